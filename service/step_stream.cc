// StepStream on completion queues (service/step_stream.h).
//
// A StepStreamCall is one stream's state machine. Its operations go to its queue: the call
// itself (start), done (AsyncNotifyWhenDone: the stream ended or was cancelled), read, write and
// finish. At most one of read, write and finish is in flight, so the call's fields need no lock;
// between a read and its write the engine work runs on an executor thread, which starts the write
// itself. The call deletes itself on its queue's thread once both finish and done came back
// (done comes only for a call that started).
#include "service/step_stream.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/rpc_wire.h"
#include "service/shared_memory.h"
#include "service/step_stream_ring.h"
#include "common/shared_memory_ring.h"
#include "common/thread_priority.h"

namespace pkv::service {

class StepStreamCall final {
 public:
  enum class Op { kStart, kDone, kRead, kWrite, kFinish };
  struct Tag {
    StepStreamCall* call;
    Op op;
  };

  StepStreamCall(StepStreamServer* owner, grpc::ServerCompletionQueue* cq)
      : owner_(owner), service_(owner->service_), cq_(cq), stream_(&ctx_) {
    owner_->live_.fetch_add(1);
    ctx_.AsyncNotifyWhenDone(&tags_[static_cast<int>(Op::kDone)]);
    service_.RequestStepStream(&ctx_, &stream_, cq_, cq_, &tags_[static_cast<int>(Op::kStart)]);
  }

  // The queue's thread: operation `op` completed with `ok`.
  void OnEvent(Op op, bool ok) {
    switch (op) {
      case Op::kStart:
        if (!ok) {  // the server shut down before a client called
          Delete();
          return;
        }
        started_ = true;
        owner_->Listen(cq_);  // the next stream on this queue
        service_.stats().Begin(RpcMethod::kStepStream);
        if (absl::StatusOr<CallContext> call = service_.CallOf(ctx_); call.ok()) {
          call_ = *std::move(call);
          if (const absl::Status shm = MapSharedMemory(); !shm.ok()) {
            StartFinish(ToGrpcStatus(shm));
            return;
          }
          StartRead();
        } else {
          StartFinish(ToGrpcStatus(call.status()));
        }
        return;
      case Op::kDone:
        done_ = true;
        if (ctx_.IsCancelled()) cancelled_.store(true);
        if (finished_) Delete();
        return;
      case Op::kRead:
        if (ring_ != nullptr) {  // requests come through the ring; the stream only has to end
          ring_->Stop();
          const absl::Status failure = ring_->failure();
          if (!failure.ok()) {
            StartFinish(ToGrpcStatus(failure));
          } else if (ok) {
            StartFinish(ToGrpcStatus(absl::InvalidArgumentError(
                "StepStream: this stream serves its requests through its shared-memory ring, not in messages")));
          } else {
            StartFinish(cancelled_.load() ? grpc::Status::CANCELLED : grpc::Status::OK);
          }
          return;
        }
        if (!ok) {  // the client half-closed, or the stream broke / was cancelled
          StartFinish(cancelled_.load() ? grpc::Status::CANCELLED : grpc::Status::OK);
          return;
        }
        received_ = std::chrono::steady_clock::now();
        if (!service_.executor().TrySubmit([this] { Process(); })) {
          service_.stats().Rejected(WorkerMetrics::Queue::kDecode);
          // Rare: parse here so that the refusal echoes the request's ids.
          const absl::Status parsed = Parse();
          Answer(parsed.ok() ? BusyError(service_.executor()) : parsed);
        }
        return;
      case Op::kWrite:
        if (!ok) {
          StartFinish(grpc::Status(grpc::StatusCode::CANCELLED, "StepStream: the response could not be sent"));
          return;
        }
        StartRead();
        return;
      case Op::kFinish:
        finished_ = true;
        if (done_) Delete();
        return;
    }
  }

 private:
  void* TagOf(Op op) { return &tags_[static_cast<int>(op)]; }
  void StartRead() { stream_.Read(&raw_request_, TagOf(Op::kRead)); }
  void StartFinish(const grpc::Status& status) { stream_.Finish(status, TagOf(Op::kFinish)); }

