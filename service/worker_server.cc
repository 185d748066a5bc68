// WorkerServer: the life cycle of the worker's gRPC servers (service/worker_server.h).
//
// Start builds the API server around WorkerService (service/worker_service.h; credentials from
// service/tls_credentials.h) and the optional health-only server (service/health_server.h), then
// starts the engine heartbeat, the stall watch (service/stall_watch.h) and the lease sweeper.
// BeginDrain and Shutdown take them down in order. The sweeper is its own thread; health
// statuses change under Impl::health_mu.
#include "service/worker_server.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/metrics.h"
#include "common/thread_priority.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "service/executor.h"
#include "service/health_server.h"
#include "service/heartbeat.h"
#include "service/stall_watch.h"
#include "service/step_stream.h"
#include "service/tls_credentials.h"
#include "service/worker_service.h"

namespace pkv::service {
namespace {

bool IsUnixAddress(const std::string& address) { return absl::StartsWith(address, "unix:"); }

std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

struct WorkerServer::Impl {
  ServerOptions options;
  // Declaration order is destruction order reversed: the server goes first, the engine last.
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<BoundedExecutor> executor;
  std::unique_ptr<BoundedExecutor> ingest_executor;
  std::unique_ptr<WorkerService> service;
  // StepStream's queues and threads: they outlive the server (destroyed after it).
  std::unique_ptr<StepStreamServer> streams;
  std::unique_ptr<grpc::Server> server;
  // Plaintext grpc.health.v1 only (options.health_listen_address); null when not asked for.
  std::unique_ptr<HealthOnlyServer> health;
  int port = 0;
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
  // Logs wake-ups of its own 1 ms timer that come over 1 ms late (the process got no CPU).
  std::unique_ptr<StallWatch> stall_watch;

