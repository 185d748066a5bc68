// service/rpc_wire.h — what every API v1 handler does to the wire: parse a raw request, serialize
// a response (a StepResponse's output bytes sent uncopied), stamp the server times, name the
// calling router, and the refusals every method words the same way.
//
// Shared by the callback reactors (service/worker_service.cc) and the StepStream completion-queue
// server (service/step_stream.cc). Only service .cc files include it (it brings gRPC).
// Thread-safety: free functions on their arguments only.
#pragma once

#include <chrono>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/metrics.h"
#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "pkv/v1/worker.pb.h"
#include "service/executor.h"

namespace pkv::service {

// UNAVAILABLE: the worker is draining.
absl::Status DrainingError();

// RESOURCE_EXHAUSTED: `executor`'s queue is full.
absl::Status BusyError(const BoundedExecutor& executor);

// StepResponse timing: the worker held the request from `received` (read off the wire) to now;
// it waited for an engine thread until `started`. Both ends also as wall-clock stamps.
void SetServerTimes(std::chrono::steady_clock::time_point received, std::chrono::steady_clock::time_point started,
                    v1::StepResponse* response);

// The router a call comes from (see worker.proto, Routers): the verified client certificate's
// identity under mutual TLS, else the declared x-pkv-router-id, else "" (anonymous);
// INVALID_ARGUMENT for an oversized id.
absl::StatusOr<std::string> RouterOf(const grpc::ServerContextBase& ctx);

// Parses a raw request; INVALID_ARGUMENT (counted as malformed when `metrics` is set) when the
// bytes are not a `Message`.
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

// A StepResponse whose out.data is `payload`, the bytes sent as a slice that keeps `payload`
// alive instead of a copy.
void SerializeStepResponse(const v1::StepResponse& response, const engine::OutputBytes& payload,
                           grpc::ByteBuffer* out);

}  // namespace pkv::service