  void Delete() {
    if (started_) service_.stats().End(RpcMethod::kStepStream);
    StepStreamServer* owner = owner_;
    delete this;
    owner->CallEnded();
  }

  // The shared memory the stream's metadata names, if any (see Shared memory in worker.proto).
  absl::Status MapSharedMemory() {
    const auto& metadata = ctx_.client_metadata();
    auto it = metadata.find(kSharedMemoryKey);
    auto ring = metadata.find(kSharedMemoryRingKey);
    if (it == metadata.end()) {
      if (ring != metadata.end()) {
        return absl::InvalidArgumentError(absl::StrCat("metadata ", kSharedMemoryRingKey, ": a ring lives in the "
                                                       "stream's shared memory: name it with ", kSharedMemoryKey));
      }
      return absl::OkStatus();
    }
    const int64_t max_bytes = service_.limits().shared_memory_max_bytes;
    if (max_bytes <= 0) {
      return absl::FailedPreconditionError(absl::StrCat("metadata ", kSharedMemoryKey,
                                                        ": shared memory is off on this worker (--shared_memory_max_bytes=0)"));
    }
    PKV_ASSIGN_OR_RETURN(std::shared_ptr<SharedMemoryRegion> region,
                         SharedMemoryRegion::Open(absl::string_view(it->second.data(), it->second.size()), max_bytes));
    // Registered with the backend, the device reads q, k, v from the region and writes the outputs
    // into it itself; without (a CPU backend, or registration refused) the engine copies.
    const auto register_start = std::chrono::steady_clock::now();
    absl::StatusOr<std::shared_ptr<void>> registered =
        service_.engine().RegisterHostMemory(region->base(), static_cast<size_t>(region->size()));
    const double register_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - register_start).count();
    if (registered.ok()) {
      region->HoldUntilUnmapped(*std::move(registered));
    } else if (registered.status().code() != absl::StatusCode::kUnimplemented) {
      PKV_LOG(WARNING) << "StepStream: " << region->name() << " stays unregistered (layer-steps copy through it): "
                       << registered.status();
    }
    PKV_LOG(INFO) << "StepStream: mapped " << region->name() << " (" << region->size() << " bytes"
                  << (registered.ok() ? absl::StrCat(", registered for in-place device reads and writes in ",
                                                     absl::SixDigits(register_ms), " ms")
                                      : std::string())
                  << ")";
    call_.shared_memory = std::move(region);
    if (ring != metadata.end()) {
      if (absl::string_view(ring->second.data(), ring->second.size()) != "1") {
        return absl::InvalidArgumentError(absl::StrCat("metadata ", kSharedMemoryRingKey, ": \"1\" or absent"));
      }
      PKV_ASSIGN_OR_RETURN(ring_, StepStreamRing::Start(service_, call_, owner_->spin_));
    }
    return absl::OkStatus();
  }

  absl::Status Parse() {
    request_.Clear();
    return ParseRequest(raw_request_, &request_, RpcMethod::kStepStream, service_.stats().metrics());
  }

  // Executor thread: the engine work for the request read.
  void Process() {
    started_at_ = std::chrono::steady_clock::now();
    service_.stats().Started(RpcMethod::kStepStream, received_);
    const absl::Status parsed = Parse();
    if (!parsed.ok()) {
      Answer(parsed);
      return;
    }
    if (cancelled_.load()) {
      Answer(absl::CancelledError("StepStream was cancelled"));
      return;
    }
    response_.Clear();
    payload_ = engine::OutputBytes();
    Answer(RunStep(service_.engine(), request_, &response_, call_, &payload_));
  }

  // Writes response_ with `status` (echoing the request's ids; 0 for an unparsable request).
  void Answer(const absl::Status& status) {
    if (!status.ok()) {
      response_.Clear();
      payload_ = engine::OutputBytes();
    }
    response_.set_token_step_id(request_.token_step_id());
    response_.set_layer(request_.layer());
    response_.set_incarnation(call_.incarnation);
    ToRequestStatus(status, response_.mutable_status());
    // A request refused before it reached an engine thread (queue full) has a stale started_at_,
    // older than received_: SetServerTimes counts no queueing for it.
    SetServerTimes(received_, started_at_, &response_);
    service_.stats().Count(RpcMethod::kStepStream, ToGrpcStatus(status));
    service_.stats().Answered(RpcMethod::kStepStream, received_);
    raw_response_.Clear();
    SerializeStepResponse(response_, payload_, &raw_response_);
    payload_ = engine::OutputBytes();  // the slice keeps the bytes alive until gRPC sent them
    stream_.Write(raw_response_, TagOf(Op::kWrite));
  }

