// The shared-memory ring's wait / publish protocol (common/shared_memory_ring.h) between two
// processes, as the worker and a router use it: a forked child answers every request of its parent
// through a MAP_SHARED mapping, sleeping on the futex words. A lost wake-up would leave a side
// asleep until its next futex slice; slices are long here (5 s), so any wait that long is a lost
// wake-up, and none may happen.
#include "common/shared_memory_ring.h"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <new>

#include "gtest/gtest.h"

namespace pkv {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr int64_t kSliceNs = 5'000'000'000;  // a wait this long is a lost wake-up
constexpr uint32_t kSlots = 4;

struct Shared {
  RingHeader header;
  uint64_t request[kSlots];
  uint64_t response[kSlots];
};

// Runs `n` round trips, the parent as the router and a forked child as the worker, each side
// polling for `spin_ns` before it sleeps. Returns the longest wait the parent saw.
int64_t RoundTrips(uint32_t n, int64_t spin_ns) {
  void* mem = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  EXPECT_NE(mem, MAP_FAILED);
  if (mem == MAP_FAILED) return -1;
  auto* s = new (mem) Shared();
  const pid_t child = fork();
  if (child == 0) {
    // The worker: answer request i with 2 * value + 1, in order.
    uint32_t next = 0;
    while (next < n) {
      const uint32_t seen = RingWait(&s->header.request_seq, &s->header.worker_waiting, next, spin_ns, kSliceNs,
                                     [] { return false; }, NowNs);
      while (next != seen) {
        s->response[next % kSlots] = 2 * s->request[next % kSlots] + 1;
        ++next;
        RingPublish(&s->header.response_seq, &s->header.router_waiting, next);
      }
    }
    _exit(0);
  }
  int64_t longest = 0;
  for (uint32_t i = 0; i < n; ++i) {
    s->request[i % kSlots] = 1000 + i;
    RingPublish(&s->header.request_seq, &s->header.worker_waiting, i + 1);
    const int64_t t0 = NowNs();
    const uint32_t seen = RingWait(&s->header.response_seq, &s->header.router_waiting, i, spin_ns, kSliceNs,
                                   [] { return false; }, NowNs);
    longest = std::max(longest, NowNs() - t0);
    EXPECT_EQ(seen, i + 1);
    if (s->response[i % kSlots] != 2 * (1000 + uint64_t{i}) + 1) {
      ADD_FAILURE() << "round trip " << i << ": answer " << s->response[i % kSlots];
      break;
    }
  }
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  munmap(mem, sizeof(Shared));
  return longest;
}

TEST(SharedMemoryRingTest, BothSidesAsleepOnTheFutexNeverLoseAWakeUp) {
  // No polling at all: every wait goes to sleep, the path where a wake-up can be lost.
  const int64_t longest = RoundTrips(5000, 0);
  EXPECT_LT(longest, kSliceNs / 2) << "a side slept through a wake-up";
}

TEST(SharedMemoryRingTest, ShortPollsThenSleepNeverLoseAWakeUp) {
  // Polls shorter than a round trip on a busy machine: waits end in either way.
  const int64_t longest = RoundTrips(5000, 2'000);
  EXPECT_LT(longest, kSliceNs / 2) << "a side slept through a wake-up";
}

TEST(SharedMemoryRingTest, AWaitEndsWhenStopSaysSo) {
  RingHeader h{};
  int calls = 0;
  const uint32_t seen = RingWait(&h.response_seq, &h.router_waiting, 0, 0, 1'000'000,
                                 [&] { return ++calls >= 3; }, NowNs);
  EXPECT_EQ(seen, 0u);
  EXPECT_GE(calls, 3);
  EXPECT_EQ(h.router_waiting.load(), 0u);
}

}  // namespace
}  // namespace pkv
