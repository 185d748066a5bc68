// bench/benchmarks/trace_bench.h — `pkv-bench trace`: the engine driven like a serving loop, without gRPC.
//
// For each workload of MISSION.md (continuous batching: at most B active rows, each row's length
// grows by one token per step, finished rows released and replaced by the next request, pages
// scattered) it runs every arm — the adaptive scheduler and each fixed route — through
// engine::Engine on the CUDA backend with `num_layers` layer-steps per token step and one plan
// per token step. The KV pool is filled with random normal data once; prompts adopt pages of it
// (their content is random, never zeros). Per arm it reports decode tokens/s over the attention
// time (CUDA events around the kernels of one layer-step in --attention_timing_interval, scaled to
// all of them, as pkv-worker samples it) and over wall time (host work, transfers and
// synchronisation included), p50/p99 token-step times, launches per layer-step, the arm mix and
// the share of a streaming-read ceiling measured in the same run; seeds are held out from the
// calibration seed and reported as mean ± std. Built with PKV_WITH_FLASHINFER, FlashInfer's two
// paths (fi_decode, fi_prefill) run as arms too — the same workload loop driven outside the
// engine (which has no FlashInfer backend) over the engine's device arena, with the engine
// backend's per-layer pattern (upload q|k|v, append, attention (between events on the sampled
// layer-steps), out written to mapped host memory, sync) and FlashInfer's planner once per token step (host wall time, outside the GPU timing) —
// and adaptive / FlashInfer (best path) ratios are printed per workload. Not thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace pkv::bench {

struct TraceBenchOptions {
  // "name:B" items: name in uniform, bimodal, zipf, bucketed, homogeneous.
  std::vector<std::string> workloads = {"bimodal:8", "uniform:8", "zipf:8", "bimodal:4", "bucketed:1"};
  std::vector<uint64_t> seeds = {20260623, 20260624, 20260625, 20260626, 20260627};
  std::vector<DType> dtypes = {DType::kF16};
  int num_layers = 32;
  int num_q_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  int page_size = 16;
  int warmup_steps = 3;
  int measured_steps = 0;  // 0: 48 (B > 1) or 64 (B1), as in the paper's headline runs
  int num_requests = 0;    // 0: 24 (B > 1) or 16 (B1)
  // Every arm brackets its attention with events on one layer-step in this many (the same
  // rotation as the engine's: counted over layer-steps, shifted by one per token step);
  // attention totals are the timed layer-steps' scaled to all. 1: every layer-step.
  int attention_timing_interval = 8;
  double pool_fraction = 0.85;
  // How the engine uploads q|k|v and descriptors (engine::DecodeUpload): auto, pull or copy.
  std::string decode_upload = "auto";
  std::string profile_path;  // calibration profile; empty: built-in defaults
  std::string csv_path;
  std::string md_path;
  std::string commit = "unknown";
  std::string command;
};

// Runs the benchmark; returns a process exit code.
int RunTraceBench(const TraceBenchOptions& options);

}  // namespace pkv::bench
