// service/executor.h — a small bounded thread pool for engine work handed off by gRPC reactors.
//
// Reactors must never block, and engine calls (a CPU attention layer, a pool mutation under the
// engine lock) can take milliseconds, so the service runs them here. The queue is bounded:
// TrySubmit refuses work when `max_queued` tasks wait, and the caller answers RESOURCE_EXHAUSTED
// (backpressure) instead of queueing without limit. SubmitAlways is for cleanup and for the next
// message of a stream that already holds an admission (each stream has at most one task queued),
// so its extra queue is bounded by the number of open streams.
// A worker that finishes a task may poll for the next one for `spin` before it sleeps: a task
// that arrives meanwhile starts without a thread wake-up (tens of microseconds), at the price of
// that much CPU after each task. At most `max_spinners` workers poll at once; the rest sleep.
// SubmitUncounted is for a
// monitoring probe: queued like the rest but never counted against the bound, so that it neither
// is refused nor takes a slot from real work.
// Thread-safety: every method may be called from any thread. Shutdown runs every queued task,
// then joins the threads; submissions after Shutdown are refused (SubmitAlways runs them inline).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <string_view>
#include <vector>

#include "absl/functional/any_invocable.h"

namespace pkv::service {

class BoundedExecutor final {
 public:
  using Task = absl::AnyInvocable<void() &&>;

  // Starts `num_threads` (>= 1) workers; at most `max_queued` (>= 1) tasks wait for a worker;
  // an idle worker polls for `spin` before it sleeps (zero: it sleeps at once), at most
  // `max_spinners` (>= 1) of them at a time. `nice` > 0: the workers run at that Linux nice value
  // (bulk work that should yield a contended core to latency work, common/thread_priority.h).
  // The workers are named `name` (common/thread_priority.h: NameThisThread).
  BoundedExecutor(int num_threads, int max_queued,
                  std::chrono::microseconds spin = std::chrono::microseconds(0), int max_spinners = 1,
                  int nice = 0, std::string_view name = "pkv-executor");
  BoundedExecutor(const BoundedExecutor&) = delete;
  BoundedExecutor& operator=(const BoundedExecutor&) = delete;
  // Shuts down (see Shutdown).
  ~BoundedExecutor();

  // Queues `task`; false (task dropped) when the queue is full or the executor shut down.
  [[nodiscard]] bool TrySubmit(Task task);
  // Queues `task` whatever the queue length; after Shutdown it runs on the calling thread.
  void SubmitAlways(Task task);
  // SubmitAlways, and `task` does not count towards `max_queued` while it waits.
  void SubmitUncounted(Task task);
  // Runs every queued task, then stops and joins the workers. Idempotent.
  void Shutdown();

  // Tasks waiting (not yet running).
  int64_t queued() const;
  // Tasks running now.
  int64_t running() const;

 private:
  struct Queued {
    Task task;
    bool counted = true;  // counts towards max_queued_
  };

  void WorkerLoop();
  void Submit(Task task, bool counted);

  const int max_queued_;
  const std::chrono::microseconds spin_;
  const int max_spinners_;
  std::atomic<int> spinners_{0};  // workers polling now
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Queued> queue_;
  int64_t counted_ = 0;  // entries of queue_ that count towards max_queued_
  std::atomic<int64_t> waiting_{0};  // queue_.size(), readable without mu_ by polling workers
  int sleepers_ = 0;                 // workers blocked on cv_ (under mu_)
  int64_t running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace pkv::service
