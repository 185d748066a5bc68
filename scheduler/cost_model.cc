#include "scheduler/cost_model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "scheduler/work_list.h"

namespace pkv::scheduler {
namespace {

int64_t PagesOfRow(const StepShape& s, size_t row) {
  return (s.row_tokens[row] + s.model.page_size - 1) / s.model.page_size;
}

// Bytes of K and V of one page of one KV head.
int64_t PageHeadBytes(const StepShape& s) {
  return 2LL * s.model.page_size * s.model.head_dim * static_cast<int64_t>(DTypeSize(s.model.dtype));
}

// Partial states a split row writes and the merge reads back: per query head and split,
// acc[d] + m + l in fp32.
int64_t MergeBytes(const StepShape& s, int64_t split_partials) {
  return 2LL * split_partials * s.model.group_size() * (s.model.head_dim + 2) * 4;
}

}  // namespace

int64_t CostModel::KvBytes(const StepShape& shape) {
  int64_t pages = 0;
  for (size_t r = 0; r < shape.row_tokens.size(); ++r) pages += PagesOfRow(shape, r);
  return pages * shape.model.num_kv_heads * PageHeadBytes(shape);
}

double CostModel::UnitsUs(std::vector<UnitGroup> groups, double efficiency) const {
  // Water-filling: all units start together and share the device's read bandwidth β; a unit
  // alone reads at most β_cta, and at most `concurrency` units read at once. Equal units finish
  // together, so walking the groups from the smallest unit up, the time to the next finish is the
  // bytes each active unit still lacks over the rate each gets while that many are active. With
  // equal units this is max(Σ bytes / β, unit bytes / β_cta); with a few long units it adds the
  // tail in which they read alone, which max(...) left out.
  const int64_t concurrency = static_cast<int64_t>(profile_.num_sms) * profile_.resident_ctas_per_sm;
  const double beta = profile_.stream_read_gbps * efficiency * 1e3;  // bytes per us
  const double beta_cta = profile_.cta_read_gbps * 1e3;
  std::sort(groups.begin(), groups.end(), [](const UnitGroup& a, const UnitGroup& b) { return a.bytes < b.bytes; });
  int64_t active = 0;
  for (const UnitGroup& g : groups) active += g.count;
  const int64_t units = active;
  double us = 0.0, progress = 0.0;  // bytes every still-active unit has read
  for (const UnitGroup& g : groups) {
    if (g.count <= 0) continue;
    const double aggregate = std::min(beta_cta * static_cast<double>(std::min(active, concurrency)), beta);
    const double rate = aggregate / static_cast<double>(active);
    us += (static_cast<double>(g.bytes) - progress) / rate;
    progress = static_cast<double>(g.bytes);
    active -= g.count;
  }
  const int64_t waves = units == 0 ? 0 : (units + concurrency - 1) / concurrency;
  return us + static_cast<double>(waves) * profile_.task_us;
}

ArmCost CostModel::PerRequest(const StepShape& s) const {
  ArmCost c;
  c.kernel = KernelId::kPerRequest;
  c.launches = 1;
  c.kv_bytes = KvBytes(s);
  std::vector<UnitGroup> groups;
  for (size_t r = 0; r < s.row_tokens.size(); ++r) groups.push_back({PagesOfRow(s, r) * PageHeadBytes(s), s.model.num_kv_heads});
  c.units = static_cast<int64_t>(s.row_tokens.size()) * s.model.num_kv_heads;
  c.us = UnitsUs(std::move(groups)) + profile_.launch_us;
  return c;
}

ArmCost CostModel::SequenceSplit(const StepShape& s, int32_t num_splits) const {
  ArmCost c;
  c.kernel = KernelId::kSequenceSplit;
  c.num_splits = std::max(1, num_splits);
  c.launches = 1;  // the merge fused; two with a separate merge (below)
  c.kv_bytes = KvBytes(s);
  // Every (row, KV head, split) is a CTA, empty splits included (they exit early): a row of p
  // pages is cut into ranges of ceil(p / S) pages, the last one shorter.
  std::vector<UnitGroup> groups;
  const int64_t heads = s.model.num_kv_heads;
  for (size_t r = 0; r < s.row_tokens.size(); ++r) {
    const int64_t pages = PagesOfRow(s, r);
    const int64_t per = (pages + c.num_splits - 1) / c.num_splits;
    if (per == 0) {
      groups.push_back({0, heads * c.num_splits});
      continue;
    }
    const int64_t full = pages / per, rest = pages - full * per;
    groups.push_back({per * PageHeadBytes(s), heads * full});
    groups.push_back({rest * PageHeadBytes(s), heads * (c.num_splits - full)});
  }
  c.units = static_cast<int64_t>(s.row_tokens.size()) * s.model.num_kv_heads * c.num_splits;
  c.merge_bytes = c.num_splits > 1 ? MergeBytes(s, c.units) : 0;
  // A split step is priced as two launches (launch_us was calibrated as a split step's extra over
  // an unsplit one: its launch and its fused merge's tail).
  c.us = UnitsUs(std::move(groups), c.num_splits > 1 ? profile_.split_stream_efficiency : 1.0) +
         (c.num_splits > 1 ? 2 : 1) * profile_.launch_us +
         static_cast<double>(c.merge_bytes) / (profile_.merge_gbps * 1e3);
  if (c.num_splits > 1) {
    // The merge as a launch of its own: the calibrated difference (pinned without one: no change).
    const bool separate = separate_merge_.has_value() ? *separate_merge_ : profile_.ss_separate_merge_delta_us < 0;
    c.separate_merge = separate;
    c.launches = separate ? 2 : 1;
    if (separate) c.us += profile_.ss_separate_merge_delta_us;
  }
  return c;
}

ArmCost CostModel::WorkQueue(const StepShape& s, int32_t pages_per_task) const {
  ArmCost c;
  c.kernel = KernelId::kWorkQueue;
  c.pages_per_task = std::max(1, pages_per_task);
  c.launches = 1;  // AddMerge: 2 with a separate merge
  c.kv_bytes = KvBytes(s);
  // A row of p pages is cut into ceil(p / pages_per_task) balanced ranges (their sizes differ by
  // at most a page), per KV head.
  int64_t split_partials = 0;
  std::vector<UnitGroup> groups;
  const int64_t heads = s.model.num_kv_heads;
  for (size_t r = 0; r < s.row_tokens.size(); ++r) {
    const int64_t pages = PagesOfRow(s, r);
    if (pages == 0) continue;
    const int64_t tasks = (pages + c.pages_per_task - 1) / c.pages_per_task;
    const int64_t small = pages / tasks, larger = pages % tasks;  // `larger` ranges of small + 1 pages
    groups.push_back({(small + 1) * PageHeadBytes(s), heads * larger});
    groups.push_back({small * PageHeadBytes(s), heads * (tasks - larger)});
    c.units += tasks * heads;
    if (tasks > 1) split_partials += tasks * heads;
  }
  c.merge_bytes = MergeBytes(s, split_partials);
  c.us = UnitsUs(std::move(groups)) + profile_.launch_us +
         static_cast<double>(c.merge_bytes) / (profile_.merge_gbps * 1e3);
  AddMerge(split_partials > 0, &c);
  return c;
}

void CostModel::AddMerge(bool rows_split, ArmCost* c) const {
  c->separate_merge = false;
  if (!rows_split) return;
  // A pinned separate merge without a measured price is priced as one more launch.
  const double separate_us = profile_.wq_separate_merge_us > 0 ? profile_.wq_separate_merge_us : profile_.launch_us;
  const bool separate = separate_merge_.has_value()
                            ? *separate_merge_
                            : profile_.wq_separate_merge_us > 0 && profile_.wq_separate_merge_us < profile_.wq_merge_us;
  c->separate_merge = separate;
  c->launches = separate ? 2 : 1;
  c->us += separate ? separate_us : profile_.wq_merge_us;
}

int32_t CostModel::PieceCostPages(const StepShape& s) const {
  const double concurrency = std::max(1.0, static_cast<double>(profile_.num_sms) * profile_.resident_ctas_per_sm);
  const double share = profile_.stream_read_gbps * 1e3 / concurrency;  // bytes per us per CTA
  return std::max(1, static_cast<int32_t>(std::lround(profile_.task_us * share / PageHeadBytes(s))));
}

ArmCost CostModel::BalancedWorkQueue(const StepShape& s, int32_t ctas) const {
  ArmCost c;
  c.kernel = KernelId::kWorkQueue;
  c.launches = 1;
  c.kv_bytes = KvBytes(s);
  const int32_t heads = std::max(1, s.model.num_kv_heads);
  c.piece_cost_pages = PieceCostPages(s);
  c.cut = CutBalanced(RowPages(s), std::max(1, ctas / heads), c.piece_cost_pages);
  const BalancedCut& cut = c.cut;
  c.balanced_ctas = cut.ctas_per_head * heads;
  c.pages_per_task = cut.max_cta_pages;
  c.units = c.balanced_ctas;
  int64_t split_partials = 0;
  std::vector<int32_t> pieces(s.row_tokens.size(), 0);
  for (const BalancedPiece& piece : cut.pieces) pieces[piece.row] += 1;
  for (int32_t n : pieces) {
    if (n > 1) c.partial_slots += n;
  }
  split_partials = c.partial_slots * heads;
  c.tasks = static_cast<int64_t>(cut.pieces.size()) * heads;
  c.merge_bytes = MergeBytes(s, split_partials);
  // Every CTA's load is the budget: its pages plus a task's cost per piece; the first piece's
  // cost is the per-unit cost UnitsUs adds.
  const int64_t unit_pages = std::max<int64_t>(0, cut.budget_pages - c.piece_cost_pages);
  c.us = UnitsUs({UnitGroup{unit_pages * PageHeadBytes(s), c.balanced_ctas}}) + profile_.launch_us +
         static_cast<double>(c.merge_bytes) / (profile_.merge_gbps * 1e3);
  AddMerge(split_partials > 0, &c);
  return c;
}

ArmCost CostModel::BestOf(KernelId kernel, const StepShape& s) const {
  switch (kernel) {
    case KernelId::kSequenceSplit: {
      const auto batch = static_cast<int32_t>(s.row_tokens.size());
      ArmCost best = SequenceSplit(s, 1);
      for (int32_t splits = 2; splits <= 128; splits *= 2) {
        ArmCost c = SequenceSplit(s, FitNumSplits(splits, batch, s.device.limits));
        if (c.us < best.us) best = c;
      }
      return best;
    }
    case KernelId::kWorkQueue: {
      const int64_t concurrency = static_cast<int64_t>(profile_.num_sms) * profile_.resident_ctas_per_sm;
      const std::vector<int32_t> row_pages = RowPages(s);
      const int32_t heads = s.model.num_kv_heads;
      ArmCost best;
      best.us = std::numeric_limits<double>::infinity();
      // At least one full wave of the persistent grid: fewer tasks than resident CTAs leave SMs
      // without a second CTA, and the model's per-CTA read rate (a lone CTA's) overstates what
      // each of them gets then. On the H200, plans of half a wave (128 tasks on 264 CTAs) were
      // 3-12% slower than one wave on every mixed B8, B4 and long B1 step where the model chose
      // them (bench/results/h200-kernels-ac2f2c6/).
      // One wave is balanced: one CTA per resident slot, every CTA the same pages. Strided lists
      // of more waves are the fallback (and the form a pinned task size runs).
      {
        ArmCost c = BalancedWorkQueue(s, static_cast<int32_t>(concurrency));
        const PlanLimits& limits = s.device.limits;
        if ((limits.max_partial_slots <= 0 || c.partial_slots <= limits.max_partial_slots) &&
            (limits.max_tasks <= 0 || c.tasks <= limits.max_tasks)) {
          best = c;
        }
      }
      for (int64_t target : {2 * concurrency, 4 * concurrency}) {
        const int32_t per_task = PagesPerTaskFor(row_pages, heads, target);
        ArmCost c = WorkQueue(s, FitPagesPerTask(row_pages, heads, per_task, s.device.limits));
        if (c.us < best.us) best = c;
      }
      return best;
    }
    default:
      return PerRequest(s);
  }
}

}  // namespace pkv::scheduler
