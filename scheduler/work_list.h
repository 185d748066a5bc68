// scheduler/work_list.h — how a token step's rows are cut into work, and the fit of that cut to
// the backend's capacity.
//
// The work queue (kWorkQueue) runs a compact list of tasks: every non-empty (row, KV head) is cut
// into balanced page ranges of at most `pages_per_task` pages, and every row cut into more than
// one range gets partial slots that the fused merge reads back. PagesPerTaskFor picks the task
// size for a task-count target, BuildWorkList builds the list for a task size (it fills a
// StepPlan's row_splits, partial_offset, num_partials and tasks), WorkListUsageFor counts what
// that list needs without building it. FitNumSplits and FitPagesPerTask are the capacity rules:
// a uniform split count is clamped to the partial slots per row, and a task size is doubled until
// the list fits the partial slots and the descriptor's tasks (PlanLimits).
// Host only, no CUDA. Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/decode_types.h"
#include "scheduler/step_plan.h"

namespace pkv::scheduler {

// Pages of every row of `shape` (ceil(tokens / page size)), as the engine's page table holds them.
std::vector<int32_t> RowPages(const StepShape& shape);

// What the work list of one task size needs from the backend.
struct WorkListUsage {
  int64_t tasks = 0;     // descriptor entries: one per (range, KV head), one per KV head of an empty row
  int64_t partials = 0;  // partial slots: the ranges of every row cut into more than one
};

// The usage of BuildWorkList(row_pages, num_kv_heads, pages_per_task), without building it.
// `pages_per_task` < 1 counts as 1.
WorkListUsage WorkListUsageFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task);

// The smallest task size (pages per task) whose work list has at most `target_tasks` tasks, so a
// grid of `target_tasks` CTAs runs it in one balanced wave; the longest row's pages (at least 1)
// when even one task per (row, KV head) exceeds the target or the target is < 1.
int32_t PagesPerTaskFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int64_t target_tasks);

// kWorkQueue's work list for task size `pages_per_task` (< 1 counts as 1) into `plan`'s
// row_splits, partial_offset, num_partials and tasks (replacing them): each non-empty row is cut
// into ceil(pages / pages_per_task) balanced page ranges per KV head; a row with 0 pages gets one
// empty task per KV head (it writes zeros and lse = -inf, as the kernel contract asks); rows cut
// into more than one range take consecutive partial slots; tasks are sorted largest first (a
// better tail on a strided persistent grid). Sets plan.pages_per_task.
void BuildWorkList(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task,
                   StepPlan* plan);

// A balanced cut of every KV head's rows over `ctas_per_head` CTAs (BalancedCut): the rows of a
// head are laid end to end and cut into consecutive pieces, each CTA taking the next pieces up to
// a budget of `budget_pages`, where each piece also costs `piece_cost_pages` (the fixed cost of
// starting a task, in pages of reading). A CTA may end one row and begin the next; a row is cut
// at the same pages for every KV head. A row with 0 pages is one empty piece.
struct BalancedPiece {
  int32_t row = 0;
  int32_t page_begin = 0;
  int32_t page_end = 0;
  int32_t cta = 0;  // of this head's CTAs, 0-based
};
struct BalancedCut {
  int64_t budget_pages = 0;       // the smallest budget whose walk fits the CTAs
  int32_t ctas_per_head = 0;      // CTAs the cut uses per KV head (<= the ones offered)
  int32_t max_cta_pages = 0;      // most pages one CTA reads
  int32_t max_cta_pieces = 0;     // most pieces (tasks) one CTA runs
  std::vector<BalancedPiece> pieces;  // one head's pieces, in row order
};
// The balanced cut with the smallest budget that fits `ctas_per_head` (>= 1) CTAs per KV head.
BalancedCut CutBalanced(std::span<const int32_t> row_pages, int32_t ctas_per_head, int32_t piece_cost_pages);

// kWorkQueue's balanced work list into `plan` (replacing row_splits, partial_offset,
// num_partials, tasks and cta_task_begin): `cut` (CutBalanced of these rows) repeated for every
// KV head, CTA (piece.cta * num_kv_heads + head) running its pieces of that head in row order as
// the contiguous task range [cta_task_begin[c], cta_task_begin[c + 1]). A row cut into n > 1
// pieces takes n consecutive partial slots (split i = its i-th piece). Sets plan.pages_per_task
// to the cut's largest CTA load and plan.balanced_ctas to the CTA count.
void BuildBalancedWorkList(std::span<const int32_t> row_pages, int32_t num_kv_heads, const BalancedCut& cut,
                           StepPlan* plan);

// kSequenceSplit's split count for `batch` rows: `num_splits` clamped to [1, max_partial_slots /
// batch] (at least 1; a single split uses no partial slots). Unbounded when max_partial_slots is 0.
int32_t FitNumSplits(int32_t num_splits, int32_t batch, const PlanLimits& limits);

// kWorkQueue's task size: `pages_per_task` (< 1 counts as 1), doubled until its work list fits
// `limits` (partial slots and tasks). Doubling stops once no row is cut (the task size reaches the
// longest row): that list needs no partial slots and the fewest tasks, one per (row, KV head); if
// even those exceed max_tasks the backend refuses the step.
int32_t FitPagesPerTask(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task,
                        const PlanLimits& limits);

}  // namespace pkv::scheduler
