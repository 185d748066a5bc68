#include "service/grpc_status.h"

#include <string>

namespace pkv::service {

static_assert(static_cast<int>(absl::StatusCode::kInvalidArgument) ==
              static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
static_assert(static_cast<int>(absl::StatusCode::kResourceExhausted) ==
              static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
static_assert(static_cast<int>(absl::StatusCode::kUnauthenticated) ==
              static_cast<int>(grpc::StatusCode::UNAUTHENTICATED));

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

void ToRequestStatus(const absl::Status& status, v1::RequestStatus* out) {
  const grpc::Status g = ToGrpcStatus(status);
  out->set_code(static_cast<int32_t>(g.error_code()));
  out->set_message(g.error_message());
}

}  // namespace pkv::service
