#include "engine/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>

#include <sys/resource.h>

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace pkv::engine {
namespace {

// A token step's begin (layer 0's deltas, pager, copies, plan and descriptor) that takes longer
// than this is logged with its parts, at most once a second: these run under the engine lock.
constexpr auto kSlowBeginLog = std::chrono::microseconds(500);

// A layer-step that holds the worker this much longer than its wait for the device is logged
// with its parts, at most once a second.
constexpr auto kSlowLayerLog = std::chrono::microseconds(500);

// This thread's involuntary and voluntary context switches and minor page faults so far.
struct ThreadUsage {
  long preempted = 0, blocked = 0, faults = 0;
};
ThreadUsage ThreadSwitchesAndFaults() {
  struct rusage u {};
  if (getrusage(RUSAGE_THREAD, &u) != 0) return {};
  return {u.ru_nivcsw, u.ru_nvcsw, u.ru_minflt};
}

// True at most once a second per `last_ns` (the caller logs); counts the others in `unlogged`.
bool LogNow(std::atomic<int64_t>& last_ns, std::atomic<int64_t>& unlogged) {
  const int64_t now_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  int64_t last = last_ns.load(std::memory_order_relaxed);
  if (now_ns - last >= 1'000'000'000 && last_ns.compare_exchange_strong(last, now_ns)) return true;
  unlogged.fetch_add(1, std::memory_order_relaxed);
  return false;
}

double Us(std::chrono::steady_clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// First duplicate in `ids`, or -1.
int64_t FirstDuplicate(const std::vector<SeqId>& ids) {
  absl::flat_hash_set<SeqId> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) return static_cast<int64_t>(i);
  }
  return -1;
}

bool Contains(const std::vector<SeqId>& ids, SeqId id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

// The request checks Step and PromptWrite::Write share, so that both word an error the same way.

// INVALID_ARGUMENT naming `layer` when it is outside [0, num_layers).
absl::Status CheckLayer(int32_t layer, const ModelShape& s) {
  if (layer >= 0 && layer < s.num_layers) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("layer: ", layer, " out of range [0, ", s.num_layers, ")"));
}

// INVALID_ARGUMENT naming `field` unless `bytes` is the size of a [rows, heads, head_dim] tensor
// of the model dtype.
absl::Status CheckTensorBytes(absl::string_view field, size_t bytes, int64_t rows, int32_t heads,
                              const ModelShape& s) {
  const size_t want = static_cast<size_t>(rows) * heads * s.head_dim * DTypeSize(s.dtype);
  if (bytes == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", bytes, " bytes, want ", want, " ([", rows, ", ",
                                                 heads, ", ", s.head_dim, "] ", DTypeName(s.dtype), ")"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PromptWrite

PromptWrite::PromptWrite(Engine* engine, SeqId seq, int64_t num_tokens)
    : engine_(engine),
      seq_(seq),
      num_tokens_(num_tokens),
      written_(engine->shape().num_layers, std::vector<bool>(num_tokens, false)),
      covered_(engine->shape().num_layers, 0),
      started_(std::chrono::steady_clock::now()) {}

PromptWrite::~PromptWrite() { Abort(); }

absl::Status PromptWrite::Write(int32_t layer, int64_t token_offset, int64_t n, const PieceBytes& k,
                                const PieceBytes& v) {
  if (done_) return absl::FailedPreconditionError("prompt write already finished");
  const ModelShape& s = engine_->shape();
  PKV_RETURN_IF_ERROR(CheckLayer(layer, s));
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("num_tokens: must be >= 1, got ", n));
  // Written without token_offset + n, which may overflow for offsets a client makes up.
  if (token_offset < 0 || token_offset > num_tokens_ - n) {
    return absl::InvalidArgumentError(absl::StrCat("token_offset: ", token_offset, " with num_tokens ", n,
                                                   " is not a range within the prompt's ", num_tokens_,
                                                   " tokens"));
  }
  PKV_RETURN_IF_ERROR(CheckTensorBytes("k", k.size(), n, s.num_kv_heads, s));
  PKV_RETURN_IF_ERROR(CheckTensorBytes("v", v.size(), n, s.num_kv_heads, s));
  // Under the engine lock only the page ids of the range are copied (a few dozen): decode steps
  // wait for this lock, so the per-token slots are worked out after it.
  const int64_t page_size = s.page_size;
  const int64_t first_page = token_offset / page_size;
  std::vector<kvpool::PageId> range_pages;
  if (n > 0) {
    const int64_t last_page = (token_offset + n - 1) / page_size;
    std::lock_guard<std::mutex> lock(engine_->mu_);
    const kvpool::SequencePages* pages = engine_->pager_.Find(seq_);
    // Invariant: a sequence being written cannot be released (Release refuses it), and its pages
    // were all allocated by BeginPrompt.
    PKV_CHECK(pages != nullptr) << "prompt sequence " << seq_ << " vanished";
    PKV_CHECK(static_cast<int64_t>(pages->pages.size()) > last_page) << "prompt sequence " << seq_ << " lacks pages";
    range_pages.assign(pages->pages.begin() + first_page, pages->pages.begin() + last_page + 1);
  }
  std::vector<kvpool::SlotAddr> slots(n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t token = token_offset + t;
    slots[t] = kvpool::SlotAddr{range_pages[token / page_size - first_page], static_cast<int32_t>(token % page_size)};
  }
  // Staged without the engine lock (decode steps never wait for prompt bytes): the slots are
  // this prompt's own pages, which nothing else reads or writes until Commit or Abort, and this
  // PromptWrite is used by one thread. On the device the chunk joins a merged copy + scatter;
  // Commit flushes it. The arena scans the rows for NaN/inf before it stages anything (on the
  // device spread over its copy helpers: one core's scan bounds a single prompt stream).
  kvpool::StageScan scan;
  PKV_RETURN_IF_ERROR(
      engine_->backend_->arena().StageTokens(layer, slots, k, v, engine_->limits_.check_finite ? &scan : nullptr));
  if (scan.first_k >= 0) return engine_->NonFiniteError("k", k, scan.first_k, s.num_kv_heads);
  if (scan.first_v >= 0) return engine_->NonFiniteError("v", v, scan.first_v, s.num_kv_heads);
  for (int64_t t = token_offset; t < token_offset + n; ++t) {
    if (!written_[layer][t]) {
      written_[layer][t] = true;
      ++covered_[layer];
    }
  }
  bytes_written_ += static_cast<int64_t>(k.size() + v.size());
  return absl::OkStatus();
}

absl::Status PromptWrite::Commit() {
  if (done_) return absl::FailedPreconditionError("prompt write already finished");
  for (size_t layer = 0; layer < covered_.size(); ++layer) {
    if (covered_[layer] != num_tokens_) {
      const auto first = std::find(written_[layer].begin(), written_[layer].end(), false) -
                         written_[layer].begin();
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", seq_, ": prompt incomplete: layer ", layer, " has ", covered_[layer], " of ",
          num_tokens_, " tokens (first missing token ", first, ")"));
    }
  }
  // The sequence's bytes are in the pages (device: copied, scattered, stream synchronised)
  // before it is steppable, so its first step reads them on any stream. On a failed flush it
  // stays unwritten and is released with this PromptWrite. The flush waits without the engine
  // lock.
  if (absl::Status flushed = engine_->backend_->arena().FlushStaged(); !flushed.ok()) {
    return absl::InternalError(absl::StrCat("sequence ", seq_, ": prompt ingest failed: ", flushed.message()));
  }
  std::lock_guard<std::mutex> lock(engine_->mu_);
  Engine::SeqState& state = engine_->seqs_[seq_];
  state.phase = Engine::SeqPhase::kReady;
  state.last_used = Engine::Clock::now();
  done_ = true;
  engine_->observer_->OnPromptCommitted(
      bytes_written_, std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  return absl::OkStatus();
}

void PromptWrite::Abort() {
  if (done_) return;
  done_ = true;
  // Staged bytes of this prompt must land (or be dropped) before its pages can go to another
  // sequence; the flush waits for the ingest stream either way (without the engine lock).
  if (absl::Status flushed = engine_->backend_->arena().FlushStaged(); !flushed.ok()) {
    PKV_LOG(WARNING) << "sequence " << seq_ << ": prompt ingest flush on abort: " << flushed;
  }
  std::lock_guard<std::mutex> lock(engine_->mu_);
  engine_->ReleaseLocked(seq_);
}

// ---------------------------------------------------------------------------------------------
// Engine

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options,
                                                       ExecutionBackendPtr backend,
                                                       scheduler::Scheduler scheduler) {
  if (backend == nullptr) return absl::InvalidArgumentError("backend is null");
  PKV_RETURN_IF_ERROR(backend->arena().shape().Validate());
  if (options.max_batch < 1) return absl::InvalidArgumentError("max_batch must be >= 1");
  for (KernelId k : scheduler.options().available) {
    const auto have = backend->kernels();
    if (std::find(have.begin(), have.end(), k) == have.end()) {
      return absl::InvalidArgumentError(absl::StrCat("scheduler offers kernel ", KernelName(k),
                                                     " that backend ", backend->name(), " lacks"));
    }
  }
  return std::unique_ptr<Engine>(new Engine(options, std::move(backend), std::move(scheduler)));
}

Engine::Engine(const EngineOptions& options, ExecutionBackendPtr backend, scheduler::Scheduler scheduler)
    : options_(options),
      shape_(backend->arena().shape()),
      backend_(std::move(backend)),
      output_pool_(size_t{64} << 20, backend_->output_memory()),
      scheduler_(std::move(scheduler)),
      pager_(kvpool::BlockPager::Options{backend_->arena().num_pages(), shape_.page_size,
                                         options.scatter_seed}) {
  limits_.max_batch = options.max_batch;
  limits_.max_open_token_steps = backend_->max_open_token_steps();
  limits_.retry_window_token_steps = std::max(options.retained_token_steps, 0);
  const int64_t pool_tokens = backend_->arena().num_pages() * shape_.page_size;
  limits_.max_prompt_tokens =
      options.max_prompt_tokens > 0 ? std::min(options.max_prompt_tokens, pool_tokens) : pool_tokens;
  limits_.max_sequences = options.max_sequences > 0 ? options.max_sequences : 65536;
  limits_.max_open_per_step = options.max_open_per_step > 0 ? options.max_open_per_step : options.max_batch;
  limits_.max_free_per_step = options.max_free_per_step > 0 ? options.max_free_per_step : 4096;
  limits_.token_step_idle_seconds = std::max(options.token_step_idle_seconds, 0.0);
  limits_.sequence_idle_seconds = std::max(options.sequence_idle_seconds, 0.0);
  limits_.check_finite = options.check_finite;
}

Engine::~Engine() {
  // Callers stop stepping first; a layer still running would use the backend being destroyed.
  std::unique_lock<std::mutex> lock(mu_);
  layer_finished_.wait(lock, [&] { return layers_in_flight_ == 0; });
  std::lock_guard<std::mutex> registrations(registrations_->mu);
  for (void* base : registrations_->bases) backend_->UnregisterHostMemory(base);
  registrations_->bases.clear();
  registrations_->backend = nullptr;
}

absl::StatusOr<std::shared_ptr<void>> Engine::RegisterHostMemory(void* base, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(registrations_->mu);
    PKV_RETURN_IF_ERROR(backend_->RegisterHostMemory(base, bytes));
    registrations_->backend = backend_.get();
    registrations_->bases.push_back(base);
  }
  return std::shared_ptr<void>(base, [registrations = registrations_](void* p) {
    std::lock_guard<std::mutex> lock(registrations->mu);
    auto it = std::find(registrations->bases.begin(), registrations->bases.end(), p);
    if (registrations->backend == nullptr || it == registrations->bases.end()) return;  // the engine is gone
    registrations->backend->UnregisterHostMemory(p);
    registrations->bases.erase(it);
  });
}

absl::Status Engine::ValidateTensors(const StepInput& in) const {
  const int64_t b = static_cast<int64_t>(in.rows.size());
  PKV_RETURN_IF_ERROR(CheckTensorBytes("q", in.q.size(), b, shape_.num_q_heads, shape_));
  PKV_RETURN_IF_ERROR(CheckTensorBytes("k", in.k.size(), b, shape_.num_kv_heads, shape_));
  PKV_RETURN_IF_ERROR(CheckTensorBytes("v", in.v.size(), b, shape_.num_kv_heads, shape_));
  if (!in.out_copy.empty()) PKV_RETURN_IF_ERROR(CheckTensorBytes("out_copy", in.out_copy.size(), b, shape_.num_q_heads, shape_));
  if (limits_.check_finite) {
    PKV_RETURN_IF_ERROR(CheckFinite("q", in.q, shape_.num_q_heads));
    PKV_RETURN_IF_ERROR(CheckFinite("k", in.k, shape_.num_kv_heads));
    PKV_RETURN_IF_ERROR(CheckFinite("v", in.v, shape_.num_kv_heads));
  }
  return absl::OkStatus();
}

absl::Status Engine::CheckFinite(absl::string_view field, std::span<const uint8_t> data, int32_t heads) const {
  const int64_t i = FirstNonFinite(shape_.dtype, data.data(), data.size());
  if (i < 0) return absl::OkStatus();
  return NonFiniteError(field, data, i, heads);
}

absl::Status Engine::NonFiniteError(absl::string_view field, const PieceBytes& data, int64_t i,
                                    int32_t heads) const {
  const int64_t d = shape_.head_dim;
  uint8_t bits[2] = {0, 0};
  data.CopyTo(static_cast<size_t>(2 * i), 2, bits);
  const float value = ToFloat(shape_.dtype, static_cast<uint16_t>(bits[0] | (bits[1] << 8)));
  return absl::InvalidArgumentError(absl::StrCat(field, ": element [", i / (heads * d), ", ", (i / d) % heads, ", ",
                                                 i % d, "] is ", std::isnan(value) ? "NaN" : "infinite",
                                                 " (q, k and v must be finite)"));
}

absl::Status Engine::ValidateListSizes(size_t rows, size_t open, size_t free) const {
  if (rows > static_cast<size_t>(limits_.max_batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows: ", rows, " rows exceed max_batch ", limits_.max_batch));
  }
  if (open > static_cast<size_t>(limits_.max_open_per_step)) {
    return absl::InvalidArgumentError(
        absl::StrCat("open: ", open, " ids exceed the limit of ", limits_.max_open_per_step, " per token step"));
  }
  if (free > static_cast<size_t>(limits_.max_free_per_step)) {
    return absl::InvalidArgumentError(
        absl::StrCat("free: ", free, " ids exceed the limit of ", limits_.max_free_per_step, " per token step"));
  }
  return absl::OkStatus();
}

absl::Status Engine::CheckOwner(const SeqState& s, const std::string& owner, absl::string_view field, size_t index,
                                SeqId id) const {
  if (s.owner == owner) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(field, "[", index, "]: sequence ", id,
                                                  " belongs to another router"));
}

absl::Status Engine::ValidateLayerZero(const StepInput& in) const {
  if (stopped_ && (!in.rows.empty() || !in.open.empty())) {
    return absl::UnavailableError(
        "token_step_id: the worker is draining (shutting down): no new token steps; open ones may finish");
  }
  if (!in.rows.empty() && static_cast<int32_t>(open_steps_.size()) >= backend_->max_open_token_steps()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "token_step_id: open token steps full: ", open_steps_.size(), " are open (the most the ", backend_->name(),
        " backend keeps); finish their layers before opening another (an idle one is aborted after ",
        limits_.token_step_idle_seconds, " s)"));
  }
  if (int64_t i = FirstDuplicate(in.free); i >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("free[", i, "]: sequence ", in.free[i], " listed twice"));
  }
  if (int64_t i = FirstDuplicate(in.open); i >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("open[", i, "]: sequence ", in.open[i], " listed twice"));
  }
  for (size_t i = 0; i < in.free.size(); ++i) {
    const SeqId id = in.free[i];
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("free[", i, "]: sequence ", id, " not found"));
    PKV_RETURN_IF_ERROR(CheckOwner(it->second, in.owner, "free", i, id));
    if (it->second.phase == SeqPhase::kWriting) {
      return absl::FailedPreconditionError(
          absl::StrCat("free[", i, "]: sequence ", id, " prompt is still being written"));
    }
    if (it->second.open_token_step != 0) {
      return absl::FailedPreconditionError(absl::StrCat("free[", i, "]: sequence ", id, " is in token step ",
                                                        ExternalStepId(it->second.open_token_step),
                                                        ", which has layers left"));
    }
    if (Contains(in.rows, id)) {
      return absl::InvalidArgumentError(absl::StrCat("free[", i, "]: sequence ", id, " is also a row of this step"));
    }
  }
  for (size_t i = 0; i < in.open.size(); ++i) {
    const SeqId id = in.open[i];
    if (Contains(in.free, id)) {
      return absl::InvalidArgumentError(absl::StrCat("open[", i, "]: sequence ", id, " is also freed"));
    }
    if (seqs_.contains(id)) {
      return absl::AlreadyExistsError(absl::StrCat("open[", i, "]: sequence ", id, " already exists"));
    }
  }
  if (!in.open.empty()) {
    const int64_t after = static_cast<int64_t>(seqs_.size() - in.free.size() + in.open.size());
    if (after > limits_.max_sequences) {
      return absl::ResourceExhaustedError(absl::StrCat("open: sequences full: ", in.open.size(),
                                                       " new sequences would make ", after, ", over the limit of ",
                                                       limits_.max_sequences));
    }
  }
  int64_t pages_needed = 0;
  for (size_t i = 0; i < in.rows.size(); ++i) {
    const SeqId id = in.rows[i];
    if (Contains(in.open, id)) {
      // An opened sequence is empty: its first token needs a page (or its static slot).
      pages_needed += std::max<int64_t>(1, pager_.PagesForTokens(options_.static_slot_tokens));
      continue;
    }
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("rows[", i, "]: sequence ", id, " not found"));
    PKV_RETURN_IF_ERROR(CheckOwner(it->second, in.owner, "rows", i, id));
    if (it->second.phase == SeqPhase::kWriting) {
      return absl::FailedPreconditionError(
          absl::StrCat("rows[", i, "]: sequence ", id, " prompt is still being written (WriteKV not complete)"));
    }
    if (it->second.open_token_step != 0) {
      return absl::FailedPreconditionError(absl::StrCat("rows[", i, "]: sequence ", id, " is in token step ",
                                                        ExternalStepId(it->second.open_token_step),
                                                        ", which has layers left"));
    }
    auto need = pager_.PagesToAppend(id, 1);
    PKV_CHECK(need.ok()) << "engine and pager disagree on sequence " << id;
    pages_needed += *need;
  }
  const int64_t from_frees = pager_.PagesReleasedBy(in.free);
  const int64_t available = pager_.free_pages() + from_frees;
  if (pages_needed > available) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool full: this token step needs ", pages_needed,
                                                     " new pages, ", pager_.free_pages(), " free (+",
                                                     from_frees, " released by free)"));
  }
  return absl::OkStatus();
}

