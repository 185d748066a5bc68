// service/health_server.h — the second, plaintext server that serves only grpc.health.v1.
//
// Kubernetes gRPC probes cannot speak TLS, so with --health_listen WorkerServer also starts this
// server on its own port. It has gRPC's default health service and nothing else: the builder
// plugins (reflection) are dropped, and every other method answers UNIMPLEMENTED saying where the
// API is. WorkerServer sets its health statuses, the same as on the API server.
//
// This header brings gRPC: only service .cc files include it (worker_server.h stays free of
// gRPC). Thread-safety: Start and Stop from one thread; the grpc::Server is gRPC's (thread-safe).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server.h"

namespace pkv::service {

class HealthOnlyServer final {
 public:
  // Starts serving on `address` (host:port; port 0 picks a free one). UNAVAILABLE naming
  // --health_listen when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<HealthOnlyServer>> Start(const std::string& address);
  HealthOnlyServer(const HealthOnlyServer&) = delete;
  HealthOnlyServer& operator=(const HealthOnlyServer&) = delete;

  // The running server (its health service takes the statuses).
  grpc::Server* server() { return server_.get(); }
  // The bound port (the chosen one when the address asked for port 0).
  int port() const { return port_; }
  // Stops at once and waits until the server is down.
  void Stop();

 private:
  HealthOnlyServer() = default;

  // Answers every method but grpc.health.v1's. Declared before the server, so it outlives it.
  std::unique_ptr<grpc::CallbackGenericService> fallback_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace pkv::service
