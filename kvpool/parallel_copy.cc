#include "kvpool/parallel_copy.h"

#include <algorithm>

#include "common/log.h"
#include "common/thread_priority.h"
#include "kvpool/ingest_staging.h"

namespace pkv::kvpool {

ParallelCopier::ParallelCopier(int helpers, size_t min_piece, int nice)
    : min_piece_((std::max<size_t>(min_piece, 64) + 63) / 64 * 64) {
  PKV_CHECK(helpers >= 0) << "helper count must be >= 0";
  threads_.reserve(static_cast<size_t>(helpers));
  for (int i = 0; i < helpers; ++i) {
    threads_.emplace_back([this, nice, i] {
      NameThisThread("pkv-copy");
      if (absl::Status st = SetThisThreadNice(nice); !st.ok() && i == 0) {
        PKV_LOG(WARNING) << "copy helpers keep their priority: " << st;
      }
      HelperLoop();
    });
  }
}

ParallelCopier::~ParallelCopier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

bool ParallelCopier::Split(std::span<const Span> spans, Job& job) const {
  size_t total = 0;
  for (const Span& s : spans) total += s.bytes;
  job.spans = spans;
  if (threads_.empty() || total < 2 * min_piece_) return false;
  // Pieces of about total / workers, never below min_piece_. A piece ends inside a span only at a
  // 64-byte step from the span's start, so the next one starts on a whole element and keeps the
  // span's destination alignment; small spans are taken together.
  const size_t piece = std::max(min_piece_, (total / (threads_.size() + 1) + 63) / 64 * 64);
  job.pieces.reserve(total / piece + 2);
  Piece cur;
  size_t taken = 0;  // bytes in cur
  for (size_t i = 0; i < spans.size(); ++i) {
    const size_t bytes = spans[i].bytes;
    size_t at = 0;
    while (at < bytes) {
      size_t end = std::min(bytes, at + (piece - taken));
      if (end < bytes) end = std::min(bytes, (end + 63) / 64 * 64);
      taken += end - at;
      at = end;
      if (taken >= piece) {
        cur.last = i;
        cur.end_offset = at;
        job.pieces.push_back(cur);
        cur = Piece{at < bytes ? i : i + 1, at < bytes ? at : 0, 0, 0};
        taken = 0;
      }
    }
  }
  if (taken > 0) {
    cur.last = spans.size() - 1;
    cur.end_offset = spans.back().bytes;
    job.pieces.push_back(cur);
  }
  return true;
}

void ParallelCopier::Copy(std::span<const Span> spans) {
  Job job;
  if (!Split(spans, job)) {
    for (const Span& s : spans) CopyRows(s.dst, s.src, s.bytes);
    return;
  }
  Run(job);
}

void ParallelCopier::FirstNonFinite(std::span<const Span> spans, DType dtype, std::span<int64_t> first) {
  PKV_CHECK(first.size() == spans.size()) << "one result per span";
  Job job;
  job.scan = true;
  job.dtype = dtype;
  if (!Split(spans, job)) {
    for (size_t i = 0; i < spans.size(); ++i) {
      first[i] = pkv::FirstNonFinite(dtype, static_cast<const uint8_t*>(spans[i].src), spans[i].bytes);
    }
    return;
  }
  job.first.assign(spans.size(), -1);
  Run(job);
  std::copy(job.first.begin(), job.first.end(), first.begin());
}

void ParallelCopier::FirstNonFinite(std::span<const PieceBytes* const> tensors, DType dtype,
                                    std::span<int64_t> first) {
  PKV_CHECK(first.size() == tensors.size()) << "one result per tensor";
  std::vector<Span> spans;
  std::vector<size_t> owner;           // tensor of each span
  std::vector<int64_t> first_element;  // tensor element where each span starts
  for (size_t t = 0; t < tensors.size(); ++t) {
    first[t] = -1;
    size_t pos = 0;          // tensor byte where the current piece starts
    bool have_low = false;   // the last piece ended inside an element: its first byte is `low`
    uint8_t low = 0;
    for (const std::span<const uint8_t> piece : tensors[t]->pieces()) {
      size_t i = 0;
      if (have_low && !piece.empty()) {
        const uint8_t split[2] = {low, piece[0]};
        if (first[t] < 0 && pkv::FirstNonFinite(dtype, split, 2) == 0) first[t] = static_cast<int64_t>(pos / 2);
        have_low = false;
        i = 1;
      }
      const size_t whole = (piece.size() - i) & ~size_t{1};
      if (whole > 0) {
        spans.push_back(Span{nullptr, piece.data() + i, whole});
        owner.push_back(t);
        first_element.push_back(static_cast<int64_t>((pos + i) / 2));
      }
      if (i + whole < piece.size()) {
        low = piece[piece.size() - 1];
        have_low = true;
      }
      pos += piece.size();
    }
  }
  std::vector<int64_t> found(spans.size(), -1);
  FirstNonFinite(spans, dtype, found);
  for (size_t i = 0; i < spans.size(); ++i) {
    if (found[i] < 0) continue;
    const int64_t e = first_element[i] + found[i];
    int64_t& f = first[owner[i]];
    if (f < 0 || e < f) f = e;
  }
}

void ParallelCopier::CopyAndScan(std::span<const Span> spans, std::span<const ScanOf> scans, DType dtype,
                                 std::span<int64_t> first) {
  PKV_CHECK(scans.size() == spans.size()) << "one ScanOf per span";
  Job job;
  job.copy_scan = scans.data();
  job.dtype = dtype;
  job.first.assign(first.size(), -1);
  if (!Split(spans, job)) {
    Found found;
    Work(job, Piece{0, 0, spans.empty() ? 0 : spans.size() - 1, spans.empty() ? 0 : spans.back().bytes}, &found);
    for (const auto& [tensor, element] : found) {
      if (job.first[tensor] < 0 || element < job.first[tensor]) job.first[tensor] = element;
    }
  } else {
    Run(job);
  }
  std::copy(job.first.begin(), job.first.end(), first.begin());
}

void ParallelCopier::AppendStaging(const PieceBytes& src, size_t offset, size_t n, char* dst, int32_t tensor,
                                   std::vector<Span>* spans, std::vector<ScanOf>* scans, std::vector<int64_t>* split) {
  src.ForEachPart(offset, n, [&](size_t at, const uint8_t* from, size_t len) {
    const size_t pos = offset + at;  // tensor byte of this part's first byte (offset is even)
    size_t head = 0;
    if (pos % 2 == 1) {  // the second byte of an element the previous part began
      spans->push_back({dst + at, from, 1});
      scans->push_back({});
      split->push_back(static_cast<int64_t>(pos / 2));
      head = 1;
    }
    const size_t whole = (len - head) & ~size_t{1};
    if (whole > 0) {
      spans->push_back({dst + at + head, from + head, whole});
      scans->push_back({tensor, static_cast<int64_t>((pos + head) / 2)});
    }
    if (head + whole < len) {  // the first byte of an element the next part ends
      spans->push_back({dst + at + len - 1, from + len - 1, 1});
      scans->push_back({});
    }
  });
}

void ParallelCopier::Work(const Job& job, const Piece& p, Found* found) {
  for (size_t s = p.begin; s <= p.last && s < job.spans.size(); ++s) {
    const Span& span = job.spans[s];
    const size_t from = s == p.begin ? p.begin_offset : 0;
    const size_t to = s == p.last ? p.end_offset : span.bytes;
    if (to <= from) continue;
    if (job.copy_scan != nullptr) {
      // Copied and checked in one pass, in blocks: a block whose check fails is scanned again
      // (from the cache) for the element.
      constexpr size_t kBlock = size_t{16} << 10;
      const ScanOf& of = job.copy_scan[s];
      bool clean = of.tensor >= 0;
      for (size_t b = from; b < to; b += kBlock) {
        const size_t len = std::min(kBlock, to - b);
        const char* src = static_cast<const char*>(span.src) + b;
        if (!clean) {
          CopyRows(static_cast<char*>(span.dst) + b, src, len);
          continue;
        }
        if (CopyRowsFinite(static_cast<char*>(span.dst) + b, src, len, job.dtype)) continue;
        const int64_t i = pkv::FirstNonFinite(job.dtype, reinterpret_cast<const uint8_t*>(src), len);
        if (i >= 0) {
          found->emplace_back(static_cast<size_t>(of.tensor), of.first_element + static_cast<int64_t>(b / 2) + i);
          clean = false;  // the rest of this span cannot hold an earlier one
        }
      }
      continue;
    }
    if (!job.scan) {
      CopyRows(static_cast<char*>(span.dst) + from, static_cast<const char*>(span.src) + from, to - from);
      continue;
    }
    const int64_t i =
        pkv::FirstNonFinite(job.dtype, static_cast<const uint8_t*>(span.src) + from, to - from);
    if (i >= 0) found->emplace_back(s, static_cast<int64_t>(from / 2) + i);
  }
}

void ParallelCopier::Finish(Job& job, const Found& found) {
  for (const auto& [index, element] : found) {  // a span's (FirstNonFinite) or a tensor's (CopyAndScan)
    if (job.first[index] < 0 || element < job.first[index]) job.first[index] = element;
  }
  ++job.done;
}

const ParallelCopier::Piece& ParallelCopier::Claim(Job& job) {
  const Piece& piece = job.pieces[job.claimed++];
  if (job.claimed == job.pieces.size()) {
    // Nobody may claim from it any more: the caller may return once its pieces are done.
    queue_.erase(std::find(queue_.begin(), queue_.end(), &job));
  }
  return piece;
}

void ParallelCopier::Run(Job& job) {
  std::unique_lock<std::mutex> lock(mu_);
  queue_.push_back(&job);
  lock.unlock();
  work_cv_.notify_all();
  lock.lock();
  // Run this call's own pieces until none is left to claim, then wait for those the helpers took.
  while (job.claimed < job.pieces.size()) {
    const Piece& p = Claim(job);
    lock.unlock();
    Found found;
    Work(job, p, &found);
    lock.lock();
    Finish(job, found);
  }
  done_cv_.wait(lock, [&] { return job.done == job.pieces.size(); });
}

void ParallelCopier::HelperLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Job& job = *queue_.front();
    const Piece& p = Claim(job);
    lock.unlock();
    Found found;
    Work(job, p, &found);
    helper_pieces_.fetch_add(1, std::memory_order_relaxed);
    lock.lock();
    // The caller frees `job` once done reaches its size, which it can only see under mu_: after
    // this thread has released the lock for good with respect to this job.
    Finish(job, found);
    if (job.done == job.pieces.size()) done_cv_.notify_all();
  }
}

}  // namespace pkv::kvpool
