// bench/benchmarks/ingest_bench.h — `pkv-bench ingest`: WriteKV prompt ingest bandwidth on the GPU.
//
// Drives engine::Engine on the CUDA backend the way the WriteKV service path does: `num_prompts`
// prompts (lengths spread evenly over [min_tokens, max_tokens]) are begun together, then their
// K,V arrive as `chunk_tokens`-token chunks, for each layer in turn, interleaved across the
// prompts (chunk 0 of every prompt, chunk 1 of every prompt, ...), from pageable host buffers
// like gRPC messages; every prompt is committed at the end (Commit returns once its bytes are on
// the device). Reports the staged-ingest GB/s (K+V bytes over the wall time from the first
// BeginPrompt to the last Commit; with --writers > 1 the prompts are shared out over that many
// threads, each writing its own in the same order) next to a plain cudaMemcpy of the same number of bytes from
// pinned memory in large copies, measured in the same run, and the copies the merged path issued.
// Fails (exit 1, message) without a CUDA device. Not thread-safe (one process).
#pragma once

#include <cstdint>
#include <string>

namespace pkv::bench {

struct IngestBenchOptions {
  int num_prompts = 8;
  int64_t min_tokens = 4096;
  int64_t max_tokens = 32768;
  int chunk_tokens = 256;
  int num_layers = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  int page_size = 16;
  int repeats = 2;             // measured rounds (each writes every prompt once); a warm-up precedes
  int writers = 1;             // threads writing the prompts (prompt i on thread i % writers), like
                               // concurrent WriteKV streams on the worker's ingest executor
  int copy_threads = 4;        // the arena's copy helpers (pkv-worker --ingest_copy_threads)
  bool check_finite = true;    // the engine scans every chunk for NaN/inf (pkv-worker
                               // --check_finite); 0 measures the path without that scan
  std::string md_path;         // also append the result as markdown here
  std::string commit = "unknown";
  std::string command;
};

// Runs the benchmark; returns a process exit code. Flags (bench/benchmarks/pkv_bench_main.cc): --prompts
// --min_tokens --max_tokens --chunk_tokens --layers --hkv --d --page --repeats --writers --copy_threads
// --check_finite --md --commit.
int RunIngestBench(const IngestBenchOptions& options);

}  // namespace pkv::bench
