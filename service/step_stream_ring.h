// service/step_stream_ring.h — the worker's side of a StepStream's shared-memory ring
// (common/shared_memory_ring.h): one thread per stream that polls the ring for requests, runs each
// on the engine itself (no executor hop, no gRPC message either way) and writes its response
// into the same message slot.
//
// The thread polls request_seq for `spin` after each answer (the next layer-step's request
// arrives within it while a token step is decoded), then sleeps on the futex. A request that
// cannot be read or parsed, or whose response does not fit its slot, is answered with a status
// naming why, like any StepStream message; a router that shrinks its region stops the ring
// (failure() says why, the stream then ends with it).
//
// Thread-safety: Start and Stop from the stream's completion-queue thread; the ring's own thread
// does the rest.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "service/proto_convert.h"

namespace pkv::service {

class WorkerService;

class StepStreamRing final {
 public:
  // Checks the ring header in `call.shared_memory` (INVALID_ARGUMENT naming the metadata key
  // when it is not a ring of this version that fits the region; RESOURCE_EXHAUSTED when
  // kMaxRings rings are served) and starts the ring's thread.
  static absl::StatusOr<std::unique_ptr<StepStreamRing>> Start(WorkerService& service, CallContext call,
                                                               std::chrono::microseconds spin);
  StepStreamRing(const StepStreamRing&) = delete;
  StepStreamRing& operator=(const StepStreamRing&) = delete;
  ~StepStreamRing();

  // Stops the thread after the request it runs (if any), marks the ring closed and joins.
  // Idempotent.
  void Stop();
  // OK, or why the ring stopped by itself (the router shrank the region).
  absl::Status failure() const;

  // Rings served at once, in the whole process (each has a thread).
  static constexpr int kMaxRings = 256;

 private:
  StepStreamRing(WorkerService& service, CallContext call, std::chrono::microseconds spin);
  void Run();

  WorkerService& service_;
  const CallContext call_;
  const std::chrono::microseconds spin_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  absl::Status failure_;  // under mu_
  std::thread thread_;
  bool joined_ = false;
};

}  // namespace pkv::service
