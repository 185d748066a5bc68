// The callback service of API v1 and the server around it.
//
// Threading model: gRPC threads only run reactor callbacks, which never block: they check
// cheap things (draining) and hand engine work to the BoundedExecutor. Each RPC has at most one
// task in the executor at a time. A stream reactor has one operation in flight at a time
// (read -> engine task -> write -> read ...), so its state needs no lock; OnCancel only sets an
// atomic flag, and Finish is reached exactly once on each path. Reactors delete themselves in
// OnDone; a WriteKV prompt still pending there is aborted on the executor (it takes the engine
// lock), never on the gRPC thread.
#include "service/worker_server.h"

#include <atomic>
#include <condition_variable>
#include <random>
#include <thread>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "common/status_macros.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/metrics.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/security/server_credentials.h"
#include "pkv/v1/worker.grpc.pb.h"
#include "service/executor.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/heartbeat.h"
#include "service/tls_credentials.h"
#include "service/write_kv_wire.h"

namespace pkv::service {
namespace {

constexpr char kServiceName[] = "pkv.v1.PersistentKV";

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

class WriteKvReactor;

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

using RawService = v1::PersistentKV::WithRawCallbackMethod_Describe<
    v1::PersistentKV::WithRawCallbackMethod_Step<v1::PersistentKV::WithRawCallbackMethod_StepStream<
        v1::PersistentKV::WithRawCallbackMethod_WriteKV<v1::PersistentKV::WithRawCallbackMethod_Release<
            v1::PersistentKV::Service>>>>>;

// API v1 on raw byte buffers: every request is parsed by the worker itself, so a message that is
// not a valid request gets INVALID_ARGUMENT (and a response on StepStream) rather than gRPC's
// generic failure.
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
                                     grpc::ByteBuffer* response) override {
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

  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override {
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

  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override {
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

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StepStream(grpc::CallbackServerContext* ctx) override;

  grpc::ServerReadReactor<grpc::ByteBuffer>* WriteKV(grpc::CallbackServerContext* ctx,
                                                     grpc::ByteBuffer* response) override;

  // The call's router and this worker's incarnation; INVALID_ARGUMENT for a bad router id.
  absl::StatusOr<CallContext> CallOf(const grpc::CallbackServerContext* ctx) const {
    absl::StatusOr<std::string> router = RouterOf(ctx);
    if (!router.ok()) return router.status();
    return CallContext{*std::move(router), incarnation_};
  }

 private:
  // Runs `work(call)` (returning absl::Status) on the executor and finishes the call with it.
  template <typename Work>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* ctx, RpcMethod method, Work work) {
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

  engine::Engine& engine_;
  BoundedExecutor& executor_;
  BoundedExecutor& ingest_executor_;
  const ServiceLimits limits_;
  const RpcStats stats_;
  const uint64_t incarnation_;
  std::atomic<bool> draining_{false};
  WriteKvRegistry writes_;
};

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

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* WorkerService::StepStream(
    grpc::CallbackServerContext* ctx) {
  return new StepStreamReactor(this, ctx);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* WorkerService::WriteKV(grpc::CallbackServerContext* ctx,
                                                                  grpc::ByteBuffer* response) {
  return new WriteKvReactor(this, ctx, response);
}

std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

// Reads the PEM file given to option `flag` (named in errors as the pkv-worker flag).
absl::StatusOr<std::string> ReadPemFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": cannot read the file: ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": read error"));
  }
  std::string pem = std::move(text).str();
  if (pem.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

// The API port's credentials from the TLS options; *mode says which it is.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ApiCredentials(const ServerOptions& options,
                                                                        std::string* mode) {
  const bool has_cert = !options.tls_cert_file.empty();
  const bool has_key = !options.tls_key_file.empty();
  if (has_cert != has_key) {
    return absl::InvalidArgumentError(
        "--tls_cert_file and --tls_key_file must be given together (TLS needs both the "
        "certificate and its private key)");
  }
  if (!has_cert) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs TLS: give --tls_cert_file and --tls_key_file too");
    }
    *mode = "plaintext";
    return grpc::InsecureServerCredentials();
  }
  // The files are checked now, so that a bad one fails start-up; gRPC then reads them again
  // every tls_reload_seconds (a rotated certificate needs no restart).
  if (options.tls_reload_seconds < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_reload_s must be at least 1, got ", options.tls_reload_seconds));
  }
  absl::StatusOr<std::string> cert = ReadPemFile("tls_cert_file", options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("tls_key_file", options.tls_key_file);
  if (!key.ok()) return key.status();
  if (absl::Status match = CheckKeyMatchesCertificate(*cert, *key); !match.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert_file=", options.tls_cert_file, ", --tls_key_file=",
                                                   options.tls_key_file, ": ", match.message()));
  }
  if (options.tls_client_ca_file.empty()) {
    *mode = "TLS";
  } else {
    absl::StatusOr<std::string> ca = ReadPemFile("tls_client_ca_file", options.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
    *mode = "mutual TLS";
  }
  return WatchedTlsCredentials(options.tls_cert_file, options.tls_key_file, options.tls_client_ca_file,
                               options.tls_reload_seconds);
}

// The health-only server's answer to every method but grpc.health.v1's: UNIMPLEMENTED, saying
// where the API is. (gRPC also needs one callback service to start a server at all: the default
// health service is added later and does not count.)
class HealthPortFallback final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    class Refuse final : public grpc::ServerGenericBidiReactor {
     public:
      explicit Refuse(const std::string& method) {
        Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                            absl::StrCat(method, ": this port serves only grpc.health.v1; the API "
                                                 "is on the --listen port")));
      }
      void OnDone() override { delete this; }
    };
    return new Refuse(ctx->method());
  }
};

