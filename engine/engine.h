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
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_shape.h"
#include "engine/backend.h"
#include "engine/output_pool.h"
#include "engine/step_observer.h"
#include "kvpool/block_pager.h"
#include "scheduler/scheduler.h"

namespace pkv::engine {

using kvpool::SeqId;

struct EngineOptions {
  int32_t max_batch = 256;            // rows per step
  // Retry window: completed token steps whose outputs are kept, so a lost answer of any of their
  // layers can be asked for again (same token_step_id, layer and rows) and is replayed.
  int32_t retained_token_steps = 32;
  // Ids of this many completed token steps are remembered past the retry window: a layer 0
  // resent after its outputs were dropped is refused (FAILED_PRECONDITION) instead of appending
  // its token a second time.
  int32_t remembered_token_step_ids = 65536;
  uint64_t scatter_seed = 0;          // 0: ascending page order (see BlockPager::Options)
  // Static baseline (comparisons only): > 0 reserves pages for this many tokens per sequence at
  // creation, as a fixed-shape engine without a pager reserves max context per batch slot.
  int64_t static_slot_tokens = 0;
  // Limits, each enforced before anything is allocated. 0 picks the default named.
  int64_t max_prompt_tokens = 0;      // tokens of one WriteKV prompt; 0: the pool's token capacity
  int64_t max_sequences = 0;          // sequences held at once; 0: 65536
  int32_t max_open_per_step = 0;      // `open` ids of one token step; 0: max_batch
  int32_t max_free_per_step = 0;      // `free` ids of one token step; 0: 4096
  // Refuse NaN / infinity in q, k, v and prompt K,V (INVALID_ARGUMENT naming the tensor).
  bool check_finite = true;
  // Leases, enforced by ReclaimIdle (the worker calls it about once a second). 0 disables.
  double token_step_idle_seconds = 30;  // an open token step with no layer for this long is aborted
  double sequence_idle_seconds = 0;     // a steppable sequence untouched this long is released
};

// The limits actually in force (EngineOptions with defaults resolved).
struct EngineLimits {
  int32_t max_batch = 0;
  int32_t max_open_token_steps = 0;  // the backend's descriptor slots
  int32_t retry_window_token_steps = 0;
  int64_t max_prompt_tokens = 0;
  int64_t max_sequences = 0;
  int32_t max_open_per_step = 0;
  int32_t max_free_per_step = 0;
  double token_step_idle_seconds = 0;
  double sequence_idle_seconds = 0;
  bool check_finite = true;
};

// What ReclaimIdle took back, for logs and metrics.
struct Reclaimed {
  struct Step {
    uint64_t token_step_id;
    std::string owner;
    int32_t layers_done;
    int32_t rows;
  };
  struct Sequence {
    SeqId id;
    std::string owner;
    int64_t pages;  // pages that went back to the free list
  };
  std::vector<Step> token_steps;
  std::vector<Sequence> sequences;
};

// One layer of one token step, in domain terms. Spans point into the caller's request buffers
// and must stay valid for the call.
struct StepInput {
  // The router that sends the request (the client certificate's identity under mutual TLS, else
  // the router id it declares; empty: anonymous). Sequences and token steps belong to the router
  // that created them; another router gets PERMISSION_DENIED.
  std::string owner;
  uint64_t token_step_id = 0;  // nonzero; shared by all layers of the token step
  int32_t layer = 0;           // 0 opens the token step and carries the deltas
  std::vector<SeqId> rows;     // batch rows, in order (unique)
  std::vector<SeqId> open;     // layer 0 only: new empty sequences, opened before the append
  std::vector<SeqId> free;     // layer 0 only: sequences released before the append
  std::span<const uint8_t> q;  // [B, Hq, d] model dtype, little-endian
  std::span<const uint8_t> k;  // [B, Hkv, d] this layer's K of each row's new token
  std::span<const uint8_t> v;  // [B, Hkv, d]
  // Optional: [B, Hq, d] host bytes (exactly) the outputs are also written to, besides
  // StepOutput::out, replays included (e.g. a router's shared memory). When it and q, k, v lie in
  // memory registered with RegisterHostMemory, the device reads and writes them in place.
  std::span<uint8_t> out_copy;
  bool want_lse = false;
};

// Where one layer-step's time went inside the engine, in seconds (see StepResponse in
// proto/pkv/v1/worker.proto for the stages).
struct StepTimings {
  double validate_seconds = 0;  // checks before any change, including the engine lock wait
  double host_seconds = 0;      // deltas, page table, plan, descriptor (layer 0); the backend's
                                // host work; recording the outputs
  double h2d_seconds = 0;       // device stages, from LayerRunInfo: sampled (all 0 on a layer
  double kernel_seconds = 0;    // whose stages the backend did not time, see LayerRunInfo)
  double d2h_seconds = 0;
};

// Immutable output bytes shared by the caller's response and the retry cache (no copy for
// either): a buffer of OutputPool (host memory, or pinned memory the backend's kernels wrote
// directly), kept alive by whoever holds it.
class OutputBytes {
 public:
  OutputBytes() = default;
  explicit OutputBytes(const std::string& bytes) {
    auto copy = std::make_shared<const std::string>(bytes);
    data_ = std::shared_ptr<const char>(copy, copy->data());
    size_ = bytes.size();
  }
  // Takes a buffer (e.g. one of OutputPool's, its owner keeping the memory alive); it must not be
  // written to afterwards.
  OutputBytes(std::shared_ptr<const char> data, size_t size) : data_(std::move(data)), size_(size) {}
  const char* data() const { return size_ > 0 ? data_.get() : ""; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::string_view view() const { return std::string_view(data(), size_); }
  std::string str() const { return std::string(view()); }
  operator std::string() const { return str(); }  // NOLINT: reads as the bytes
  const char* begin() const { return data(); }
  const char* end() const { return data() + size_; }
  // The buffer itself, for handing it on without a copy (e.g. as a gRPC slice).
  const std::shared_ptr<const char>& shared() const { return data_; }
  friend bool operator==(const OutputBytes& a, const OutputBytes& b) { return a.view() == b.view(); }
  friend bool operator!=(const OutputBytes& a, const OutputBytes& b) { return !(a == b); }
  friend bool operator==(const OutputBytes& a, const std::string& b) { return a.view() == b; }
  friend bool operator==(const std::string& a, const OutputBytes& b) { return a == b.view(); }
  friend bool operator!=(const OutputBytes& a, const std::string& b) { return !(a == b); }
  friend bool operator!=(const std::string& a, const OutputBytes& b) { return !(a == b); }

 private:
  std::shared_ptr<const char> data_;
  size_t size_ = 0;
};

struct StepOutput {
  OutputBytes out;         // [B, Hq, d] model dtype bytes
  std::vector<float> lse;  // [B, Hq] natural-log LSE of the scaled scores, when asked
  KernelId kernel = KernelId::kReference;
  bool replayed = false;    // served from the retry cache
  double attend_seconds = 0.0;  // the attention's device time for this layer, when attention_timed
  bool attention_skipped = false;  // the backend skips attention (SkipAttention): zero outputs
  // attend_seconds was measured (the CUDA backend times the attention on one layer-step in
  // EngineConfig::attention_timing_interval per descriptor slot; 0 on the others).
  bool attention_timed = true;
  // The device read q, k, v from and wrote StepInput::out_copy into registered host memory itself
  // (no host copy of either).
  bool in_place = false;
  StepTimings timings;      // this call's (a replay reports only its validation)
};

// What the worker serves, for Describe and readiness.
struct OpenTokenStepInfo {
  uint64_t token_step_id = 0;
  std::string owner;
  int32_t rows = 0;
  int32_t layers_done = 0;
  double idle_seconds = 0;  // since its last layer began or finished
};

struct EngineInfo {
  ModelShape shape;
  EngineLimits limits;
  std::vector<OpenTokenStepInfo> open_steps;
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
  // INVALID_ARGUMENT naming the field (worded as Step words it) for a layer out of range, n < 1,
  // tokens outside the prompt, a byte size that is not [n, Hkv, d], or a non-finite value.
  // The bytes are staged (KvArena::StageTokens): on the device they join a merged copy of many
  // chunks (of any prompts) and are on the device once Commit returns.
  // `k` and `v` may lie in pieces (common/piece_bytes.h: a received message's slices), which the
  // arena scans and stages where they lie.
  [[nodiscard]] absl::Status Write(int32_t layer, int64_t token_offset, int64_t n, const PieceBytes& k,
                                   const PieceBytes& v);
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

