// kvpool/parallel_copy.h — prompt KV rows copied into pinned staging memory by several cores.
//
// The merged ingest path (kvpool/ingest_staging.h) copies every prompt byte once on the host,
// from the received message into a pinned staging buffer that the copy engine then reads. One
// core copies a fraction of what the copy engine takes (about 6 GB/s against 54 GB/s on an H200
// host), so one WriteKV stream, or a worker with few ingest threads, would be bounded by that
// core. ParallelCopier splits a call's copies into pieces and copies them on its helper threads
// and on the calling thread together. Concurrent calls share the helpers; each caller also copies
// its own pieces, so a call never waits for helpers that are busy elsewhere — at worst it copies
// everything itself, as without helpers.
// Thread-safety: Copy may be called from any number of threads at once. The destructor joins the
// helpers; no call may be running then.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstddef>
#include <deque>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

namespace pkv::kvpool {

class ParallelCopier {
 public:
  // One copy: `bytes` from `src` to `dst` (16-byte aligned: CopyRows' streaming stores).
  struct Span {
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
  };

  // Smallest piece handed to another thread: below it a wake-up costs more than the copy saves.
  static constexpr size_t kDefaultMinPiece = size_t{128} << 10;

  // `helpers` threads (0: every call copies on its own thread); pieces of at least `min_piece`
  // bytes (rounded up to 64).
  explicit ParallelCopier(int helpers, size_t min_piece = kDefaultMinPiece);
  ~ParallelCopier();
  ParallelCopier(const ParallelCopier&) = delete;
  ParallelCopier& operator=(const ParallelCopier&) = delete;

  // Copies every span with CopyRows and returns once all of them landed (their streaming stores
  // fenced, and visible to this thread).
  void Copy(std::span<const Span> spans);

  int helpers() const { return static_cast<int>(threads_.size()); }
  // Pieces the helper threads copied since creation (the rest were copied by the callers).
  int64_t helper_pieces() const { return helper_pieces_.load(std::memory_order_relaxed); }

 private:
  struct Piece {
    char* dst;
    const char* src;
    size_t bytes;
  };
  // One Copy call's pieces, on the caller's stack while it waits.
  struct Job {
    std::vector<Piece> pieces;
    size_t claimed = 0;  // pieces taken by a thread (guarded by mu_)
    size_t done = 0;     // pieces copied (guarded by mu_)
  };

  // Takes the next piece of `job` (mu_ held); removes the job from the queue when it was the last.
  const Piece& Claim(Job& job);
  void HelperLoop();

  size_t min_piece_;
  std::mutex mu_;
  std::condition_variable work_cv_;  // a job with pieces to claim was queued, or stop_
  std::condition_variable done_cv_;  // a job's last piece landed
  std::deque<Job*> queue_;           // jobs with unclaimed pieces, oldest first
  bool stop_ = false;
  std::atomic<int64_t> helper_pieces_{0};
  std::vector<std::thread> threads_;
};

}  // namespace pkv::kvpool