// Drops the builder plugins (reflection registers itself globally for every ServerBuilder), so
// the health-only server serves grpc.health.v1 and nothing else.
class NoPluginsOption final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->clear();
  }
};

}  // namespace

struct WorkerServer::Impl {
  ServerOptions options;
  // Declaration order is destruction order reversed: the server goes first, the engine last.
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<BoundedExecutor> executor;
  std::unique_ptr<BoundedExecutor> ingest_executor;
  std::unique_ptr<WorkerService> service;
  std::unique_ptr<grpc::Server> server;
  // Plaintext grpc.health.v1 only (options.health_listen_address); null when not asked for.
  std::unique_ptr<HealthPortFallback> health_fallback;
  std::unique_ptr<grpc::Server> health_server;
  int port = 0;
  int health_port = 0;
  std::string security_mode;
  std::mutex shutdown_mu;
  bool shut_down = false;
  uint64_t incarnation = 0;
  // The lease sweeper: every half second, aborts idle token steps, cancels idle WriteKV streams,
  // releases idle sequences, and turns readiness off while no token step can start.
  std::thread sweeper;
  std::mutex sweeper_mu;
  std::condition_variable sweeper_cv;
  bool sweeper_stop = false;
  bool jammed = false;  // sweeper thread only
  std::mutex health_mu;  // orders the sweeper's readiness changes against BeginDrain
  // Liveness (kLivenessService): the engine heartbeat's verdict, under health_mu. Null heartbeat:
  // liveness_stall_seconds is 0 and liveness stays SERVING.
  bool live = true;
  std::unique_ptr<EngineHeartbeat> heartbeat;

  void Sweep() {
    WorkerMetrics* m = options.metrics;
    const engine::Reclaimed r = engine->ReclaimIdle(std::chrono::steady_clock::now());
    for (const auto& ts : r.token_steps) {
      PKV_LOG(WARNING) << "lease: aborted token step " << ts.token_step_id << " of router '" << ts.owner << "' ("
                       << ts.rows << " rows, " << ts.layers_done << " layers done): no layer for "
                       << engine->limits().token_step_idle_seconds << " s";
      if (m != nullptr) m->reclaimed(WorkerMetrics::Reclaim::kTokenStep).Increment();
    }
    for (const auto& seq : r.sequences) {
      PKV_LOG(WARNING) << "lease: released sequence " << seq.id << " of router '" << seq.owner << "' (" << seq.pages
                       << " pages): idle for " << engine->limits().sequence_idle_seconds << " s";
      if (m != nullptr) {
        m->reclaimed(WorkerMetrics::Reclaim::kSequence).Increment();
        m->reclaimed_pages().Increment(static_cast<double>(seq.pages));
      }
    }
    if (options.prompt_idle_seconds > 0) {
      service->writes().CancelIdle(std::chrono::duration<double>(options.prompt_idle_seconds),
                                   [&](const WriteKvRegistry::Entry& e) {
                                     PKV_LOG(WARNING) << "lease: cancelled the WriteKV stream of sequence "
                                                      << e.sequence_id.load() << " of router '" << e.router
                                                      << "': no message for " << options.prompt_idle_seconds
                                                      << " s; its prompt is released";
                                     if (m != nullptr) m->reclaimed(WorkerMetrics::Reclaim::kPrompt).Increment();
                                   });
    }
    // Readiness: NOT_SERVING while every open-token-step slot is held by a token step with no
    // layer running (a new token step would be refused); the lease clears it.
    const engine::EngineInfo info = engine->Info();
    bool all_idle = info.open_steps.size() >= static_cast<size_t>(info.limits.max_open_token_steps);
    for (const auto& o : info.open_steps) all_idle = all_idle && o.idle_seconds > 1.0;
    std::lock_guard<std::mutex> health_lock(health_mu);
    if (all_idle != jammed && !service->draining()) {
      jammed = all_idle;
      PKV_LOG(WARNING) << (jammed ? "every open-token-step slot is held by an idle token step: health NOT_SERVING "
                                    "until the token-step lease frees one"
                                  : "an open-token-step slot is free again: health SERVING");
      SetHealth(!jammed);
    }
  }

