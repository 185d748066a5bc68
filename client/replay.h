// client/replay.h — the prefill/router tier in miniature: replays a workload against a worker.
//
// For each request it writes the prompt's K,V for every layer with WriteKV (the prefill side),
// then decodes with continuous batching: at most `batch` active rows; each token step sends
// every layer in order over one StepStream (layer l+1 after layer l's answer); each row appends
// one token per token step; a finished row is released and replaced by the next request.
// Admission keeps the pool from running dry mid-decode: a request is admitted only when the
// pages for its whole life (prompt + decode tokens) fit next to those of the active rows.
// A sample of outputs is checked against the client's own double-precision reference.
// Thread-safety: RunReplay uses the client from the calling thread only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/worker_client.h"
#include "common/workload.h"

namespace pkv::client {

struct ReplayOptions {
  int32_t batch = 8;              // most active rows
  uint64_t seed = 20260622;       // data seed (q, K, V) and check sampling
  double check_fraction = 0.01;   // share of (token step, layer, row) outputs checked
  int64_t max_steps = 0;          // stop after this many token steps (0: run the workload out)
  int64_t warmup_steps = 3;       // first token steps left out of the latency statistics
  int64_t chunk_tokens = 256;     // WriteKV chunk size
  bool honor_arrivals = false;    // admit a request no earlier than its arrival_ms
  bool use_stream = true;         // StepStream (true) or unary Step
  absl::Duration progress_interval = absl::Seconds(5);  // 0: no progress lines
  bool verbose = true;            // progress lines on stderr
};

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
  double decode_s = 0;             // time in measured token steps
  int64_t measured_tokens = 0;     // decode tokens of measured (post-warm-up) steps
  std::vector<double> layer_step_ms;  // per measured layer step
  std::vector<double> token_step_ms;  // per measured token step
  int64_t outputs_checked = 0;     // (row, layer) outputs compared with the reference
  int64_t check_failures = 0;
  double max_rel_error = 0;
  double max_lse_error = 0;
  std::string first_failure;       // description of the first failed check

  // Decode tokens per second over the measured token steps.
  double DecodeTokensPerSecond() const;
  // The summary pkv-replay prints.
  std::string Format() const;
};

// Replays `requests` against the worker behind `client`. Errors: the worker's status for a
// failed RPC (naming the request), INVALID_ARGUMENT for a request that can never fit the pool.
// A failed output check is not an error: it is counted in the report.
absl::StatusOr<ReplayReport> RunReplay(WorkerClient& client, const ReplayOptions& options,
                                       const std::vector<WorkloadRequest>& requests);

// Percentile (0..100) of `values` by linear interpolation between nearest ranks; 0 when empty.
double Percentile(std::vector<double> values, double pct);

}  // namespace pkv::client
