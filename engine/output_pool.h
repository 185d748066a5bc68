// engine/output_pool.h — recycled buffers for layer-step outputs.
//
// Every layer-step answers [B, Hq, d] output bytes that live on after the step: in the response
// being sent (as a gRPC slice) and in the retry cache. A fresh allocation per step costs more than
// the copy it holds: the C library hands freed buffers of that size back to the kernel, so each
// new one page-faults on first touch (about ten faults per step at B8, Hq 32, d 128, several
// microseconds on a virtual machine), and a zero-fill that the backend overwrites anyway.
// OutputPool keeps released buffers (up to `max_idle_bytes` of them) and hands them out again;
// a buffer returns to the pool when its last reference (response, retry cache) goes.
// Buffers are kept by size class (four classes per power of two, at least one page), not by exact
// size, and a Take may reuse a buffer up to two classes larger: a batch whose row count dropped
// from one token step to the next reuses the larger buffers (resized within their capacity)
// instead of faulting in new ones. The retry
// cache holds every output of its window, so while it fills (the first token steps of a worker,
// or a new batch shape) buffers are new; a new buffer's pages are populated with one madvise call
// where the kernel supports it (Linux 5.14+) rather than faulted in one by one on first write.
// Thread-safety: Take may be called from any thread; buffers may be released on any thread, also
// after the pool is gone (they are then freed).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace pkv::engine {

class OutputPool {
 public:
  explicit OutputPool(size_t max_idle_bytes);
  ~OutputPool();
  OutputPool(const OutputPool&) = delete;
  OutputPool& operator=(const OutputPool&) = delete;

  // A buffer of exactly `bytes` bytes, with the capacity of its size class or of one up to two
  // classes larger; its contents are
  // unspecified (a recycled buffer keeps what it held). It goes back to the pool when the last
  // shared_ptr to it is destroyed.
  std::shared_ptr<std::string> Take(size_t bytes);

  // The capacity a buffer of `bytes` gets: `bytes` rounded up to a quarter of its power of two,
  // and to at least one 4 KiB page.
  static size_t SizeClass(size_t bytes);

  // Idle buffers and their bytes (capacities; tests, metrics).
  size_t idle_buffers() const;
  size_t idle_bytes() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace pkv::engine
