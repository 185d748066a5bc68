// Scheduler decisions pinned on hand-computed shapes. Constants of the profile used here:
// β = 2500 GB/s, β_cta = 20 GB/s, 132 SMs x 4 resident, λ = 6 µs, β_merge = 1000 GB/s,
// task_us = 0.5 (DefaultCostProfile). Shape Hq=32, Hkv=8, d=128, page 16, fp16:
// one page of one KV head = 2 * 16 * 128 * 2 = 8192 bytes.
#include "scheduler/scheduler.h"

#include "gtest/gtest.h"
#include "scheduler/cost_model.h"
#include "scheduler/cost_profile.h"

namespace pkv::scheduler {
namespace {

StepShape Shape(std::vector<int64_t> rows) {
  StepShape s;
  s.model.num_q_heads = 32;
  s.model.num_kv_heads = 8;
  s.model.head_dim = 128;
  s.model.page_size = 16;
  s.row_tokens = std::move(rows);
  s.device.is_gpu = true;
  return s;
}

Scheduler GpuScheduler(std::optional<KernelId> fixed = std::nullopt) {
  Scheduler::Options o;
  o.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  o.fixed_kernel = fixed;
  auto s = Scheduler::Create(o);
  EXPECT_TRUE(s.ok());
  return *s;
}

TEST(CostModelTest, HandComputedPerRequestCost) {
  CostModel m(DefaultCostProfile());
  // B1 x 8192 tokens: 512 pages x 8 heads x 8192 B = 32 MiB; longest unit 4 MiB.
  const ArmCost c = m.PerRequest(Shape({8192}));
  EXPECT_EQ(c.kv_bytes, 512LL * 8 * 8192);
  EXPECT_EQ(c.units, 8);
  // max(33554432 / 2.5e6, 4194304 / 2e4) + 1 wave x 0.5 + 6 = 209.7152 + 6.5
  EXPECT_NEAR(c.us, 4194304.0 / 2e4 + 0.5 + 6.0, 1e-6);
}

TEST(CostModelTest, HandComputedSplitAndWorkQueueCosts) {
  CostModel m(DefaultCostProfile());
  const StepShape s = Shape({8192});
  const ArmCost split = m.SequenceSplit(s, 64);
  EXPECT_EQ(split.units, 8 * 64);
  EXPECT_EQ(split.launches, 2);
  // merge: 2 x 512 partials x G=4 x (128 + 2) x 4 B = 2129920 B
  EXPECT_EQ(split.merge_bytes, 2LL * 512 * 4 * 130 * 4);
  // streaming 33554432 / 2.5e6 = 13.42 µs beats longest 8 pages x 8192 / 2e4 = 3.28 µs.
  EXPECT_NEAR(split.us, 33554432.0 / 2.5e6 + 0.5 + 12.0 + 2129920.0 / 1e6, 1e-6);
  const ArmCost wq = m.WorkQueue(s, 8);
  EXPECT_EQ(wq.units, 64 * 8);
  EXPECT_EQ(wq.launches, 1);
  EXPECT_NEAR(wq.us, 33554432.0 / 2.5e6 + 0.5 + 6.0 + 2129920.0 / 1e6, 1e-6);
}

TEST(SchedulerTest, SingleLongRowGoesToTheWorkQueue) {
  // B1 x 8K: per-request is bound by one CTA per head (~216 µs); a split route fills the GPU.
  const StepPlan p = GpuScheduler().Plan(Shape({8192}));
  EXPECT_EQ(p.kernel, KernelId::kWorkQueue);
  EXPECT_GT(p.pages_per_task, 0);
  EXPECT_LT(p.predicted_us, 25.0);
  EXPECT_EQ(p.launches_per_layer, 1);
}

TEST(SchedulerTest, LargeUniformBatchStaysPerRequest) {
  // B64 x 32K: 512 CTAs of 16 MiB each; streaming (3436 µs) dominates, splitting only adds
  // launches and merge traffic.
  const StepPlan p = GpuScheduler().Plan(Shape(std::vector<int64_t>(64, 32768)));
  EXPECT_EQ(p.kernel, KernelId::kPerRequest);
  EXPECT_NEAR(p.predicted_us, 64.0 * 2048 * 8 * 8192 / 2.5e6 + 0.5 + 6.0, 1e-6);
}

TEST(SchedulerTest, FixedArmPicksItsBestParameter) {
  const StepPlan p = GpuScheduler(KernelId::kSequenceSplit).Plan(Shape({8192}));
  EXPECT_EQ(p.kernel, KernelId::kSequenceSplit);
  EXPECT_GE(p.num_splits, 16);
  EXPECT_EQ(p.launches_per_layer, 2);
}

TEST(SchedulerTest, DeterministicAndCpuPlansTheReference) {
  const StepShape s = Shape({100, 5000, 20000, 16});
  EXPECT_EQ(GpuScheduler().Plan(s).pages_per_task, GpuScheduler().Plan(s).pages_per_task);
  auto cpu = Scheduler::Create(Scheduler::Options{});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->Plan(s).kernel, KernelId::kReference);
}

TEST(SchedulerTest, RejectsFixedKernelTheBackendLacks) {
  Scheduler::Options o;
  o.available = {KernelId::kReference};
  o.fixed_kernel = KernelId::kWorkQueue;
  EXPECT_EQ(Scheduler::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.available.clear();
  o.fixed_kernel.reset();
  EXPECT_FALSE(Scheduler::Create(o).ok());
}

TEST(CostProfileTest, RoundTripsAndRejectsBadFiles) {
  CostProfile p = DefaultCostProfile();
  p.gpu = "NVIDIA H100 80GB HBM3";
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.page_size = 16;
  p.dtype = "fp16";
  p.stream_read_gbps = 3111.5;
  auto back = ParseCostProfile(CostProfileToJson(p));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->gpu, p.gpu);
  EXPECT_DOUBLE_EQ(back->stream_read_gbps, 3111.5);
  EXPECT_EQ(back->head_dim, 128);
  ModelShape shape;
  EXPECT_TRUE(back->Matches(shape).ok());
  shape.head_dim = 64;
  EXPECT_EQ(back->Matches(shape).code(), absl::StatusCode::kFailedPrecondition);

  auto missing = ParseCostProfile(R"({"format": "pkv-calibration-v1", "gpu": "x"})");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("num_sms"), std::string_view::npos);
  EXPECT_FALSE(ParseCostProfile("{\"format\": ").ok());
  EXPECT_FALSE(ParseCostProfile(R"({"format": "other"})").ok());
  EXPECT_EQ(LoadCostProfile("/nonexistent/profile.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pkv::scheduler

namespace pkv::scheduler {
namespace {

TEST(SchedulerTest, FixedParameterPinsSplitsAndTaskSize) {
  Scheduler::Options o;
  o.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  o.fixed_kernel = KernelId::kSequenceSplit;
  o.fixed_parameter = 3;
  StepShape s;
  s.model.num_q_heads = 32;
  s.model.num_kv_heads = 8;
  s.row_tokens = {4096};
  EXPECT_EQ(Scheduler::Create(o)->Plan(s).num_splits, 3);
  o.fixed_kernel = KernelId::kWorkQueue;
  o.fixed_parameter = 5;
  EXPECT_EQ(Scheduler::Create(o)->Plan(s).pages_per_task, 5);
}

}  // namespace
}  // namespace pkv::scheduler

namespace pkv::scheduler {
namespace {

TEST(CostModelTest, CalibratedCorrectionsApplyOnlyWhereTheyBelong) {
  CostProfile p = DefaultCostProfile();
  p.split_stream_efficiency = 0.5;
  p.wq_merge_us = 4.0;
  CostModel base(DefaultCostProfile()), corrected(p);
  StepShape s;
  s.model.num_q_heads = 32;
  s.model.num_kv_heads = 8;
  s.row_tokens = {8192};
  // Split S=64: the streaming term (13.42 µs, larger than the longest unit) doubles.
  EXPECT_NEAR(corrected.SequenceSplit(s, 64).us - base.SequenceSplit(s, 64).us, 33554432.0 / 2.5e6, 1e-6);
  // S=1 is per-request work: no correction.
  EXPECT_NEAR(corrected.SequenceSplit(s, 1).us, base.SequenceSplit(s, 1).us, 1e-9);
  // Work queue: +4 µs of fused merge when a row is split, nothing when no row is.
  EXPECT_NEAR(corrected.WorkQueue(s, 8).us - base.WorkQueue(s, 8).us, 4.0, 1e-9);
  EXPECT_NEAR(corrected.WorkQueue(s, 512).us, base.WorkQueue(s, 512).us, 1e-9);
  auto back = ParseCostProfile(CostProfileToJson(p));
  ASSERT_TRUE(back.ok());
  EXPECT_DOUBLE_EQ(back->split_stream_efficiency, 0.5);
  EXPECT_DOUBLE_EQ(back->wq_merge_us, 4.0);
}

}  // namespace
}  // namespace pkv::scheduler
