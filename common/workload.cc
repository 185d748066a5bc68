#include "common/workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace pkv {
namespace {

constexpr int64_t kRound = 16;  // MISSION.md: prompts rounded up to a multiple of 16

int64_t RoundUp(int64_t tokens) { return (tokens + kRound - 1) / kRound * kRound; }

struct KindName {
  WorkloadKind kind;
  absl::string_view name;
};
constexpr KindName kKindNames[] = {
    {WorkloadKind::kUniform, "uniform"},   {WorkloadKind::kBimodal, "bimodal"},
    {WorkloadKind::kZipf, "zipf"},         {WorkloadKind::kBucketed, "bucketed"},
    {WorkloadKind::kHomogeneous, "homogeneous"},
};

absl::Status LineError(int line, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("trace line ", line, ": ", what));
}

}  // namespace

uint64_t SplitMix64::Next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int64_t SplitMix64::UniformInt(int64_t lo, int64_t hi) {
  const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  // Modulo bias is below 2^-40 for the spans used here.
  return lo + static_cast<int64_t>(Next() % span);
}

absl::string_view WorkloadKindName(WorkloadKind kind) {
  for (const auto& kn : kKindNames) {
    if (kn.kind == kind) return kn.name;
  }
  return "unknown";
}

absl::StatusOr<WorkloadKind> ParseWorkloadKind(absl::string_view name) {
  std::vector<absl::string_view> names;
  for (const auto& kn : kKindNames) {
    if (kn.name == name) return kn.kind;
    names.push_back(kn.name);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown workload '", name,
                                                 "' (valid: ", absl::StrJoin(names, ", "), ")"));
}

std::vector<WorkloadRequest> GenerateWorkload(WorkloadKind kind, int num_requests, uint64_t seed) {
  SplitMix64 rng(seed ^ (static_cast<uint64_t>(kind) + 1) * 0xD1B54A32D192ED03ull);
  std::vector<WorkloadRequest> out;
  out.reserve(num_requests > 0 ? num_requests : 0);
  for (int i = 0; i < num_requests; ++i) {
    WorkloadRequest r;
    switch (kind) {
      case WorkloadKind::kUniform:
        r.input_tokens = rng.UniformInt(4096, 32768);
        r.output_tokens = rng.UniformInt(16, 96);
        break;
      case WorkloadKind::kBimodal:
        if (i % 4 == 0) {
          r.input_tokens = rng.UniformInt(24576, 65536);
          r.output_tokens = rng.UniformInt(32, 128);
        } else {
          r.input_tokens = rng.UniformInt(2048, 12288);
          r.output_tokens = rng.UniformInt(8, 64);
        }
        break;
      case WorkloadKind::kZipf: {
        const int64_t rank = rng.UniformInt(1, 32);
        const int64_t base = 2048 + static_cast<int64_t>(65536.0 / std::sqrt(static_cast<double>(rank)));
        r.input_tokens = std::max<int64_t>(1024, base + rng.UniformInt(-512, 512));
        r.output_tokens = rng.UniformInt(8, 128);
        break;
      }
      case WorkloadKind::kBucketed: {
        static constexpr int64_t kBuckets[] = {8192, 16384, 32768, 65536};
        r.input_tokens = kBuckets[i % 4];
        r.output_tokens = rng.UniformInt(32, 96);
        break;
      }
      case WorkloadKind::kHomogeneous:
        r.input_tokens = 32768;
        r.output_tokens = rng.UniformInt(32, 96);
        break;
    }
    r.input_tokens = RoundUp(r.input_tokens);
    out.push_back(std::move(r));
  }
  return out;
}

absl::StatusOr<std::vector<WorkloadRequest>> ParseTraceCsv(absl::string_view text) {
  std::vector<WorkloadRequest> out;
  int line_no = 0;
  bool has_hashes = false;
  bool header_seen = false;
  int64_t last_arrival = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripTrailingAsciiWhitespace(line);  // also drops '\r'
    if (line.empty()) continue;
    std::vector<absl::string_view> cols = absl::StrSplit(line, ',');
    if (!header_seen) {
      header_seen = true;
      const bool base = cols.size() >= 3 && cols[0] == "arrival_ms" && cols[1] == "input_tokens" &&
                        cols[2] == "output_tokens";
      if (!base || cols.size() > 4 || (cols.size() == 4 && cols[3] != "block_hashes")) {
        return LineError(line_no,
                         "header must be arrival_ms,input_tokens,output_tokens[,block_hashes]");
      }
      has_hashes = cols.size() == 4;
      continue;
    }
    if (cols.size() != (has_hashes ? 4u : 3u)) {
      return LineError(line_no, absl::StrCat("expected ", has_hashes ? 4 : 3, " columns, got ",
                                             cols.size()));
    }
    WorkloadRequest r;
    if (!absl::SimpleAtoi(cols[0], &r.arrival_ms) || r.arrival_ms < 0) {
      return LineError(line_no, absl::StrCat("arrival_ms '", cols[0], "' is not an integer >= 0"));
    }
    if (!absl::SimpleAtoi(cols[1], &r.input_tokens) || r.input_tokens < 1) {
      return LineError(line_no, absl::StrCat("input_tokens '", cols[1], "' is not an integer >= 1"));
    }
    if (!absl::SimpleAtoi(cols[2], &r.output_tokens) || r.output_tokens < 1) {
      return LineError(line_no,
                       absl::StrCat("output_tokens '", cols[2], "' is not an integer >= 1"));
    }
    if (r.arrival_ms < last_arrival) {
      return LineError(line_no, absl::StrCat("arrival_ms ", r.arrival_ms,
                                             " is before the previous row's ", last_arrival));
    }
    last_arrival = r.arrival_ms;
    if (has_hashes) {
      for (absl::string_view h : absl::StrSplit(cols[3], ' ', absl::SkipEmpty())) {
        uint64_t id = 0;
        if (!absl::SimpleAtoi(h, &id)) {
          return LineError(line_no, absl::StrCat("block hash '", h, "' is not an integer"));
        }
        r.block_hashes.push_back(id);
      }
    }
    out.push_back(std::move(r));
  }
  if (!header_seen) return absl::InvalidArgumentError("trace is empty (no header)");
  return out;
}

absl::StatusOr<std::vector<WorkloadRequest>> ReadTraceCsv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open trace '", path, "'"));
  std::ostringstream text;
  text << in.rdbuf();
  auto parsed = ParseTraceCsv(text.str());
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(),
                        absl::StrCat(path, ": ", parsed.status().message()));
  }
  return parsed;
}

void ScaleWorkload(std::vector<WorkloadRequest>& requests, double context_scale,
                   int64_t max_context, int64_t max_output) {
  for (auto& r : requests) {
    if (context_scale > 0 && context_scale < 1) {
      r.input_tokens = static_cast<int64_t>(std::ceil(static_cast<double>(r.input_tokens) * context_scale));
    }
    if (max_context > 0) r.input_tokens = std::min(r.input_tokens, max_context);
    r.input_tokens = std::max<int64_t>(r.input_tokens, 1);
    if (max_output > 0) r.output_tokens = std::min(r.output_tokens, max_output);
    r.output_tokens = std::max<int64_t>(r.output_tokens, 1);
  }
}

}  // namespace pkv
