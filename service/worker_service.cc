// The reactors of API v1 (service/worker_service.h) and the helpers they share: request
// parsing, response serialization (a StepResponse's output bytes sent uncopied) and router ids.
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
#include "service/write_kv_wire.h"

namespace pkv::service {
namespace {

absl::Status DrainingError() {
  return absl::UnavailableError("the worker is draining (shutting down) and takes no new work");
}

// StepResponse timing: the worker held the request from `received` (read on the API thread) to
// now; it waited for an engine thread until `started`. Both ends also as wall-clock stamps.
void SetServerTimes(std::chrono::steady_clock::time_point received, std::chrono::steady_clock::time_point started,
                    v1::StepResponse* response) {
  const auto now = std::chrono::steady_clock::now();
  const int64_t now_unix = std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::system_clock::now().time_since_epoch()).count();
  const int64_t held = std::chrono::duration_cast<std::chrono::nanoseconds>(now - received).count();
  response->set_server_seconds(std::chrono::duration<double>(now - received).count());
  response->set_queue_seconds(std::chrono::duration<double>(std::max(started, received) - received).count());
  response->set_received_unix_nanos(now_unix - held);
  response->set_answered_unix_nanos(now_unix);
}

absl::Status BusyError(const BoundedExecutor& executor) {
  return absl::ResourceExhaustedError(absl::StrCat(
      "the worker's work queue is full (", executor.queued(),
      " tasks waiting); retry later (a retried Step with the same token_step_id is safe)"));
}

// Request metadata key a router names itself with when the API port is not mutual TLS.
constexpr char kRouterIdKey[] = "x-pkv-router-id";
constexpr size_t kMaxRouterIdBytes = 256;

// The router a call comes from (see worker.proto, Routers): the verified client certificate's
// identity under mutual TLS, else the declared x-pkv-router-id, else "" (anonymous).
absl::StatusOr<std::string> RouterOf(const grpc::CallbackServerContext* ctx) {
  std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    const std::vector<grpc::string_ref> identity = auth->GetPeerIdentity();
    if (!identity.empty()) return std::string(identity.front().data(), identity.front().size());
  }
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find(kRouterIdKey);
  if (it == metadata.end()) return std::string();
  if (it->second.size() > kMaxRouterIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", kRouterIdKey, ": ", it->second.size(),
                                                   " bytes, the most is ", kMaxRouterIdBytes));
  }
  return std::string(it->second.data(), it->second.size());
}

// Parses a raw request; INVALID_ARGUMENT (counted) when the bytes are not a `Message`.
template <typename Message>
absl::Status ParseRequest(const grpc::ByteBuffer& raw, Message* message, RpcMethod method, WorkerMetrics* metrics) {
  grpc::ByteBuffer shallow(raw);  // shares the slices; parsing consumes the copy
  if (grpc::SerializationTraits<Message>::Deserialize(&shallow, message).ok()) return absl::OkStatus();
  if (metrics != nullptr) metrics->malformed(method).Increment();
  return absl::InvalidArgumentError(absl::StrCat("request: cannot parse the message as ",
                                                 Message::descriptor()->full_name()));
}

template <typename Message>
void SerializeResponse(const Message& message, grpc::ByteBuffer* out) {
  bool own = false;
  const grpc::Status s = grpc::SerializationTraits<Message>::Serialize(message, out, &own);
  PKV_CHECK(s.ok()) << "serializing " << Message::descriptor()->full_name() << ": " << s.error_message();
}

// A StepResponse whose out.data is `payload`: the message without it, then a second occurrence of
// field `out` that carries only the data (protobuf merges repeated occurrences of a message
// field), the bytes themselves as a slice that keeps `payload` alive instead of a copy.
void SerializeStepResponse(const v1::StepResponse& response, const engine::OutputBytes& payload,
                           grpc::ByteBuffer* out) {
  if (payload.empty()) {
    SerializeResponse(response, out);
    return;
  }
  auto varint = [](std::string* s, uint64_t v) {
    while (v >= 0x80) {
      s->push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    s->push_back(static_cast<char>(v));
  };
  constexpr char kOutTag = (v1::StepResponse::kOutFieldNumber << 3) | 2;  // length-delimited
  constexpr char kDataTag = (v1::Tensor::kDataFieldNumber << 3) | 2;
  std::string head = response.SerializeAsString();
  std::string data_key(1, kDataTag);
  varint(&data_key, payload.size());
  head.push_back(kOutTag);
  varint(&head, data_key.size() + payload.size());
  head += data_key;
  auto* keep = new std::shared_ptr<const std::string>(payload.shared());
  grpc::Slice slices[2] = {
      grpc::Slice(head),
      grpc::Slice(const_cast<char*>((*keep)->data()), (*keep)->size(),
                  [](void* p) { delete static_cast<std::shared_ptr<const std::string>*>(p); }, keep)};
  *out = grpc::ByteBuffer(slices, 2);
}

}  // namespace

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
  absl::StatusOr<CallContext> call = CallOf(ctx);
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

