// The seeded request fuzzer (tests/fuzz/request_fuzzer.h) as a bounded CI test, and the replay of
// the checked-in seed corpus (tests/fuzz/corpus/<kind>/*.binpb: one binary pkv.v1 message each).
// Environment:
//   PKV_FUZZ_SEED               the seed (default kDefaultSeed); every run prints the one it used
//   PKV_FUZZ_ITERS              iterations (default: 12-25 s on two cores, RelWithDebInfo)
//   PKV_FUZZ_ARTIFACT_DIR       a failing run writes its last request there (binary proto)
//   PKV_FUZZ_RUN_KNOWN_CRASHES  1: also send the inputs of known aborting defects
// A failure names the seed and iteration: the same seed and iteration count reproduce it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "gtest/gtest.h"
#include "tests/fuzz/request_fuzzer.h"

namespace pkv::fuzz {
namespace {

constexpr uint64_t kDefaultSeed = 20240611;
constexpr int64_t kDefaultIterations = 200000;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* value = std::getenv(name);
  uint64_t parsed = 0;
  if (value == nullptr || !absl::SimpleAtoi(value, &parsed)) return fallback;
  return parsed;
}

const char* KindName(MessageKind kind) {
  switch (kind) {
    case MessageKind::kStep:
      return "step";
    case MessageKind::kWriteKv:
      return "write_kv";
    case MessageKind::kRelease:
      return "release";
  }
  return "unknown";
}

// Writes the failing run's last request where PKV_FUZZ_ARTIFACT_DIR says; returns its path.
std::string WriteArtifact(const RequestFuzzer& fuzzer, uint64_t seed) {
  const char* dir = std::getenv("PKV_FUZZ_ARTIFACT_DIR");
  if (dir == nullptr) return "(set PKV_FUZZ_ARTIFACT_DIR to keep the last request)";
  const std::string path =
      absl::StrCat(dir, "/fuzz-", seed, "-", KindName(fuzzer.last_kind()), ".binpb");
  std::ofstream(path, std::ios::binary) << fuzzer.last_request();
  return path;
}

void PrintStats(const FuzzStats& s) {
  std::string codes;
  for (const auto& [code, n] : s.codes) {
    absl::StrAppend(&codes, " ", absl::StatusCodeToString(static_cast<absl::StatusCode>(code)), "=", n);
  }
  std::printf("request fuzz: %lld requests (%lld OK, %lld layer-steps OK, %lld prompts committed), "
              "%lld unparsable byte strings\n  codes:%s\n",
              static_cast<long long>(s.requests), static_cast<long long>(s.ok), static_cast<long long>(s.steps_ok),
              static_cast<long long>(s.prompts_committed), static_cast<long long>(s.unparsable), codes.c_str());
  std::printf("  steps accepted with an open or free list longer than max_batch: %lld\n",
              static_cast<long long>(s.long_deltas_ok));
}

TEST(RequestFuzzTest, SeededRequestsKeepEveryInvariant) {
  SetMinLogLevel(LogLevel::kError);  // aborted token steps log a warning each
  const uint64_t seed = EnvOr("PKV_FUZZ_SEED", kDefaultSeed);
  const int64_t iterations = static_cast<int64_t>(EnvOr("PKV_FUZZ_ITERS", kDefaultIterations));
  RequestFuzzer::Options options;
  options.seed = seed;
  options.run_known_crashes = EnvOr("PKV_FUZZ_RUN_KNOWN_CRASHES", 0) != 0;
  std::printf("request fuzz: seed %llu, %lld iterations (reproduce with PKV_FUZZ_SEED=%llu PKV_FUZZ_ITERS=%lld)\n",
              static_cast<unsigned long long>(seed), static_cast<long long>(iterations),
              static_cast<unsigned long long>(seed), static_cast<long long>(iterations));
  std::fflush(stdout);
  auto fuzzer = RequestFuzzer::Create(options);
  ASSERT_TRUE(fuzzer.ok()) << fuzzer.status();
  const auto started = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iterations; ++i) {
    absl::Status status;
    try {
      status = (*fuzzer)->Iterate();
    } catch (const std::exception& e) {
      // The handlers never throw; one that does would terminate the worker.
      status = absl::InternalError(absl::StrCat("exception escaped a handler: ", e.what(),
                                                "\n  last request sent: ", (*fuzzer)->last_description()));
    }
    if (!status.ok()) {
      FAIL() << "seed " << seed << ", iteration " << i << " (PKV_FUZZ_SEED=" << seed
             << " PKV_FUZZ_ITERS=" << i + 1 << "): " << status.message()
             << "\n  last request: " << WriteArtifact(**fuzzer, seed);
    }
  }
  const absl::Status finished = (*fuzzer)->Finish();
  ASSERT_TRUE(finished.ok()) << "seed " << seed << ": " << finished;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  PrintStats((*fuzzer)->stats());
  std::printf("  %.1f s, %.0f iterations/s\n", seconds, iterations / std::max(seconds, 1e-9));
  if ((*fuzzer)->stats().known_crashes > 0) {
    std::printf("  known aborting inputs recognised and not sent: %lld (first: %s); see "
                "request_fuzz_known_defects_test\n",
                static_cast<long long>((*fuzzer)->stats().known_crashes),
                (*fuzzer)->first_known_crash().c_str());
  }
  // The seeded run must reach deep: accepted token steps, committed prompts, each refusal kind.
  const FuzzStats& s = (*fuzzer)->stats();
  if (iterations >= 2000) {
    EXPECT_GT(s.steps_ok, iterations / 10);
    EXPECT_GT(s.prompts_committed, iterations / 1000);
    for (absl::StatusCode code : {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
                                  absl::StatusCode::kAlreadyExists, absl::StatusCode::kFailedPrecondition,
                                  absl::StatusCode::kResourceExhausted}) {
      EXPECT_GT(s.codes.count(static_cast<int>(code)), 0u) << "never saw " << absl::StatusCodeToString(code);
    }
  }
}

TEST(RequestFuzzTest, SeedCorpusReplays) {
  SetMinLogLevel(LogLevel::kError);
  const std::filesystem::path root(PKV_FUZZ_CORPUS_DIR);
  int files = 0;
  for (MessageKind kind : {MessageKind::kStep, MessageKind::kWriteKv, MessageKind::kRelease}) {
    const std::filesystem::path dir = root / KindName(kind);
    if (!std::filesystem::exists(dir)) continue;
    std::vector<std::filesystem::path> paths;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) paths.push_back(entry.path());
    std::sort(paths.begin(), paths.end());
    for (const auto& path : paths) {
      std::ifstream in(path, std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      // Each file against a fresh engine with the two committed prompts of Create.
      auto fuzzer = RequestFuzzer::Create(RequestFuzzer::Options{});
      ASSERT_TRUE(fuzzer.ok()) << fuzzer.status();
      absl::Status status = (*fuzzer)->Feed(kind, bytes);
      if (status.ok()) status = (*fuzzer)->CommitStream();
      if (status.ok()) status = (*fuzzer)->Finish();
      EXPECT_TRUE(status.ok()) << path << ": " << status;
      ++files;
    }
  }
  EXPECT_GT(files, 0) << "no corpus under " << root;
}

}  // namespace
}  // namespace pkv::fuzz
