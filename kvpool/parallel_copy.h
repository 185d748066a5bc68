// kvpool/parallel_copy.h — prompt KV rows scanned and copied into pinned staging memory by
// several cores.
//
// The merged ingest path (kvpool/ingest_staging.h) scans every prompt byte for NaN/inf and copies
// it from the received message into a pinned staging buffer that the copy engine reads. One core
// does either at a fraction of what the copy engine takes (on an H200 host one writer thread
// ingests 5.5 GB/s against a 55 GB/s pinned cudaMemcpy; 7.7 without the scan; 16.8 without the
// scan and with four helpers), so one WriteKV stream, or a worker with few ingest threads, would
// be bounded by that core. ParallelCopier splits a call's spans into pieces and runs them on its
// helper threads and on the calling thread together. Concurrent calls share the helpers; each
// caller also takes its own pieces, so a call never waits for helpers that are busy elsewhere — at
// worst it does everything itself, as without helpers. CopyAndScan does both in one pass, so the
// source is read from memory once (8 writers: 0.66 -> 0.73-0.75x a pinned cudaMemcpy on the H200,
// bench/results/h200-ingest-one-pass-dd753c4/). The source may be a message's pieces, cut anywhere.
// Thread-safety: Copy, FirstNonFinite and CopyAndScan may be called from any number of threads at
// once. The destructor joins the helpers; no call may be running then.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/piece_bytes.h"

namespace pkv::kvpool {

class ParallelCopier {
 public:
  // One span: `bytes` from `src` (to `dst`; unused by FirstNonFinite, whose spans must hold whole
  // 2-byte elements).
  struct Span {
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
  };

  // Smallest piece handed to another thread: below it a wake-up costs more than the work saves.
  static constexpr size_t kDefaultMinPiece = size_t{128} << 10;

  // `helpers` threads (0: every call runs on its own thread); pieces of at least `min_piece`
  // bytes (rounded up to 64); `nice` > 0: the helpers run at that Linux nice value
  // (common/thread_priority.h).
  explicit ParallelCopier(int helpers, size_t min_piece = kDefaultMinPiece, int nice = 0);
  ~ParallelCopier();
  ParallelCopier(const ParallelCopier&) = delete;
  ParallelCopier& operator=(const ParallelCopier&) = delete;

  // Copies every span with CopyRows and returns once all of them landed (their streaming stores
  // fenced, and visible to this thread). Spans may be small and many (a received message's
  // pieces): a piece of work covers as many consecutive spans as its size takes.
  void Copy(std::span<const Span> spans);

  // For each span (2-byte elements of `dtype`), the index of its first NaN or infinity
  // (common/dtype.h FirstNonFinite), or -1 when all are finite: written to first[i].
  void FirstNonFinite(std::span<const Span> spans, DType dtype, std::span<int64_t> first);

  // For each tensor of `tensors` (2-byte elements of `dtype`, in pieces cut anywhere, even
  // inside an element), the index of its first NaN or infinity, or -1: written to first[i]. The
  // whole elements of each piece are scanned as FirstNonFinite's spans; an element split between
  // two pieces is put together and checked on this thread.
  void FirstNonFinite(std::span<const PieceBytes* const> tensors, DType dtype, std::span<int64_t> first);

  // Copy and scan in one pass over the source: every span is copied as Copy does and, where
  // scans[i].tensor >= 0, its elements are checked in the copy's own loop (CopyRowsFinite,
  // kvpool/ingest_staging.h: the source is read once; a 16 KiB block that fails the check is
  // scanned again, from the cache, for the element). Such a span starts on a whole element
  // (its first element is element scans[i].first_element of tensor scans[i].tensor) and holds
  // whole elements. first[t]: tensor t's first NaN or infinity among its scanned spans, or -1.
  // Everything is copied either way.
  struct ScanOf {
    int32_t tensor = -1;  // -1: copy only
    int64_t first_element = 0;
  };
  void CopyAndScan(std::span<const Span> spans, std::span<const ScanOf> scans, DType dtype, std::span<int64_t> first);

  // Spans (with their ScanOf) that stage bytes [offset, offset + n) of `src` (one tensor,
  // `tensor`, of 2-byte elements; `offset` even) to `dst`, for CopyAndScan: one per piece part,
  // except that an element split between two pieces is copied as two 1-byte copy-only spans and
  // its index appended to *split (the caller checks those elements itself).
  static void AppendStaging(const PieceBytes& src, size_t offset, size_t n, char* dst, int32_t tensor,
                            std::vector<Span>* spans, std::vector<ScanOf>* scans, std::vector<int64_t>* split);

  int helpers() const { return static_cast<int>(threads_.size()); }
  // Pieces the helper threads took since creation (the rest were run by the callers).
  int64_t helper_pieces() const { return helper_pieces_.load(std::memory_order_relaxed); }

 private:
  // Bytes [begin_offset of span `begin`, end_offset of span `last`] of the call's spans in order
  // (cut inside a span only at 64-byte steps from its start, so a scan piece starts on a whole
  // element).
  struct Piece {
    size_t begin = 0;         // first span
    size_t begin_offset = 0;  // in it
    size_t last = 0;          // last span
    size_t end_offset = 0;    // in it (exclusive)
  };
  // One call's pieces, on the caller's stack while it waits.
  struct Job {
    bool scan = false;  // FirstNonFinite, else Copy
    const ScanOf* copy_scan = nullptr;  // CopyAndScan: one per span (first[] is then per tensor)
    DType dtype = DType::kF16;
    std::span<const Span> spans;
    std::vector<Piece> pieces;
    // scan: per span (CopyAndScan: per tensor), the first non-finite element found (-1: none)
    std::vector<int64_t> first;
    size_t claimed = 0;          // pieces taken by a thread (guarded by mu_)
    size_t done = 0;             // pieces finished (guarded by mu_)
  };

  // Splits `spans` into `job`'s pieces; false when the call is too small to share.
  bool Split(std::span<const Span> spans, Job& job) const;
  // Runs the job's pieces here and on the helpers; returns once all are done.
  void Run(Job& job);
  // Runs one piece (without mu_); a scan's results (span, first element) go to *found and are
  // folded in under mu_ by Finish.
  using Found = std::vector<std::pair<size_t, int64_t>>;
  static void Work(const Job& job, const Piece& piece, Found* found);
  void Finish(Job& job, const Found& found);
  // Takes the next piece of `job` (mu_ held); removes the job from the queue when it was the last.
  const Piece& Claim(Job& job);
  void HelperLoop();

  size_t min_piece_;
  std::mutex mu_;
  std::condition_variable work_cv_;  // a job with pieces to claim was queued, or stop_
  std::condition_variable done_cv_;  // a job's last piece finished
  std::deque<Job*> queue_;           // jobs with unclaimed pieces, oldest first
  bool stop_ = false;
  std::atomic<int64_t> helper_pieces_{0};
  std::vector<std::thread> threads_;
};

}  // namespace pkv::kvpool