  grpc::Server* health_grpc_server() { return health != nullptr ? health->server() : nullptr; }

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
    for (grpc::Server* s : {server.get(), health_grpc_server()}) {
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
    for (grpc::Server* s : {server.get(), health_grpc_server()}) {
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
  PKV_RETURN_IF_ERROR(CheckChannelArgs(options.channel_args, "channel_args", "the message size limit is max_message_bytes"));
  if (options.max_message_bytes < (1 << 20) || options.max_message_bytes > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes must be in [1 MiB, 2 GiB), got ", options.max_message_bytes));
  }
  if (options.stream_threads < 1 || options.stream_threads > 256) {
    return absl::InvalidArgumentError(absl::StrCat("stream_threads must be in [1, 256], got ", options.stream_threads));
  }
  if (options.shared_memory_max_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared_memory_max_bytes must be >= 0 (0: off), got ", options.shared_memory_max_bytes));
  }
  std::string security_mode;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      ApiCredentials(ApiTlsFiles{.cert_file = options.tls_cert_file,
                                 .key_file = options.tls_key_file,
                                 .client_ca_file = options.tls_client_ca_file,
                                 .reload_seconds = options.tls_reload_seconds},
                     &security_mode);
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
  int spin_us = options.executor_spin_us;
  if (spin_us < 0) spin_us = absl::StartsWith(impl->engine->Info().backend, "cuda") ? kAutoSpinUs : 0;
  impl->executor = std::make_unique<BoundedExecutor>(options.executor_threads, options.executor_queue,
                                                     std::chrono::microseconds(spin_us), kMaxSpinners, /*nice=*/0,
                                                     "pkv-decode");
  PKV_LOG(INFO) << "decode executor: " << options.executor_threads << " threads, queue " << options.executor_queue
                << ", idle threads poll " << spin_us << " us for the next step (at most " << kMaxSpinners
                << " at once)";
  impl->ingest_executor = std::make_unique<BoundedExecutor>(options.ingest_threads, options.ingest_queue,
                                                            std::chrono::microseconds(0), 1, options.ingest_nice,
                                                            "pkv-ingest");
  {
    std::random_device random;
    while (impl->incarnation == 0) {
      impl->incarnation = (static_cast<uint64_t>(random()) << 32) ^ static_cast<uint64_t>(random());
    }
  }
  impl->service = std::make_unique<WorkerService>(
      *impl->engine, *impl->executor, *impl->ingest_executor,
      ServiceLimits{.max_message_bytes = options.max_message_bytes,
                    .prompt_idle_seconds = options.prompt_idle_seconds,
                    .shared_memory_max_bytes = options.shared_memory_max_bytes},
      options.metrics, impl->incarnation);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, *credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  impl->streams = std::make_unique<StepStreamServer>(builder, *impl->service, options.stream_threads,
                                                     std::chrono::microseconds(spin_us));
  PKV_LOG(INFO) << "StepStream: " << std::max(1, options.stream_threads)
                << " completion-queue threads, each polling " << spin_us << " us after an event before it blocks";
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  // An argument of options.channel_args replaces the server's own setting of it (no duplicates).
  auto set_own = [&](const char* name, int value) {
    if (!HasChannelArg(options.channel_args, name)) builder.AddChannelArgument(name, value);
  };
  if (options.keepalive_seconds > 0) {
    // Ping idle connections; a peer that does not answer within the timeout is dropped, which
    // cancels its streams (a prompt being written is released).
    set_own(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_seconds * 1000));
    set_own(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(std::max(options.keepalive_timeout_seconds, 1.0) * 1000));
    set_own(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    set_own(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  for (const ChannelArg& arg : options.channel_args) {
    if (arg.is_int) {
      builder.AddChannelArgument(arg.name, static_cast<int>(arg.int_value));
    } else {
      builder.AddChannelArgument(arg.name, arg.string_value);
    }
  }
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    if (impl->server != nullptr) {
      impl->server->Shutdown(absl::ToChronoTime(absl::Now()));
      impl->server->Wait();
    }
    impl->streams->Stop();
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
    absl::StatusOr<std::unique_ptr<HealthOnlyServer>> health = HealthOnlyServer::Start(options.health_listen_address);
    if (!health.ok()) {
      impl->server->Shutdown(absl::ToChronoTime(absl::Now()));
      impl->server->Wait();
      impl->streams->Stop();
      impl->executor->Shutdown();
      impl->ingest_executor->Shutdown();
      return health.status();
    }
    impl->health = *std::move(health);
  }
  impl->streams->Start();
  PKV_LOG(INFO) << "API "
                << (IsUnixAddress(options.listen_address) ? options.listen_address
                                                          : absl::StrCat("port ", HostOf(options.listen_address), ":",
                                                                         impl->port))
                << ": "
                << security_mode
                << (security_mode == "mutual TLS" ? " (client certificates required)" : "")
                << "; health "
                << (impl->health == nullptr
                        ? "on the API port"
                        : absl::StrCat("also on plaintext port ", impl->health->port(),
                                       " (grpc.health.v1 only)"));
  PKV_LOG(INFO) << "incarnation " << impl->incarnation;
  // Ready means "can serve": the engine and its pool exist and the port is bound.
  impl->SetHealth(true);
  impl->StartHeartbeat();
  StallWatch::Options stall_options;
  if (options.metrics != nullptr) stall_options.histogram = &options.metrics->process_stalls();
  impl->stall_watch = std::make_unique<StallWatch>(stall_options);
  Impl* raw = impl.get();
  impl->sweeper = std::thread([raw] {
    NameThisThread("pkv-sweeper");
    raw->RunSweeper();
  });
  return std::unique_ptr<WorkerServer>(new WorkerServer(std::move(impl)));
}

WorkerServer::WorkerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerServer::~WorkerServer() { Shutdown(absl::ZeroDuration()); }

int WorkerServer::port() const { return impl_->port; }

std::string WorkerServer::address() const {
  if (IsUnixAddress(impl_->options.listen_address)) return impl_->options.listen_address;
  return absl::StrCat(HostOf(impl_->options.listen_address), ":", impl_->port);
}

int WorkerServer::health_port() const { return impl_->health != nullptr ? impl_->health->port() : 0; }

std::string WorkerServer::health_address() const {
  if (impl_->health == nullptr) return "";
  return absl::StrCat(HostOf(impl_->options.health_listen_address), ":", impl_->health->port());
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
  if (impl_->stall_watch != nullptr) impl_->stall_watch->Stop();
  // Then in-flight RPCs get a short moment to send their answers before they are cancelled;
  // their reactors and streams still finish through the executor, which is running until after
  // this returns.
  impl_->server->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Milliseconds(200))));
  impl_->server->Wait();
  // Probes kept seeing NOT_SERVING during the grace period; now the health port goes too.
  if (impl_->health != nullptr) impl_->health->Stop();
  impl_->ingest_executor->Shutdown();
  impl_->executor->Shutdown();
  // Every StepStream was cancelled or ended with the server, and the executor ran its last write.
  impl_->streams->Stop();
  const engine::EngineInfo info = impl_->engine->Info();
  PKV_LOG(INFO) << "server stopped: " << info.pager.free_pages << "/" << info.pager.total_pages
                << " pages free, " << info.pager.num_sequences << " sequences held";
}

}  // namespace pkv::service
