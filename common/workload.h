// common/workload.h — decode workloads: the synthetic traces of MISSION.md and CSV request traces.
//
// A workload is a list of requests (arrival time, prompt tokens, decode tokens). The synthetic
// generators (uniform, bimodal, zipf, bucketed, homogeneous) are seeded and reproducible across
// platforms (they use their own SplitMix64 stream, not <random> distributions). CSV traces have
// the columns arrival_ms,input_tokens,output_tokens[,block_hashes]. ScaleWorkload shrinks prompt
// lengths so that CPU runs stay small. Pure C++ (no gRPC); used by pkv-replay and the trace
// benchmarks. Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pkv {

// One request of a workload.
struct WorkloadRequest {
  int64_t arrival_ms = 0;     // since the start of the workload (0 for synthetic workloads)
  int64_t input_tokens = 0;   // prompt tokens (>= 1)
  int64_t output_tokens = 0;  // decode tokens (>= 1): token steps the request takes part in
  std::vector<uint64_t> block_hashes;  // prefix-block hash ids (Mooncake traces), may be empty
};

enum class WorkloadKind { kUniform, kBimodal, kZipf, kBucketed, kHomogeneous };

// "uniform", "bimodal", "zipf", "bucketed", "homogeneous".
absl::string_view WorkloadKindName(WorkloadKind kind);
// Parses a name of WorkloadKindName; INVALID_ARGUMENT listing the valid names otherwise.
absl::StatusOr<WorkloadKind> ParseWorkloadKind(absl::string_view name);

// Generates `num_requests` requests of `kind` with the lengths of MISSION.md (prompts rounded up
// to a multiple of 16), all arriving at 0. The same (kind, num_requests, seed) gives the same
// requests on every platform.
std::vector<WorkloadRequest> GenerateWorkload(WorkloadKind kind, int num_requests, uint64_t seed);

// Parses CSV text with a header naming arrival_ms,input_tokens,output_tokens[,block_hashes]
// (in that order; block_hashes space-separated). INVALID_ARGUMENT naming the line on a bad row
// (non-numeric, negative arrival, zero tokens, arrivals not sorted).
absl::StatusOr<std::vector<WorkloadRequest>> ParseTraceCsv(absl::string_view text);

// Reads and parses a CSV trace file (NOT_FOUND when it cannot be opened).
absl::StatusOr<std::vector<WorkloadRequest>> ReadTraceCsv(const std::string& path);

// Shrinks prompts for small runs: input_tokens = ceil(input_tokens * context_scale) (scale in
// (0, 1]; 1 keeps them), then capped at max_context when max_context > 0, never below 1.
// Decode lengths are capped at max_output when max_output > 0.
void ScaleWorkload(std::vector<WorkloadRequest>& requests, double context_scale,
                   int64_t max_context, int64_t max_output);

// A small counter-based random stream (SplitMix64): reproducible on every platform.
class SplitMix64 final {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  // Next 64 random bits.
  uint64_t Next();
  // Uniform integer in [lo, hi] (lo <= hi).
  int64_t UniformInt(int64_t lo, int64_t hi);

 private:
  uint64_t state_;
};

}  // namespace pkv
