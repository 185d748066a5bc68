#include "service/handlers.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace pkv::service {
void RunDescribe(const engine::Engine& engine, const ServiceLimits& limits, bool serving,
                 v1::DescribeResponse* response, const CallContext& call) {
  FillDescribe(engine.Info(), limits, serving, call, response);
}

absl::Status RunStep(engine::Engine& engine, const v1::StepRequest& request,
                     v1::StepResponse* response, const CallContext& call, engine::OutputBytes* payload) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  PKV_RETURN_IF_ERROR(CheckIncarnation(request.expected_incarnation(), call));
  // List sizes first: nothing is copied out of an oversized request.
  PKV_RETURN_IF_ERROR(engine.ValidateListSizes(request.rows_size(), request.open_size(), request.free_size()));
  const SharedMemoryRegion* shm = call.shared_memory.get();
  if (shm != nullptr) PKV_RETURN_IF_ERROR(shm->CheckIntact());
  PKV_ASSIGN_OR_RETURN(engine::StepInput input, ToStepInput(request, engine.shape(), shm));
  input.owner = call.router;
  // Where the outputs go when they go into shared memory: checked before anything runs.
  std::span<uint8_t> out_shm;
  if (request.has_out_shm()) {
    if (shm == nullptr) return NoSharedMemory("out_shm");
    const ModelShape& shape = engine.shape();
    const uint64_t bytes = static_cast<uint64_t>(request.rows_size()) * shape.num_q_heads * shape.head_dim *
                           DTypeSize(shape.dtype);
    PKV_ASSIGN_OR_RETURN(out_shm, shm->Slice(request.out_shm().offset(), bytes, "out_shm.offset"));
    // The engine writes the outputs there (the device itself when the region is registered with
    // the backend: StepStreamServer maps it so).
    input.out_copy = out_shm;
  }
  const Clock::time_point t1 = Clock::now();
  PKV_ASSIGN_OR_RETURN(engine::StepOutput output, engine.Step(input));
  // The wire checks count as validation, next to the engine's own.
  output.timings.validate_seconds += std::chrono::duration<double>(t1 - t0).count();
  const Clock::time_point t2 = Clock::now();
  if (request.has_out_shm()) {
    engine::OutputBytes out;  // in the region already (StepInput::out_copy), not sent
    ToStepResponse(std::move(output), request, engine.shape(), response, &out);
    response->mutable_out()->mutable_shm()->set_offset(request.out_shm().offset());
  } else {
    ToStepResponse(std::move(output), request, engine.shape(), response, payload);
  }
  // The router shrank its region while the step read or wrote it: the layer ran on zeros.
  if (shm != nullptr) PKV_RETURN_IF_ERROR(shm->CheckIntact());
  response->set_incarnation(call.incarnation);
  response->set_serialize_seconds(std::chrono::duration<double>(Clock::now() - t2).count());
  return absl::OkStatus();
}

absl::Status RunRelease(engine::Engine& engine, const v1::ReleaseRequest& request,
                        v1::ReleaseResponse* response, const CallContext& call) {
  PKV_RETURN_IF_ERROR(CheckIncarnation(request.expected_incarnation(), call));
  const std::vector<engine::SeqId> ids(request.sequence_ids().begin(), request.sequence_ids().end());
  PKV_RETURN_IF_ERROR(engine.Release(ids, call.router));
  response->set_released(static_cast<int64_t>(ids.size()));
  response->set_free_pages(engine.Info().pager.free_pages);
  response->set_incarnation(call.incarnation);
  return absl::OkStatus();
}

absl::Status PromptSession::OnMessage(const v1::WriteKVRequest& request) {
  switch (request.payload_case()) {
    case v1::WriteKVRequest::kHeader: {
      if (write_ != nullptr || committed_) {
        return absl::InvalidArgumentError("header: a WriteKV stream carries exactly one header, first");
      }
      const v1::WriteKVHeader& h = request.header();
      PKV_RETURN_IF_ERROR(CheckIncarnation(h.expected_incarnation(), call_));
      PKV_ASSIGN_OR_RETURN(write_, engine_.BeginPrompt(h.sequence_id(), h.num_tokens(), call_.router));
      return absl::OkStatus();
    }
    case v1::WriteKVRequest::kChunk:
      return OnChunk(ChunkRefOf(request.chunk()));
    case v1::WriteKVRequest::PAYLOAD_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("payload: a WriteKVRequest must carry a header or a chunk");
}

absl::Status PromptSession::OnChunk(const ChunkRef& c) {
  if (write_ == nullptr) {
    return absl::InvalidArgumentError("chunk: the first WriteKV message must be a header");
  }
  PKV_RETURN_IF_ERROR(CheckChunk(c, engine_.shape()));
  PKV_RETURN_IF_ERROR(write_->Write(c.layer, c.token_offset, c.num_tokens, c.k.bytes(), c.v.bytes()));
  ++num_chunks_;
  return absl::OkStatus();
}

absl::Status PromptSession::Commit(v1::WriteKVResponse* response) {
  if (write_ == nullptr) {
    return absl::InvalidArgumentError("header: the WriteKV stream ended without a header");
  }
  PKV_RETURN_IF_ERROR(write_->Commit());
  committed_ = true;
  response->set_sequence_id(write_->seq());
  response->set_num_tokens(write_->num_tokens());
  response->set_bytes_written(write_->bytes_written());
  response->set_num_chunks(num_chunks_);
  response->set_incarnation(call_.incarnation);
  return absl::OkStatus();
}

void PromptSession::Abort() {
  if (pending()) write_->Abort();
  write_.reset();
}

}  // namespace pkv::service
