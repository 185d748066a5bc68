#include "service/executor.h"

#include <algorithm>
#include <string>
#include <utility>

#include "common/log.h"
#include "common/thread_priority.h"

namespace pkv::service {

BoundedExecutor::BoundedExecutor(int num_threads, int max_queued, std::chrono::microseconds spin, int max_spinners,
                                 int nice, std::string_view name)
    : max_queued_(std::max(1, max_queued)),
      spin_(std::max(spin, std::chrono::microseconds(0))),
      max_spinners_(std::max(1, max_spinners)) {
  const int n = std::max(1, num_threads);
  threads_.reserve(n);
  for (int i = 0; i < n; ++i) {
    threads_.emplace_back([this, nice, i, thread_name = std::string(name)] {
      NameThisThread(thread_name);
      if (absl::Status st = SetThisThreadNice(nice); !st.ok() && i == 0) {
        PKV_LOG(WARNING) << "executor threads keep their priority: " << st;
      }
      WorkerLoop();
    });
  }
}

BoundedExecutor::~BoundedExecutor() { Shutdown(); }

bool BoundedExecutor::TrySubmit(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || counted_ >= max_queued_) return false;
    queue_.push_back({std::move(task), true});
    ++counted_;
    waiting_.store(static_cast<int64_t>(queue_.size()), std::memory_order_release);
    if (sleepers_ == 0) return true;  // a polling worker takes it
  }
  cv_.notify_one();
  return true;
}

void BoundedExecutor::SubmitAlways(Task task) { Submit(std::move(task), /*counted=*/true); }

void BoundedExecutor::SubmitUncounted(Task task) { Submit(std::move(task), /*counted=*/false); }

void BoundedExecutor::Submit(Task task, bool counted) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      queue_.push_back({std::move(task), counted});
      if (counted) ++counted_;
      waiting_.store(static_cast<int64_t>(queue_.size()), std::memory_order_release);
      if (sleepers_ > 0) cv_.notify_one();
      return;
    }
  }
  std::move(task)();  // the workers are gone or going: run it here rather than lose a cleanup
}

void BoundedExecutor::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

int64_t BoundedExecutor::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t BoundedExecutor::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

void BoundedExecutor::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    bool poll = queue_.empty() && !stopping_ && spin_.count() > 0;
    if (poll && spinners_.fetch_add(1, std::memory_order_relaxed) >= max_spinners_) {
      spinners_.fetch_sub(1, std::memory_order_relaxed);  // enough workers poll: sleep
      poll = false;
    }
    if (poll) {
      // Poll a while before sleeping; a submitter that sees no sleeper does not notify.
      lock.unlock();
      const auto until = std::chrono::steady_clock::now() + spin_;
      while (waiting_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
      spinners_.fetch_sub(1, std::memory_order_relaxed);
      lock.lock();
    }
    // Sleepers are counted under mu_, so a task queued after this check is either seen by the
    // predicate or its submitter sees the sleeper and notifies.
    ++sleepers_;
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    --sleepers_;
    if (queue_.empty()) return;  // stopping and drained
    Queued next = std::move(queue_.front());
    queue_.pop_front();
    waiting_.store(static_cast<int64_t>(queue_.size()), std::memory_order_release);
    if (next.counted) --counted_;
    Task task = std::move(next.task);
    ++running_;
    lock.unlock();
    std::move(task)();
    lock.lock();
    --running_;
  }
}

}  // namespace pkv::service
