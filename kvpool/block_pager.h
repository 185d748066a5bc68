// kvpool/block_pager.h — maps each sequence's logical token history to physical KV pages.
//
// The pager owns the free list, one page table per sequence and a refcount per page (a page may
// be shared by several sequences after Fork, the hook for prefix sharing). Every mutating call is
// all-or-nothing: it either succeeds or returns an error and changes nothing, so accounting stays
// exact through every error path (CheckConsistency verifies it). The free list can be scattered
// with a seed so that no caller can rely on contiguous pages.
// Thread-safety: not synchronised; the engine calls it under its own lock.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvpool/kv_arena.h"

namespace pkv::kvpool {

using SeqId = uint64_t;

// One sequence's history: pages in logical order and the number of tokens they hold.
struct SequencePages {
  std::vector<PageId> pages;
  int64_t num_tokens = 0;
  // Pages held from creation whatever the length (a static reservation); 0 for paged growth.
  int64_t capacity_pages = 0;
};

// A physical copy the caller must perform (copy-on-write of a shared partial page on Fork).
struct PageCopy {
  PageId src;
  PageId dst;
};

struct PagerStats {
  int64_t total_pages = 0;
  int64_t free_pages = 0;
  int64_t used_pages = 0;       // pages with refcount > 0
  int64_t num_sequences = 0;
  int64_t reserved_tokens = 0;  // sum over sequences of pages * page_size
  int64_t used_tokens = 0;      // sum over sequences of num_tokens
};

class BlockPager {
 public:
  struct Options {
    int64_t num_pages = 0;
    int32_t page_size = 16;
    // 0: pages are handed out in ascending order. Otherwise the initial free list is a seeded
    // random permutation (tests and benchmarks use this so nothing relies on contiguity).
    uint64_t scatter_seed = 0;
  };

  explicit BlockPager(const Options& options);

  // Pages needed to hold `tokens` tokens.
  // Overflow-free for every tokens >= 0 (INT64_MAX included).
  int64_t PagesForTokens(int64_t tokens) const {
    return tokens / page_size_ + (tokens % page_size_ != 0 ? 1 : 0);
  }
  // New pages `seq` needs to grow by `tokens` (NOT_FOUND for an unknown sequence).
  absl::StatusOr<int64_t> PagesToAppend(SeqId seq, int64_t tokens) const;
  // Pages that would return to the free list if all of `seqs` were released (each id once).
  int64_t PagesReleasedBy(std::span<const SeqId> seqs) const;

  // Creates `seq` with room for `num_tokens` tokens. With `capacity_tokens` > 0 it holds pages for
  // that many tokens from the start (what a fixed-shape engine without a pager reserves per slot;
  // the static baseline), growing only past it. ALREADY_EXISTS, RESOURCE_EXHAUSTED.
  [[nodiscard]] absl::Status Create(SeqId seq, int64_t num_tokens, int64_t capacity_tokens = 0);
  // Grows `seq` by `tokens`, allocating pages as needed. NOT_FOUND, RESOURCE_EXHAUSTED.
  // A shared (refcount > 1) partial last page is replaced by a private copy; the copy to make is
  // appended to `copies` (may be null only when no page is shared).
  [[nodiscard]] absl::Status Append(SeqId seq, int64_t tokens, std::vector<PageCopy>* copies = nullptr);
  // Shrinks `seq` to its first `num_tokens` tokens, dropping pages past them (undoes an Append).
  // NOT_FOUND, INVALID_ARGUMENT when num_tokens is negative or larger than the sequence.
  [[nodiscard]] absl::Status Truncate(SeqId seq, int64_t num_tokens);
  // Drops `seq` and its page references. NOT_FOUND.
  [[nodiscard]] absl::Status Release(SeqId seq);
  // Creates `dst` sharing every page of `src` (refcounts + 1). NOT_FOUND, ALREADY_EXISTS.
  [[nodiscard]] absl::Status Fork(SeqId src, SeqId dst);

  // Null when unknown.
  const SequencePages* Find(SeqId seq) const;
  bool Contains(SeqId seq) const { return seqs_.contains(seq); }
  // The slot of token `token` (< num_tokens) of a known sequence.
  SlotAddr Locate(const SequencePages& seq, int64_t token) const {
    return SlotAddr{seq.pages[token / page_size_], static_cast<int32_t>(token % page_size_)};
  }

  int32_t page_size() const { return page_size_; }
  int64_t total_pages() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int32_t refcount(PageId page) const { return refcount_[page]; }
  PagerStats Stats() const;

  // Verifies free list + refcounts + page tables agree (tests; O(pages + table entries)).
  absl::Status CheckConsistency() const;

 private:
  PageId Take();
  void Drop(PageId page);
  // Pages a sequence of `num_tokens` tokens holds.
  int64_t PagesHeld(int64_t num_tokens, int64_t capacity_pages) const {
    return std::max(PagesForTokens(num_tokens), capacity_pages);
  }
  // The partially filled page that receives the next token, or -1 when the next token opens a
  // new page.
  PageId PartialPage(const SequencePages& s) const {
    return s.num_tokens % page_size_ == 0 ? -1 : s.pages[s.num_tokens / page_size_];
  }

  int32_t page_size_;
  std::vector<PageId> free_;       // stack: back() is handed out next
  std::vector<int32_t> refcount_;  // per physical page
  absl::flat_hash_map<SeqId, SequencePages> seqs_;
  int64_t reserved_tokens_ = 0;
  int64_t used_tokens_ = 0;
};

}  // namespace pkv::kvpool