  void RunSweeper() {
    std::unique_lock<std::mutex> lock(sweeper_mu);
    while (!sweeper_stop) {
      sweeper_cv.wait_for(lock, std::chrono::milliseconds(500));
      if (sweeper_stop) break;
      lock.unlock();
      Sweep();
      lock.lock();
    }
  }

  void StopSweeper() {
    {
      std::lock_guard<std::mutex> lock(sweeper_mu);
      sweeper_stop = true;
    }
    sweeper_cv.notify_all();
    if (sweeper.joinable()) sweeper.join();
  }

  // Sets the same status on both servers, so a probe of the health port sees what a client of
  // the API port sees.
  void SetHealth(bool serving) {
    for (grpc::Server* s : {server.get(), health_server.get()}) {
      if (s == nullptr) continue;
      grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService();
      if (health == nullptr) continue;
      health->SetServingStatus(serving);  // every service, including "" (the whole server)
      health->SetServingStatus(kServiceName, serving);
      health->SetServingStatus(kLivenessService, live);  // liveness keeps its own status
    }
  }

  // Sets liveness on both servers (health_mu held by the caller, or no other thread yet).
  void SetLiveness(bool is_live) {
    live = is_live;
    for (grpc::Server* s : {server.get(), health_server.get()}) {
      if (s == nullptr) continue;
      if (grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService()) {
        health->SetServingStatus(kLivenessService, live);
      }
    }
  }

  void StartHeartbeat() {
    if (options.liveness_stall_seconds <= 0) return;
    EngineHeartbeat::Options o;
    o.period = std::chrono::duration<double>(
        options.heartbeat_period_seconds > 0 ? options.heartbeat_period_seconds : 1.0);
    o.stall = std::chrono::duration<double>(options.liveness_stall_seconds);
    heartbeat = std::make_unique<EngineHeartbeat>(
        *executor, [e = engine.get()] { e->Heartbeat(); }, o,
        [this](bool is_live) {
          std::lock_guard<std::mutex> lock(health_mu);
          SetLiveness(is_live);
        },
        options.metrics != nullptr ? &options.metrics->heartbeat_age() : nullptr);
  }
};

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(
    const ServerOptions& options, std::unique_ptr<engine::Engine> engine) {
  if (engine == nullptr) return absl::InvalidArgumentError("WorkerServer::Start: no engine");
  if (options.max_message_bytes < (1 << 20) || options.max_message_bytes > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes must be in [1 MiB, 2 GiB), got ", options.max_message_bytes));
  }
  std::string security_mode;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      ApiCredentials(options, &security_mode);
  if (!credentials.ok()) return credentials.status();
  if (!options.health_listen_address.empty() &&
      options.health_listen_address == options.listen_address &&
      !absl::EndsWith(options.listen_address, ":0")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--health_listen must differ from --listen (both are ", options.listen_address, ")"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->security_mode = security_mode;
  impl->engine = std::move(engine);
  impl->executor = std::make_unique<BoundedExecutor>(options.executor_threads, options.executor_queue,
                                                     std::chrono::microseconds(options.executor_spin_us));
  impl->ingest_executor = std::make_unique<BoundedExecutor>(options.ingest_threads, options.ingest_queue);
  {
    std::random_device random;
    while (impl->incarnation == 0) {
      impl->incarnation = (static_cast<uint64_t>(random()) << 32) ^ static_cast<uint64_t>(random());
    }
  }
  impl->service = std::make_unique<WorkerService>(
      *impl->engine, *impl->executor, *impl->ingest_executor,
      ServiceLimits{.max_message_bytes = options.max_message_bytes, .prompt_idle_seconds = options.prompt_idle_seconds},
      options.metrics, impl->incarnation);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, *credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  if (options.keepalive_seconds > 0) {
    // Ping idle connections; a peer that does not answer within the timeout is dropped, which
    // cancels its streams (a prompt being written is released).
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_seconds * 1000));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                               static_cast<int>(std::max(options.keepalive_timeout_seconds, 1.0) * 1000));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    impl->executor->Shutdown();
    impl->ingest_executor->Shutdown();
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen_address,
        security_mode == "plaintext"
            ? ""
            : " (the address is in use, or the TLS certificate and key were rejected: check that "
              "they are valid PEM and belong together)"));
  }
  if (!options.health_listen_address.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.SetOption(std::make_unique<NoPluginsOption>());
    impl->health_fallback = std::make_unique<HealthPortFallback>();
    health_builder.RegisterCallbackGenericService(impl->health_fallback.get());
    health_builder.AddListeningPort(options.health_listen_address,
                                    grpc::InsecureServerCredentials(), &impl->health_port);
    impl->health_server = health_builder.BuildAndStart();
    if (impl->health_server == nullptr || impl->health_port == 0) {
      impl->server->Shutdown(absl::ToChronoTime(absl::Now()));
      impl->server->Wait();
      impl->executor->Shutdown();
      impl->ingest_executor->Shutdown();
      return absl::UnavailableError(
          absl::StrCat("--health_listen: cannot listen on ", options.health_listen_address));
    }
  }
  PKV_LOG(INFO) << "API port " << HostOf(options.listen_address) << ":" << impl->port << ": "
                << security_mode
                << (security_mode == "mutual TLS" ? " (client certificates required)" : "")
                << "; health "
                << (impl->health_server == nullptr
                        ? "on the API port"
                        : absl::StrCat("also on plaintext port ", impl->health_port,
                                       " (grpc.health.v1 only)"));
  PKV_LOG(INFO) << "incarnation " << impl->incarnation;
  // Ready means "can serve": the engine and its pool exist and the port is bound.
  impl->SetHealth(true);
  impl->StartHeartbeat();
  Impl* raw = impl.get();
  impl->sweeper = std::thread([raw] { raw->RunSweeper(); });
  return std::unique_ptr<WorkerServer>(new WorkerServer(std::move(impl)));
}