absl::StatusOr<CallContext> WorkerService::CallOf(const grpc::CallbackServerContext* ctx) const {
  absl::StatusOr<std::string> router = RouterOf(ctx);
  if (!router.ok()) return router.status();
  return CallContext{*std::move(router), incarnation_};
}

namespace {

// StepStream: one StepResponse per StepRequest, in order; per-message errors (a message that
// cannot be parsed included) in StepResponse.status.
class StepStreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StepStreamReactor(WorkerService* service, grpc::CallbackServerContext* ctx) : service_(service) {
    service_->stats().Begin(RpcMethod::kStepStream);
    absl::StatusOr<CallContext> call = service_->CallOf(ctx);
    if (!call.ok()) {
      Finish(ToGrpcStatus(call.status()));
      return;
    }
    call_ = *std::move(call);
    StartRead(&raw_request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or the stream broke / was cancelled
      Finish(cancelled_.load() ? grpc::Status::CANCELLED : grpc::Status::OK);
      return;
    }
    received_ = std::chrono::steady_clock::now();
    if (!service_->executor().TrySubmit([this] { Process(); })) {
      service_->stats().Rejected(WorkerMetrics::Queue::kDecode);
      // Rare: parse here so that the refusal echoes the request's ids.
      absl::Status parsed = Parse();
      Answer(parsed.ok() ? BusyError(service_->executor()) : parsed);
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "StepStream: the response could not be sent"));
      return;
    }
    StartRead(&raw_request_);
  }

  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override {
    service_->stats().End(RpcMethod::kStepStream);
    delete this;
  }

 private:
  absl::Status Parse() {
    request_.Clear();
    return ParseRequest(raw_request_, &request_, RpcMethod::kStepStream, service_->stats().metrics());
  }

  // Executor thread: the engine work for the request read.
  void Process() {
    started_ = std::chrono::steady_clock::now();
    service_->stats().Started(RpcMethod::kStepStream, received_);
    absl::Status parsed = Parse();
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
    Answer(RunStep(service_->engine(), request_, &response_, call_, &payload_));
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
    // A request refused before it reached an engine thread (queue full) has a stale started_,
    // older than received_: SetServerTimes counts no queueing for it.
    SetServerTimes(received_, started_, &response_);
    service_->stats().Count(RpcMethod::kStepStream, ToGrpcStatus(status));
    service_->stats().Answered(RpcMethod::kStepStream, received_);
    raw_response_.Clear();
    SerializeStepResponse(response_, payload_, &raw_response_);
    payload_ = engine::OutputBytes();  // the slice keeps the bytes alive until gRPC sent them
    StartWrite(&raw_response_);
  }

  WorkerService* const service_;
  CallContext call_;
  grpc::ByteBuffer raw_request_, raw_response_;
  v1::StepRequest request_;
  v1::StepResponse response_;
  engine::OutputBytes payload_;  // response_'s out.data, sent uncopied
  std::chrono::steady_clock::time_point received_, started_;  // request read; engine thread began
  std::atomic<bool> cancelled_{false};
};

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
    absl::StatusOr<CallContext> call = service_->CallOf(ctx);
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
    // A chunk is read in place: its K,V bytes go to the engine from the slices gRPC received
    // them in, or from one gathered copy when a field crosses slices (gRPC receives into 64 KiB
    // slices, so a large field does). The header, and anything the in-place reader leaves
    // (service/write_kv_wire.h), goes through protobuf.
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
    return ReadChunkInPlace(pieces_, &chunk_, &k_scratch_, &v_scratch_);
  }

  WorkerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  grpc::ByteBuffer* const response_;
  const std::chrono::steady_clock::time_point opened_;  // the stream began
  std::unique_ptr<PromptSession> session_;
  std::shared_ptr<WriteKvRegistry::Entry> entry_;
  grpc::ByteBuffer raw_request_;
  v1::WriteKVRequest request_;
  // The chunk read in place and what it points into (reused from message to message).
  std::vector<grpc::Slice> slices_;
  std::vector<std::span<const uint8_t>> pieces_;
  ChunkRef chunk_;
  std::string k_scratch_, v_scratch_;
  bool admitted_ = false;  // gRPC threads only (one read in flight)
  std::atomic<bool> cancelled_{false};
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* WorkerService::StepStream(
    grpc::CallbackServerContext* ctx) {
  return new StepStreamReactor(this, ctx);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* WorkerService::WriteKV(grpc::CallbackServerContext* ctx,
                                                                  grpc::ByteBuffer* response) {
  return new WriteKvReactor(this, ctx, response);
}

}  // namespace pkv::service
