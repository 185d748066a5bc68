// engine/engine.h — the step executor: the only code that combines pager, scheduler and backend.
//
// Life of a token step (see docs/ARCHITECTURE.md): the router sends one Step per layer, all
// carrying the same token_step_id and the same rows in the same order. Layer 0 opens the token
// step: it applies the page-table deltas (free, then open), appends one token slot to every row,
// builds the page table and the scheduler's plan; every layer then writes its new K,V into the
// row's new slot and runs attention with that plan. When every layer has run, the token step is
// complete and its sequences may join the next one.
//
// Every call validates all of its input before it changes anything: on error the pool, page
// tables and sequence states are exactly as before. Errors carry absl codes that map one-to-one
// to gRPC (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ALREADY_EXISTS)
// and name the offending field. A retried (token_step_id, layer) returns the outputs of its first
// execution without appending again, for the token steps still held (Options).
//
// Thread-safety: all public methods are thread-safe. One internal mutex guards every state
// change (validation, deltas, page tables, retry cache, completion); the backend's RunLayer of a
// layer-step runs WITHOUT it, so layer-steps of different open token steps (micro-batches)
// overlap on the device. While a layer of a token step runs: a second request for the same
// (token_step_id, layer) or for another layer of that token step gets FAILED_PRECONDITION
// ("is running"); a Release of one of its rows waits for the layer to finish before it frees
// anything (pages and descriptor slot are never freed under running work).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_shape.h"
#include "engine/backend.h"
#include "engine/step_observer.h"
#include "kvpool/block_pager.h"
#include "scheduler/scheduler.h"

namespace pkv::engine {

using kvpool::SeqId;

struct EngineOptions {
  int32_t max_batch = 256;            // rows per step
  int32_t retained_token_steps = 2;   // completed token steps whose outputs are kept for retries
  uint64_t scatter_seed = 0;          // 0: ascending page order (see BlockPager::Options)
  // Static baseline (comparisons only): > 0 reserves pages for this many tokens per sequence at
  // creation, as a fixed-shape engine without a pager reserves max context per batch slot.
  int64_t static_slot_tokens = 0;
};

// One layer of one token step, in domain terms. Spans point into the caller's request buffers
// and must stay valid for the call.
struct StepInput {
  uint64_t token_step_id = 0;  // nonzero; shared by all layers of the token step
  int32_t layer = 0;           // 0 opens the token step and carries the deltas
  std::vector<SeqId> rows;     // batch rows, in order (unique)
  std::vector<SeqId> open;     // layer 0 only: new empty sequences, opened before the append
  std::vector<SeqId> free;     // layer 0 only: sequences released before the append
  std::span<const uint8_t> q;  // [B, Hq, d] model dtype, little-endian
  std::span<const uint8_t> k;  // [B, Hkv, d] this layer's K of each row's new token
  std::span<const uint8_t> v;  // [B, Hkv, d]
  bool want_lse = false;
};

// Where one layer-step's time went inside the engine, in seconds (see StepResponse in
// proto/pkv/v1/worker.proto for the stages).
struct StepTimings {
  double validate_seconds = 0;  // checks before any change, including the engine lock wait
  double host_seconds = 0;      // deltas, page table, plan, descriptor (layer 0); the backend's
                                // host work; recording the outputs
  double h2d_seconds = 0;       // device stages, from LayerRunInfo
  double kernel_seconds = 0;
  double d2h_seconds = 0;
};

struct StepOutput {
  std::string out;         // [B, Hq, d] model dtype bytes
  std::vector<float> lse;  // [B, Hq] natural-log LSE of the scaled scores, when asked
  KernelId kernel = KernelId::kReference;
  bool replayed = false;    // served from the retry cache
  double attend_seconds = 0.0;  // time in the backend's Attend for this layer
  bool attention_skipped = false;  // the backend skips attention (SkipAttention): zero outputs
  StepTimings timings;      // this call's (a replay reports only its validation)
};

// What the worker serves, for Describe and readiness.
struct EngineInfo {
  ModelShape shape;
  std::string backend;
  std::string device;
  int32_t max_batch = 0;
  kvpool::PagerStats pager;
  int64_t active_sequences = 0;   // steppable
  int64_t writing_sequences = 0;  // prompt being written by WriteKV
  int64_t open_token_steps = 0;   // token steps with layers still to run
};

class Engine;

// A prompt being written (WriteKV). Pages are allocated by Engine::BeginPrompt; the sequence
// becomes steppable only after Commit. Destroying an uncommitted PromptWrite releases the
// sequence and its pages, so a cut stream leaves nothing behind. Not thread-safe itself; calls
// take the engine's lock.
class PromptWrite {
 public:
  PromptWrite(const PromptWrite&) = delete;
  PromptWrite& operator=(const PromptWrite&) = delete;
  ~PromptWrite();

  // Writes K,V of tokens [token_offset, token_offset + n) of one layer; `k` and `v` are
  // [n, Hkv, d] model-dtype bytes. Chunks may come in any order; rewriting a token is allowed.
  // The bytes are staged (KvArena::StageTokens): on the device they join a merged copy of many
  // chunks (of any prompts) and are on the device once Commit returns.
  [[nodiscard]] absl::Status Write(int32_t layer, int64_t token_offset, int64_t n,
                                   std::span<const uint8_t> k, std::span<const uint8_t> v);
  // FAILED_PRECONDITION (naming the first missing layer/token) unless every token of every layer
  // was written; INTERNAL when the staged bytes could not be flushed. On success the prompt's
  // bytes are in the arena (device: copied and synchronised) and the sequence is steppable.
  [[nodiscard]] absl::Status Commit();
  // Releases the sequence now (also done by the destructor when not committed).
  void Abort();

