#include "kvpool/block_pager.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace pkv::kvpool {

BlockPager::BlockPager(const Options& options)
    : page_size_(options.page_size), refcount_(options.num_pages, 0) {
  PKV_CHECK(options.page_size > 0 && options.num_pages >= 0) << "bad pager options";
  free_.resize(options.num_pages);
  // Stack order: the lowest id is handed out first unless scattered.
  std::iota(free_.rbegin(), free_.rend(), 0);
  if (options.scatter_seed != 0) {
    std::mt19937_64 rng(options.scatter_seed);
    std::shuffle(free_.begin(), free_.end(), rng);
  }
}

absl::StatusOr<int64_t> BlockPager::PagesToAppend(SeqId seq, int64_t tokens) const {
  const SequencePages* s = Find(seq);
  if (s == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", seq, " not found"));
  int64_t need = std::max<int64_t>(
      PagesForTokens(s->num_tokens + tokens) - static_cast<int64_t>(s->pages.size()), 0);
  // A shared partial page that receives tokens must be copied to a private page first.
  const PageId partial = PartialPage(*s);
  if (tokens > 0 && partial >= 0 && refcount_[partial] > 1) ++need;
  return need;
}

int64_t BlockPager::PagesReleasedBy(std::span<const SeqId> seqs) const {
  absl::flat_hash_map<PageId, int32_t> drops;
  for (SeqId id : seqs) {
    const SequencePages* s = Find(id);
    if (s == nullptr) continue;
    for (PageId p : s->pages) ++drops[p];
  }
  int64_t released = 0;
  for (const auto& [page, n] : drops) released += (refcount_[page] == n) ? 1 : 0;
  return released;
}

PageId BlockPager::Take() {
  // Invariant: callers checked free_pages() first.
  PKV_CHECK(!free_.empty()) << "free list empty after a successful capacity check";
  const PageId p = free_.back();
  free_.pop_back();
  refcount_[p] = 1;
  return p;
}

void BlockPager::Drop(PageId page) {
  PKV_CHECK(refcount_[page] > 0) << "page " << page << " dropped below zero references";
  if (--refcount_[page] == 0) free_.push_back(page);
}

absl::Status BlockPager::Create(SeqId seq, int64_t num_tokens, int64_t capacity_tokens) {
  if (num_tokens < 0 || capacity_tokens < 0) return absl::InvalidArgumentError("num_tokens must be >= 0");
  if (seqs_.contains(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " already exists"));
  const int64_t capacity_pages = PagesForTokens(capacity_tokens);
  const int64_t need = PagesHeld(num_tokens, capacity_pages);
  if (need > free_pages()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool full: sequence ", seq, " needs ", need,
                                                     " pages, ", free_pages(), " free"));
  }
  SequencePages& s = seqs_[seq];
  s.pages.reserve(need);
  for (int64_t i = 0; i < need; ++i) s.pages.push_back(Take());
  s.num_tokens = num_tokens;
  s.capacity_pages = capacity_pages;
  reserved_tokens_ += need * page_size_;
  used_tokens_ += num_tokens;
  return absl::OkStatus();
}

absl::Status BlockPager::Append(SeqId seq, int64_t tokens, std::vector<PageCopy>* copies) {
  if (tokens < 0) return absl::InvalidArgumentError("tokens must be >= 0");
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq, " not found"));
  SequencePages& s = it->second;
  auto need = PagesToAppend(seq, tokens);
  if (!need.ok()) return need.status();
  if (*need > free_pages()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool full: sequence ", seq, " needs ", *need,
                                                     " pages, ", free_pages(), " free"));
  }
  if (const PageId shared = PartialPage(s); tokens > 0 && shared >= 0 && refcount_[shared] > 1) {
    PKV_CHECK(copies != nullptr) << "appending into a shared page needs a copy list";
    const PageId mine = Take();
    copies->push_back(PageCopy{shared, mine});
    Drop(shared);
    s.pages[s.num_tokens / page_size_] = mine;
  }
  const int64_t grow =
      std::max<int64_t>(PagesForTokens(s.num_tokens + tokens) - static_cast<int64_t>(s.pages.size()), 0);
  for (int64_t i = 0; i < grow; ++i) s.pages.push_back(Take());
  reserved_tokens_ += grow * page_size_;
  s.num_tokens += tokens;
  used_tokens_ += tokens;
  return absl::OkStatus();
}

