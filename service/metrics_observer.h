// service/metrics_observer.h — binds engine step events and pool state to the worker's metrics.
//
// MetricsObserver turns engine::StepObserver events into increments of the pre-bound handles of
// common/metrics.h (no lookups on the step path). PoolSampler refreshes the process gauges (from
// /proc/self) and the pool, sequence and readiness gauges (from Engine::Info()) on a background
// thread (once a second by default) and on demand. Thread-safety: the observer is called under
// the engine's lock and only touches atomic metric handles; the sampler owns its thread and joins
// it in Stop()/the destructor.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "common/metrics.h"
#include "engine/engine.h"
#include "engine/step_observer.h"

namespace pkv::service {

class MetricsObserver final : public engine::StepObserver {
 public:
  explicit MetricsObserver(WorkerMetrics* metrics) : m_(metrics) {}
  void OnTokenStepPlanned(const engine::TokenStepEvent& e) override;
  void OnLayerStep(const engine::LayerStepEvent& e) override;
  void OnTokenStepCompleted(int32_t rows) override;
  void OnTokenStepAborted(int32_t rows) override;
  void OnPromptCommitted(int64_t bytes, double seconds) override;

 private:
  WorkerMetrics* m_;
};

class PoolSampler {
 public:
  // `ready` reports whether the worker serves (health SERVING).
  PoolSampler(const engine::Engine* engine, WorkerMetrics* metrics, std::function<bool()> ready,
              std::chrono::milliseconds period = std::chrono::milliseconds(1000));
  ~PoolSampler();
  PoolSampler(const PoolSampler&) = delete;
  PoolSampler& operator=(const PoolSampler&) = delete;

  // Refreshes every gauge now.
  void SampleNow();
  // Stops the background thread (idempotent).
  void Stop();

 private:
  const engine::Engine* engine_;
  WorkerMetrics* m_;
  std::function<bool()> ready_;
  std::chrono::milliseconds period_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace pkv::service
