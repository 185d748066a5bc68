// service/stall_watch.h — notices when the whole worker process stops getting CPU time.
//
// A thread of its own sleeps to a 1 ms tick and measures how late each wake-up comes. A wake-up
// later than `threshold` means no core ran this thread for that long although it was due: the
// cores were busy with other threads, the container hit its CPU quota (cgroup throttling), or a
// virtual machine's processors were stopped by their host. It is logged at most once a second
// with the number of such wake-ups and the latest and largest lateness since the last line, and
// each one's lateness is observed in a histogram (pkv_process_stall_seconds) when one is given.
// The engine's own `slow layer-step` lines (engine/engine.cc) name a stall of one layer-step;
// this one tells whether the process as a whole stalled at that time.
// Thread-safety: stalls() and max_late_us() may be called from any thread; Stop (or the
// destructor) joins the thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "prometheus/histogram.h"

namespace pkv::service {

class StallWatch final {
 public:
  struct Options {
    std::chrono::microseconds tick{1000};       // the wake-up period
    std::chrono::microseconds threshold{1000};  // a wake-up this much later is a stall
    bool log = true;                            // log stalls (at most once a second)
    prometheus::Histogram* histogram = nullptr;  // when set, observes each stall's lateness (s)
  };
  explicit StallWatch(Options options);
  ~StallWatch();
  StallWatch(const StallWatch&) = delete;
  StallWatch& operator=(const StallWatch&) = delete;

  void Stop();
  int64_t stalls() const { return stalls_.load(std::memory_order_relaxed); }
  // The largest lateness seen, in microseconds.
  int64_t max_late_us() const { return max_late_us_.load(std::memory_order_relaxed); }

 private:
  void Run();

  const Options options_;
  std::atomic<int64_t> stalls_{0};
  std::atomic<int64_t> max_late_us_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace pkv::service
