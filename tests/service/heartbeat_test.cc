// EngineHeartbeat: liveness follows whether its probe gets through the executor, and a probe
// still queued when the heartbeat stops runs later without touching it.
#include "service/heartbeat.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/gauge.h"

namespace pkv::service {
namespace {

using std::chrono::milliseconds;

// A gate the probe waits at while closed.
class Gate {
 public:
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Pass() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
};

template <typename Fn>
bool WaitFor(Fn done, milliseconds timeout = milliseconds(5000)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(milliseconds(2));
  }
  return done();
}

EngineHeartbeat::Options FastOptions() {
  EngineHeartbeat::Options o;
  o.period = std::chrono::duration<double>(0.01);
  o.stall = std::chrono::duration<double>(0.5);
  return o;
}

TEST(EngineHeartbeatTest, LivenessFollowsTheProbeAndEveryChangeIsReported) {
  BoundedExecutor executor(1, 4);
  Gate gate;
  std::atomic<int> probes{0};
  std::mutex changes_mu;
  std::vector<bool> changes;
  prometheus::Gauge age;
  EngineHeartbeat heartbeat(
      executor,
      [&] {
        gate.Pass();
        ++probes;
      },
      FastOptions(),
      [&](bool live) {
        std::lock_guard<std::mutex> lock(changes_mu);
        changes.push_back(live);
      },
      &age);
  ASSERT_TRUE(WaitFor([&] { return probes.load() >= 3; }));
  EXPECT_TRUE(heartbeat.live());

  gate.Close();
  ASSERT_TRUE(WaitFor([&] { return !heartbeat.live(); }));
  EXPECT_GT(age.Value(), 0.5);
  // One probe at a time: the stuck one is not joined by more.
  EXPECT_LE(executor.queued() + executor.running(), 1);

  gate.Open();
  ASSERT_TRUE(WaitFor([&] { return heartbeat.live(); }));
  heartbeat.Stop();
  std::lock_guard<std::mutex> lock(changes_mu);
  EXPECT_EQ(changes, (std::vector<bool>{false, true}));
}

TEST(EngineHeartbeatTest, AProbeQueuedAtStopRunsLaterWithoutTheHeartbeat) {
  BoundedExecutor executor(1, 4);
  Gate gate;
  gate.Close();
  std::atomic<int> probes{0};
  {
    EngineHeartbeat heartbeat(
        executor,
        [&] {
          gate.Pass();
          ++probes;
        },
        FastOptions(), nullptr);
    ASSERT_TRUE(WaitFor([&] { return executor.running() == 1; }));
  }  // destroyed with its probe stuck in the executor
  gate.Open();
  executor.Shutdown();
  EXPECT_EQ(probes.load(), 1);
}

}  // namespace
}  // namespace pkv::service
