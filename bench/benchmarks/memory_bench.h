// bench/benchmarks/memory_bench.h — `pkv-bench memory`: reserved versus used KV memory of the paged pool and
// of a static baseline, on a request trace, through engine::Engine (no GPU needed).
//
// The same continuous-batching loop runs twice over the trace (arrival times ignored): once with
// the block pager's paged growth, once with EngineOptions::static_slot_tokens = the largest
// prompt + output of the trace (what a fixed-shape engine without a pager reserves per batch
// slot, the most favourable static size). After every token step it samples the pager's reserved
// token slots (pages held × page size) and used tokens. Only accounting matters, so the engine
// runs a one-layer toy shape; bytes are reported for the served shape (`num_layers` × 2 × Hkv ×
// d × dtype per token). Not thread-safe (one process).
#pragma once

#include <cstdint>
#include <string>

namespace pkv::bench {

struct MemoryBenchOptions {
  std::string trace_csv = "data/traces/azure_llm_2023_conv_head.csv";
  int batch = 8;
  int num_requests = 0;          // 0: the whole trace
  int64_t max_output = 0;        // cap decode lengths (0: none)
  int64_t static_slot_tokens = 0;  // 0: largest prompt + output of the trace
  int page_size = 16;
  int num_layers = 32;           // served shape, for bytes
  int num_kv_heads = 8;
  int head_dim = 128;
  std::string md_path;
  std::string commit = "unknown";
  std::string command;
};

int RunMemoryBench(const MemoryBenchOptions& options);

}  // namespace pkv::bench