absl::Status Engine::ValidateLaterLayer(const StepInput& in, const TokenStep& ts) const {
  if (!in.open.empty() || !in.free.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(in.open.empty() ? "free" : "open",
                                                   ": deltas are only allowed in layer 0 of a token step"));
  }
  if (in.rows != ts.rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows: differ from layer 0 of token step ", ts.external_id, " (same rows, same order)"));
  }
  if (!ts.layer_done[in.layer - 1]) {
    return absl::FailedPreconditionError(absl::StrCat("layer: layer ", in.layer - 1, " of token step ",
                                                      ts.external_id, " has not run; layers run in order"));
  }
  for (size_t i = 0; i < ts.rows.size(); ++i) {
    if (!seqs_.contains(ts.rows[i])) {
      return absl::NotFoundError(absl::StrCat("rows[", i, "]: sequence ", ts.rows[i], " was released"));
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::BeginTokenStep(const StepInput& in, uint64_t key) {
  const auto t_begin = std::chrono::steady_clock::now();
  const ThreadUsage usage_begin = ThreadSwitchesAndFaults();
  auto ts = std::make_unique<TokenStep>();
  ts->id = key;
  ts->external_id = in.token_step_id;
  ts->owner = in.owner;
  ts->last_activity = Clock::now();
  ts->rows = in.rows;
  ts->layer_done.assign(shape_.num_layers, false);
  ts->outputs.resize(shape_.num_layers);
  for (SeqId id : in.free) ReleaseLocked(id);
  for (SeqId id : in.open) {
    PKV_CHECK(pager_.Create(id, 0, options_.static_slot_tokens).ok()) << "validated open failed";
    seqs_[id] = SeqState{SeqPhase::kReady, 0, in.owner, ts->last_activity};
  }
  if (in.rows.empty()) {
    // Only deltas: nothing to attend, no backend slot. The token step is complete at once; its
    // later layers are answered (empty) from the retry window.
    for (int32_t l = 0; l < shape_.num_layers; ++l) {
      ts->layer_done[l] = true;
      ts->outputs[l].kernel = KernelId::kReference;
    }
    ts->layers_done = shape_.num_layers;
    retained_.push_back(std::move(ts));
    while (static_cast<int32_t>(retained_.size()) > std::max(limits_.retry_window_token_steps, 1)) {
      Remember(retained_.front()->id);
      retained_.pop_front();
    }
    return absl::OkStatus();
  }
  std::vector<kvpool::PageCopy> copies;
  scheduler::StepShape shape;
  shape.model = shape_;
  shape.device = backend_->device_info();
  ts->table.indptr.push_back(0);
  for (SeqId id : in.rows) {
    PKV_CHECK(pager_.Append(id, 1, &copies).ok()) << "validated append failed";
    const kvpool::SequencePages* pages = pager_.Find(id);
    ts->new_slots.push_back(pager_.Locate(*pages, pages->num_tokens - 1));
    // Only the pages that hold tokens: a static-baseline sequence holds more than it fills.
    ts->table.indices.insert(ts->table.indices.end(), pages->pages.begin(),
                             pages->pages.begin() + pager_.PagesForTokens(pages->num_tokens));
    ts->table.indptr.push_back(static_cast<int32_t>(ts->table.indices.size()));
    ts->table.last_page_len.push_back(
        static_cast<int32_t>((pages->num_tokens - 1) % shape_.page_size + 1));
    shape.row_tokens.push_back(pages->num_tokens);
    SeqState& state = seqs_[id];
    state.open_token_step = ts->id;
    state.last_used = ts->last_activity;
  }
  const auto t_pager = std::chrono::steady_clock::now();
  for (const kvpool::PageCopy& c : copies) {
    // Invariant: the pager only returns in-range pages.
    PKV_CHECK(backend_->arena().CopyPage(c.src, c.dst).ok()) << "page copy failed";
  }
  const auto t_copies = std::chrono::steady_clock::now();
  ts->plan = scheduler_.Plan(shape);
  const auto t_plan = std::chrono::steady_clock::now();
  absl::StatusOr<int32_t> slot = backend_->BeginTokenStep(ts->plan, ts->table, ts->new_slots);
  const auto t_end = std::chrono::steady_clock::now();
  if (t_end - t_begin > kSlowBeginLog) {
    static std::atomic<int64_t> last_log_ns{0}, unlogged{0};
    if (LogNow(last_log_ns, unlogged)) {
      const ThreadUsage usage_end = ThreadSwitchesAndFaults();
      PKV_LOG(WARNING) << "slow token step begin (" << in.rows.size() << " rows, " << in.open.size() << " opened, "
                       << in.free.size() << " freed, " << copies.size() << " page copies): " << Us(t_end - t_begin)
                       << " us under the engine lock: deltas and pager " << Us(t_pager - t_begin) << ", page copies "
                       << Us(t_copies - t_pager) << ", plan " << Us(t_plan - t_copies) << ", descriptor "
                       << Us(t_end - t_plan) << "; meanwhile this thread was preempted "
                       << usage_end.preempted - usage_begin.preempted << " times, blocked "
                       << usage_end.blocked - usage_begin.blocked << " times and took "
                       << usage_end.faults - usage_begin.faults << " page faults ("
                       << unlogged.exchange(0) << " more slow begins since the last such line)";
    }
  }
  if (!slot.ok()) {
    for (SeqId id : in.rows) {
      seqs_[id].open_token_step = 0;
      PKV_CHECK(pager_.Truncate(id, pager_.Find(id)->num_tokens - 1).ok()) << "undo append failed";
    }
    for (SeqId id : in.open) ReleaseLocked(id);
    ForgetStepKey(key);
    PKV_LOG(ERROR) << "backend refused token step " << in.token_step_id << ": " << slot.status();
    return absl::InternalError(absl::StrCat("backend ", backend_->name(), " failed to begin token step ",
                                            in.token_step_id, ": ", slot.status().message()));
  }
  ts->backend_slot = *slot;
  TokenStepEvent event;
  event.kernel = ts->plan.kernel;
  event.rows = static_cast<int32_t>(ts->rows.size());
  for (int64_t t : shape.row_tokens) event.kv_tokens += t;
  // The plan is the one that runs (the scheduler fitted it to the backend's limits; the backend
  // packs it unchanged), so these describe the launched work.
  event.num_splits = ts->plan.num_splits;
  event.pages_per_task = ts->plan.pages_per_task;
  if (ts->plan.kernel == KernelId::kSequenceSplit) {
    event.max_row_splits = ts->plan.num_splits;
  } else if (ts->plan.kernel == KernelId::kWorkQueue && !ts->plan.row_splits.empty()) {
    event.max_row_splits = *std::max_element(ts->plan.row_splits.begin(), ts->plan.row_splits.end());
  }
  event.launches_per_layer = ts->plan.launches_per_layer;
  event.predicted_seconds = ts->plan.predicted_us * 1e-6;
  observer_->OnTokenStepPlanned(event);
  open_steps_[ts->id] = std::move(ts);
  return absl::OkStatus();
}

absl::StatusOr<StepOutput> Engine::RunLayer(std::unique_lock<std::mutex>& lock, TokenStep& ts,
                                            const StepInput& in, std::chrono::steady_clock::time_point started,
                                            std::chrono::steady_clock::time_point validated,
                                            std::chrono::steady_clock::time_point locked,
                                            std::chrono::steady_clock::duration begun) {
  const size_t b = ts.rows.size();
  const int32_t slot = ts.backend_slot;
  StepOutput result;
  result.kernel = ts.plan.kernel;
  ts.running_layer = in.layer;
  ts.last_activity = Clock::now();
  ++layers_in_flight_;
  lock.unlock();
  // Without the lock: `ts` stays alive and keeps its slot (a token step with a running layer is
  // neither completed nor aborted, see Release); only this thread touches the slot's buffers
  // (one running layer per token step).
  // Every byte is written by the backend (or the layer fails and the buffer is dropped).
  const auto take_start = std::chrono::steady_clock::now();
  OutputBuffer out = output_pool_.Take(b * shape_.num_q_heads * shape_.head_dim * DTypeSize(shape_.dtype));
  if (in.want_lse) result.lse.resize(b * shape_.num_q_heads);
  const auto taken = std::chrono::steady_clock::now() - take_start;
  absl::Status run = absl::OkStatus();
  LayerRunInfo info;
  std::chrono::steady_clock::duration in_backend{};
  const auto t0 = std::chrono::steady_clock::now();
  if (b > 0) {
    LayerBuffers io;
    io.q = in.q.data();
    io.k = in.k.data();
    io.v = in.v.data();
    io.out = out.data;
    io.out_device = out.device;
    io.out_copy = in.out_copy.empty() ? nullptr : in.out_copy.data();
    io.lse = in.want_lse ? result.lse.data() : nullptr;
    run = backend_->RunLayer(slot, in.layer, io, &info);
    // Not written by the device: copied here, still outside the engine lock.
    if (run.ok() && io.out_copy != nullptr && !info.in_place) std::memcpy(io.out_copy, out.data, in.out_copy.size());
    in_backend = std::chrono::steady_clock::now() - t0;
    result.attend_seconds = info.attend_seconds;
    result.attention_skipped = info.attention_skipped;
    result.attention_timed = info.attention_timed;
    result.in_place = info.in_place;
  }
  result.out = OutputBytes(std::move(out.owner), out.size);  // shared with the retry cache, not copied
  const auto relock = std::chrono::steady_clock::now();
  lock.lock();
  const auto relocked = std::chrono::steady_clock::now();
  const auto device_wait = in_backend - std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                            std::chrono::duration<double>(info.host_seconds));
  if (relocked - started - device_wait > kSlowLayerLog) {
    static std::atomic<int64_t> last_log_ns{0}, unlogged{0};
    if (LogNow(last_log_ns, unlogged)) {
      PKV_LOG(WARNING) << "slow layer-step (layer " << in.layer << ", " << b << " rows): "
                       << Us(relocked - started - device_wait) << " us in the worker beyond "
                       << Us(device_wait) << " us of waiting for the device: checks and engine lock wait "
                       << Us(locked - started) << ", validation under the lock " << Us(validated - locked)
                       << ", token step begin "
                       << Us(begun) << ", output buffers " << Us(taken) << ", the rest before the backend "
                       << Us(t0 - validated - begun - taken) << ", backend host work " << info.host_seconds * 1e6
                       << ", after the backend " << Us(relock - t0 - in_backend) << ", engine lock wait again "
                       << Us(relocked - relock) << " (" << unlogged.exchange(0)
                       << " more slow layer-steps since the last such line)";
    }
  }
  ts.running_layer = -1;
  ts.last_activity = Clock::now();
  --layers_in_flight_;
  layer_finished_.notify_all();
  // A failed layer stays not done: a retry of (token_step_id, layer) runs it again.
  if (!run.ok()) return run;
  ts.layer_done[in.layer] = true;
  ++ts.layers_done;
  ts.outputs[in.layer] = result;
  LayerStepEvent event;
  event.kernel = ts.plan.kernel;
  event.rows = static_cast<int32_t>(b);
  event.layer = in.layer;
  event.attend_seconds = result.attend_seconds;
  event.attention_timed = result.attention_timed;
  event.predicted_seconds = ts.plan.predicted_us * 1e-6;
  event.launches = ts.plan.launches_per_layer;
  const auto now = std::chrono::steady_clock::now();
  event.step_seconds = std::chrono::duration<double>(now - started).count();
  observer_->OnLayerStep(event);
  // The backend's time splits into its host work and device stages (its waits for the device
  // are in neither); the rest since validation is the engine's own host work.
  result.timings.validate_seconds = std::chrono::duration<double>(validated - started).count();
  result.timings.host_seconds =
      std::chrono::duration<double>(now - validated - in_backend).count() + info.host_seconds;
  result.timings.h2d_seconds = info.h2d_seconds;
  result.timings.kernel_seconds = info.kernel_seconds;
  result.timings.d2h_seconds = info.d2h_seconds;
  return result;
}

void Engine::CompleteTokenStep(uint64_t id) {
  auto it = open_steps_.find(id);
  PKV_CHECK(it != open_steps_.end()) << "completing unknown token step " << id;
  std::unique_ptr<TokenStep> ts = std::move(it->second);
  open_steps_.erase(it);
  for (SeqId row : ts->rows) {
    auto s = seqs_.find(row);
    if (s != seqs_.end() && s->second.open_token_step == id) {
      s->second.open_token_step = 0;
      s->second.last_used = Clock::now();
    }
  }
  observer_->OnTokenStepCompleted(static_cast<int32_t>(ts->rows.size()));
  backend_->EndTokenStep(ts->backend_slot);
  ts->backend_slot = -1;
  ts->table = PageTableCsr{};  // only outputs are needed for retries
  retained_.push_back(std::move(ts));
  while (static_cast<int32_t>(retained_.size()) > limits_.retry_window_token_steps) {
    Remember(retained_.front()->id);
    retained_.pop_front();
  }
}

void Engine::Remember(uint64_t id) {
  if (options_.remembered_token_step_ids <= 0) {
    ForgetStepKey(id);
    return;
  }
  if (remembered_.insert(id).second) remembered_order_.push_back(id);
  while (static_cast<int32_t>(remembered_order_.size()) > options_.remembered_token_step_ids) {
    remembered_.erase(remembered_order_.front());
    ForgetStepKey(remembered_order_.front());
    remembered_order_.pop_front();
  }
}

uint64_t Engine::StepKey(const std::string& owner, uint64_t token_step_id) const {
  auto it = step_keys_.find(std::make_pair(owner, token_step_id));
  return it == step_keys_.end() ? 0 : it->second;
}

uint64_t Engine::NewStepKey(const std::string& owner, uint64_t token_step_id) {
  const uint64_t key = next_step_key_++;
  step_keys_[std::make_pair(owner, token_step_id)] = key;
  step_names_[key] = std::make_pair(owner, token_step_id);
  return key;
}

void Engine::ForgetStepKey(uint64_t key) {
  auto it = step_names_.find(key);
  if (it == step_names_.end()) return;
  step_keys_.erase(it->second);
  step_names_.erase(it);
}

uint64_t Engine::ExternalStepId(uint64_t key) const {
  auto it = step_names_.find(key);
  return it == step_names_.end() ? 0 : it->second.second;
}

void Engine::AbortTokenStep(uint64_t id) {
  auto it = open_steps_.find(id);
  if (it == open_steps_.end()) return;
  for (SeqId row : it->second->rows) {
    auto s = seqs_.find(row);
    if (s == seqs_.end() || s->second.open_token_step != id) continue;
    s->second.open_token_step = 0;
    const kvpool::SequencePages* pages = pager_.Find(row);
    PKV_CHECK(pages != nullptr && pages->num_tokens >= 1) << "open token step row without its token";
    PKV_CHECK(pager_.Truncate(row, pages->num_tokens - 1).ok()) << "truncate failed";
  }
  PKV_LOG(WARNING) << "token step " << it->second->external_id << " of router '" << it->second->owner
                   << "' aborted after " << it->second->layers_done << " of " << shape_.num_layers << " layers";
  observer_->OnTokenStepAborted(static_cast<int32_t>(it->second->rows.size()));
  backend_->EndTokenStep(it->second->backend_slot);
  ForgetStepKey(id);  // an aborted token step's id may be used again
  open_steps_.erase(it);
}

Engine::TokenStep* Engine::FindRetained(uint64_t id) {
  for (auto& ts : retained_) {
    if (ts->id == id) return ts.get();
  }
  return nullptr;
}

void Engine::ReleaseLocked(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  if (it->second.open_token_step != 0) {
    const uint64_t step = it->second.open_token_step;
    // Invariant: Release waited for the step's running layer; `free` and prompt aborts only
    // release sequences outside open token steps. Freeing pages under a running append would
    // let it write into a page another sequence gets next.
    auto open = open_steps_.find(step);
    PKV_CHECK(open == open_steps_.end() || open->second->running_layer < 0)
        << "releasing sequence " << seq << " while token step " << step << " has a running layer";
    it->second.open_token_step = 0;
    AbortTokenStep(step);
  }
  PKV_CHECK(pager_.Release(seq).ok()) << "engine and pager disagree on sequence " << seq;
  seqs_.erase(seq);
}

absl::StatusOr<StepOutput> Engine::Step(const StepInput& in) {
  const auto started = std::chrono::steady_clock::now();
  if (in.token_step_id == 0) return absl::InvalidArgumentError("token_step_id: must be nonzero");
  PKV_RETURN_IF_ERROR(CheckLayer(in.layer, shape_));
  PKV_RETURN_IF_ERROR(ValidateListSizes(in.rows.size(), in.open.size(), in.free.size()));
  if (int64_t i = FirstDuplicate(in.rows); i >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows[", i, "]: sequence ", in.rows[i], " listed twice"));
  }
  PKV_RETURN_IF_ERROR(ValidateTensors(in));

  std::unique_lock<std::mutex> lock(mu_);
  const auto locked = std::chrono::steady_clock::now();
  // Token step ids are per router: another router's token step of the same id is not this one.
  // A Release waiting on this token step's running layer goes first (then the step is aborted).
  layer_finished_.wait(lock, [&] {
    const uint64_t k = StepKey(in.owner, in.token_step_id);
    return k == 0 || !release_waiting_.contains(k);
  });
  uint64_t key = StepKey(in.owner, in.token_step_id);
  // A retried (token_step_id, layer) returns its first outputs.
  TokenStep* ts = nullptr;
  if (auto it = open_steps_.find(key); key != 0 && it != open_steps_.end()) ts = it->second.get();
  if (ts == nullptr && key != 0) ts = FindRetained(key);
  if (ts != nullptr && ts->layer_done[in.layer]) {
    if (in.rows != ts->rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token_step_id: ", in.token_step_id, " layer ", in.layer, " already ran with different rows"));
    }
    StepOutput replay = ts->outputs[in.layer];
    // (A token step without rows completed every layer at layer 0: its later layers come from here too.)
    replay.replayed = true;
    replay.in_place = false;
    if (!in.out_copy.empty()) std::memcpy(in.out_copy.data(), replay.out.data(), std::min(in.out_copy.size(), replay.out.size()));
    replay.timings = StepTimings{};
    replay.timings.validate_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    LayerStepEvent event;
    event.kernel = replay.kernel;
    event.rows = static_cast<int32_t>(ts->rows.size());
    event.layer = in.layer;
    event.replayed = true;
    observer_->OnLayerStep(event);
    if (!in.want_lse) replay.lse.clear();
    return replay;
  }
  std::chrono::steady_clock::time_point validated;  // validation done: host work starts
  std::chrono::steady_clock::duration begun{};       // layer 0: BeginTokenStep's time
  if (ts != nullptr && ts->running_layer >= 0) {
    // One layer of a token step at a time: its descriptor slot's buffers belong to that call.
    if (ts->running_layer == in.layer) {
      return absl::FailedPreconditionError(absl::StrCat("token_step_id: ", in.token_step_id, " layer ", in.layer,
                                                        " is running; retry after it answers"));
    }
    return absl::FailedPreconditionError(absl::StrCat("token_step_id: ", in.token_step_id, " layer ",
                                                      ts->running_layer, " is running; send layer ", in.layer,
                                                      " after it answers"));
  }
  if (ts == nullptr && key != 0 && remembered_.contains(key)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "token_step_id: token step ", in.token_step_id, " already completed and its outputs left the retry window (the ",
        limits_.retry_window_token_steps, " most recent token steps); nothing was appended"));
  }
  if (in.layer == 0) {
    if (ts != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("token_step_id: ", in.token_step_id, " already exists"));
    }
    PKV_RETURN_IF_ERROR(ValidateLayerZero(in));
    validated = std::chrono::steady_clock::now();
    key = NewStepKey(in.owner, in.token_step_id);
    PKV_RETURN_IF_ERROR(BeginTokenStep(in, key));
    begun = std::chrono::steady_clock::now() - validated;
    if (in.rows.empty()) {
      StepOutput empty;
      empty.kernel = KernelId::kReference;
      return empty;
    }
    ts = open_steps_[key].get();
  } else {
    if (ts == nullptr || !open_steps_.contains(key)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "token_step_id: ", in.token_step_id,
          " has not begun (send layer 0 first) or was aborted (a row was released, or it sat idle past the lease)"));
    }
    PKV_RETURN_IF_ERROR(ValidateLaterLayer(in, *ts));
    validated = std::chrono::steady_clock::now();
  }
  absl::StatusOr<StepOutput> out = RunLayer(lock, *ts, in, started, validated, locked, begun);
  // Still open: nothing completes or aborts a token step while its layer runs.
  if (out.ok() && ts->layers_done == shape_.num_layers) CompleteTokenStep(ts->id);
  return out;
}

