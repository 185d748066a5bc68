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
#include <chrono>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
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

// Counts finished RPCs (StepStream: messages) and in-flight calls when metrics are enabled.
class RpcStats {
 public:
  explicit RpcStats(WorkerMetrics* metrics) : m_(metrics) {}
  void Begin(RpcMethod method) const {
    if (m_ != nullptr) m_->inflight_streams(method).Increment();
  }
  void End(RpcMethod method) const {
    if (m_ != nullptr) m_->inflight_streams(method).Decrement();
  }
  void Count(RpcMethod method, const grpc::Status& status) const {
    if (m_ != nullptr) m_->rpc(method, static_cast<int>(status.error_code())).Increment();
  }
  void Rejected() const {
    if (m_ != nullptr) m_->queue_rejections().Increment();
  }

 private:
  WorkerMetrics* m_;
};

class WorkerService final : public v1::PersistentKV::CallbackService {
 public:
  WorkerService(engine::Engine& engine, BoundedExecutor& executor, BoundedExecutor& ingest_executor,
                ServiceLimits limits, WorkerMetrics* metrics)
      : engine_(engine), executor_(executor), ingest_executor_(ingest_executor), limits_(limits), stats_(metrics) {}

  const RpcStats& stats() const { return stats_; }

  void SetDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  engine::Engine& engine() { return engine_; }
  // Decode steps, Describe and Release.
  BoundedExecutor& executor() { return executor_; }
  // WriteKV.
  BoundedExecutor& ingest_executor() { return ingest_executor_; }

  grpc::ServerUnaryReactor* Describe(grpc::CallbackServerContext* ctx, const v1::DescribeRequest*,
                                     v1::DescribeResponse* response) override {
    // Describe stays available while draining: it reports serving = false.
    return RunUnary(ctx, RpcMethod::kDescribe, /*refuse_when_draining=*/false, [this, response] {
      RunDescribe(engine_, limits_, !draining(), response);
      return absl::OkStatus();
    });
  }

  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* request,
                                 v1::StepResponse* response) override {
    const auto received = std::chrono::steady_clock::now();
    return RunUnary(ctx, RpcMethod::kStep, /*refuse_when_draining=*/true, [this, request, response, received] {
      const auto started = std::chrono::steady_clock::now();
      absl::Status status = RunStep(engine_, *request, response);
      SetServerTimes(received, started, response);
      return status;
    });
  }

  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse* response) override {
    // Release frees memory: allowed while draining.
    return RunUnary(ctx, RpcMethod::kRelease, /*refuse_when_draining=*/false,
                    [this, request, response] { return RunRelease(engine_, *request, response); });
  }

  grpc::ServerBidiReactor<v1::StepRequest, v1::StepResponse>* StepStream(
      grpc::CallbackServerContext* ctx) override;

  grpc::ServerReadReactor<v1::WriteKVRequest>* WriteKV(grpc::CallbackServerContext* ctx,
                                                       v1::WriteKVResponse* response) override;

 private:
  // Runs `work` (returning absl::Status) on the executor and finishes the call with its status.
  template <typename Work>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* ctx, RpcMethod method,
                                     bool refuse_when_draining, Work work) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    stats_.Begin(method);
    auto finish = [this, reactor, method](const grpc::Status& status) {
      stats_.Count(method, status);
      stats_.End(method);
      reactor->Finish(status);
    };
    if (refuse_when_draining && draining()) {
      finish(ToGrpcStatus(DrainingError()));
      return reactor;
    }
    const bool queued = executor_.TrySubmit([ctx, finish, work = std::move(work)]() mutable {
      if (ctx->IsCancelled()) {  // the caller is gone: skip the engine work
        finish(grpc::Status::CANCELLED);
        return;
      }
      finish(ToGrpcStatus(work()));
    });
    if (!queued) {
      stats_.Rejected();
      finish(ToGrpcStatus(BusyError(executor_)));
    }
    return reactor;
  }

  engine::Engine& engine_;
  BoundedExecutor& executor_;
  BoundedExecutor& ingest_executor_;
  const ServiceLimits limits_;
  const RpcStats stats_;
  std::atomic<bool> draining_{false};
};

