#include "kernels/cuda/work_plan.h"

#include <algorithm>

namespace pkv::kernels::cuda {

WorkPlan BuildWorkPlan(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t max_pages_per_task) {
  const int32_t cap = std::max<int32_t>(1, max_pages_per_task);
  WorkPlan plan;
  const auto batch = static_cast<int32_t>(row_pages.size());
  plan.row_splits.assign(batch, 0);
  plan.partial_offset.assign(batch, 0);
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t pages = row_pages[b];
    if (pages <= 0) {
      // An empty row still owes zeros and lse = -inf: one empty task per KV head writes them.
      plan.row_splits[b] = 1;
      for (int32_t h = 0; h < num_kv_heads; ++h) plan.tasks.push_back(DecodeTask{b, h, 0, 1, 0, 0});
      continue;
    }
    const int32_t splits = (pages + cap - 1) / cap;
    plan.row_splits[b] = splits;
    if (splits > 1) {
      plan.partial_offset[b] = plan.num_partials;
      plan.num_partials += splits;
    }
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      for (int32_t s = 0; s < splits; ++s) {
        const int32_t begin = static_cast<int32_t>(static_cast<int64_t>(pages) * s / splits);
        const int32_t end = static_cast<int32_t>(static_cast<int64_t>(pages) * (s + 1) / splits);
        plan.tasks.push_back(DecodeTask{b, h, s, splits, begin, end});
      }
    }
  }
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(), [](const DecodeTask& a, const DecodeTask& b) {
    return a.page_end - a.page_begin > b.page_end - b.page_begin;
  });
  return plan;
}

namespace {

int64_t TaskCount(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t cap) {
  int64_t tasks = 0;
  for (int32_t p : row_pages) tasks += p > 0 ? (p + cap - 1) / cap : 1;
  return tasks * num_kv_heads;
}

}  // namespace

int32_t PagesPerTaskFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int64_t target_tasks) {
  int32_t hi = 1;
  for (int32_t p : row_pages) hi = std::max(hi, p);
  // The smallest cap whose task count fits the target (task count falls as the cap grows).
  if (target_tasks <= 0 || TaskCount(row_pages, num_kv_heads, hi) > target_tasks) return hi;
  int32_t lo = 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (TaskCount(row_pages, num_kv_heads, mid) <= target_tasks) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

}  // namespace pkv::kernels::cuda
