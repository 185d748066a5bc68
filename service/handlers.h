// service/handlers.h — the work behind each RPC, in blocking form, on engine domain calls.
//
// The gRPC reactors (worker_service.cc) run these on the BoundedExecutor, never on a gRPC
// thread: they take the engine lock and may compute attention. Keeping them free of gRPC types
// lets tests drive every validation path without a server. Errors are absl statuses naming the
// field; a failed call leaves the engine unchanged (the engine's all-or-nothing contract).
// Thread-safety: the functions are as thread-safe as the engine (fully); a PromptSession belongs
// to one WriteKV stream and is used by one task at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "engine/engine.h"
#include "pkv/v1/worker.pb.h"
#include "service/proto_convert.h"

namespace pkv::service {

// Describe: the engine's shape, pool and limits.
void RunDescribe(const engine::Engine& engine, const ServiceLimits& limits, bool serving,
                 v1::DescribeResponse* response, const CallContext& call = {});

// Step: proto checks, then engine::Engine::Step as `call.router`; fills `response` only on
// success, with the stage timings up to serialize_seconds (the caller adds what happened around
// it).
// With `payload`, response->out carries no data: *payload holds the output bytes, for the caller to
// send as out.data without copying them (see SerializeStepResponse in worker_service.cc).
absl::Status RunStep(engine::Engine& engine, const v1::StepRequest& request,
                     v1::StepResponse* response, const CallContext& call = {},
                     engine::OutputBytes* payload = nullptr);

// Release: frees all of request.sequence_ids or none.
absl::Status RunRelease(engine::Engine& engine, const v1::ReleaseRequest& request,
                        v1::ReleaseResponse* response, const CallContext& call = {});

// The state of one WriteKV stream: the header begins a prompt (pages allocated), chunks write
// it, Commit makes it steppable. Destroying an uncommitted session releases the sequence.
class PromptSession final {
 public:
  explicit PromptSession(engine::Engine& engine, CallContext call = {})
      : engine_(engine), call_(std::move(call)) {}
  PromptSession(const PromptSession&) = delete;
  PromptSession& operator=(const PromptSession&) = delete;

  // Handles the next message of the stream: a header first (INVALID_ARGUMENT for a chunk before
  // it or a second header), then chunks.
  absl::Status OnMessage(const v1::WriteKVRequest& request);
  // Handles a chunk (OnMessage's chunk case; the WriteKV reactor calls it with chunks read in
  // place, service/write_kv_wire.h).
  absl::Status OnChunk(const ChunkRef& chunk);
  // On the client's half-close: commits the prompt (FAILED_PRECONDITION naming the first
  // missing layer/token, INVALID_ARGUMENT when no header came) and fills `response`.
  absl::Status Commit(v1::WriteKVResponse* response);
  // Releases the sequence now when it was begun and not committed.
  void Abort();

  // Whether a prompt was begun and is neither committed nor aborted.
  bool pending() const { return write_ != nullptr && !committed_; }
  // The sequence of the header (0 before it).
  uint64_t sequence_id() const { return write_ != nullptr ? write_->seq() : 0; }
  const CallContext& call() const { return call_; }

 private:
  engine::Engine& engine_;
  const CallContext call_;
  std::unique_ptr<engine::PromptWrite> write_;
  bool committed_ = false;
  int64_t num_chunks_ = 0;
};

}  // namespace pkv::service
