// The wire helpers of API v1 (service/rpc_wire.h).
#include "service/rpc_wire.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pkv::service {

absl::Status DrainingError() {
  return absl::UnavailableError("the worker is draining (shutting down) and takes no new work");
}

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

namespace {

// Request metadata key a router names itself with when the API port is not mutual TLS.
constexpr char kRouterIdKey[] = "x-pkv-router-id";
constexpr size_t kMaxRouterIdBytes = 256;

}  // namespace

absl::StatusOr<std::string> RouterOf(const grpc::ServerContextBase& ctx) {
  std::shared_ptr<const grpc::AuthContext> auth = ctx.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    const std::vector<grpc::string_ref> identity = auth->GetPeerIdentity();
    if (!identity.empty()) return std::string(identity.front().data(), identity.front().size());
  }
  const auto& metadata = ctx.client_metadata();
  auto it = metadata.find(kRouterIdKey);
  if (it == metadata.end()) return std::string();
  if (it->second.size() > kMaxRouterIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", kRouterIdKey, ": ", it->second.size(),
                                                   " bytes, the most is ", kMaxRouterIdBytes));
  }
  return std::string(it->second.data(), it->second.size());
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
  auto* keep = new std::shared_ptr<const char>(payload.shared());
  grpc::Slice slices[2] = {
      grpc::Slice(head),
      grpc::Slice(const_cast<char*>(payload.data()), payload.size(),
                  [](void* p) { delete static_cast<std::shared_ptr<const char>*>(p); }, keep)};
  *out = grpc::ByteBuffer(slices, 2);
}

}  // namespace pkv::service