  // One layer of a token step (see the file comment). Validates everything it is given
  // (token_step_id, layer, the lists, q/k/v byte sizes against the model shape, finiteness)
  // before it changes anything.
  absl::StatusOr<StepOutput> Step(const StepInput& input);

  // Starts writing a prompt of `num_tokens` tokens (1 .. max_prompt_tokens) for a new sequence
  // owned by `owner`. ALREADY_EXISTS, INVALID_ARGUMENT, RESOURCE_EXHAUSTED (free pages, or the
  // sequence limit, in the message), UNAVAILABLE while draining.
  absl::StatusOr<std::unique_ptr<PromptWrite>> BeginPrompt(SeqId seq, int64_t num_tokens,
                                                           const std::string& owner = "");

  // Benchmarks only: creates a steppable sequence of `num_tokens` tokens whose prompt K,V is
  // whatever its pages hold (the benchmark fills the whole pool with random data once). Same
  // errors as BeginPrompt. Never used by the service.
  absl::Status AdoptUnwrittenPromptForBenchmark(SeqId seq, int64_t num_tokens);

  // Registers host memory [base, base + bytes) (a router's shared-memory region) with the
  // backend, so that layer-steps whose q, k, v and out_copy lie in it are read and written there
  // by the device, with no host copy (StepOutput::in_place). The handle undoes it when the last
  // copy is released: before the memory is unmapped, with no step using it running. It may
  // outlive the engine (the engine's destructor undoes what is left). UNIMPLEMENTED where the
  // backend has no device of its own, else the backend's error; steps work either way (the
  // engine then copies).
  absl::StatusOr<std::shared_ptr<void>> RegisterHostMemory(void* base, size_t bytes);

