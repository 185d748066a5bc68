// bench/benchmarks/kernel_bench.h — `pkv-bench kernels`: every kernels/cuda route on the paper's shapes.
//
// For each dtype, a grid of B x context cases (uniform rows) and mixed-length steps drawn from the
// MISSION.md workloads (B8 uniform/bimodal/zipf, B4 bimodal, B1 bucketed), it times each route
// (per-request; sequence-split and work queue over a few split granularities, the work queue with
// fused and separate merge) with CUDA events: warm-up, >= `runs` timed launches queued behind a
// spin kernel, KV rotated over several page-table copies so that the footprint exceeds L2. It
// reports median us, KV bytes, GB/s and the share of a streaming-read ceiling and of a
// device-to-device copy measured in the same run (start and end). Built with PKV_WITH_FLASHINFER,
// each case also times FlashInfer's two paths (fi_decode, fi_prefill: bench/flashinfer/flashinfer_arm.h)
// exactly the same way on the same inputs and rotated page tables (its planner once per case,
// outside the timed region) and reports ours-best / FlashInfer-best speed (> 1: ours is faster)
// in extra table columns and a last CSV field. Not thread-safe (one process).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace pkv::bench {

struct KernelBenchOptions {
  std::vector<DType> dtypes = {DType::kF16, DType::kBF16};
  int num_q_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  int page_size = 16;
  std::vector<int> batches = {1, 2, 4, 8, 16, 32, 64};
  std::vector<int64_t> contexts = {512, 2048, 8192, 32768, 131072};
  std::vector<int64_t> b1_extra = {4096, 16384};  // B1 points of the 4K-16K target
  bool grid = true;
  bool mixed = true;
  int mixed_steps = 3;
  int runs = 50;
  int warmup = 5;
  double max_kv_gib = 8.0;
  uint64_t seed = 20260622;
  // Cost-model profile of the scheduler whose plan is timed next to the search (the "planned"
  // column: the configuration the engine runs); empty: the built-in default profile.
  std::string profile_path;
  std::string csv_path;  // empty: no CSV
  std::string md_path;   // empty: no markdown summary
  std::string commit = "unknown";
  std::string command;
};

// Runs the benchmark; returns a process exit code (0 on success).
int RunKernelBench(const KernelBenchOptions& options);

}  // namespace pkv::bench
