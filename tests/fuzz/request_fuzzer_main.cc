// tests/fuzz/request_fuzzer_main.cc — libFuzzer entry point (clang only) over the harness of
// request_fuzz_test. Each input is a series of records (RequestFuzzer::FeedRecords) sent to a
// fresh engine, then everything is released; a broken invariant aborts, as libFuzzer expects.
// Inputs of known defects are sent too: finding crashes is the point here.
//   build/bin/pkv-request-fuzzer -max_total_time=60 CORPUS_DIR
#include <cstddef>
#include <cstdint>

#include "common/log.h"
#include "tests/fuzz/request_fuzzer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool quiet = [] {
    pkv::SetMinLogLevel(pkv::LogLevel::kError);  // aborted token steps log a warning each
    return true;
  }();
  (void)quiet;
  pkv::fuzz::RequestFuzzer::Options options;
  options.run_known_crashes = true;
  auto fuzzer = pkv::fuzz::RequestFuzzer::Create(options);
  PKV_CHECK(fuzzer.ok()) << fuzzer.status();
  absl::Status status = (*fuzzer)->FeedRecords({data, size});
  if (status.ok()) status = (*fuzzer)->Finish();
  PKV_CHECK(status.ok()) << status;
  return 0;
}