absl::StatusOr<std::unique_ptr<PromptWrite>> Engine::BeginPrompt(SeqId seq, int64_t num_tokens,
                                                                  const std::string& owner) {
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens: must be >= 1, got ", num_tokens));
  }
  // A prompt larger than the whole pool is refused by the pager below (RESOURCE_EXHAUSTED naming
  // the pages); an operator's tighter cap is a request error.
  if (options_.max_prompt_tokens > 0 && num_tokens > limits_.max_prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens: ", num_tokens, " exceeds the limit of ",
                                                   limits_.max_prompt_tokens, " tokens per prompt"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) {
    return absl::UnavailableError("sequence_id: the worker is draining (shutting down) and takes no new prompts");
  }
  if (seqs_.contains(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence_id: ", seq, " already exists"));
  if (static_cast<int64_t>(seqs_.size()) >= limits_.max_sequences) {
    return absl::ResourceExhaustedError(absl::StrCat("sequence_id: sequences full: ", seqs_.size(),
                                                     " held, the limit is ", limits_.max_sequences));
  }
  PKV_RETURN_IF_ERROR(pager_.Create(seq, num_tokens, options_.static_slot_tokens));
  seqs_[seq] = SeqState{SeqPhase::kWriting, 0, owner, Clock::now()};
  return std::unique_ptr<PromptWrite>(new PromptWrite(this, seq, num_tokens));
}

absl::Status Engine::AdoptUnwrittenPromptForBenchmark(SeqId seq, int64_t num_tokens) {
  if (num_tokens < 1) return absl::InvalidArgumentError("num_tokens: must be >= 1");
  std::lock_guard<std::mutex> lock(mu_);
  if (seqs_.contains(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence_id: ", seq, " already exists"));
  PKV_RETURN_IF_ERROR(pager_.Create(seq, num_tokens, options_.static_slot_tokens));
  seqs_[seq] = SeqState{SeqPhase::kReady, 0, "", Clock::now()};
  return absl::OkStatus();
}

absl::Status Engine::SetScheduler(scheduler::Scheduler scheduler) {
  const auto have = backend_->kernels();
  for (KernelId k : scheduler.options().available) {
    if (std::find(have.begin(), have.end(), k) == have.end()) {
      return absl::InvalidArgumentError(absl::StrCat("scheduler offers kernel ", KernelName(k),
                                                     " that backend ", backend_->name(), " lacks"));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  scheduler_ = std::move(scheduler);
  return absl::OkStatus();
}

absl::Status Engine::Release(std::span<const SeqId> seqs, const std::string& owner) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    absl::flat_hash_set<SeqId> seen;
    uint64_t busy = 0;  // an open token step of one of `seqs` whose layer is running
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (!seen.insert(seqs[i]).second) {
        return absl::InvalidArgumentError(absl::StrCat("sequence_ids[", i, "]: sequence ", seqs[i], " listed twice"));
      }
      auto it = seqs_.find(seqs[i]);
      if (it == seqs_.end()) {
        return absl::NotFoundError(absl::StrCat("sequence_ids[", i, "]: sequence ", seqs[i], " not found"));
      }
      PKV_RETURN_IF_ERROR(CheckOwner(it->second, owner, "sequence_ids", i, seqs[i]));
      if (it->second.phase == SeqPhase::kWriting) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence_ids[", i, "]: sequence ", seqs[i],
            " prompt is still being written; cancel its WriteKV stream instead (that releases it)"));
      }
      if (const uint64_t step = it->second.open_token_step; step != 0 && busy == 0) {
        auto open = open_steps_.find(step);
        if (open != open_steps_.end() && open->second->running_layer >= 0) busy = step;
      }
    }
    if (busy == 0) break;
    // Wait (lock released) for the running layer, then validate again: the state may have
    // changed meanwhile. Steps of `busy` wait for this release, so the wait ends.
    ++release_waiting_[busy];
    layer_finished_.wait(lock, [&] {
      auto open = open_steps_.find(busy);
      return open == open_steps_.end() || open->second->running_layer < 0;
    });
    if (--release_waiting_[busy] == 0) release_waiting_.erase(busy);
    layer_finished_.notify_all();
  }
  for (SeqId id : seqs) ReleaseLocked(id);
  layer_finished_.notify_all();
  return absl::OkStatus();
}

