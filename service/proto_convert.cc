#include "service/proto_convert.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <span>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace pkv::service {
namespace {

static_assert(std::endian::native == std::endian::little,
              "tensors travel little-endian; a big-endian host needs byte swaps here");

std::span<const uint8_t> Bytes(const std::string& data) {
  return {reinterpret_cast<const uint8_t*>(data.data()), data.size()};
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return v1::DTYPE_FP16;
    case DType::kBF16:
      return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> FromProtoDType(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FP16:
      return DType::kF16;
    case v1::DTYPE_BF16:
      return DType::kBF16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " must be DTYPE_FP16 or DTYPE_BF16, got ",
                       v1::DType_IsValid(dtype) ? v1::DType_Name(static_cast<v1::DType>(dtype))
                                                : absl::StrCat(dtype)));
  }
}

absl::Status CheckIncarnation(uint64_t expected, const CallContext& call) {
  if (expected == 0 || call.incarnation == 0 || expected == call.incarnation) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "expected_incarnation: ", expected, " but this worker is incarnation ", call.incarnation,
      ": the worker restarted and holds none of the sequences of the incarnation expected"));
}

void FillDescribe(const engine::EngineInfo& info, const ServiceLimits& limits, bool serving,
                  const CallContext& call, v1::DescribeResponse* out) {
  v1::ModelShape* m = out->mutable_model();
  m->set_num_layers(info.shape.num_layers);
  m->set_num_q_heads(info.shape.num_q_heads);
  m->set_num_kv_heads(info.shape.num_kv_heads);
  m->set_head_dim(info.shape.head_dim);
  m->set_page_size(info.shape.page_size);
  m->set_dtype(ToProtoDType(info.shape.dtype));
  v1::PoolInfo* p = out->mutable_pool();
  p->set_total_pages(info.pager.total_pages);
  p->set_free_pages(info.pager.free_pages);
  p->set_used_pages(info.pager.used_pages);
  p->set_page_bytes(info.shape.page_bytes_all_layers());
  p->set_num_sequences(info.pager.num_sequences);
  p->set_reserved_tokens(info.pager.reserved_tokens);
  p->set_used_tokens(info.pager.used_tokens);
  out->set_backend(info.backend);
  out->set_device(info.device);
  v1::Limits* l = out->mutable_limits();
  l->set_max_batch(info.limits.max_batch);
  l->set_max_message_bytes(limits.max_message_bytes);
  l->set_max_open_token_steps(info.limits.max_open_token_steps);
  l->set_retry_window_token_steps(info.limits.retry_window_token_steps);
  l->set_max_prompt_tokens(info.limits.max_prompt_tokens);
  l->set_max_sequences(info.limits.max_sequences);
  l->set_max_open_per_step(info.limits.max_open_per_step);
  l->set_max_free_per_step(info.limits.max_free_per_step);
  l->set_token_step_idle_seconds(info.limits.token_step_idle_seconds);
  l->set_prompt_idle_seconds(limits.prompt_idle_seconds);
  l->set_sequence_idle_seconds(info.limits.sequence_idle_seconds);
  l->set_check_finite(info.limits.check_finite);
  l->set_shared_memory_max_bytes(limits.shared_memory_max_bytes);
  out->set_incarnation(call.incarnation);
  out->set_router(call.router);
  for (const engine::OpenTokenStepInfo& o : info.open_steps) {
    v1::OpenTokenStep* step = out->add_open_steps();
    step->set_token_step_id(o.token_step_id);
    step->set_router(o.owner);
    step->set_rows(o.rows);
    step->set_layers_done(o.layers_done);
    step->set_idle_seconds(o.idle_seconds);
  }
  out->set_active_sequences(info.active_sequences);
  out->set_writing_sequences(info.writing_sequences);
  out->set_open_token_steps(info.open_token_steps);
  out->set_serving(serving);
}

namespace {

TensorRef TensorRefOf(const v1::Tensor& tensor) {
  TensorRef t;
  t.dtype = tensor.dtype();
  t.shape.assign(tensor.shape().begin(), tensor.shape().end());
  t.data = Bytes(tensor.data());
  t.in_shared_memory = tensor.has_shm();
  return t;
}

}  // namespace

absl::Status CheckTensor(const v1::Tensor& tensor, DType dtype, std::initializer_list<int64_t> shape,
                         absl::string_view field) {
  return CheckTensor(TensorRefOf(tensor), dtype, shape, field);
}

ChunkRef ChunkRefOf(const v1::KVChunk& chunk) {
  ChunkRef c;
  c.layer = chunk.layer();
  c.token_offset = chunk.token_offset();
  c.num_tokens = chunk.num_tokens();
  c.k = TensorRefOf(chunk.k());
  c.v = TensorRefOf(chunk.v());
  return c;
}

absl::Status CheckTensor(const TensorRef& tensor, DType dtype, std::initializer_list<int64_t> shape,
                         absl::string_view field) {
  PKV_ASSIGN_OR_RETURN(const DType got, FromProtoDType(tensor.dtype, absl::StrCat(field, ".dtype")));
  if (got != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype is ", std::string(DTypeName(got)),
                                                   " but the model dtype is ", std::string(DTypeName(dtype))));
  }
  if (tensor.in_shared_memory) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".shm: this call carries its tensors in the message (shared memory is for StepStream only)"));
  }
  const std::span<const int64_t> want(shape.begin(), shape.size());
  const std::span<const int64_t> have(tensor.shape.data(), tensor.shape.size());
  if (!std::equal(want.begin(), want.end(), have.begin(), have.end())) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape is ", ShapeString(have),
                                                   ", expected ", ShapeString(want)));
  }
  // The data's byte size is the engine's to check (engine::Engine::Step, PromptWrite::Write).
  return absl::OkStatus();
}

