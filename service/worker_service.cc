// The callback reactors of API v1 (service/worker_service.h): Describe, Step, Release and WriteKV.
// StepStream is served from completion queues (service/step_stream.cc); the wire helpers both use
// are service/rpc_wire.h.
//
// Threading model: gRPC threads only run reactor callbacks, which never block: they check
// cheap things (draining) and hand engine work to the BoundedExecutor. Each RPC has at most one
// task in the executor at a time. A stream reactor has one operation in flight at a time
// (read -> engine task -> write -> read ...), so its state needs no lock; OnCancel only sets an
// atomic flag, and Finish is reached exactly once on each path. Reactors delete themselves in
// OnDone; a WriteKV prompt still pending there is aborted on the executor (it takes the engine
// lock), never on the gRPC thread.
#include "service/worker_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/rpc_wire.h"
#include "service/write_kv_wire.h"

namespace pkv::service {

template <typename Work>
grpc::ServerUnaryReactor* WorkerService::RunUnary(grpc::CallbackServerContext* ctx, RpcMethod method,
                                                  Work work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const RpcStats::Clock::time_point received = RpcStats::Clock::now();
  stats_.Begin(method);
  auto finish = [this, reactor, method, received](const grpc::Status& status) {
    stats_.Count(method, status);
    stats_.Answered(method, received);
    stats_.End(method);
    reactor->Finish(status);
  };
  absl::StatusOr<CallContext> call = CallOf(*ctx);
  if (!call.ok()) {
    finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  const bool queued =
      executor_.TrySubmit([this, method, received, ctx, finish, call = *std::move(call),
                           work = std::move(work)]() mutable {
        stats_.Started(method, received);
        if (ctx->IsCancelled()) {  // the caller is gone: skip the engine work
          finish(grpc::Status::CANCELLED);
          return;
        }
        finish(ToGrpcStatus(work(call)));
      });
  if (!queued) {
    stats_.Rejected(WorkerMetrics::Queue::kDecode);
    finish(ToGrpcStatus(BusyError(executor_)));
  }
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Describe(grpc::CallbackServerContext* ctx,
                                                   const grpc::ByteBuffer* request,
                                                   grpc::ByteBuffer* response) {
  // Describe stays available while draining: it reports serving = false.
  return RunUnary(ctx, RpcMethod::kDescribe, [this, request, response](const CallContext& call) {
    v1::DescribeRequest in;
    PKV_RETURN_IF_ERROR(ParseRequest(*request, &in, RpcMethod::kDescribe, stats_.metrics()));
    v1::DescribeResponse out;
    RunDescribe(engine_, limits_, !draining(), &out, call);
    SerializeResponse(out, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerService::Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                               grpc::ByteBuffer* response) {
  // While draining, the engine refuses new token steps and runs the later layers of open ones.
  const auto received = std::chrono::steady_clock::now();
  return RunUnary(ctx, RpcMethod::kStep, [this, request, response, received](const CallContext& call) {
    const auto started = std::chrono::steady_clock::now();
    v1::StepRequest in;
    PKV_RETURN_IF_ERROR(ParseRequest(*request, &in, RpcMethod::kStep, stats_.metrics()));
    v1::StepResponse out;
    engine::OutputBytes payload;
    PKV_RETURN_IF_ERROR(RunStep(engine_, in, &out, call, &payload));
    SetServerTimes(received, started, &out);
    SerializeStepResponse(out, payload, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerService::Release(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                                  grpc::ByteBuffer* response) {
  // Release frees memory: allowed while draining.
  return RunUnary(ctx, RpcMethod::kRelease, [this, request, response](const CallContext& call) {
    v1::ReleaseRequest in;
    PKV_RETURN_IF_ERROR(ParseRequest(*request, &in, RpcMethod::kRelease, stats_.metrics()));
    v1::ReleaseResponse out;
    PKV_RETURN_IF_ERROR(RunRelease(engine_, in, &out, call));
    SerializeResponse(out, response);
    return absl::OkStatus();
  });
}

absl::StatusOr<CallContext> WorkerService::CallOf(const grpc::ServerContextBase& ctx) const {
  absl::StatusOr<std::string> router = RouterOf(ctx);
  if (!router.ok()) return router.status();
  CallContext call;
  call.router = *std::move(router);
  call.incarnation = incarnation_;
  return call;
}

namespace {

// WriteKV: header, chunks, then Commit on the client's half-close. Any error, a cancellation or
// the prompt lease (no message for prompt_idle_seconds) finishes the stream and releases the
// prompt.
class WriteKvReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  WriteKvReactor(WorkerService* service, grpc::CallbackServerContext* ctx, grpc::ByteBuffer* response)
      : service_(service), ctx_(ctx), response_(response), opened_(std::chrono::steady_clock::now()) {
    service_->stats().Begin(RpcMethod::kWriteKV);
    if (service_->draining()) {
      Finish(ToGrpcStatus(DrainingError()));
      return;
    }
    absl::StatusOr<CallContext> call = service_->CallOf(*ctx);
    if (!call.ok()) {
      Finish(ToGrpcStatus(call.status()));
      return;
    }
    session_ = std::make_unique<PromptSession>(service->engine(), *call);
    entry_ = service_->writes().Add(ctx, call->router);
    StartRead(&raw_request_);
  }

  void OnReadDone(bool ok) override {
    BoundedExecutor& executor = service_->ingest_executor();
    WriteKvRegistry::Touch(*entry_);
    const auto queued = std::chrono::steady_clock::now();
    if (!ok) {
      if (Cancelled()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                            entry_->expired ? absl::StrCat("WriteKV: no message for ", service_->limits().prompt_idle_seconds,
                                                           " s (the prompt lease): the prompt was released")
                                            : "WriteKV was cancelled"));  // OnDone aborts the prompt
        return;
      }
      // The client half-closed: commit. This stream already holds an admission. A read that
      // failed because the call was cut may be reported before OnCancel: ask the context too,
      // so a cut stream is never committed.
      executor.SubmitAlways([this, queued] {
        service_->stats().Started(RpcMethod::kWriteKV, queued);
        v1::WriteKVResponse out;
        absl::Status status =
            Cancelled() ? absl::CancelledError("WriteKV was cancelled") : session_->Commit(&out);
        if (status.ok()) {
          SerializeResponse(out, response_);
        } else {
          session_->Abort();
        }
        Finish(ToGrpcStatus(status));
      });
      return;
    }
    auto task = [this, queued] {
      service_->stats().Started(RpcMethod::kWriteKV, queued);
      absl::Status status = Cancelled() ? absl::CancelledError("WriteKV was cancelled") : Handle();
      if (!status.ok()) {
        session_->Abort();
        Finish(ToGrpcStatus(status));
        return;
      }
      WriteKvRegistry::Touch(*entry_);
      StartRead(&raw_request_);
    };
    if (!admitted_) {
      // The first message asks for new work: bounded admission and drain check.
      admitted_ = true;
      if (service_->draining()) {
        Finish(ToGrpcStatus(DrainingError()));
        return;
      }
      if (!executor.TrySubmit(std::move(task))) {
        service_->stats().Rejected(WorkerMetrics::Queue::kIngest);
        Finish(ToGrpcStatus(BusyError(executor)));
      }
      return;
    }
    executor.SubmitAlways(std::move(task));
  }

  void OnCancel() override { cancelled_.store(true); }

  // Every WriteKV ends here: count it once with its final status.
  void Finish(const grpc::Status& status) {
    service_->stats().Count(RpcMethod::kWriteKV, status);
    service_->stats().Answered(RpcMethod::kWriteKV, opened_);
    grpc::ServerReadReactor<grpc::ByteBuffer>::Finish(status);
  }

  void OnDone() override {
    service_->stats().End(RpcMethod::kWriteKV);
    if (entry_ != nullptr) service_->writes().Remove(entry_);
    if (session_ != nullptr && session_->pending()) {
      PKV_LOG(INFO) << "WriteKV stream of sequence " << session_->sequence_id() << " ended before commit: releasing its prompt";
      // The abort takes the engine lock: run it on the executor, not on this gRPC thread.
      service_->ingest_executor().SubmitAlways([session = std::move(session_)] { session->Abort(); });
    }
    delete this;
  }

 private:
  bool Cancelled() const { return cancelled_.load() || ctx_->IsCancelled(); }

  absl::Status Handle() {
    // A chunk is read in place: its K,V bytes go to the engine in the slices gRPC received them
    // in (a large field crosses many: gRPC receives into slices of up to 64 KiB, cut again at
    // each HTTP/2 frame), and the arena stages them from there. The header, and anything the
    // in-place reader leaves (service/write_kv_wire.h), goes through protobuf.
    if (ReadChunk()) {
      PKV_RETURN_IF_ERROR(session_->OnChunk(chunk_));
    } else {
      request_.Clear();
      PKV_RETURN_IF_ERROR(ParseRequest(raw_request_, &request_, RpcMethod::kWriteKV, service_->stats().metrics()));
      PKV_RETURN_IF_ERROR(session_->OnMessage(request_));
    }
    entry_->sequence_id.store(session_->sequence_id());
    return absl::OkStatus();
  }

  // Reads raw_request_ as a chunk into chunk_ (spans into its slices or the scratch strings).
  bool ReadChunk() {
    slices_.clear();
    if (!raw_request_.Dump(&slices_).ok()) return false;
    pieces_.clear();
    for (const grpc::Slice& slice : slices_) pieces_.emplace_back(slice.begin(), slice.size());
    return ReadChunkInPlace(pieces_, &chunk_);
  }

  WorkerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  grpc::ByteBuffer* const response_;
  const std::chrono::steady_clock::time_point opened_;  // the stream began
  std::unique_ptr<PromptSession> session_;
  std::shared_ptr<WriteKvRegistry::Entry> entry_;
  grpc::ByteBuffer raw_request_;
  v1::WriteKVRequest request_;
  // The chunk read in place and the slices it points into (reused from message to message).
  std::vector<grpc::Slice> slices_;
  std::vector<std::span<const uint8_t>> pieces_;
  ChunkRef chunk_;
  bool admitted_ = false;  // gRPC threads only (one read in flight)
  std::atomic<bool> cancelled_{false};
};

}  // namespace

grpc::ServerReadReactor<grpc::ByteBuffer>* WorkerService::WriteKV(grpc::CallbackServerContext* ctx,
                                                                  grpc::ByteBuffer* response) {
  return new WriteKvReactor(this, ctx, response);
}

}  // namespace pkv::service
