#include "engine/output_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "common/log.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and nothing happens
#endif

namespace pkv::engine {
namespace {

constexpr size_t kPage = 4096;

// One buffer's memory: a heap allocation (keep null) or an OutputMemory block (keep set).
struct Memory {
  char* host = nullptr;
  void* device = nullptr;
  size_t capacity = 0;
  std::shared_ptr<void> keep;
  bool heap() const { return keep == nullptr; }
};

void FreeMemory(Memory& m) {
  if (m.heap()) std::free(m.host);
  m = Memory{};  // an OutputMemory block lives on while `keep` has other holders
}

}  // namespace

struct OutputPool::State {
  explicit State(size_t max_idle) : max_idle_heap_bytes(max_idle) {}

  // Keeps `m` for reuse (an OutputMemory block always, a heap buffer if there is room), else
  // frees it.
  void Return(Memory m) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!m.heap() || idle_heap_bytes + m.capacity <= max_idle_heap_bytes) {
        if (m.heap()) idle_heap_bytes += m.capacity;
        idle_bytes += m.capacity;
        ++idle_buffers;
        const size_t cls = m.capacity;
        idle[cls].push_back(std::move(m));
        return;
      }
    }
    FreeMemory(m);
  }

  ~State() {
    for (auto& [cls, list] : idle) {
      for (Memory& m : list) FreeMemory(m);
    }
  }

  const size_t max_idle_heap_bytes;
  mutable std::mutex mu;
  absl::flat_hash_map<size_t, std::vector<Memory>> idle;  // by capacity
  size_t idle_heap_bytes = 0;
  size_t idle_bytes = 0;
  size_t idle_buffers = 0;
};

OutputPool::OutputPool(size_t max_idle_bytes, OutputMemory* memory)
    : memory_(memory), state_(std::make_shared<State>(max_idle_bytes)) {}

OutputPool::~OutputPool() = default;

size_t OutputPool::SizeClass(size_t bytes) {
  if (bytes <= kPage) return kPage;
  const size_t step = std::max(kPage, std::bit_floor(bytes) / 4);
  return (bytes + step - 1) / step * step;
}

OutputBuffer OutputPool::Take(size_t bytes) {
  const size_t cls = SizeClass(bytes);
  Memory m;
  {
    // Its own class first, then up to two classes above (a batch that lost a row or two reuses
    // the buffers of the larger one; at most about half a buffer unused).
    std::lock_guard<std::mutex> lock(state_->mu);
    size_t c = cls;
    for (int up = 0; up <= 2 && m.host == nullptr; ++up, c = SizeClass(c + 1)) {
      auto it = state_->idle.find(c);
      if (it == state_->idle.end() || it->second.empty()) continue;
      m = std::move(it->second.back());
      it->second.pop_back();
      if (m.heap()) state_->idle_heap_bytes -= c;
      state_->idle_bytes -= c;
      --state_->idle_buffers;
    }
  }
  if (m.host == nullptr && memory_ != nullptr) {
    OutputMemory::Block b = memory_->Allocate(cls);
    if (b.host != nullptr) {
      PKV_CHECK(b.keep != nullptr) << "an OutputMemory block must keep its memory";
      m = Memory{b.host, b.device, cls, std::move(b.keep)};
    }
  }
  if (m.host == nullptr) {
    // Page-aligned, so that madvise populates exactly the buffer's pages.
    m.host = static_cast<char*>(std::aligned_alloc(kPage, cls));
    PKV_CHECK(m.host != nullptr) << "out of memory for a " << cls << "-byte output buffer";
    m.capacity = cls;
    (void)madvise(m.host, cls, MADV_POPULATE_WRITE);  // best effort
  }
  OutputBuffer out;
  out.data = m.host;
  out.device = m.device;
  out.size = bytes;
  out.capacity = m.capacity;
  // The deleter holds the pool's state weakly: a buffer released after the pool is gone is freed.
  std::weak_ptr<State> home = state_;
  out.owner = std::shared_ptr<char>(m.host, [home, m = std::move(m)](char*) mutable {
    if (std::shared_ptr<State> state = home.lock()) {
      state->Return(std::move(m));
    } else {
      FreeMemory(m);
    }
  });
  return out;
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
