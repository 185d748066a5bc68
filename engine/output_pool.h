// engine/output_pool.h — recycled buffers for layer-step outputs.
//
// Every layer-step answers [B, Hq, d] output bytes that live on after the step: in the response
// being sent (as a gRPC slice) and in the retry cache. A fresh allocation per step costs more than
// the copy it holds: new memory page-faults on first touch (about 20 us per 64 KiB on our GPU
// host). OutputPool keeps released buffers and hands them out again; a buffer returns to the pool
// when its last reference (response, retry cache) goes.
// Buffers are kept by size class (four classes per power of two, at least one page), not by exact
// size, and a Take may reuse a buffer up to two classes larger: a batch whose row count dropped
// from one token step to the next reuses the larger buffers instead of faulting in new ones.
// The retry cache holds every output of its window, so while it fills (the first token steps of a
// worker, or a new batch shape) buffers are new. They come from the backend's OutputMemory while
// it has room (the CUDA backend's: pinned host memory, populated when the worker starts, that the
// kernels write directly, so a layer's outputs are neither faulted in nor copied), else from the
// heap (one madvise call populates a new buffer's pages where the kernel supports it). Heap
// buffers are kept up to `max_idle_bytes`, then freed; OutputMemory buffers are always kept.
// Thread-safety: Take may be called from any thread; buffers may be released on any thread, also
// after the pool is gone (heap buffers are then freed; an OutputMemory block's memory lives until
// its last buffer goes, see OutputMemory::Block::keep).
#pragma once

#include <cstddef>
#include <memory>

namespace pkv::engine {

// Memory for output buffers besides the heap, provided by a backend (ExecutionBackend::
// output_memory). Thread-safety: Allocate may be called from any thread.
class OutputMemory {
 public:
  struct Block {
    char* host = nullptr;         // null: no room left
    void* device = nullptr;       // the same bytes' address for the backend's kernels
    std::shared_ptr<void> keep;   // keeps the block's memory alive while a buffer uses it
  };
  virtual ~OutputMemory() = default;
  // A block of `bytes` bytes (a size class, a multiple of 4 KiB), or a null host pointer when the
  // memory is used up. Blocks are never given back: the pool keeps them.
  virtual Block Allocate(size_t bytes) = 0;
};

// A buffer of OutputPool: `size` writable bytes at `data` (contents unspecified: a recycled
// buffer keeps what it held), with their device address when they are OutputMemory's. The buffer
// goes back to the pool when the last copy of `owner` is destroyed.
struct OutputBuffer {
  char* data = nullptr;
  void* device = nullptr;
  size_t size = 0;
  size_t capacity = 0;
  std::shared_ptr<char> owner;
};

class OutputPool {
 public:
  // `memory` (not owned; may be null: heap only) must outlive the pool.
  explicit OutputPool(size_t max_idle_bytes, OutputMemory* memory = nullptr);
  ~OutputPool();
  OutputPool(const OutputPool&) = delete;
  OutputPool& operator=(const OutputPool&) = delete;

  // A buffer of exactly `bytes` bytes, with the capacity of its size class or of one up to two
  // classes larger.
  OutputBuffer Take(size_t bytes);

  // The capacity a buffer of `bytes` gets: `bytes` rounded up to a quarter of its power of two,
  // and to at least one 4 KiB page.
  static size_t SizeClass(size_t bytes);

  // Idle buffers and their bytes (capacities; tests, metrics), of both kinds.
  size_t idle_buffers() const;
  size_t idle_bytes() const;

 private:
  struct State;
  OutputMemory* const memory_;
  std::shared_ptr<State> state_;
};

}  // namespace pkv::engine