  SeqId seq() const { return seq_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t bytes_written() const { return bytes_written_; }

 private:
  friend class Engine;
  PromptWrite(Engine* engine, SeqId seq, int64_t num_tokens);

  Engine* engine_;
  SeqId seq_;
  int64_t num_tokens_;
  bool done_ = false;
  int64_t bytes_written_ = 0;
  std::vector<std::vector<bool>> written_;  // [layer][token]
  std::vector<int64_t> covered_;           // [layer] tokens written
  std::chrono::steady_clock::time_point started_;
};

class Engine {
 public:
  // Takes ownership of the backend; the pager is sized to the backend's arena.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options,
                                                        ExecutionBackendPtr backend,
                                                        scheduler::Scheduler scheduler);
  ~Engine();

  // One layer of a token step (see the file comment).
  absl::StatusOr<StepOutput> Step(const StepInput& input);

  // Starts writing a prompt of `num_tokens` tokens (>= 1) for a new sequence.
  // ALREADY_EXISTS, INVALID_ARGUMENT, RESOURCE_EXHAUSTED (free pages in the message).
  absl::StatusOr<std::unique_ptr<PromptWrite>> BeginPrompt(SeqId seq, int64_t num_tokens);

  // Benchmarks only: creates a steppable sequence of `num_tokens` tokens whose prompt K,V is
  // whatever its pages hold (the benchmark fills the whole pool with random data once). Same
  // errors as BeginPrompt. Never used by the service.
  absl::Status AdoptUnwrittenPromptForBenchmark(SeqId seq, int64_t num_tokens);

  // Replaces the scheduler (fixed-arm comparisons in benchmarks; the worker sets it at start).
  // INVALID_ARGUMENT when it offers a kernel the backend lacks.
  absl::Status SetScheduler(scheduler::Scheduler scheduler);

  // Releases sequences (all-or-nothing): NOT_FOUND if any is unknown, FAILED_PRECONDITION if a
  // prompt is still being written. A released sequence drops out of any open token step.
  // Waits for running layers of the token steps of `seqs` to finish before it frees anything.
  absl::Status Release(std::span<const SeqId> seqs);

  EngineInfo Info() const;

  // Installs the observer of step events (not owned; must outlive the engine). Call before
  // serving; null disables reporting.
  void SetObserver(StepObserver* observer);
  const ModelShape& shape() const { return shape_; }

  // Verifies the pager and the engine's sequence states agree (tests).
  absl::Status CheckConsistency() const;

  // A hash of every page table, sequence state, open token step and (for a host arena) every KV
  // byte: tests compare it before and after a rejected request to prove nothing changed. Waits
  // until no layer-step is running (their appends write KV bytes).
  uint64_t StateFingerprint() const;

 private:
  friend class PromptWrite;

  enum class SeqPhase { kWriting, kReady };
  struct SeqState {
    SeqPhase phase = SeqPhase::kReady;
    uint64_t open_token_step = 0;  // 0: none
  };
  struct TokenStep {
    uint64_t id = 0;
    std::vector<SeqId> rows;
    std::vector<kvpool::SlotAddr> new_slots;  // [B] slot of each row's new token
    PageTableCsr table;
    scheduler::StepPlan plan;
    int32_t backend_slot = -1;  // descriptor slot of the backend while open
    std::vector<bool> layer_done;
    int32_t layers_done = 0;
    // The layer whose backend RunLayer is running without the engine lock, or -1. While >= 0 the
    // token step is neither completed nor aborted (so the TokenStep object and its backend slot
    // stay valid for the running call).
    int32_t running_layer = -1;
    std::vector<StepOutput> outputs;  // [num_layers] kept for retries
  };

  Engine(const EngineOptions& options, ExecutionBackendPtr backend, scheduler::Scheduler scheduler);

  absl::Status ValidateTensors(const StepInput& in) const;
  absl::Status ValidateLayerZero(const StepInput& in) const;
  absl::Status ValidateLaterLayer(const StepInput& in, const TokenStep& ts) const;
  // Applies the deltas and commits the step to the backend. Fails only on a backend (device)
  // fault, after undoing the appends and opens (frees stay applied).
  absl::Status BeginTokenStep(const StepInput& in);
  // Runs the backend layer of `ts` with `lock` released, then records the outputs under it.
  // `validated`: when validation ended (the host-work stage starts there).
  absl::StatusOr<StepOutput> RunLayer(std::unique_lock<std::mutex>& lock, TokenStep& ts, const StepInput& in,
                                      std::chrono::steady_clock::time_point started,
                                      std::chrono::steady_clock::time_point validated);
  void CompleteTokenStep(uint64_t id);
  // Drops an open token step: its rows lose the token it appended and are unlocked.
  void AbortTokenStep(uint64_t id);
  TokenStep* FindRetained(uint64_t id);
  void ReleaseLocked(SeqId seq);

  const EngineOptions options_;
  const ModelShape shape_;
  ExecutionBackendPtr backend_;
  scheduler::Scheduler scheduler_;

  mutable std::mutex mu_;
  // Signalled whenever a running layer finishes and whenever a waiting Release is done.
  mutable std::condition_variable layer_finished_;
  int32_t layers_in_flight_ = 0;  // backend RunLayer calls running without mu_
  // Token steps (by id) a Release is waiting on; Step waits for these releases to go first.
  absl::flat_hash_map<uint64_t, int32_t> release_waiting_;
  kvpool::BlockPager pager_;
  absl::flat_hash_map<SeqId, SeqState> seqs_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<TokenStep>> open_steps_;
  std::deque<std::unique_ptr<TokenStep>> retained_;  // completed, newest last
  StepObserver default_observer_;
  StepObserver* observer_ = &default_observer_;
};

}  // namespace pkv::engine