  // Replaces the scheduler (fixed-arm comparisons in benchmarks; the worker sets it at start).
  // INVALID_ARGUMENT when it offers a kernel the backend lacks.
  absl::Status SetScheduler(scheduler::Scheduler scheduler);

  // Releases sequences (all-or-nothing): NOT_FOUND if any is unknown, FAILED_PRECONDITION if a
  // prompt is still being written. A released sequence drops out of any open token step.
  // Waits for running layers of the token steps of `seqs` to finish before it frees anything.
  // PERMISSION_DENIED when one of `seqs` belongs to another router than `owner`.
  absl::Status Release(std::span<const SeqId> seqs, const std::string& owner = "");

  // The list sizes of one StepRequest against the limits (INVALID_ARGUMENT naming the list).
  // Step checks them too; the service calls it before copying the lists out of a request.
  absl::Status ValidateListSizes(size_t rows, size_t open, size_t free) const;

  // Aborts open token steps and releases sequences idle past their lease (EngineOptions) at
  // `now`. Never touches a token step whose layer is running or a prompt being written.
  Reclaimed ReclaimIdle(std::chrono::steady_clock::time_point now);

  // Draining: layer 0 of a new token step, `open` and new prompts get UNAVAILABLE; later layers
  // of open token steps, Release and `free` still run, so open token steps can finish.
  void StopNewWork();

  // Takes the engine lock and returns at once, for a liveness heartbeat: it blocks while another
  // call holds the lock.
  void Heartbeat() const;

  const EngineLimits& limits() const { return limits_; }

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