absl::Status BlockPager::Truncate(SeqId seq, int64_t num_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq, " not found"));
  SequencePages& s = it->second;
  if (num_tokens < 0 || num_tokens > s.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("cannot truncate sequence ", seq, " of ",
                                                   s.num_tokens, " tokens to ", num_tokens));
  }
  const int64_t keep = PagesHeld(num_tokens, s.capacity_pages);
  for (int64_t i = keep; i < static_cast<int64_t>(s.pages.size()); ++i) Drop(s.pages[i]);
  reserved_tokens_ -= (static_cast<int64_t>(s.pages.size()) - keep) * page_size_;
  s.pages.resize(keep);
  used_tokens_ -= s.num_tokens - num_tokens;
  s.num_tokens = num_tokens;
  return absl::OkStatus();
}

absl::Status BlockPager::Release(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq, " not found"));
  for (PageId p : it->second.pages) Drop(p);
  reserved_tokens_ -= static_cast<int64_t>(it->second.pages.size()) * page_size_;
  used_tokens_ -= it->second.num_tokens;
  seqs_.erase(it);
  return absl::OkStatus();
}

absl::Status BlockPager::Fork(SeqId src, SeqId dst) {
  const SequencePages* s = Find(src);
  if (s == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", src, " not found"));
  if (seqs_.contains(dst)) return absl::AlreadyExistsError(absl::StrCat("sequence ", dst, " already exists"));
  SequencePages copy = *s;  // copy before inserting: insertion may rehash
  for (PageId p : copy.pages) ++refcount_[p];
  reserved_tokens_ += static_cast<int64_t>(copy.pages.size()) * page_size_;
  used_tokens_ += copy.num_tokens;
  seqs_.emplace(dst, std::move(copy));
  return absl::OkStatus();
}

const SequencePages* BlockPager::Find(SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? nullptr : &it->second;
}

PagerStats BlockPager::Stats() const {
  PagerStats st;
  st.total_pages = total_pages();
  st.free_pages = free_pages();
  st.used_pages = st.total_pages - st.free_pages;
  st.num_sequences = static_cast<int64_t>(seqs_.size());
  st.reserved_tokens = reserved_tokens_;
  st.used_tokens = used_tokens_;
  return st;
}

absl::Status BlockPager::CheckConsistency() const {
  std::vector<int32_t> refs(refcount_.size(), 0);
  int64_t reserved = 0, used = 0;
  for (const auto& [id, s] : seqs_) {
    if (static_cast<int64_t>(s.pages.size()) != PagesHeld(s.num_tokens, s.capacity_pages)) {
      return absl::InternalError(absl::StrCat("sequence ", id, " has ", s.pages.size(),
                                              " pages for ", s.num_tokens, " tokens"));
    }
    for (PageId p : s.pages) ++refs[p];
    reserved += static_cast<int64_t>(s.pages.size()) * page_size_;
    used += s.num_tokens;
  }
  absl::flat_hash_set<PageId> free_set(free_.begin(), free_.end());
  if (free_set.size() != free_.size()) return absl::InternalError("free list holds a page twice");
  for (size_t p = 0; p < refcount_.size(); ++p) {
    if (refs[p] != refcount_[p]) {
      return absl::InternalError(absl::StrCat("page ", p, " refcount ", refcount_[p], " but ",
                                              refs[p], " references"));
    }
    if ((refcount_[p] == 0) != free_set.contains(static_cast<PageId>(p))) {
      return absl::InternalError(absl::StrCat("page ", p, " free-list membership disagrees with refcount"));
    }
  }
  if (reserved != reserved_tokens_ || used != used_tokens_) {
    return absl::InternalError("token counters disagree with page tables");
  }
  return absl::OkStatus();
}

}  // namespace pkv::kvpool