  StepStreamServer* const owner_;
  WorkerService& service_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext ctx_;
  grpc::ServerAsyncReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer> stream_;
  Tag tags_[5] = {{this, Op::kStart}, {this, Op::kDone}, {this, Op::kRead}, {this, Op::kWrite}, {this, Op::kFinish}};
  CallContext call_;
  grpc::ByteBuffer raw_request_, raw_response_;
  v1::StepRequest request_;
  v1::StepResponse response_;
  engine::OutputBytes payload_;  // response_'s out.data, sent uncopied
  std::unique_ptr<StepStreamRing> ring_;  // requests through the shared-memory ring
  std::chrono::steady_clock::time_point received_, started_at_;  // request read; engine thread began
  std::atomic<bool> cancelled_{false};
  bool started_ = false, done_ = false, finished_ = false;  // the queue's thread only
};

StepStreamServer::StepStreamServer(grpc::ServerBuilder& builder, WorkerService& service, int threads,
                                   std::chrono::microseconds spin)
    : service_(service), spin_(std::max(spin, std::chrono::microseconds(0))) {
  const int n = std::max(1, threads);
  for (int i = 0; i < n; ++i) queues_.push_back(builder.AddCompletionQueue());
}

StepStreamServer::~StepStreamServer() { Stop(); }

void StepStreamServer::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_ || stopped_) return;
  started_ = true;
  for (auto& q : queues_) {
    Listen(q.get());
    threads_.emplace_back([this, cq = q.get()] {
      NameThisThread("pkv-stepstream");
      Poll(cq);
    });
  }
}

void StepStreamServer::Listen(grpc::ServerCompletionQueue* cq) { new StepStreamCall(this, cq); }

void StepStreamServer::CallEnded() {
  if (live_.fetch_sub(1) == 1) {
    std::lock_guard<std::mutex> lock(mu_);
    ended_.notify_all();
  }
}

void StepStreamServer::Poll(grpc::ServerCompletionQueue* cq) {
  auto last_event = std::chrono::steady_clock::now();
  for (;;) {
    void* tag = nullptr;
    bool ok = false;
    const bool spin = spin_.count() > 0 && std::chrono::steady_clock::now() - last_event < spin_;
    const grpc::CompletionQueue::NextStatus status =
        cq->AsyncNext(&tag, &ok, spin ? gpr_time_0(GPR_CLOCK_MONOTONIC) : gpr_inf_future(GPR_CLOCK_MONOTONIC));
    if (status == grpc::CompletionQueue::TIMEOUT) continue;
    if (status == grpc::CompletionQueue::SHUTDOWN) return;
    auto* t = static_cast<StepStreamCall::Tag*>(tag);
    t->call->OnEvent(t->op, ok);
    last_event = std::chrono::steady_clock::now();
  }
}

void StepStreamServer::Stop() {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopped_) return;
  stopped_ = true;
  // Every stream was cancelled by the server's shutdown, and its waiting calls come back
  // refused: each ends through its queue's thread.
  int waited_s = 0;
  while (!ended_.wait_for(lock, std::chrono::seconds(1), [this] { return live_.load() == 0; })) {
    PKV_LOG(WARNING) << "StepStream: waiting for " << live_.load() << " calls to end (" << ++waited_s << " s)";
  }
  lock.unlock();
  for (auto& q : queues_) q->Shutdown();
  for (auto& t : threads_) t.join();
  if (!started_) {
    // No thread ever polled: drain the queues here (a queue must be empty before it is destroyed).
    for (auto& q : queues_) {
      void* tag;
      bool ok;
      while (q->Next(&tag, &ok)) {
      }
    }
  }
}

}  // namespace pkv::service
