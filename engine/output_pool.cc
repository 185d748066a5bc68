#include "engine/output_pool.h"

#include <mutex>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace pkv::engine {

struct OutputPool::State {
  explicit State(size_t max_idle) : max_idle_bytes(max_idle) {}

  // Keeps `buffer` for reuse if there is room, else frees it.
  void Return(std::string* buffer) {
    std::unique_ptr<std::string> owned(buffer);
    std::lock_guard<std::mutex> lock(mu);
    if (idle_bytes + owned->size() > max_idle_bytes) return;
    idle_bytes += owned->size();
    ++idle_buffers;
    idle[owned->size()].push_back(std::move(owned));
  }

  const size_t max_idle_bytes;
  mutable std::mutex mu;
  absl::flat_hash_map<size_t, std::vector<std::unique_ptr<std::string>>> idle;  // by size
  size_t idle_bytes = 0;
  size_t idle_buffers = 0;
};

OutputPool::OutputPool(size_t max_idle_bytes) : state_(std::make_shared<State>(max_idle_bytes)) {}

OutputPool::~OutputPool() = default;

std::shared_ptr<std::string> OutputPool::Take(size_t bytes) {
  std::unique_ptr<std::string> buffer;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto it = state_->idle.find(bytes);
    if (it != state_->idle.end() && !it->second.empty()) {
      buffer = std::move(it->second.back());
      it->second.pop_back();
      state_->idle_bytes -= bytes;
      --state_->idle_buffers;
    }
  }
  if (buffer == nullptr) buffer = std::make_unique<std::string>(bytes, '\0');
  // The deleter holds the pool's state weakly: a buffer released after the pool is gone is freed.
  std::weak_ptr<State> home = state_;
  return std::shared_ptr<std::string>(buffer.release(), [home](std::string* b) {
    if (std::shared_ptr<State> state = home.lock()) {
      state->Return(b);
    } else {
      delete b;
    }
  });
}

size_t OutputPool::idle_buffers() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->idle_buffers;
}

size_t OutputPool::idle_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->idle_bytes;
}

}  // namespace pkv::engine
