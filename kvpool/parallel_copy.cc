#include "kvpool/parallel_copy.h"

#include <algorithm>

#include "common/log.h"
#include "kvpool/ingest_staging.h"

namespace pkv::kvpool {

ParallelCopier::ParallelCopier(int helpers, size_t min_piece)
    : min_piece_((std::max<size_t>(min_piece, 64) + 63) / 64 * 64) {
  PKV_CHECK(helpers >= 0) << "helper count must be >= 0";
  threads_.reserve(static_cast<size_t>(helpers));
  for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { HelperLoop(); });
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
  if (threads_.empty() || total < 2 * min_piece_) return false;
  // Pieces of about total / workers, never below min_piece_, cut at 64-byte steps so that every
  // piece's destination keeps the span's 16-byte alignment and starts on a whole element.
  const size_t piece = std::max(min_piece_, (total / (threads_.size() + 1) + 63) / 64 * 64);
  job.pieces.reserve(total / piece + spans.size());
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span& s = spans[i];
    for (size_t at = 0; at < s.bytes; at += piece) {
      job.pieces.push_back(Piece{static_cast<char*>(s.dst) + (s.dst != nullptr ? at : 0),
                                 static_cast<const char*>(s.src) + at, std::min(piece, s.bytes - at), i, at / 2});
    }
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

int64_t ParallelCopier::Work(const Job& job, const Piece& p) {
  if (!job.scan) {
    CopyRows(p.dst, p.src, p.bytes);
    return -1;
  }
  const int64_t i = pkv::FirstNonFinite(job.dtype, reinterpret_cast<const uint8_t*>(p.src), p.bytes);
  return i < 0 ? -1 : static_cast<int64_t>(p.element) + i;
}

void ParallelCopier::Finish(Job& job, const Piece& p, int64_t found) {
  if (found >= 0 && (job.first[p.span] < 0 || found < job.first[p.span])) job.first[p.span] = found;
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
    const int64_t found = Work(job, p);
    lock.lock();
    Finish(job, p, found);
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
    const int64_t found = Work(job, p);
    helper_pieces_.fetch_add(1, std::memory_order_relaxed);
    lock.lock();
    // The caller frees `job` once done reaches its size, which it can only see under mu_: after
    // this thread has released the lock for good with respect to this job.
    Finish(job, p, found);
    if (job.done == job.pieces.size()) done_cv_.notify_all();
  }
}

}  // namespace pkv::kvpool
