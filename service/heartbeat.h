// service/heartbeat.h — the engine heartbeat behind the worker's liveness check.
//
// Readiness is answered by gRPC threads, which go on answering while the engine is wedged. The
// heartbeat shows that engine work still gets done: once per period it queues a probe on the
// decode executor (behind whatever waits there) and the probe takes the engine lock
// (Engine::Heartbeat). Its age is the time since a probe last finished; the engine is live while
// the age is at most `stall`. A stuck lock or executor threads that never come back leave the
// probe pending, the age grows and liveness turns false; when the probe finally runs, it turns
// true again. At most one probe is pending at a time.
// Thread-safety: all methods may be called from any thread. `on_change` and the age gauge are
// driven from the heartbeat's own thread. Stop (or the destructor) joins that thread; a probe
// still queued then may run later and touches only state it shares with the queue.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "service/executor.h"

namespace prometheus {
class Gauge;
}  // namespace prometheus

namespace pkv::service {

class EngineHeartbeat final {
 public:
  struct Options {
    std::chrono::duration<double> period{1.0};  // a probe is sent and the age checked this often
    std::chrono::duration<double> stall{60.0};  // not live once the age exceeds this
  };
  // Starts the heartbeat thread; the first probe is queued at once. `probe` runs on `executor`
  // (which must outlive this object's Stop); `on_change(live)` is called when liveness flips;
  // `age` (optional, not owned) is set to the age in seconds every period.
  EngineHeartbeat(BoundedExecutor& executor, std::function<void()> probe, Options options,
                  std::function<void(bool live)> on_change, prometheus::Gauge* age = nullptr);
  EngineHeartbeat(const EngineHeartbeat&) = delete;
  EngineHeartbeat& operator=(const EngineHeartbeat&) = delete;
  ~EngineHeartbeat();

  // Stops the thread; liveness keeps its last value. Idempotent.
  void Stop();
  // Whether the last check found the age within `stall`.
  bool live() const { return live_.load(); }
  // Seconds since a probe last finished (since the start before the first one).
  double age_seconds() const;

 private:
  // What a queued probe needs: it may outlive this object (the executor runs queued tasks at its
  // own shutdown), so the probe task holds it by shared ownership.
  struct Shared {
    std::function<void()> probe;
    std::atomic<int64_t> last_success_ns{0};  // steady_clock
    std::atomic<bool> pending{false};
  };

  void Run();
  void Beat();

  BoundedExecutor& executor_;
  const Options options_;
  const std::function<void(bool)> on_change_;
  prometheus::Gauge* const age_;
  const std::shared_ptr<Shared> shared_;
  std::atomic<bool> live_{true};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace pkv::service
