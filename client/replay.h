// client/replay.h — the prefill/router tier in miniature: replays a workload against a worker.
//
// Three kinds of work run at once, as in a disaggregated deployment:
//  - prefill: `prefill_streams` WriteKV streams write prompts (every layer's K,V) ahead of
//    decode, in request order, no earlier than each request's arrival when asked to; a written
//    prompt waits in a ready queue. Admission keeps the pool from running dry mid-decode: a
//    request is prefilled only when the pages for its whole life (prompt + decode tokens) fit
//    next to those of the prompts already admitted.
//  - decode: `micro_batches` independent groups, each with its own StepStream and at most
//    `batch` rows (continuous batching: a finished row is freed through the next token step's
//    `free` delta and replaced from the ready queue). Each token step sends every layer in
//    order, and layer l+1 is sent only after layer l's output came back (the real dependency of a
//    model's layers); the next layer's request is built while the worker runs the current
//    one. Groups run concurrently, so their layer-steps interleave on the worker.
//  - payloads: q/K/V rows are generated once into a PayloadPool (client/payload_pool.h) and
//    copied into requests and prompt chunks, so building a request costs a few copies.
//  - checks: a sample of outputs is checked against the client's own double-precision reference
//    (rebuilt from the pool rows actually sent) on checker threads, off the decode path. A worker
//    that skips attention (StepResponse.attention_skipped) is not checked.
// Every measured layer-step is split into the stages of Stage (client, transport, worker), and
// the client's own CPU time is measured (per decode thread and for the whole process), so a run
// shows whether the client or the worker limits it.
// A monitor samples the worker's pool (Describe) for reserved versus used KV bytes.
// Thread-safety: RunReplay is one call; it uses the client from several threads (WorkerClient
// is thread-safe; each stream is used by one thread).#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/worker_client.h"
#include "common/workload.h"

