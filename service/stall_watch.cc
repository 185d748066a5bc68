// service/stall_watch.cc — StallWatch (service/stall_watch.h).
#include "service/stall_watch.h"

#include <algorithm>

#include "common/log.h"
#include "common/thread_priority.h"

namespace pkv::service {

StallWatch::StallWatch(Options options)
    : options_(options), thread_([this] {
        NameThisThread("pkv-stallwatch");
        Run();
      }) {}

StallWatch::~StallWatch() { Stop(); }

void StallWatch::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void StallWatch::Run() {
  using Clock = std::chrono::steady_clock;
  auto due = Clock::now() + options_.tick;
  auto last_log = Clock::now() - std::chrono::seconds(1);
  int64_t unlogged = 0, unlogged_max_us = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_until(lock, due, [this] { return stop_; })) {
    const auto now = Clock::now();
    const int64_t late_us = std::chrono::duration_cast<std::chrono::microseconds>(now - due).count();
    if (late_us > options_.threshold.count()) {
      stalls_.fetch_add(1, std::memory_order_relaxed);
      if (late_us > max_late_us_.load(std::memory_order_relaxed)) {
        max_late_us_.store(late_us, std::memory_order_relaxed);
      }
      if (options_.histogram != nullptr) options_.histogram->Observe(static_cast<double>(late_us) * 1e-6);
      ++unlogged;
      unlogged_max_us = std::max(unlogged_max_us, late_us);
      if (options_.log && now - last_log >= std::chrono::seconds(1)) {
        PKV_LOG(WARNING) << "process stall: a " << options_.tick.count() << " us timer woke " << late_us
                         << " us late (" << unlogged << " such wake-ups since the last such line, the largest "
                         << unlogged_max_us
                         << " us): its cores were busy with other threads, the container at its CPU quota, "
                            "the process stopped, or the machine's processors stopped by their host";
        last_log = now;
        unlogged = 0;
        unlogged_max_us = 0;
      }
    }
    // The next tick from now: a stall is counted once, not as the ticks it swallowed.
    due = now + options_.tick;
  }
}

}  // namespace pkv::service
