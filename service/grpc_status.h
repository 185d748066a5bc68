// service/grpc_status.h — the one place where absl::Status becomes grpc::Status.
//
// absl::StatusCode and grpc::StatusCode share their numbering (both follow google.rpc.Code), so
// the mapping is one-to-one and keeps the message. The per-message status of StepStream is made
// from the same function. Thread-safety: pure functions.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"
#include "pkv/v1/worker.pb.h"

namespace pkv::service {

// The gRPC status carrying the same code and message as `status`.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Writes `status` into a StepStream per-message status (through ToGrpcStatus).
void ToRequestStatus(const absl::Status& status, v1::RequestStatus* out);

}  // namespace pkv::service