WorkerServer::WorkerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerServer::~WorkerServer() { Shutdown(absl::ZeroDuration()); }

int WorkerServer::port() const { return impl_->port; }

std::string WorkerServer::address() const {
  return absl::StrCat(HostOf(impl_->options.listen_address), ":", impl_->port);
}

int WorkerServer::health_port() const { return impl_->health_port; }

std::string WorkerServer::health_address() const {
  if (impl_->health_server == nullptr) return "";
  return absl::StrCat(HostOf(impl_->options.health_listen_address), ":", impl_->health_port);
}

std::string WorkerServer::security_mode() const { return impl_->security_mode; }

engine::Engine& WorkerServer::engine() { return *impl_->engine; }

BoundedExecutor& WorkerServer::executor_for_testing() { return *impl_->executor; }

BoundedExecutor& WorkerServer::ingest_executor_for_testing() { return *impl_->ingest_executor; }

uint64_t WorkerServer::incarnation() const { return impl_->incarnation; }

void WorkerServer::SweepNowForTesting() { impl_->Sweep(); }

void WorkerServer::BeginDrain() {
  {
    std::lock_guard<std::mutex> lock(impl_->health_mu);
    if (impl_->service->draining()) return;
    impl_->service->SetDraining();
    impl_->SetHealth(false);
  }
  impl_->engine->StopNewWork();
  PKV_LOG(INFO) << "draining: health NOT_SERVING, new token steps and prompts refused with UNAVAILABLE; "
                   "open token steps may finish";
}

bool WorkerServer::draining() const { return impl_->service->draining(); }

void WorkerServer::Shutdown(absl::Duration grace) {
  std::lock_guard<std::mutex> lock(impl_->shutdown_mu);
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  BeginDrain();
  // The API port stays open while open token steps and prompts being written finish, up to the
  // grace period.
  const absl::Time deadline = absl::Now() + grace;
  for (;;) {
    const engine::EngineInfo info = impl_->engine->Info();
    if (info.open_token_steps == 0 && info.writing_sequences == 0) break;
    if (absl::Now() >= deadline) {
      PKV_LOG(WARNING) << "grace period over with " << info.open_token_steps << " open token steps and "
                       << info.writing_sequences << " prompts being written: cancelling them";
      break;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  impl_->StopSweeper();
  if (impl_->heartbeat != nullptr) impl_->heartbeat->Stop();  // before the executor stops
  // Then in-flight RPCs get a short moment to send their answers before they are cancelled;
  // their reactors still finish through the executor, which is running until after this returns.
  impl_->server->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Milliseconds(200))));
  impl_->server->Wait();
  // Probes kept seeing NOT_SERVING during the grace period; now the health port goes too.
  if (impl_->health_server != nullptr) {
    impl_->health_server->Shutdown(absl::ToChronoTime(absl::Now()));
    impl_->health_server->Wait();
  }
  impl_->ingest_executor->Shutdown();
  impl_->executor->Shutdown();
  const engine::EngineInfo info = impl_->engine->Info();
  PKV_LOG(INFO) << "server stopped: " << info.pager.free_pages << "/" << info.pager.total_pages
                << " pages free, " << info.pager.num_sequences << " sequences held";
}

}  // namespace pkv::service
