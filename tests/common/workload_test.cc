// Tests of common/workload.h: seeded synthetic workloads with the MISSION.md ranges, the CSV
// trace reader (good and bad input) and scaling.
#include "common/workload.h"

#include <cmath>
#include <set>
#include <string>

#include "gtest/gtest.h"

namespace pkv {
namespace {

TEST(WorkloadTest, KindNamesRoundTrip) {
  for (auto kind : {WorkloadKind::kUniform, WorkloadKind::kBimodal, WorkloadKind::kZipf,
                    WorkloadKind::kBucketed, WorkloadKind::kHomogeneous}) {
    auto parsed = ParseWorkloadKind(WorkloadKindName(kind));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, kind);
  }
  auto bad = ParseWorkloadKind("poisson");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("bimodal"), absl::string_view::npos);
}

TEST(WorkloadTest, SameSeedSameRequestsOtherSeedOtherRequests) {
  const auto a = GenerateWorkload(WorkloadKind::kUniform, 50, 20260622);
  const auto b = GenerateWorkload(WorkloadKind::kUniform, 50, 20260622);
  const auto c = GenerateWorkload(WorkloadKind::kUniform, 50, 20260623);
  ASSERT_EQ(a.size(), 50u);
  int same_as_c = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].input_tokens, b[i].input_tokens);
    EXPECT_EQ(a[i].output_tokens, b[i].output_tokens);
    same_as_c += a[i].input_tokens == c[i].input_tokens;
  }
  EXPECT_LT(same_as_c, 5);
}

TEST(WorkloadTest, RangesFollowTheMission) {
  const int n = 400;
  for (const auto& r : GenerateWorkload(WorkloadKind::kUniform, n, 1)) {
    EXPECT_GE(r.input_tokens, 4096);
    EXPECT_LE(r.input_tokens, 32768);
    EXPECT_EQ(r.input_tokens % 16, 0);
    EXPECT_GE(r.output_tokens, 16);
    EXPECT_LE(r.output_tokens, 96);
    EXPECT_EQ(r.arrival_ms, 0);
  }
  const auto bimodal = GenerateWorkload(WorkloadKind::kBimodal, n, 2);
  for (int i = 0; i < n; ++i) {
    const auto& r = bimodal[i];
    EXPECT_EQ(r.input_tokens % 16, 0);
    if (i % 4 == 0) {
      EXPECT_GE(r.input_tokens, 24576);
      EXPECT_LE(r.input_tokens, 65536);
      EXPECT_GE(r.output_tokens, 32);
      EXPECT_LE(r.output_tokens, 128);
    } else {
      EXPECT_GE(r.input_tokens, 2048);
      EXPECT_LE(r.input_tokens, 12288);
      EXPECT_GE(r.output_tokens, 8);
      EXPECT_LE(r.output_tokens, 64);
    }
  }
  std::set<int64_t> zipf_lengths;
  for (const auto& r : GenerateWorkload(WorkloadKind::kZipf, n, 3)) {
    EXPECT_GE(r.input_tokens, 1024);
    EXPECT_LE(r.input_tokens, 2048 + 65536 + 512 + 16);
    EXPECT_GE(r.output_tokens, 8);
    EXPECT_LE(r.output_tokens, 128);
    zipf_lengths.insert(r.input_tokens);
  }
  EXPECT_GT(zipf_lengths.size(), 50u);
  const auto bucketed = GenerateWorkload(WorkloadKind::kBucketed, 8, 4);
  const int64_t buckets[] = {8192, 16384, 32768, 65536};
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(bucketed[i].input_tokens, buckets[i % 4]);
    EXPECT_GE(bucketed[i].output_tokens, 32);
    EXPECT_LE(bucketed[i].output_tokens, 96);
  }
  for (const auto& r : GenerateWorkload(WorkloadKind::kHomogeneous, 20, 5)) {
    EXPECT_EQ(r.input_tokens, 32768);
  }
}

TEST(WorkloadTest, ParsesCsvWithAndWithoutBlockHashes) {
  auto a = ParseTraceCsv("arrival_ms,input_tokens,output_tokens\n0,374,44\r\n4315,396,109\n\n");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->size(), 2u);
  EXPECT_EQ((*a)[1].arrival_ms, 4315);
  EXPECT_EQ((*a)[1].input_tokens, 396);
  EXPECT_EQ((*a)[1].output_tokens, 109);
  auto b = ParseTraceCsv("arrival_ms,input_tokens,output_tokens,block_hashes\n0,1000,5,0 1\n7,600,3,0 2\n");
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->size(), 2u);
  EXPECT_EQ((*b)[1].block_hashes, (std::vector<uint64_t>{0, 2}));
}

TEST(WorkloadTest, RejectsBadCsvNamingTheLine) {
  const char* bad[] = {
      "",
      "time,in,out\n0,1,1\n",
      "arrival_ms,input_tokens,output_tokens\n0,10\n",
      "arrival_ms,input_tokens,output_tokens\n0,ten,1\n",
      "arrival_ms,input_tokens,output_tokens\n0,10,0\n",
      "arrival_ms,input_tokens,output_tokens\n-5,10,1\n",
      "arrival_ms,input_tokens,output_tokens\n10,10,1\n5,10,1\n",
      "arrival_ms,input_tokens,output_tokens,block_hashes\n0,10,1,a b\n",
  };
  for (const char* text : bad) {
    auto r = ParseTraceCsv(text);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
  auto r = ParseTraceCsv("arrival_ms,input_tokens,output_tokens\n0,1,1\n3,x,1\n");
  EXPECT_NE(r.status().message().find("line 3"), absl::string_view::npos) << r.status();
  EXPECT_EQ(ReadTraceCsv("/nonexistent/trace.csv").status().code(), absl::StatusCode::kNotFound);
}

TEST(WorkloadTest, ReadsTheBundledTraces) {
  for (const char* name : {"azure_llm_2023_conv_head.csv", "azure_llm_2023_code_head.csv"}) {
    auto r = ReadTraceCsv(std::string(PKV_TRACES_DIR) + "/" + name);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_GE(r->size(), 100u);
    EXPECT_EQ(r->front().arrival_ms, 0);
    for (const auto& q : *r) {
      EXPECT_GE(q.input_tokens, 1);
      EXPECT_GE(q.output_tokens, 1);
    }
  }
}

TEST(WorkloadTest, ScaleShrinksPromptsAndCaps) {
  std::vector<WorkloadRequest> r(2);
  r[0].input_tokens = 32768;
  r[0].output_tokens = 100;
  r[1].input_tokens = 3;
  r[1].output_tokens = 5;
  ScaleWorkload(r, 0.01, 200, 50);
  EXPECT_EQ(r[0].input_tokens, 200);  // ceil(327.68) capped at 200
  EXPECT_EQ(r[0].output_tokens, 50);
  EXPECT_EQ(r[1].input_tokens, 1);    // never below 1
  EXPECT_EQ(r[1].output_tokens, 5);
  ScaleWorkload(r, 1.0, 0, 0);
  EXPECT_EQ(r[0].input_tokens, 200);
}

}  // namespace
}  // namespace pkv
