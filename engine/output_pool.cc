#include "engine/output_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and nothing happens
#endif

namespace pkv::engine {
namespace {

constexpr size_t kPage = 4096;

// Faults in the whole pages of [data, data + n) with one call (best effort).
void Populate(char* data, size_t n) {
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + n) & ~(kPage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
}

}  // namespace

struct OutputPool::State {
  explicit State(size_t max_idle) : max_idle_bytes(max_idle) {}

  // Keeps `buffer` for reuse if there is room, else frees it.
  void Return(std::string* buffer) {
    std::unique_ptr<std::string> owned(buffer);
    const size_t cls = owned->capacity();
    if (SizeClass(cls) != cls) return;  // not one of ours (cannot happen), or its capacity moved
    std::lock_guard<std::mutex> lock(mu);
    if (idle_bytes + cls > max_idle_bytes) return;
    idle_bytes += cls;
    ++idle_buffers;
    idle[cls].push_back(std::move(owned));
  }

  const size_t max_idle_bytes;
  mutable std::mutex mu;
  absl::flat_hash_map<size_t, std::vector<std::unique_ptr<std::string>>> idle;  // by capacity
  size_t idle_bytes = 0;
  size_t idle_buffers = 0;
};

OutputPool::OutputPool(size_t max_idle_bytes) : state_(std::make_shared<State>(max_idle_bytes)) {}

OutputPool::~OutputPool() = default;

size_t OutputPool::SizeClass(size_t bytes) {
  if (bytes <= kPage) return kPage;
  const size_t step = std::max(kPage, std::bit_floor(bytes) / 4);
  return (bytes + step - 1) / step * step;
}

std::shared_ptr<std::string> OutputPool::Take(size_t bytes) {
  const size_t cls = SizeClass(bytes);
  std::unique_ptr<std::string> buffer;
  {
    // Its own class first, then up to two classes above (a batch that lost a row or two reuses
    // the buffers of the larger one; at most about half a buffer unused).
    std::lock_guard<std::mutex> lock(state_->mu);
    size_t c = cls;
    for (int up = 0; up <= 2 && buffer == nullptr; ++up, c = SizeClass(c + 1)) {
      auto it = state_->idle.find(c);
      if (it == state_->idle.end() || it->second.empty()) continue;
      buffer = std::move(it->second.back());
      it->second.pop_back();
      state_->idle_bytes -= c;
      --state_->idle_buffers;
    }
  }
  if (buffer == nullptr) {
    buffer = std::make_unique<std::string>();
    buffer->reserve(cls);  // libstdc++ gives exactly cls (checked in Return)
    Populate(buffer->data(), cls);
  }
  buffer->resize(bytes);  // within the capacity: no reallocation
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