  using Clock = std::chrono::steady_clock;
  enum class SeqPhase { kWriting, kReady };
  struct SeqState {
    SeqPhase phase = SeqPhase::kReady;
    uint64_t open_token_step = 0;  // 0: none
    std::string owner;
    Clock::time_point last_used;  // created, or last in a token step
  };
  struct TokenStep {
    uint64_t id = 0;           // the engine's key (StepKey), unique across routers
    uint64_t external_id = 0;  // the router's token_step_id (per-router namespace)
    std::string owner;
    Clock::time_point last_activity;
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
  // INVALID_ARGUMENT naming `field` and the [row, head, dim] of its first NaN or infinity.
  absl::Status CheckFinite(absl::string_view field, std::span<const uint8_t> data, int32_t heads) const;
  // The refusal of `data` (a [rows, heads, head_dim] tensor named `field`) for its non-finite
  // element `i`: INVALID_ARGUMENT naming the element and what it is.
  absl::Status NonFiniteError(absl::string_view field, const PieceBytes& data, int64_t i, int32_t heads) const;
  absl::Status ValidateLayerZero(const StepInput& in) const;
  absl::Status ValidateLaterLayer(const StepInput& in, const TokenStep& ts) const;
  // Applies the deltas and commits the step, under the engine's key `key`, to the backend. Fails
  // only on a backend (device) fault, after undoing the appends and opens (frees stay applied).
  absl::Status BeginTokenStep(const StepInput& in, uint64_t key);
  // Token step ids are per router: (owner, token_step_id) names a token step by an engine key.
  // 0 when the router has no such token step (open, retained or remembered).
  uint64_t StepKey(const std::string& owner, uint64_t token_step_id) const;
  uint64_t NewStepKey(const std::string& owner, uint64_t token_step_id);
  // Drops the name of `key` (its token_step_id may be used again by its router).
  void ForgetStepKey(uint64_t key);
  // The router's token_step_id of engine key `key`, for messages.
  uint64_t ExternalStepId(uint64_t key) const;
  // Runs the backend layer of `ts` with `lock` released, then records the outputs under it.
  // `validated`: when validation ended (the host-work stage starts there). `locked`: when Step
  // took the engine lock; `begun`: how long layer 0's BeginTokenStep took (for the slow-step log).
  absl::StatusOr<StepOutput> RunLayer(std::unique_lock<std::mutex>& lock, TokenStep& ts, const StepInput& in,
                                      std::chrono::steady_clock::time_point started,
                                      std::chrono::steady_clock::time_point validated,
                                      std::chrono::steady_clock::time_point locked,
                                      std::chrono::steady_clock::duration begun);
  void CompleteTokenStep(uint64_t id);
  // Drops an open token step: its rows lose the token it appended and are unlocked.
  void AbortTokenStep(uint64_t id);
  TokenStep* FindRetained(uint64_t id);
  void ReleaseLocked(SeqId seq);
  // A completed token step leaves the retry window: its id is remembered a while longer.
  void Remember(uint64_t id);
  // PERMISSION_DENIED naming `field` when sequence `id` belongs to another router.
  absl::Status CheckOwner(const SeqState& s, const std::string& owner, absl::string_view field, size_t index,
                          SeqId id) const;

  const EngineOptions options_;
  const ModelShape shape_;
  EngineLimits limits_;
  ExecutionBackendPtr backend_;
  OutputPool output_pool_;  // layer-step output buffers, recycled (heap ones: up to 64 MiB idle)
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
  // Ids of completed token steps that left retained_ (oldest first), bounded by
  // remembered_token_step_ids.
  std::deque<uint64_t> remembered_order_;
  absl::flat_hash_set<uint64_t> remembered_;
  // Names of the token steps held (open, retained or remembered): (owner, token_step_id) <-> key.
  absl::flat_hash_map<std::pair<std::string, uint64_t>, uint64_t> step_keys_;
  absl::flat_hash_map<uint64_t, std::pair<std::string, uint64_t>> step_names_;
  uint64_t next_step_key_ = 1;
  bool stopped_ = false;  // StopNewWork
  StepObserver default_observer_;
  StepObserver* observer_ = &default_observer_;
  // Host memory registered with the backend, shared with the handles RegisterHostMemory gave out
  // (the destructor unregisters what is left and clears `backend`).
  struct HostRegistrations {
    std::mutex mu;
    ExecutionBackend* backend = nullptr;
    std::vector<void*> bases;
  };
  std::shared_ptr<HostRegistrations> registrations_ = std::make_shared<HostRegistrations>();
};

}  // namespace pkv::engine
