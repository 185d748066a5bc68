#include "scheduler/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

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
  (void)shape;
  StepPlan plan;
  plan.kernel = options_.fixed_kernel.value_or(options_.available.front());
  return plan;
}

}  // namespace pkv::scheduler
