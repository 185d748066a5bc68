#include "service/executor.h"

#include <algorithm>
#include <utility>

namespace pkv::service {

BoundedExecutor::BoundedExecutor(int num_threads, int max_queued)
    : max_queued_(std::max(1, max_queued)) {
  const int n = std::max(1, num_threads);
  threads_.reserve(n);
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

BoundedExecutor::~BoundedExecutor() { Shutdown(); }

bool BoundedExecutor::TrySubmit(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || counted_ >= max_queued_) return false;
    queue_.push_back({std::move(task), true});
    ++counted_;
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
      cv_.notify_one();
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
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping and drained
    Queued next = std::move(queue_.front());
    queue_.pop_front();
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
