// service/worker_server.h — the PersistentKV gRPC server: API v1, health and reflection.
//
// WorkerServer owns the engine, the bounded executors that run engine work, the callback service
// (service/worker_service.h) and the grpc::Server (plaintext, TLS or mutual TLS; credentials from
// service/tls_credentials.h), plus an optional second, plaintext server that serves only
// grpc.health.v1 for Kubernetes gRPC probes, which cannot speak TLS (service/health_server.h).
// pkv-worker and the integration tests both start it through Start, so the tests exercise exactly
// what the binary serves. gRPC types stay in the .cc files: this header is cheap to include.
//
// Life cycle: Start -> serving (health SERVING on both servers) -> BeginDrain (health NOT_SERVING,
// new token steps and prompts refused with UNAVAILABLE; open token steps, Describe and Release go
// on) -> Shutdown (keeps the port open until open token steps and prompts finish or the grace
// period ends, cancels the rest, runs queued cleanups, stops).
// Liveness is separate: the health service kLivenessService is SERVING while the engine heartbeat
// (service/heartbeat.h) got through the decode executor and the engine lock within
// liveness_stall_seconds, whatever readiness says (it stays SERVING while draining).
// Thread-safety: all methods may be called from any thread; Shutdown is idempotent.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/channel_args.h"
#include "engine/engine.h"
#include "service/executor.h"

namespace pkv {
class WorkerMetrics;
}  // namespace pkv

namespace pkv::service {

// The grpc.health.v1 service name of liveness (the Kubernetes liveness probe's `service`).
// Readiness is "" (the whole server) and "pkv.v1.PersistentKV".
inline constexpr char kLivenessService[] = "pkv.v1.Liveness";

struct ServerOptions {
  // host:port (port 0 picks a free one), or unix:PATH for a Unix domain socket (a router on the
  // same host: no TCP stack on the decode path).
  std::string listen_address = "0.0.0.0:50051";
  int64_t max_message_bytes = 64LL << 20;         // gRPC max send/receive message size
  int executor_threads = 2;                       // threads for decode steps, Describe, Release
  int executor_queue = 64;                        // their tasks waiting before RESOURCE_EXHAUSTED
  // An idle decode-executor thread polls this long for the next task before it sleeps, so the
  // next layer-step starts without a thread wake-up; 0: sleep at once; negative: automatic
  // (kAutoSpinUs on a GPU backend, whose layer-steps come back within a millisecond, 0 on the CPU
  // backend, whose attention needs every core). At most kMaxSpinners threads poll at once.
  int executor_spin_us = -1;
  // StepStream is read and written by this many threads, each polling its own completion queue:
  // after an event a thread keeps polling for executor_spin_us (as resolved above) before it
  // blocks (service/step_stream.h). A stream stays on one thread.
  int stream_threads = 2;
  // WriteKV (prefill ingest) runs on its own executor, so that prompt chunks never queue in
  // front of decode steps.
  int ingest_threads = 4;
  int ingest_queue = 64;
  // > 0: the ingest threads run at this Linux nice value, so that where they and decode compete
  // for a core decode goes first (common/thread_priority.h).
  int ingest_nice = 0;
  // RPC counters, in-flight gauges and queue rejections go here when set (not owned; must
  // outlive the server). Engine events are bound separately (service/metrics_observer.h).
  WorkerMetrics* metrics = nullptr;

  // TLS on the API port: PEM certificate chain and private key, read at Start. Both or neither;
  // neither: plaintext.
  std::string tls_cert_file;
  std::string tls_key_file;
  // With TLS: require client certificates signed by this PEM CA bundle (mutual TLS). Empty: no
  // client certificate is asked for.
  std::string tls_client_ca_file;
  // With TLS: the certificate, key and client CA files are read again this often, and new
  // connections use what they hold (a rotated Secret needs no restart). At least 1.
  int tls_reload_seconds = 30;
  // host:port of a second, plaintext server that serves only grpc.health.v1, with the same
  // status as the API server (no API, no reflection); port 0 picks a free one. Empty: none.
  std::string health_listen_address;
  // Leases (see worker.proto): a WriteKV stream with no message for this long is cancelled and
  // its prompt released; 0: never. Token-step and sequence leases are engine options.
  double prompt_idle_seconds = 60;
  // Shared memory (see worker.proto): a StepStream may name a POSIX shared-memory object of at
  // most this many bytes, which the worker maps for the stream's life and reads q, k, v from and
  // writes outputs to; 0: off (such a stream ends with FAILED_PRECONDITION).
  int64_t shared_memory_max_bytes = 1LL << 30;
  // HTTP/2 keepalive: ping every keepalive_seconds; drop a peer that does not answer within
  // keepalive_timeout_seconds. 0: no pings.
  double keepalive_seconds = 30;
  double keepalive_timeout_seconds = 10;
  // Liveness: NOT_SERVING once the engine heartbeat has not got through for this long; 0: no
  // heartbeat (liveness always SERVING). The heartbeat is sent every heartbeat_period_seconds.
  double liveness_stall_seconds = 60;
  double heartbeat_period_seconds = 1;
  // Extra gRPC core channel arguments of the API server (pkv-worker --grpc_arg). One that the
  // server sets itself (the keepalive ones above) replaces its setting; message size limits are
  // max_message_bytes only (Start refuses them here with INVALID_ARGUMENT).
  std::vector<ChannelArg> channel_args;
};

// The automatic --service_spin_us of a GPU backend, and the most decode threads that poll at once.
inline constexpr int kAutoSpinUs = 1000;
inline constexpr int kMaxSpinners = 2;

class WorkerServer final {
 public:
  // Starts serving `engine`. INVALID_ARGUMENT for bad options (a TLS file that is missing,
  // unreadable or not PEM, a key without a certificate, ...); UNAVAILABLE when an address cannot
  // be bound or the TLS credentials are rejected.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(const ServerOptions& options,
                                                             std::unique_ptr<engine::Engine> engine);
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;
  // Shutdown with no grace period if it has not run.
  ~WorkerServer();

  // The bound port (the chosen one when the address asked for port 0).
  int port() const;
  // host:port actually bound, e.g. "127.0.0.1:41234"; the listen address itself for unix:PATH.
  std::string address() const;
  // The bound port of the health-only server; 0 when there is none.
  int health_port() const;
  // host:port of the health-only server; empty when there is none.
  std::string health_address() const;
  // "plaintext", "TLS" or "mutual TLS": how the API port is served.
  std::string security_mode() const;
  // The engine served (tests inspect its state).
  engine::Engine& engine();

  // The executors that run engine work: steps and the rest, and WriteKV (tests fill them to
  // provoke backpressure).
  BoundedExecutor& executor_for_testing();
  BoundedExecutor& ingest_executor_for_testing();

  // This run's incarnation id (nonzero; in Describe and every response).
  uint64_t incarnation() const;
  // Runs one round of the lease sweeper now (tests; it also runs every half second).
  void SweepNowForTesting();

  // Health NOT_SERVING (both servers); new token steps and prompts are refused with UNAVAILABLE;
  // later layers of open token steps, Describe and Release still run.
  void BeginDrain();
  // Whether BeginDrain has run.
  bool draining() const;
  // BeginDrain, then keeps the API port open up to `grace` while open token steps and prompts
  // being written finish, cancels what remains, stops the health-only server and stops the
  // executors after their queued tasks. Idempotent.
  void Shutdown(absl::Duration grace);

  struct Impl;

 private:
  explicit WorkerServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pkv::service
