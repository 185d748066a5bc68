// scheduler/cost_model.h — a roofline-style cost model of each decode-attention route.
//
// A route runs a set of work units (CTAs or tasks), each streaming some KV bytes. With the
// calibrated constants of a CostProfile, one layer of a step is predicted to take
//   streaming time of the units sharing β     all start together; each active unit gets
//                                             min(β_cta · min(active, SMs × resident), β) / active,
//                                             so equal units take max(Σ bytes / β, unit bytes / β_cta)
//                                             and a few long units add the tail they read alone in
//   + ceil(units / (SMs × resident)) × task_us  per-unit fixed costs, per wave
//   + launches × λ                              kernel launches
//   + merge bytes / β_merge                     split partials written and read back
// with two calibrated corrections: a uniform split streams at `split_stream_efficiency` × β when
// S > 1 (ragged rows give unequal units), and the work queue's merge adds, when some row is
// split, `wq_merge_us` fused (the last task of the row merges after all others) or
// `wq_separate_merge_us` as a launch of its own, whichever is cheaper (fused when the profile has
// no separate price, or as pinned by the caller).
// Sequence-split's merge is fused too (one launch; priced as two launches, as calibrated) unless
// the profile's `ss_separate_merge_delta_us` (a launch of its own minus fused) is negative.
// Routes differ in their units: per-request has one per (row, KV head); sequence-split cuts every
// row into S equal page ranges (uniform S; one launch, two with a separate merge); the work queue
// cuts rows into tasks of at most `pages_per_task` pages (only non-empty tasks; one launch, two
// with a separate merge), or, in its balanced form, gives every CTA the same pages (a CTA may end
// one row and start the next).
// Thread-safety: const methods, safe to share.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "scheduler/cost_profile.h"
#include "scheduler/step_plan.h"
#include "scheduler/work_list.h"

namespace pkv::scheduler {

// One route with its parameter and predicted cost per layer.
struct ArmCost {
  KernelId kernel = KernelId::kPerRequest;
  int32_t num_splits = 1;      // kSequenceSplit
  int32_t pages_per_task = 0;  // kWorkQueue (balanced: the largest CTA's pages)
  int32_t balanced_ctas = 0;   // kWorkQueue balanced over this many CTAs (0: a strided task list)
  int32_t piece_cost_pages = 0;  // kWorkQueue balanced: the fixed cost of a task, in pages
  int64_t units = 0;           // CTAs or tasks
  int64_t tasks = 0;           // kWorkQueue balanced: descriptor entries of its work list
  int64_t partial_slots = 0;   // kWorkQueue balanced: partial slots of its work list
  BalancedCut cut;             // kWorkQueue balanced: the cut priced (the plan builds its list from it)
  int32_t launches = 1;
  bool separate_merge = false;  // kWorkQueue, kSequenceSplit: split rows merged by a launch of their own
  int64_t kv_bytes = 0;
  int64_t merge_bytes = 0;
  double us = 0.0;
};

class CostModel {
 public:
  // `separate_merge` pins the split routes' merge (true: a launch of its own, false: fused);
  // unset, the cheaper of the two by the profile.
  explicit CostModel(CostProfile profile, std::optional<bool> separate_merge = std::nullopt)
      : profile_(std::move(profile)), separate_merge_(separate_merge) {}

  // KV bytes one layer of the step reads (each K,V byte once).
  static int64_t KvBytes(const StepShape& shape);

  ArmCost PerRequest(const StepShape& shape) const;
  ArmCost SequenceSplit(const StepShape& shape, int32_t num_splits) const;
  ArmCost WorkQueue(const StepShape& shape, int32_t pages_per_task) const;
  // The work queue balanced over `ctas` CTAs (scheduler/work_list.h's CutBalanced with
  // PieceCostPages): every CTA streams about the same pages, a task's start priced in pages.
  ArmCost BalancedWorkQueue(const StepShape& shape, int32_t ctas) const;
  // task_us in pages of one KV head that a CTA streams at its share of β meanwhile (>= 1).
  int32_t PieceCostPages(const StepShape& shape) const;

  // The cheapest parameter of one route (splits in {2..128}; for the work queue one balanced
  // wave over the device's concurrency, or strided task lists of two and four waves,
  // scheduler/work_list.h's PagesPerTaskFor), each first fitted to the step's capacity
  // (shape.device.limits: FitNumSplits, FitPagesPerTask), or the route's only form for
  // per-request.
  ArmCost BestOf(KernelId kernel, const StepShape& shape) const;

  const CostProfile& profile() const { return profile_; }

 private:
  // `count` units of `bytes` each.
  struct UnitGroup {
    int64_t bytes = 0;
    int64_t count = 0;
  };
  // Streaming time of the units of `groups` sharing `efficiency` times the streaming bandwidth,
  // plus their per-wave fixed costs (see the header comment).
  double UnitsUs(std::vector<UnitGroup> groups, double efficiency = 1.0) const;
  // The work queue's merge: adds its cost to `c` (priced without it) when rows are split, fused or
  // separate (the pinned form, else the cheaper).
  void AddMerge(bool rows_split, ArmCost* c) const;

  CostProfile profile_;
  std::optional<bool> separate_merge_;
};

}  // namespace pkv::scheduler