void Engine::SetObserver(StepObserver* observer) {
  std::lock_guard<std::mutex> lock(mu_);
  observer_ = observer != nullptr ? observer : &default_observer_;
}

void Engine::StopNewWork() {
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
}

void Engine::Heartbeat() const { std::lock_guard<std::mutex> lock(mu_); }

Reclaimed Engine::ReclaimIdle(Clock::time_point now) {
  Reclaimed out;
  std::lock_guard<std::mutex> lock(mu_);
  if (limits_.token_step_idle_seconds > 0) {
    const auto ttl = std::chrono::duration<double>(limits_.token_step_idle_seconds);
    std::vector<uint64_t> idle;
    for (const auto& [id, ts] : open_steps_) {
      if (ts->running_layer < 0 && !release_waiting_.contains(id) && now - ts->last_activity > ttl) idle.push_back(id);
    }
    std::sort(idle.begin(), idle.end());
    for (uint64_t id : idle) {
      const TokenStep& ts = *open_steps_.at(id);
      out.token_steps.push_back({ts.external_id, ts.owner, ts.layers_done, static_cast<int32_t>(ts.rows.size())});
      AbortTokenStep(id);
    }
  }
  if (limits_.sequence_idle_seconds > 0) {
    const auto ttl = std::chrono::duration<double>(limits_.sequence_idle_seconds);
    std::vector<SeqId> idle;
    for (const auto& [id, s] : seqs_) {
      if (s.phase == SeqPhase::kReady && s.open_token_step == 0 && now - s.last_used > ttl) idle.push_back(id);
    }
    std::sort(idle.begin(), idle.end());
    for (SeqId id : idle) {
      const SeqId one[] = {id};
      out.sequences.push_back({id, seqs_.at(id).owner, pager_.PagesReleasedBy(one)});
      ReleaseLocked(id);
    }
  }
  if (!out.token_steps.empty() || !out.sequences.empty()) layer_finished_.notify_all();
  return out;
}