// StepStream: one StepResponse per StepRequest, in order; per-message errors in
// StepResponse.status.
class StepStreamReactor final : public grpc::ServerBidiReactor<v1::StepRequest, v1::StepResponse> {
 public:
  explicit StepStreamReactor(WorkerService* service) : service_(service) {
    service_->stats().Begin(RpcMethod::kStepStream);
    if (service_->draining()) {
      Finish(ToGrpcStatus(DrainingError()));
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or the stream broke / was cancelled
      Finish(cancelled_.load() ? grpc::Status::CANCELLED : grpc::Status::OK);
      return;
    }
    if (service_->draining()) {
      Finish(ToGrpcStatus(DrainingError()));
      return;
    }
    response_.Clear();
    received_ = std::chrono::steady_clock::now();
    if (!service_->executor().TrySubmit([this] { Process(); })) {
      service_->stats().Rejected();
      Answer(BusyError(service_->executor()));
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "StepStream: the response could not be sent"));
      return;
    }
    StartRead(&request_);
  }

  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override {
    service_->stats().End(RpcMethod::kStepStream);
    delete this;
  }

 private:
  // Executor thread: the engine work for request_.
  void Process() {
    started_ = std::chrono::steady_clock::now();
    if (cancelled_.load()) {
      Answer(absl::CancelledError("StepStream was cancelled"));
      return;
    }
    Answer(RunStep(service_->engine(), request_, &response_));
  }

  // Writes response_ with `status` (echoing the request's ids).
  void Answer(const absl::Status& status) {
    if (!status.ok()) response_.Clear();
    response_.set_token_step_id(request_.token_step_id());
    response_.set_layer(request_.layer());
    ToRequestStatus(status, response_.mutable_status());
    // A request refused before it reached an engine thread (queue full) has a stale started_,
    // older than received_: SetServerTimes counts no queueing for it.
    SetServerTimes(received_, started_, &response_);
    service_->stats().Count(RpcMethod::kStepStream, ToGrpcStatus(status));
    StartWrite(&response_);
  }

  WorkerService* const service_;
  v1::StepRequest request_;
  v1::StepResponse response_;
  std::chrono::steady_clock::time_point received_, started_;  // request read; engine thread began
  std::atomic<bool> cancelled_{false};
};