namespace pkv::client {

struct ReplayOptions {
  int32_t batch = 8;              // most active rows of one micro-batch
  int32_t micro_batches = 1;      // decode groups in flight at once (each its own StepStream)
  int32_t prefill_streams = 2;    // WriteKV streams in flight at once
  // > 0: the prefill threads run at this Linux nice value, so that where they and the decode
  // threads compete for a core (replay and worker on one host) decode goes first.
  int32_t prefill_nice = 0;
  int32_t prefill_ahead = 0;      // prompts written ahead of decode (0: batch * micro_batches)
  uint64_t seed = 20260622;       // data seed (q, K, V) and check sampling
  double check_fraction = 0.01;   // share of (token step, layer, row) outputs checked
  int32_t check_threads = 1;      // checker threads while decode runs (the backlog is finished
                                  // on every core after decode)
  size_t check_queue_bytes = 256u << 20;  // outputs waiting for a check, at most (then decode waits)
  int64_t max_steps = 0;          // stop after this many token steps (0: run the workload out)
  int64_t warmup_steps = 3;       // first token steps left out of the latency statistics
  int64_t chunk_tokens = 256;     // WriteKV chunk size
  bool honor_arrivals = false;    // admit a request no earlier than its arrival_ms
  bool use_stream = true;         // StepStream (true) or unary Step
  absl::Duration progress_interval = absl::Seconds(5);  // 0: no progress lines
  absl::Duration pool_sample_interval = absl::Milliseconds(100);  // Describe polls; 0: none
  bool verbose = true;            // progress lines on stderr
  int64_t payload_rows = 1024;    // distinct pre-generated q/K/V rows per kind (0: every element
                                  // generated on demand, the slow path)
  bool wait_for_prefill = false;  // decode starts only once prefill_ahead prompts (or all
                                  // requests, if fewer) are written: steady full-batch decode
};

// The stages of one layer-step, in order. The round trip (kRoundTrip) is kSend through
// kReceive; kBuild runs before kSend, overlapped with the previous layer's round trip.
enum class Stage : int32_t {
  kBuild,        // client: copying the request's q/k/v rows out of the payload pool
  kSend,         // client: request message built, encoded and written to the channel (up to
                 // the worker's read of it, when the write returns only after that)
  kToWorker,     // transport to the worker's read of the request (wire, gRPC decode)
  kQueue,        // worker: waiting for an engine thread
  kValidate,     // worker: wire checks and engine validation (with the engine lock wait)
  kHost,         // worker: engine and backend host work
  kH2D,          // device: q/k/v upload
  kKernels,      // device: KV append and attention (CPU backend: KV write + reference kernel)
  kD2H,          // device: out/lse download (0 on the CUDA backend: kernels write host memory)
  kSerialize,    // worker: response message built
  kWorkerOther,  // worker: the part of its hold time that no stage above covers
  kBack,         // transport back (gRPC encode and wire, or the ring), the client's read
  kReceive,      // client: response message converted
  kRoundTrip,    // kSend .. kReceive
};
inline constexpr int32_t kNumStages = 14;
// Short name of a stage ("client_build", ..., "round_trip"): JSON keys and table rows.
const char* StageName(Stage stage);

// One measured layer-step, for IngestHold: its rows, its round trip, whether a prompt was being
// written (WriteKV in flight) at any time during it, whether it was its token step's layer 0, and
// its stages in ms (StageSample; NaN: not measured).
struct IngestOverlapSample {
  int32_t rows = 0;
  double ms = 0;
  bool overlapped = false;
  bool first_layer = false;
  std::array<double, kNumStages> stages{};
};

// How far prompt ingest held decode back: each layer-step that overlapped a prompt write against
// the median round trip of the layer-steps of the same kind that overlapped none (its "quiet"
// median). The same kind: the same batch size, and layer 0 against layer 0, a later layer against
// later layers (layer 0 also carries its token step's page-table deltas and plan, so it takes
// longer with or without ingest). Layer-steps whose kind has fewer than the minimum quiet samples
// are not compared (counted in `overlapped` only). The excess is counted in layer-steps of a later
// layer's quiet median at the same batch size (layer 0's own where that is unknown).
// The control: the quiet layer-steps' own excess over the same medians, in the same units (a
// host's scheduling noise holds quiet layer-steps back too; what ingest adds is the difference).
// The worst overlapped layer-steps keep their stages, to say where the time went.
struct IngestHold {
  int64_t overlapped = 0;            // measured layer-steps that overlapped a prompt write
  int64_t quiet = 0;                 // measured layer-steps that overlapped none
  std::vector<double> excess_ms;     // per compared layer-step: round trip - its quiet median
  std::vector<double> excess_steps;  // the same in layer-steps' time (see above)
  std::vector<double> first_layer_excess_steps;  // excess_steps of the compared layer-0 steps only
  std::vector<double> quiet_excess_steps;        // per quiet layer-step of a compared kind (control)
  struct Worst {
    double excess_steps = 0;
    double median_ms = 0;  // its kind's quiet median
    IngestOverlapSample sample;
  };
  std::vector<Worst> worst;  // up to kWorstKept overlapped layer-steps, the largest excess first
  static constexpr size_t kWorstKept = 5;
};
IngestHold MeasureIngestHold(const std::vector<IngestOverlapSample>& samples, int64_t min_quiet = 20);

struct ReplayReport {
  int64_t requests_total = 0;
  int64_t requests_done = 0;
  int64_t prompt_tokens = 0;       // written by WriteKV
  int64_t token_steps = 0;
  int64_t decode_tokens = 0;       // rows summed over token steps
  int64_t layer_steps = 0;         // Step calls answered
  int64_t backpressure_retries = 0;
  double elapsed_s = 0;            // whole run
  double prefill_s = 0;            // time in WriteKV
  double decode_s = 0;             // wall time with a measured token step in flight
  int64_t measured_tokens = 0;     // decode tokens of measured (post-warm-up) steps
  int32_t micro_batches = 1;
  std::vector<double> layer_step_ms;  // per measured layer step: send to answer
  std::vector<double> overhead_ms;    // the same minus the attention's device time that the
                                      // worker reports (host, RPC and transfer cost of a step)
  std::vector<double> server_ms;      // per measured layer step: time the worker held it
  std::vector<double> queue_ms;       // of which waiting for an engine thread
  std::vector<double> token_step_ms;  // per measured token step: layer 0 sent to last answer
  std::vector<double> tbt_ms;         // time between tokens: per row, between its consecutive
                                      // measured token steps' completions
  // Per measured layer-step answered without a retry, each Stage in ms. kToWorker and kBack
  // come from the worker's wall-clock stamps (exact on one host; their sum never depends on
  // the clocks). The worker samples device stage times (StepResponse h2d/kernel/d2h_seconds all
  // 0 on a layer-step it did not time, attention_skipped false): kH2D, kKernels, kD2H and
  // kWorkerOther hold only the layer-steps that carry them, so their vectors may be shorter.
  std::array<std::vector<double>, kNumStages> stage_ms;
  // The same for the layer-steps among them that overlapped a prompt write (IngestHold).
  std::array<std::vector<double>, kNumStages> stage_ms_overlapped;
  // The client's CPU: per measured layer-step, the decode thread's CPU time for its work on it
  // (send, build of the next request, receive, check hand-off); and the whole process (every
  // thread: decode, gRPC, checks, prefill) over the measured phase.
  std::vector<double> client_thread_cpu_ms;
  double client_process_cpu_s = 0;
  double client_phase_s = 0;            // wall time of that phase
  int64_t client_phase_layer_steps = 0;  // layer-steps answered in it
  bool attention_skipped = false;  // the worker skipped attention: outputs were not checked
  int64_t payload_rows = 0;        // the payload pool (ReplayOptions::payload_rows)
  int64_t payload_bytes = 0;
  double client_gen_ms = 0;        // mean host time to build one layer-step's request
  double window_s = 1.0;           // width of the throughput windows below
  double worst_window_tokens_per_s = 0;   // fewest decode tokens in any busy window of the
  double worst_window_start_s = 0;        // measured phase, per s (SlidingWindowThroughput)
  double median_window_tokens_per_s = 0;
  int64_t busy_windows = 0;
  IngestHold ingest_hold;          // layer-steps measured while prompts were being written
  int64_t pool_samples = 0;        // Describe samples of the pool
  double kv_reserved_mean_bytes = 0, kv_reserved_peak_bytes = 0;  // pages held x page bytes
  double kv_used_mean_bytes = 0, kv_used_peak_bytes = 0;          // tokens held x token bytes
  double check_stall_s = 0;        // decode waited for a full check queue (left out of timings)
  int64_t outputs_checked = 0;     // (row, layer) outputs compared with the reference
  int64_t check_failures = 0;
  double max_rel_error = 0;
  double max_lse_error = 0;
  std::string first_failure;       // description of the first failed check
  // Time series for plots, in seconds since the replay started: when each tbt_ms sample was
  // taken (same order as tbt_ms), each measured token step's completion with its decode tokens,
  // and each pool sample (reserved bytes, used bytes).
  std::vector<double> tbt_at_s;
  std::vector<std::pair<double, int64_t>> token_steps_at_s;
  struct PoolPoint {
    double at_s = 0;
    double reserved_bytes = 0;
    double used_bytes = 0;
  };
  std::vector<PoolPoint> pool_at_s;

