// Reproducers of defects the request fuzzer found in the engine and service. Each test states the
// behaviour the API promises, fails while the defect is there and passes once it is fixed. They
// are their own CTest (request_fuzz_known_defects_test) so that request_fuzz_test stays a clean
// signal meanwhile; an input that aborts the process runs in a child (a death-test fork), so the
// abort is reported as a failed expectation instead of killing the run. Every defect here is
// fixed; the tests stay as regression tests.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <string>

#include "common/log.h"
#include "gtest/gtest.h"
#include "tests/fuzz/request_fuzzer.h"

namespace pkv::fuzz {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// In the child: a fresh fuzzer sends `bytes` as the first message of a WriteKV stream; exits 0
// when every invariant held (the header was refused with a documented code and nothing
// changed, then everything released), 1 otherwise.
[[noreturn]] void SendWriteKvAndExit(const std::string& bytes) {
  SetMinLogLevel(LogLevel::kError);
  RequestFuzzer::Options options;
  options.run_known_crashes = true;
  auto fuzzer = RequestFuzzer::Create(options);
  absl::Status status = fuzzer.ok() ? (*fuzzer)->Feed(MessageKind::kWriteKv, bytes) : fuzzer.status();
  if (status.ok()) status = (*fuzzer)->Finish();
  if (!status.ok()) std::cerr << status << std::endl;
  std::exit(status.ok() ? 0 : 1);
}

std::string HeaderBytes(int64_t num_tokens) {
  v1::WriteKVRequest request;
  request.mutable_header()->set_sequence_id(7000);
  request.mutable_header()->set_num_tokens(num_tokens);
  return request.SerializeAsString();
}

// A WriteKV header with num_tokens >= INT64_MAX - 14 (page_size 16) overflowed the pager's page
// count and aborted the process; it must be answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
TEST(RequestFuzzKnownDefectTest, WriteKvHeaderNearInt64MaxIsRefusedNotAborted) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  for (int64_t tokens : {kInt64Max, kInt64Max - 14}) {
    EXPECT_EXIT(SendWriteKvAndExit(HeaderBytes(tokens)), ::testing::ExitedWithCode(0), "")
        << "WriteKV header num_tokens=" << tokens;
  }
  // The same input as found by the fuzzer, kept in the corpus.
  const std::filesystem::path path = std::filesystem::path(PKV_FUZZ_CORPUS_DIR) /
                                     "known_defects/write_kv/header_num_tokens_int64_max_minus_14.binpb";
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in.good()) << path;
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EXIT(SendWriteKvAndExit(bytes), ::testing::ExitedWithCode(0), "") << path;
}

// StepRequest.open has no size bound: one layer-0 request opens any number of empty sequences
// (engine memory grows without limit, and validating `open` against `free` is quadratic). A
// list far beyond any batch must be refused, leaving the engine unchanged.
TEST(RequestFuzzKnownDefectTest, StepOpenListHasASizeBound) {
  SetMinLogLevel(LogLevel::kError);
  constexpr int kOpen = 100000;
  auto fuzzer = RequestFuzzer::Create(RequestFuzzer::Options{});
  ASSERT_TRUE(fuzzer.ok()) << fuzzer.status();
  v1::StepRequest request;
  request.set_token_step_id(1);
  for (int i = 0; i < kOpen; ++i) request.add_open(1000000 + i);
  for (v1::Tensor* t : {request.mutable_q(), request.mutable_k(), request.mutable_v()}) {
    t->set_dtype(v1::DTYPE_FP16);
    t->add_shape(0);
    t->add_shape(t == request.mutable_q() ? 8 : 2);
    t->add_shape(64);
  }
  const int64_t ok_before = (*fuzzer)->stats().ok;
  ASSERT_TRUE((*fuzzer)->Feed(MessageKind::kStep, request.SerializeAsString()).ok());
  EXPECT_EQ((*fuzzer)->stats().ok, ok_before)
      << "a StepRequest opening " << kOpen << " sequences (" << request.ByteSizeLong()
      << " bytes) was accepted; the engine now holds " << (*fuzzer)->engine().Info().pager.num_sequences
      << " sequences";
  EXPECT_TRUE((*fuzzer)->Finish().ok());
}

}  // namespace
}  // namespace pkv::fuzz
