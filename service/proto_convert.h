// service/proto_convert.h — API v1 messages <-> engine domain types, and proto-level checks.
//
// Proto types stop at service/: everything below works on engine::StepInput, engine::EngineInfo
// and raw byte spans. The checks here are only those the engine cannot make, because it never
// sees the wire message: each Tensor's dtype enum and shape fields. The engine validates the
// rest with one wording for both RPCs (token_step_id, layer, token ranges, data byte sizes, rows,
// deltas, pool space). Every error here is INVALID_ARGUMENT naming the field, e.g. "q.shape".
// Thread-safety: pure functions; a StepInput points into the request it was made from.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "common/model_shape.h"
#include "engine/engine.h"
#include "pkv/v1/worker.pb.h"
#include "service/shared_memory.h"
#include "service/write_kv_wire.h"

namespace pkv::service {

// Service-level limits reported by Describe.
struct ServiceLimits {
  int64_t max_message_bytes = 64LL << 20;
  double prompt_idle_seconds = 0;  // WriteKV streams idle this long are cancelled (0: never)
  // Largest shared-memory object a StepStream may name (service/shared_memory.h); 0: off.
  int64_t shared_memory_max_bytes = 0;
};

// Who is calling and which worker answers: the router identity (see worker.proto, Routers) and
// the worker's incarnation (0 in tests that run no server: then nothing is checked or echoed).
struct CallContext {
  std::string router;
  uint64_t incarnation = 0;
  // The StepStream's shared memory (service/shared_memory.h); null on every other call.
  std::shared_ptr<const SharedMemoryRegion> shared_memory;
};

// FAILED_PRECONDITION when the request expects another incarnation than the worker's.
absl::Status CheckIncarnation(uint64_t expected, const CallContext& call);

// Model dtype -> wire dtype.
v1::DType ToProtoDType(DType dtype);
// Wire dtype -> model dtype; INVALID_ARGUMENT naming `field` for FP32/unspecified/unknown.
absl::StatusOr<DType> FromProtoDType(int dtype, absl::string_view field);

// Fills a DescribeResponse from the engine's state.
void FillDescribe(const engine::EngineInfo& info, const ServiceLimits& limits, bool serving,
                  const CallContext& call, v1::DescribeResponse* out);

// OK when `tensor` has dtype `dtype` and exactly `shape`; otherwise INVALID_ARGUMENT naming
// `field` (e.g. "q.dtype", "k.shape"). The size of its data is left to the engine.
absl::Status CheckTensor(const v1::Tensor& tensor, DType dtype, std::initializer_list<int64_t> shape,
                         absl::string_view field);
// The same on a tensor read in place (service/write_kv_wire.h).
absl::Status CheckTensor(const TensorRef& tensor, DType dtype, std::initializer_list<int64_t> shape,
                         absl::string_view field);

// Checks the dtype and shape of the request's tensors against the model shape and returns the
// engine's view of it (spans into `request`, or into `shared_memory` for tensors given as
// Tensor.shm; both must outlive the result). A Tensor.shm without `shared_memory`, outside it, or
// next to data is INVALID_ARGUMENT naming the field; a broken region FAILED_PRECONDITION.
absl::StatusOr<engine::StepInput> ToStepInput(const v1::StepRequest& request, const ModelShape& shape,
                                              const SharedMemoryRegion* shared_memory = nullptr);

// INVALID_ARGUMENT: `field` names shared memory on a call that has none.
absl::Status NoSharedMemory(absl::string_view field);

// Moves an engine output into `response` (out [B, Hq, d], lse [B, Hq] fp32 when present, the
// engine's stage timings) and echoes the request's token_step_id and layer.
void ToStepResponse(engine::StepOutput&& output, const v1::StepRequest& request,
                    const ModelShape& shape, v1::StepResponse* response,
                    engine::OutputBytes* payload = nullptr);

// Checks the dtype and shape of a WriteKV chunk's tensors ([num_tokens, Hkv, d] in the model
// dtype); its layer, token range and byte sizes are checked by engine::PromptWrite::Write.
absl::Status CheckChunk(const ChunkRef& chunk, const ModelShape& shape);

// A parsed chunk seen as a ChunkRef (spans into `chunk`, which must outlive the result), so that
// parsed and in-place chunks take one path.
ChunkRef ChunkRefOf(const v1::KVChunk& chunk);

}  // namespace pkv::service
