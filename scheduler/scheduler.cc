#include "scheduler/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "scheduler/work_list.h"

namespace pkv::scheduler {

absl::StatusOr<Scheduler> Scheduler::Create(const Options& options) {
  if (options.available.empty()) return absl::InvalidArgumentError("scheduler needs at least one kernel");
  if (options.fixed_kernel.has_value() &&
      std::find(options.available.begin(), options.available.end(), *options.fixed_kernel) ==
          options.available.end()) {
    return absl::InvalidArgumentError(absl::StrCat("kernel ", KernelName(*options.fixed_kernel),
                                                   " is not available on this backend"));
  }
  return Scheduler(options);
}

StepPlan Scheduler::Plan(const StepShape& shape) const {
  StepPlan plan;
  const std::vector<KernelId> candidates = options_.fixed_kernel.has_value()
                                               ? std::vector<KernelId>(1, *options_.fixed_kernel)
                                               : options_.available;
  const std::vector<int32_t> row_pages = RowPages(shape);
  const int32_t heads = shape.model.num_kv_heads;
  const PlanLimits& limits = shape.device.limits;
  bool have = false;
  ArmCost best;
  for (KernelId k : candidates) {
    if (k == KernelId::kReference || k == KernelId::kFlashInfer) continue;  // not modelled
    ArmCost c = model_.BestOf(k, shape);  // already fitted to `limits`
    if (options_.fixed_kernel.has_value() && options_.fixed_parameter > 0) {
      // A pinned parameter is fitted too: the plan must be one the backend runs as it stands.
      if (k == KernelId::kSequenceSplit) {
        c = model_.SequenceSplit(
            shape, FitNumSplits(options_.fixed_parameter, static_cast<int32_t>(row_pages.size()), limits));
      }
      if (k == KernelId::kWorkQueue) {
        c = model_.WorkQueue(shape, FitPagesPerTask(row_pages, heads, options_.fixed_parameter, limits));
      }
    }
    if (!have || c.us < best.us || (c.us == best.us && c.launches < best.launches)) {
      best = c;
      have = true;
    }
  }
  if (!have) {  // the CPU reference (or an unmodelled fixed route)
    plan.kernel = candidates.front();
    return plan;
  }
  plan.kernel = best.kernel;
  plan.num_splits = best.num_splits;
  plan.pages_per_task = best.pages_per_task;
  if (plan.kernel == KernelId::kWorkQueue) {
    if (best.balanced_ctas > 0) {
      BuildBalancedWorkList(row_pages, heads, best.cut, &plan);  // the cut the model priced
    } else {
      BuildWorkList(row_pages, heads, best.pages_per_task, &plan);
    }
  }
  plan.separate_merge =
      (plan.kernel == KernelId::kWorkQueue || plan.kernel == KernelId::kSequenceSplit) && best.separate_merge;
  plan.launches_per_layer = best.launches;
  plan.predicted_us = best.us;
  return plan;
}

}  // namespace pkv::scheduler
