// common/shared_memory_ring.h — the request/response ring at the start of a StepStream's shared
// memory (see "Shared memory" in proto/pkv/v1/worker.proto), shared by the worker (service/) and
// the client library (client/). Header-only; Linux (futex).
//
// With the ring, a layer-step's request and response do not travel as gRPC messages at all: the
// router writes the serialized StepRequest into the next message slot and bumps request_seq; the
// worker, which polls request_seq (busy for a while after each answer, then asleep on a futex),
// runs it and writes the serialized StepResponse into the same slot, then bumps response_seq,
// which the router polls in turn. The gRPC stream stays open as the session: its end (the
// router's half-close, a cancellation, a lost connection) stops the worker's side of the ring.
//
// Layout (all integers little-endian, the region's first kRingHeaderBytes):
//   RingHeader                      at 0
//   message slot i (i < slots)      at kRingHeaderBytes + i * message_bytes:
//       RingMessage, then the request's bytes, then the response's bytes at message_bytes / 2
//   tensors (q, k, v, out of requests, wherever the requests say)   after the message slots
// Request n (n = 0, 1, ...) uses message slot n % slots. The router may have at most `slots`
// requests unanswered.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace pkv {

inline constexpr uint32_t kRingMagic = 0x52564B50;  // "PKVR"
inline constexpr uint32_t kRingVersion = 1;
inline constexpr uint64_t kRingHeaderBytes = 4096;
// Request metadata key that asks for the ring (value "1"), next to x-pkv-shared-memory.
inline constexpr char kSharedMemoryRingKey[] = "x-pkv-shared-memory-ring";

struct RingHeader {
  uint32_t magic;          // kRingMagic, written by the router
  uint32_t version;        // kRingVersion
  uint32_t slots;          // message slots, >= 1
  uint32_t message_bytes;  // bytes per message slot (a multiple of 64, >= 1024)
  // Requests written: the router stores n + 1 after writing request n (release).
  alignas(64) std::atomic<uint32_t> request_seq;
  std::atomic<uint32_t> worker_waiting;  // 1 while the worker sleeps on request_seq
  // Responses written: the worker stores n + 1 after writing response n (release).
  alignas(64) std::atomic<uint32_t> response_seq;
  std::atomic<uint32_t> router_waiting;  // 1 while the router sleeps on response_seq
  // Set by the worker when it stops serving the ring (then it answers nothing more).
  alignas(64) std::atomic<uint32_t> closed;
};
static_assert(sizeof(RingHeader) <= kRingHeaderBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

// The head of a message slot.
struct RingMessage {
  uint32_t request_bytes;   // serialized StepRequest, at slot + sizeof(RingMessage)
  uint32_t response_bytes;  // serialized StepResponse, at slot + message_bytes / 2
};

// Futex calls on a word of shared memory (not FUTEX_PRIVATE: the other side is another process).
inline void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns) {
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}
inline void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

// Publishes `value` in `seq` and wakes the other side if it sleeps on it.
inline void RingPublish(std::atomic<uint32_t>* seq, std::atomic<uint32_t>* waiting, uint32_t value) {
  seq->store(value, std::memory_order_seq_cst);
  if (waiting->load(std::memory_order_seq_cst) != 0) FutexWakeAll(seq);
}

// Waits until `seq` differs from `current`: polls for `spin_ns`, then sleeps on the futex in
// slices of `slice_ns` (flagging `waiting`), calling `stop()` between slices. Returns the new
// value, or `current` when stop() said so.
template <typename Stop, typename Now>
uint32_t RingWait(std::atomic<uint32_t>* seq, std::atomic<uint32_t>* waiting, uint32_t current, int64_t spin_ns,
                  int64_t slice_ns, Stop stop, Now now_ns) {
  uint32_t v = seq->load(std::memory_order_acquire);
  if (v != current) return v;
  const int64_t spin_until = now_ns() + spin_ns;
  int n = 0;
  while (now_ns() < spin_until) {
    for (int i = 0; i < 64; ++i) {
      v = seq->load(std::memory_order_acquire);
      if (v != current) return v;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    if ((++n & 63) == 0 && stop()) return current;
  }
  for (;;) {
    if (stop()) return current;
    waiting->store(1, std::memory_order_seq_cst);
    v = seq->load(std::memory_order_seq_cst);
    if (v == current) FutexWait(seq, current, slice_ns);
    waiting->store(0, std::memory_order_seq_cst);
    v = seq->load(std::memory_order_acquire);
    if (v != current) return v;
  }
}

}  // namespace pkv
