// service/worker_service.h — the service of API v1, on raw byte buffers.
//
// WorkerService is what WorkerServer registers on the API port: Describe, Step and Release as
// unary callback reactors and WriteKV as a stream reactor (worker_service.cc); StepStream as an
// async method that service/step_stream.h serves from its own completion-queue threads. Every
// request is parsed by the worker itself, so a message that is not a valid request gets
// INVALID_ARGUMENT (and a response on StepStream) rather than gRPC's generic failure. The engine
// work behind each RPC is service/handlers.h, run on a BoundedExecutor.
//
// This header brings gRPC and the generated service: only service .cc files include it
// (worker_server.h stays free of gRPC).
// Thread-safety: the reactors' threading model is described in worker_service.cc; RpcStats is
// immutable after construction; WriteKvRegistry and the draining flag may be used from any
// thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "pkv/v1/worker.grpc.pb.h"
#include "service/executor.h"
#include "service/proto_convert.h"

namespace pkv::service {

// The gRPC service name of API v1 (also a grpc.health.v1 readiness name).
inline constexpr char kServiceName[] = "pkv.v1.PersistentKV";

// Counts finished RPCs (StepStream: messages) and in-flight calls, and times them, when metrics
// are enabled.
class RpcStats {
 public:
  using Clock = std::chrono::steady_clock;
  // `draining` (not owned) tells drain refusals from other UNAVAILABLE answers.
  RpcStats(WorkerMetrics* metrics, const std::atomic<bool>* draining) : m_(metrics), draining_(draining) {}
  void Begin(RpcMethod method) const {
    if (m_ != nullptr) m_->inflight_streams(method).Increment();
  }
  void End(RpcMethod method) const {
    if (m_ != nullptr) m_->inflight_streams(method).Decrement();
  }
  void Count(RpcMethod method, const grpc::Status& status) const {
    if (m_ == nullptr) return;
    m_->rpc(method, static_cast<int>(status.error_code())).Increment();
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE && draining_->load()) {
      if (prometheus::Counter* refused = m_->drain_refusals(method)) refused->Increment();
    }
  }
  // The request (StepStream: message; WriteKV: stream) that arrived at `received` is answered now.
  void Answered(RpcMethod method, Clock::time_point received) const {
    if (m_ != nullptr) m_->rpc_duration(method).Observe(std::chrono::duration<double>(Clock::now() - received).count());
  }
  // Engine work queued at `queued` starts on an executor thread now.
  void Started(RpcMethod method, Clock::time_point queued) const {
    if (m_ != nullptr) m_->rpc_queue_time(method).Observe(std::chrono::duration<double>(Clock::now() - queued).count());
  }
  void Rejected(WorkerMetrics::Queue queue) const {
    if (m_ != nullptr) m_->queue_rejections(queue).Increment();
  }
  WorkerMetrics* metrics() const { return m_; }

 private:
  WorkerMetrics* m_;
  const std::atomic<bool>* draining_;
};

// The live WriteKV streams, for the prompt lease: a stream that sends nothing for
// prompt_idle_seconds is cancelled (its prompt is then released like any cut stream).
class WriteKvRegistry {
 public:
  // One stream's handle. `mu` is recursive: cancelling may run the stream's callbacks inline.
  struct Entry {
    std::recursive_mutex mu;
    grpc::CallbackServerContext* ctx = nullptr;  // null once the stream is done
    std::atomic<int64_t> last_activity_ns{0};
    std::atomic<uint64_t> sequence_id{0};
    std::string router;
    bool expired = false;
  };
  std::shared_ptr<Entry> Add(grpc::CallbackServerContext* ctx, std::string router) {
    auto e = std::make_shared<Entry>();
    e->ctx = ctx;
    e->router = std::move(router);
    Touch(*e);
    std::lock_guard<std::mutex> lock(mu_);
    live_.insert(e);
    return e;
  }
  void Remove(const std::shared_ptr<Entry>& e) {
    {
      std::lock_guard<std::recursive_mutex> lock(e->mu);
      e->ctx = nullptr;
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(e);
  }
  static void Touch(Entry& e) {
    e.last_activity_ns.store(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  // Cancels streams idle longer than `idle`; calls `reclaimed(entry)` for each.
  template <typename Fn>
  void CancelIdle(std::chrono::duration<double> idle, Fn reclaimed) {
    std::vector<std::shared_ptr<Entry>> entries;
    {
      std::lock_guard<std::mutex> lock(mu_);
      entries.assign(live_.begin(), live_.end());
    }
    const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
    const int64_t limit = std::chrono::duration_cast<std::chrono::nanoseconds>(idle).count();
    for (const auto& e : entries) {
      std::lock_guard<std::recursive_mutex> lock(e->mu);
      if (e->ctx == nullptr || e->expired || now - e->last_activity_ns.load() <= limit) continue;
      e->expired = true;
      reclaimed(*e);
      e->ctx->TryCancel();
    }
  }

 private:
  std::mutex mu_;
  absl::flat_hash_set<std::shared_ptr<Entry>> live_;
};

// StepStream is an async (completion-queue) method, served by service/step_stream.h; the rest are
// callback methods.
using RawService = v1::PersistentKV::WithRawCallbackMethod_Describe<
    v1::PersistentKV::WithRawCallbackMethod_Step<v1::PersistentKV::WithRawMethod_StepStream<
        v1::PersistentKV::WithRawCallbackMethod_WriteKV<v1::PersistentKV::WithRawCallbackMethod_Release<
            v1::PersistentKV::Service>>>>>;

// API v1 on raw byte buffers (see the file comment). Serves `engine` (not owned): decode steps,
// Describe and Release run on `executor`, WriteKV on `ingest_executor` (both not owned; all
// three must outlive the service and its reactors).
class WorkerService final : public RawService {
 public:
  WorkerService(engine::Engine& engine, BoundedExecutor& executor, BoundedExecutor& ingest_executor,
                ServiceLimits limits, WorkerMetrics* metrics, uint64_t incarnation)
      : engine_(engine),
        executor_(executor),
        ingest_executor_(ingest_executor),
        limits_(limits),
        stats_(metrics, &draining_),
        incarnation_(incarnation) {}

  const RpcStats& stats() const { return stats_; }

  void SetDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  engine::Engine& engine() { return engine_; }
  uint64_t incarnation() const { return incarnation_; }
  const ServiceLimits& limits() const { return limits_; }
  WriteKvRegistry& writes() { return writes_; }
  // Decode steps, Describe and Release.
  BoundedExecutor& executor() { return executor_; }
  // WriteKV.
  BoundedExecutor& ingest_executor() { return ingest_executor_; }

  grpc::ServerUnaryReactor* Describe(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* WriteKV(grpc::CallbackServerContext* ctx,
                                                     grpc::ByteBuffer* response) override;

  // The call's router and this worker's incarnation; INVALID_ARGUMENT for a bad router id.
  absl::StatusOr<CallContext> CallOf(const grpc::ServerContextBase& ctx) const;

 private:
  // Runs `work(call)` (returning absl::Status) on the executor and finishes the call with it.
  template <typename Work>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* ctx, RpcMethod method, Work work);

  engine::Engine& engine_;
  BoundedExecutor& executor_;
  BoundedExecutor& ingest_executor_;
  const ServiceLimits limits_;
  const RpcStats stats_;
  const uint64_t incarnation_;
  std::atomic<bool> draining_{false};
  WriteKvRegistry writes_;
};

}  // namespace pkv::service
