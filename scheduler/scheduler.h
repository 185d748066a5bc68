// scheduler/scheduler.h — per-step choice of the decode-attention route.
//
// Plan(shape) maps a token step's StepShape to a StepPlan: among the routes the backend offers it
// takes the one the calibrated CostModel predicts fastest (ties go to fewer launches), with that
// route's best split count or task size, fitted to the backend's capacity (shape.device.limits,
// scheduler/work_list.h), and for the work queue the compact task list. The plan is final: the
// backend runs it as it stands. The CPU reference is the only route on the CPU backend.
// The choice is deterministic: the same shape and options always give the same plan. A fixed arm (Options::fixed_kernel) bypasses the
// policy for comparisons and debugging. Thread-safety: Plan is const and may run concurrently.
#pragma once

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "scheduler/cost_model.h"
#include "scheduler/step_plan.h"

namespace pkv::scheduler {

class Scheduler {
 public:
  struct Options {
    // Routes the backend can execute; Plan only returns one of these.
    std::vector<KernelId> available = {KernelId::kReference};
    // When set, every step uses this route (it must be available).
    std::optional<KernelId> fixed_kernel;
    // With a fixed kernel, pin its parameter too (0: the cost model picks): the split count of
    // kSequenceSplit or the task size (pages) of kWorkQueue, still fitted to the step's limits
    // (clamped or coarsened when the backend cannot hold it). For calibration and debugging.
    int32_t fixed_parameter = 0;
    // Calibrated constants (DefaultCostProfile() when no profile was loaded).
    CostProfile profile = DefaultCostProfile();
    // When set, pins the split routes' merge of split rows (the work queue's and sequence-split's):
    // true a launch of its own, false fused (unset: the cost model's cheaper form). For
    // calibration and tests.
    std::optional<bool> separate_merge;
  };

  // INVALID_ARGUMENT when `available` is empty or the fixed kernel is not available.
  static absl::StatusOr<Scheduler> Create(const Options& options);

  // The plan for one token step; it fits shape.device.limits (but a step whose rows alone, one
  // task per (row, KV head), exceed max_tasks cannot fit: the backend refuses it).
  StepPlan Plan(const StepShape& shape) const;

  const Options& options() const { return options_; }
  const CostModel& cost_model() const { return model_; }

 private:
  explicit Scheduler(Options options)
      : options_(std::move(options)), model_(options_.profile, options_.separate_merge) {}
  Options options_;
  CostModel model_;
};

}  // namespace pkv::scheduler