  // Decode tokens per second over the measured token steps.
  double DecodeTokensPerSecond() const;
  // The summary pkv-replay prints.
  std::string Format() const;
  // The same figures as one JSON object (for bench/results).
  std::string ToJson() const;
  // The time series above as CSV (for plots): a header "kind,t_s,value,value2", then one row per
  // measured token step ("tokens", t, decode tokens), per time-between-tokens sample ("tbt", t,
  // ms) and per pool sample ("kv", t, reserved bytes, used bytes).
  std::string TimelineCsv() const;
};

// Replays `requests` against the worker behind `client`. Errors: the worker's status for a
// failed RPC (naming the request), INVALID_ARGUMENT for a request that can never fit the pool.
// A failed output check is not an error: it is counted in the report.
absl::StatusOr<ReplayReport> RunReplay(WorkerClient& client, const ReplayOptions& options,
                                       const std::vector<WorkloadRequest>& requests);

// Percentile (0..100) of `values` by linear interpolation between nearest ranks; 0 when empty.
double Percentile(std::vector<double> values, double pct);

// Decode throughput in windows of `window_s` sliding over [begin_s, end_s] in steps of
// window_s / 100, from token completions (time in s, tokens): the worst and median window in
// tokens per second, and where the worst one starts. Only windows that `busy` (intervals in s
// during which a decode step was in flight) covers for at least `min_busy` of their width count,
// so that idle gaps between a trace's arrivals are not read as slow decode. All zero when no
// window qualifies.
struct WindowStats {
  double worst_tokens_per_s = 0;
  double worst_start_s = 0;
  double median_tokens_per_s = 0;
  int64_t windows = 0;  // windows that counted
};
WindowStats SlidingWindowThroughput(std::vector<std::pair<double, int64_t>> completions,
                                    std::vector<std::pair<double, double>> busy, double begin_s,
                                    double end_s, double window_s, double min_busy = 0.95);

}  // namespace pkv::client