namespace {

// The bytes of StepRequest tensor `tensor` (field `field`): its data, or its slice of the
// stream's shared memory.
absl::StatusOr<std::span<const uint8_t>> StepTensorBytes(const v1::Tensor& tensor, DType dtype,
                                                         std::initializer_list<int64_t> shape,
                                                         absl::string_view field,
                                                         const SharedMemoryRegion* shared_memory) {
  TensorRef t = TensorRefOf(tensor);
  const bool in_shared_memory = t.in_shared_memory;
  t.in_shared_memory = false;
  PKV_RETURN_IF_ERROR(CheckTensor(t, dtype, shape, field));
  if (!in_shared_memory) return t.data;
  if (!tensor.data().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".data: give the elements in data or in shared memory (shm), not both"));
  }
  if (shared_memory == nullptr) return NoSharedMemory(absl::StrCat(field, ".shm"));
  uint64_t bytes = DTypeSize(dtype);
  for (int64_t s : shape) bytes *= static_cast<uint64_t>(s);
  PKV_ASSIGN_OR_RETURN(std::span<uint8_t> slice,
                       shared_memory->Slice(tensor.shm().offset(), bytes, absl::StrCat(field, ".shm.offset")));
  return std::span<const uint8_t>(slice.data(), slice.size());
}

}  // namespace

absl::Status NoSharedMemory(absl::string_view field) {
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": this call has no shared memory (open a StepStream with the metadata ", kSharedMemoryKey, ")"));
}

absl::StatusOr<engine::StepInput> ToStepInput(const v1::StepRequest& request, const ModelShape& shape,
                                              const SharedMemoryRegion* shared_memory) {
  // token_step_id, layer and the data sizes are the engine's to check (engine::Engine::Step).
  const int64_t b = request.rows_size();
  engine::StepInput in;
  PKV_ASSIGN_OR_RETURN(in.q, StepTensorBytes(request.q(), shape.dtype, {b, shape.num_q_heads, shape.head_dim}, "q",
                                             shared_memory));
  PKV_ASSIGN_OR_RETURN(in.k, StepTensorBytes(request.k(), shape.dtype, {b, shape.num_kv_heads, shape.head_dim}, "k",
                                             shared_memory));
  PKV_ASSIGN_OR_RETURN(in.v, StepTensorBytes(request.v(), shape.dtype, {b, shape.num_kv_heads, shape.head_dim}, "v",
                                             shared_memory));
  in.token_step_id = request.token_step_id();
  in.layer = request.layer();
  in.rows.assign(request.rows().begin(), request.rows().end());
  in.open.assign(request.open().begin(), request.open().end());
  in.free.assign(request.free().begin(), request.free().end());
  in.want_lse = request.want_lse();
  return in;
}

void ToStepResponse(engine::StepOutput&& output, const v1::StepRequest& request,
                    const ModelShape& shape, v1::StepResponse* response, engine::OutputBytes* payload) {
  const int64_t b = request.rows_size();
  response->set_token_step_id(request.token_step_id());
  response->set_layer(request.layer());
  v1::Tensor* out = response->mutable_out();
  out->set_dtype(ToProtoDType(shape.dtype));
  out->add_shape(b);
  out->add_shape(shape.num_q_heads);
  out->add_shape(shape.head_dim);
  if (payload != nullptr) {
    *payload = std::move(output.out);  // the caller sends these bytes as out.data, uncopied
  } else {
    out->set_data(output.out.data(), output.out.size());
  }
  if (!output.lse.empty()) {
    v1::Tensor* lse = response->mutable_lse();
    lse->set_dtype(v1::DTYPE_FP32);
    lse->add_shape(b);
    lse->add_shape(shape.num_q_heads);
    lse->mutable_data()->resize(output.lse.size() * sizeof(float));
    std::memcpy(lse->mutable_data()->data(), output.lse.data(), output.lse.size() * sizeof(float));
  }
  response->set_kernel(std::string(KernelName(output.kernel)));
  response->set_replayed(output.replayed);
  response->set_attend_seconds(output.attend_seconds);
  response->set_attention_skipped(output.attention_skipped);
  response->set_attention_untimed(!output.attention_timed);
  response->set_validate_seconds(output.timings.validate_seconds);
  response->set_host_seconds(output.timings.host_seconds);
  response->set_h2d_seconds(output.timings.h2d_seconds);
  response->set_kernel_seconds(output.timings.kernel_seconds);
  response->set_d2h_seconds(output.timings.d2h_seconds);
}

absl::Status CheckChunk(const ChunkRef& chunk, const ModelShape& shape) {
  // layer, the token range and the data sizes are the engine's to check (PromptWrite::Write).
  const int64_t n = chunk.num_tokens;
  PKV_RETURN_IF_ERROR(CheckTensor(chunk.k, shape.dtype, {n, shape.num_kv_heads, shape.head_dim}, "chunk.k"));
  PKV_RETURN_IF_ERROR(CheckTensor(chunk.v, shape.dtype, {n, shape.num_kv_heads, shape.head_dim}, "chunk.v"));
  return absl::OkStatus();
}

}  // namespace pkv::service
