#include "scheduler/work_list.h"

#include <algorithm>

#include "common/log.h"

namespace pkv::scheduler {
namespace {

// Ranges a row of `pages` pages is cut into at task size `cap` (an empty row still runs one).
int64_t RowSplits(int32_t pages, int32_t cap) { return pages > 0 ? (pages + int64_t{cap} - 1) / cap : 1; }

bool Fits(const WorkListUsage& u, const PlanLimits& limits) {
  return (limits.max_partial_slots <= 0 || u.partials <= limits.max_partial_slots) &&
         (limits.max_tasks <= 0 || u.tasks <= limits.max_tasks);
}

int32_t LongestRow(std::span<const int32_t> row_pages) {
  int32_t longest = 1;
  for (int32_t p : row_pages) longest = std::max(longest, p);
  return longest;
}

}  // namespace

std::vector<int32_t> RowPages(const StepShape& shape) {
  const int64_t page = std::max(1, shape.model.page_size);
  std::vector<int32_t> pages(shape.row_tokens.size());
  for (size_t r = 0; r < pages.size(); ++r) {
    pages[r] = static_cast<int32_t>((shape.row_tokens[r] + page - 1) / page);
  }
  return pages;
}

WorkListUsage WorkListUsageFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task) {
  const int32_t cap = std::max(1, pages_per_task);
  WorkListUsage u;
  for (int32_t p : row_pages) {
    const int64_t splits = RowSplits(p, cap);
    u.tasks += splits;
    if (splits > 1) u.partials += splits;
  }
  u.tasks *= num_kv_heads;
  return u;
}

int32_t PagesPerTaskFor(std::span<const int32_t> row_pages, int32_t num_kv_heads, int64_t target_tasks) {
  int32_t hi = LongestRow(row_pages);
  if (target_tasks <= 0 || WorkListUsageFor(row_pages, num_kv_heads, hi).tasks > target_tasks) return hi;
  // The smallest cap whose task count fits the target (the count falls as the cap grows).
  int32_t lo = 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (WorkListUsageFor(row_pages, num_kv_heads, mid).tasks <= target_tasks) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

void BuildWorkList(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task,
                   StepPlan* plan) {
  const int32_t cap = std::max(1, pages_per_task);
  const auto batch = static_cast<int32_t>(row_pages.size());
  plan->pages_per_task = cap;
  plan->cta_task_begin.clear();
  plan->balanced_ctas = 0;
  plan->row_splits.assign(batch, 0);
  plan->partial_offset.assign(batch, 0);
  plan->num_partials = 0;
  plan->tasks.clear();
  plan->tasks.reserve(WorkListUsageFor(row_pages, num_kv_heads, cap).tasks);
  // Largest task first, ties in (row, KV head, split) order. A row's balanced ranges have one or
  // two sizes (floor and ceil of pages / splits), so the order is that of the (size, row) blocks,
  // sorted once, each emitting its tasks in (head, split) order: the same list as a stable sort
  // of all tasks by size, without sorting them one by one on the step path.
  struct Block {
    int32_t pages;  // task size
    int32_t row;
  };
  std::vector<Block> blocks;
  blocks.reserve(2 * static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t pages = row_pages[b];
    const auto splits = static_cast<int32_t>(RowSplits(pages, cap));
    plan->row_splits[b] = splits;
    if (pages <= 0) {
      blocks.push_back({0, b});
      continue;
    }
    if (splits > 1) {
      plan->partial_offset[b] = plan->num_partials;
      plan->num_partials += splits;
    }
    const int32_t small = pages / splits;
    blocks.push_back({small, b});
    if (pages % splits != 0) blocks.push_back({small + 1, b});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.pages > b.pages; });
  for (const Block& blk : blocks) {
    const int32_t pages = row_pages[blk.row];
    if (pages <= 0) {
      // An empty row still owes zeros and lse = -inf: one empty task per KV head writes them.
      for (int32_t h = 0; h < num_kv_heads; ++h) plan->tasks.push_back(DecodeTask{blk.row, h, 0, 1, 0, 0});
      continue;
    }
    const int32_t splits = plan->row_splits[blk.row];
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      for (int32_t s = 0; s < splits; ++s) {
        const auto begin = static_cast<int32_t>(static_cast<int64_t>(pages) * s / splits);
        const auto end = static_cast<int32_t>(static_cast<int64_t>(pages) * (s + 1) / splits);
        if (end - begin == blk.pages) plan->tasks.push_back(DecodeTask{blk.row, h, s, splits, begin, end});
      }
    }
  }
}

namespace {

// Walks one head's rows with CTA budget `budget` (pages, each piece also costing `cost`); false
// when more than `ctas` CTAs would be needed. A CTA with less than a piece's cost and a page left
// is closed; the first piece of a CTA always takes at least one page.
bool WalkBalanced(std::span<const int32_t> row_pages, int64_t budget, int64_t cost, int32_t ctas,
                  std::vector<BalancedPiece>* out) {
  out->clear();
  int32_t cta = 0;
  int64_t left = budget;
  bool used = false;  // the current CTA holds a piece
  auto next_cta = [&] {
    ++cta;
    left = budget;
    used = false;
  };
  for (int32_t r = 0; r < static_cast<int32_t>(row_pages.size()); ++r) {
    const int32_t pages = row_pages[r];
    if (pages <= 0) {
      if (used && left < cost) next_cta();
      if (cta >= ctas) return false;
      out->push_back({r, 0, 0, cta});
      left -= cost;
      used = true;
      continue;
    }
    int32_t at = 0;
    while (at < pages) {
      if (used && left - cost < 1) {
        next_cta();
        continue;
      }
      if (cta >= ctas) return false;
      const int64_t take = std::clamp<int64_t>(left - cost, 1, pages - at);
      out->push_back({r, at, static_cast<int32_t>(at + take), cta});
      at += static_cast<int32_t>(take);
      left -= take + cost;
      used = true;
    }
  }
  return true;
}

}  // namespace

