#include "service/heartbeat.h"

#include <utility>

#include "common/log.h"
#include "common/thread_priority.h"
#include "prometheus/gauge.h"

namespace pkv::service {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

EngineHeartbeat::EngineHeartbeat(BoundedExecutor& executor, std::function<void()> probe, Options options,
                                 std::function<void(bool live)> on_change, prometheus::Gauge* age)
    : executor_(executor),
      options_(options),
      on_change_(std::move(on_change)),
      age_(age),
      shared_(std::make_shared<Shared>()) {
  shared_->probe = std::move(probe);
  shared_->last_success_ns.store(NowNs());
  thread_ = std::thread([this] {
    NameThisThread("pkv-heartbeat");
    Run();
  });
}

EngineHeartbeat::~EngineHeartbeat() { Stop(); }

void EngineHeartbeat::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

double EngineHeartbeat::age_seconds() const {
  return static_cast<double>(NowNs() - shared_->last_success_ns.load()) * 1e-9;
}

void EngineHeartbeat::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    lock.unlock();
    Beat();
    lock.lock();
    cv_.wait_for(lock, options_.period, [this] { return stop_; });
  }
}

void EngineHeartbeat::Beat() {
  if (!shared_->pending.exchange(true)) {
    // A full queue of work that is moving is not a stall: the probe waits its turn, and takes no
    // slot from real work.
    executor_.SubmitUncounted([shared = shared_] {
      shared->probe();
      shared->last_success_ns.store(NowNs());
      shared->pending.store(false);
    });
  }
  const double age = age_seconds();
  if (age_ != nullptr) age_->Set(age);
  const bool live = age <= options_.stall.count();
  if (live == live_.exchange(live)) return;
  if (live) {
    PKV_LOG(WARNING) << "engine heartbeat: the engine answers again; liveness SERVING";
  } else {
    PKV_LOG(ERROR) << "engine heartbeat: no probe got through the decode executor and the engine lock for "
                   << age << " s (limit " << options_.stall.count() << " s); liveness NOT_SERVING";
  }
  if (on_change_) on_change_(live);
}

}  // namespace pkv::service