EngineInfo Engine::Info() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineInfo info;
  info.shape = shape_;
  info.limits = limits_;
  const auto now = Clock::now();
  for (const auto& [id, ts] : open_steps_) {
    info.open_steps.push_back({ts->external_id, ts->owner, static_cast<int32_t>(ts->rows.size()), ts->layers_done,
                               std::chrono::duration<double>(now - ts->last_activity).count()});
  }
  std::sort(info.open_steps.begin(), info.open_steps.end(),
            [](const OpenTokenStepInfo& a, const OpenTokenStepInfo& b) { return a.token_step_id < b.token_step_id; });
  info.backend = std::string(backend_->name());
  info.device = backend_->device_info().name;
  info.max_batch = limits_.max_batch;
  info.pager = pager_.Stats();
  for (const auto& [id, s] : seqs_) {
    if (s.phase == SeqPhase::kWriting) ++info.writing_sequences;
    else ++info.active_sequences;
  }
  info.open_token_steps = static_cast<int64_t>(open_steps_.size());
  return info;
}

absl::Status Engine::CheckConsistency() const {
  std::lock_guard<std::mutex> lock(mu_);
  PKV_RETURN_IF_ERROR(pager_.CheckConsistency());
  if (static_cast<int64_t>(seqs_.size()) != pager_.Stats().num_sequences) {
    return absl::InternalError("engine and pager sequence counts differ");
  }
  int32_t running = 0;
  for (const auto& [id, ts] : open_steps_) running += ts->running_layer >= 0 ? 1 : 0;
  if (running != layers_in_flight_) {
    return absl::InternalError(absl::StrCat(running, " token steps have a running layer, ", layers_in_flight_,
                                            " layers in flight"));
  }
  for (const auto& [id, s] : seqs_) {
    if (!pager_.Contains(id)) return absl::InternalError(absl::StrCat("sequence ", id, " missing in pager"));
    if (s.open_token_step != 0 && !open_steps_.contains(s.open_token_step)) {
      return absl::InternalError(absl::StrCat("sequence ", id, " locked by a vanished token step"));
    }
  }
  return absl::OkStatus();
}

uint64_t Engine::StateFingerprint() const {
  std::unique_lock<std::mutex> lock(mu_);
  layer_finished_.wait(lock, [&] { return layers_in_flight_ == 0; });
  std::vector<SeqId> ids;
  ids.reserve(seqs_.size());
  for (const auto& [id, s] : seqs_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  uint64_t h = absl::HashOf(pager_.free_pages(), open_steps_.size());
  for (SeqId id : ids) {
    const SeqState& s = seqs_.at(id);
    const kvpool::SequencePages* p = pager_.Find(id);
    h = absl::HashOf(h, id, static_cast<int>(s.phase), s.open_token_step, p->num_tokens, p->pages);
  }
  const kvpool::KvArena& arena = backend_->arena();
  if (std::string_view(arena.kind()) == "host") {
    const size_t bytes = static_cast<size_t>(arena.num_pages() * arena.page_elems() * 2);
    for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
      h = absl::HashOf(h, std::string(static_cast<const char*>(arena.layer_data(layer)), bytes));
    }
  }
  return h;
}

}  // namespace pkv::engine
