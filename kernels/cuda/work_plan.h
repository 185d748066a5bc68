// kernels/cuda/work_plan.h — builds the compact task list of kWorkQueue from per-row page counts.
//
// A mechanism, not a policy: the caller (scheduler/, tests, benchmarks) says how many pages a
// task may hold at most; this splits every non-empty (row, KV head) into balanced page ranges of
// at most that many pages and numbers the partial slots. A row with 0 pages gets one empty task
// per KV head (it writes zeros and lse = -inf, as the contract asks). Host only.
// Thread-safe: pure function.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/decode_types.h"

namespace pkv::kernels::cuda {

struct WorkPlan {
  std::vector<DecodeTask> tasks;        // largest first (better tail on a strided grid)
  std::vector<int32_t> row_splits;      // [B] splits per row (1 for an empty row)
  std::vector<int32_t> partial_offset;  // [B] first partial slot (rows with > 1 split)
  int32_t num_partials = 0;             // partial slots used
};

// `max_pages_per_task` >= 1.
WorkPlan BuildWorkPlan(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t max_pages_per_task);

// The smallest pages-per-task cap whose plan has at most `target_tasks` tasks (so a grid of
// `target_tasks` CTAs runs the plan in one balanced wave); the longest row's pages when even one
// task per (row, KV head) exceeds the target.
int32_t PagesPerTaskFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int64_t target_tasks);

}  // namespace pkv::kernels::cuda