// WriteKV: header, chunks, then Commit on the client's half-close. Any error or a cancellation
// finishes the stream and releases the prompt.
class WriteKvReactor final : public grpc::ServerReadReactor<v1::WriteKVRequest> {
 public:
  WriteKvReactor(WorkerService* service, grpc::CallbackServerContext* ctx,
                 v1::WriteKVResponse* response)
      : service_(service),
        ctx_(ctx),
        response_(response),
        session_(std::make_unique<PromptSession>(service->engine())) {
    service_->stats().Begin(RpcMethod::kWriteKV);
    if (service_->draining()) {
      Finish(ToGrpcStatus(DrainingError()));
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    BoundedExecutor& executor = service_->ingest_executor();
    if (!ok) {
      if (cancelled_.load()) {
        Finish(grpc::Status::CANCELLED);  // OnDone aborts the prompt
        return;
      }
      // The client half-closed: commit. This stream already holds an admission. A read that
      // failed because the call was cut may be reported before OnCancel: ask the context too,
      // so a cut stream is never committed.
      executor.SubmitAlways([this] {
        absl::Status status = Cancelled() ? absl::CancelledError("WriteKV was cancelled")
                                          : session_->Commit(response_);
        if (!status.ok()) session_->Abort();
        Finish(ToGrpcStatus(status));
      });
      return;
    }
    auto task = [this] {
      absl::Status status =
          Cancelled() ? absl::CancelledError("WriteKV was cancelled") : session_->OnMessage(request_);
      if (!status.ok()) {
        session_->Abort();
        Finish(ToGrpcStatus(status));
        return;
      }
      StartRead(&request_);
    };
    if (!admitted_) {
      // The first message asks for new work: bounded admission and drain check.
      admitted_ = true;
      if (service_->draining()) {
        Finish(ToGrpcStatus(DrainingError()));
        return;
      }
      if (!executor.TrySubmit(std::move(task))) {
        service_->stats().Rejected();
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
    grpc::ServerReadReactor<v1::WriteKVRequest>::Finish(status);
  }

  void OnDone() override {
    service_->stats().End(RpcMethod::kWriteKV);
    if (session_->pending()) {
      PKV_LOG(INFO) << "WriteKV stream ended before commit: releasing its prompt";
      // The abort takes the engine lock: run it on the executor, not on this gRPC thread.
      service_->ingest_executor().SubmitAlways([session = std::move(session_)] { session->Abort(); });
    }
    delete this;
  }

 private:
  bool Cancelled() const { return cancelled_.load() || ctx_->IsCancelled(); }

  WorkerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  v1::WriteKVResponse* const response_;
  std::unique_ptr<PromptSession> session_;
  v1::WriteKVRequest request_;
  bool admitted_ = false;  // gRPC threads only (one read in flight)
  std::atomic<bool> cancelled_{false};
};

grpc::ServerBidiReactor<v1::StepRequest, v1::StepResponse>* WorkerService::StepStream(
    grpc::CallbackServerContext*) {
  return new StepStreamReactor(this);
}

grpc::ServerReadReactor<v1::WriteKVRequest>* WorkerService::WriteKV(grpc::CallbackServerContext* ctx,
                                                                  v1::WriteKVResponse* response) {
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
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadPemFile("tls_cert_file", options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("tls_key_file", options.tls_key_file);
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (options.tls_client_ca_file.empty()) {
    ssl.client_certificate_request = GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    *mode = "TLS";
  } else {
    absl::StatusOr<std::string> ca = ReadPemFile("tls_client_ca_file", options.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *std::move(ca);
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    *mode = "mutual TLS";
  }
  return grpc::SslServerCredentials(ssl);
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

  // Sets the same status on both servers, so a probe of the health port sees what a client of
  // the API port sees.
  void SetHealth(bool serving) {
    for (grpc::Server* s : {server.get(), health_server.get()}) {
      if (s == nullptr) continue;
      grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService();
      if (health == nullptr) continue;
      health->SetServingStatus(serving);  // every service, including "" (the whole server)
      health->SetServingStatus(kServiceName, serving);
    }
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
  impl->executor = std::make_unique<BoundedExecutor>(options.executor_threads, options.executor_queue);
  impl->ingest_executor = std::make_unique<BoundedExecutor>(options.ingest_threads, options.ingest_queue);
  impl->service = std::make_unique<WorkerService>(
      *impl->engine, *impl->executor, *impl->ingest_executor,
      ServiceLimits{.max_message_bytes = options.max_message_bytes}, options.metrics);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, *credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
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
  // Ready means "can serve": the engine and its pool exist and the port is bound.
  impl->SetHealth(true);
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

void WorkerServer::BeginDrain() {
  if (impl_->service->draining()) return;
  impl_->service->SetDraining();
  impl_->SetHealth(false);
  PKV_LOG(INFO) << "draining: health NOT_SERVING, new work refused with UNAVAILABLE";
}

bool WorkerServer::draining() const { return impl_->service->draining(); }

void WorkerServer::Shutdown(absl::Duration grace) {
  std::lock_guard<std::mutex> lock(impl_->shutdown_mu);
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  BeginDrain();
  // Waits for in-flight RPCs until the deadline, then cancels them; their reactors still finish
  // through the executor, which is running until after this returns.
  impl_->server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
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