BalancedCut CutBalanced(std::span<const int32_t> row_pages, int32_t ctas_per_head, int32_t piece_cost_pages) {
  const int32_t ctas = std::max(1, ctas_per_head);
  const int64_t cost = std::max(0, piece_cost_pages);
  int64_t total = 0;
  for (int32_t p : row_pages) total += std::max(0, p);
  // One CTA taking every piece always fits; search the smallest budget that fits `ctas`.
  int64_t lo = std::max<int64_t>(1, (total + ctas - 1) / ctas), hi = total + cost * (2 * row_pages.size() + 1) + 1;
  std::vector<BalancedPiece> pieces;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (WalkBalanced(row_pages, mid, cost, ctas, &pieces)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  BalancedCut cut;
  cut.budget_pages = lo;
  PKV_CHECK(WalkBalanced(row_pages, lo, cost, ctas, &cut.pieces)) << "balanced cut: the searched budget must fit";
  std::vector<int32_t> pages, count;
  for (const BalancedPiece& piece : cut.pieces) {
    if (piece.cta >= static_cast<int32_t>(pages.size())) {
      pages.resize(piece.cta + 1, 0);
      count.resize(piece.cta + 1, 0);
    }
    pages[piece.cta] += piece.page_end - piece.page_begin;
    count[piece.cta] += 1;
  }
  cut.ctas_per_head = static_cast<int32_t>(pages.size());
  for (size_t c = 0; c < pages.size(); ++c) {
    cut.max_cta_pages = std::max(cut.max_cta_pages, pages[c]);
    cut.max_cta_pieces = std::max(cut.max_cta_pieces, count[c]);
  }
  return cut;
}

void BuildBalancedWorkList(std::span<const int32_t> row_pages, int32_t num_kv_heads, const BalancedCut& cut,
                           StepPlan* plan) {
  const auto batch = static_cast<int32_t>(row_pages.size());
  const int32_t heads = std::max(1, num_kv_heads);
  plan->row_splits.assign(batch, 0);
  plan->partial_offset.assign(batch, 0);
  plan->num_partials = 0;
  for (const BalancedPiece& piece : cut.pieces) plan->row_splits[piece.row] += 1;
  for (int32_t b = 0; b < batch; ++b) {
    if (plan->row_splits[b] > 1) {
      plan->partial_offset[b] = plan->num_partials;
      plan->num_partials += plan->row_splits[b];
    }
  }
  // Each piece's split index within its row (pieces come in row order).
  std::vector<int32_t> split_of(cut.pieces.size());
  for (size_t i = 0; i < cut.pieces.size(); ++i) {
    split_of[i] = (i > 0 && cut.pieces[i - 1].row == cut.pieces[i].row) ? split_of[i - 1] + 1 : 0;
  }
  const int32_t ctas = cut.ctas_per_head * heads;
  plan->tasks.clear();
  plan->tasks.reserve(cut.pieces.size() * heads);
  plan->cta_task_begin.assign(1, 0);
  plan->cta_task_begin.reserve(ctas + 1);
  // CTA c = j * heads + h runs head h's pieces of CTA j; pieces of one CTA are consecutive.
  size_t first = 0;
  for (int32_t j = 0; j < cut.ctas_per_head; ++j) {
    size_t last = first;
    while (last < cut.pieces.size() && cut.pieces[last].cta == j) ++last;
    for (int32_t h = 0; h < heads; ++h) {
      for (size_t i = first; i < last; ++i) {
        const BalancedPiece& piece = cut.pieces[i];
        plan->tasks.push_back(DecodeTask{piece.row, h, split_of[i], plan->row_splits[piece.row], piece.page_begin,
                                         piece.page_end});
      }
      plan->cta_task_begin.push_back(static_cast<int32_t>(plan->tasks.size()));
    }
    first = last;
  }
  plan->pages_per_task = cut.max_cta_pages;
  plan->balanced_ctas = ctas;
}

int32_t FitNumSplits(int32_t num_splits, int32_t batch, const PlanLimits& limits) {
  const int32_t most = limits.max_partial_slots > 0 ? std::max(1, limits.max_partial_slots / std::max(1, batch))
                                                    : std::max(1, num_splits);
  return std::clamp(num_splits, 1, most);
}

int32_t FitPagesPerTask(std::span<const int32_t> row_pages, int32_t num_kv_heads, int32_t pages_per_task,
                        const PlanLimits& limits) {
  const int32_t longest = LongestRow(row_pages);
  int64_t cap = std::max(1, pages_per_task);
  // The workspace and the descriptor bound how finely rows may be cut.
  while (cap < longest && !Fits(WorkListUsageFor(row_pages, num_kv_heads, static_cast<int32_t>(cap)), limits)) {
    cap *= 2;
  }
  return static_cast<int32_t>(cap);
}

}  // namespace pkv::scheduler
