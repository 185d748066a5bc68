// Scheduler decisions pinned on hand-computed shapes. Constants of the profile used here:
// β = 2500 GB/s, β_cta = 20 GB/s, 132 SMs x 4 resident, λ = 6 µs, β_merge = 1000 GB/s,
// task_us = 0.5 (DefaultCostProfile). Shape Hq=32, Hkv=8, d=128, page 16, fp16:
// one page of one KV head = 2 * 16 * 128 * 2 = 8192 bytes.
#include "scheduler/scheduler.h"

#include <algorithm>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "scheduler/cost_model.h"
#include "scheduler/cost_profile.h"
#include "scheduler/work_list.h"

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
  EXPECT_EQ(split.launches, 1);  // the merge fused (priced as a second launch, as calibrated)
  EXPECT_FALSE(split.separate_merge);
  // merge: 2 x 512 partials x G=4 x (128 + 2) x 4 B = 2129920 B
  EXPECT_EQ(split.merge_bytes, 2LL * 512 * 4 * 130 * 4);
  // streaming 33554432 / 2.5e6 = 13.42 µs beats longest 8 pages x 8192 / 2e4 = 3.28 µs.
  EXPECT_NEAR(split.us, 33554432.0 / 2.5e6 + 0.5 + 12.0 + 2129920.0 / 1e6, 1e-6);
  const ArmCost wq = m.WorkQueue(s, 8);
  EXPECT_EQ(wq.units, 64 * 8);
  EXPECT_EQ(wq.launches, 1);
  EXPECT_NEAR(wq.us, 33554432.0 / 2.5e6 + 0.5 + 6.0 + 2129920.0 / 1e6, 1e-6);
}

TEST(CostModelTest, UnequalUnitsAddTheTailTheLongOnesReadAlone) {
  // 16 SMs x 1 resident, β = 100 GB/s, β_cta = 10 GB/s, no fixed costs; one KV head.
  CostProfile p = DefaultCostProfile();
  p.num_sms = 16;
  p.resident_ctas_per_sm = 1;
  p.stream_read_gbps = 100;
  p.cta_read_gbps = 10;
  p.launch_us = 0;
  p.task_us = 0;
  CostModel m(p);
  StepShape s = Shape({});
  s.model.num_q_heads = 4;
  s.model.num_kv_heads = 1;
  // Equal units: max(Σ bytes / β, unit bytes / β_cta). 16 rows of 10 pages: max(13.1, 8.2) µs.
  s.row_tokens.assign(16, 160);
  EXPECT_NEAR(m.PerRequest(s).us, std::max(16 * 10 * 8192 / 1e5, 10 * 8192 / 1e4), 1e-9);
  // 15 rows of 1 page and one of 40: all 16 read at 100 / 16 GB/s until the short ones finish
  // (8192 B each, 1.31 µs), then the long one alone at 10 GB/s for its other 39 pages: 33.26 µs,
  // more than max(4.5, 32.8) µs.
  s.row_tokens.assign(15, 16);
  s.row_tokens.push_back(640);
  const double want = 8192 / (1e5 / 16) + 39 * 8192 / 1e4;
  EXPECT_NEAR(m.PerRequest(s).us, want, 1e-9);
  EXPECT_GT(want, std::max(55 * 8192 / 1e5, 40 * 8192 / 1e4));
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
  EXPECT_EQ(p.launches_per_layer, 1);  // the merge fused into the split launch
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
  EXPECT_DOUBLE_EQ(back->wq_separate_merge_us, 0.0);
}

// The work queue merges split rows fused (+ wq_merge_us, one launch) or with a launch of its own
// (+ wq_separate_merge_us, two launches), whichever the profile prices lower; a profile without a
// separate price (0, and every profile written before it existed) always fuses. Rows that are not
// split need no merge either way.
TEST(CostModelTest, WorkQueueMergeIsFusedOrSeparateByItsPrice) {
  StepShape s;
  s.model.num_q_heads = 32;
  s.model.num_kv_heads = 8;
  s.row_tokens = {8192};
  CostProfile p = DefaultCostProfile();
  p.wq_merge_us = 9.0;
  const double no_merge = CostModel(DefaultCostProfile()).WorkQueue(s, 8).us;
  {
    const ArmCost c = CostModel(p).WorkQueue(s, 8);
    EXPECT_FALSE(c.separate_merge);
    EXPECT_EQ(c.launches, 1);
    EXPECT_NEAR(c.us - no_merge, 9.0, 1e-9);
  }
  p.wq_separate_merge_us = 5.0;
  {
    const ArmCost c = CostModel(p).WorkQueue(s, 8);
    EXPECT_TRUE(c.separate_merge);
    EXPECT_EQ(c.launches, 2);
    EXPECT_NEAR(c.us - no_merge, 5.0, 1e-9);
    // The balanced form prices its merge the same way.
    const ArmCost b = CostModel(p).BalancedWorkQueue(s, 132 * 4);
    EXPECT_TRUE(b.separate_merge);
    EXPECT_EQ(b.launches, 2);
    // No split row: no merge, one launch.
    const ArmCost whole = CostModel(p).WorkQueue(s, 512);
    EXPECT_FALSE(whole.separate_merge);
    EXPECT_EQ(whole.launches, 1);
    EXPECT_NEAR(whole.us, CostModel(DefaultCostProfile()).WorkQueue(s, 512).us, 1e-9);
  }
  // Pinned: the named form at its price (a separate merge with no measured price costs a launch).
  EXPECT_FALSE(CostModel(p, false).WorkQueue(s, 8).separate_merge);
  EXPECT_NEAR(CostModel(p, false).WorkQueue(s, 8).us - no_merge, 9.0, 1e-9);
  CostProfile unpriced = DefaultCostProfile();
  const ArmCost pinned = CostModel(unpriced, true).WorkQueue(s, 8);
  EXPECT_TRUE(pinned.separate_merge);
  EXPECT_NEAR(pinned.us - no_merge, unpriced.launch_us, 1e-9);
  // Dearer than fused: fused.
  p.wq_separate_merge_us = 12.0;
  EXPECT_FALSE(CostModel(p).WorkQueue(s, 8).separate_merge);
  // The profile file keeps the price; a negative one is refused.
  p.wq_separate_merge_us = 5.0;
  auto back = ParseCostProfile(CostProfileToJson(p));
  ASSERT_TRUE(back.ok());
  EXPECT_DOUBLE_EQ(back->wq_separate_merge_us, 5.0);
  std::string json = CostProfileToJson(p);
  const std::string priced = "\"wq_separate_merge_us\": 5.000";
  ASSERT_NE(json.find(priced), std::string::npos);
  json.replace(json.find(priced), priced.size(), "\"wq_separate_merge_us\": -1.0");
  EXPECT_EQ(ParseCostProfile(json).status().code(), absl::StatusCode::kInvalidArgument);
}

// The plan carries the merge the model chose, and launches_per_layer counts it; a scheduler option
// pins it either way.
TEST(SchedulerTest, PlanCarriesTheWorkQueuesMerge) {
  Scheduler::Options o;
  o.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  o.fixed_kernel = KernelId::kWorkQueue;
  o.profile.wq_merge_us = 9.0;
  o.profile.wq_separate_merge_us = 5.0;
  const StepShape s = [] {
    StepShape x;
    x.model.num_q_heads = 32;
    x.model.num_kv_heads = 8;
    x.model.head_dim = 128;
    x.model.page_size = 16;
    x.row_tokens = {8192};
    x.device.is_gpu = true;
    return x;
  }();
  {
    const StepPlan plan = Scheduler::Create(o)->Plan(s);
    EXPECT_EQ(plan.kernel, KernelId::kWorkQueue);
    EXPECT_GT(plan.num_partials, 0);
    EXPECT_TRUE(plan.separate_merge);
    EXPECT_EQ(plan.launches_per_layer, 2);
  }
  o.separate_merge = false;
  {
    const StepPlan plan = Scheduler::Create(o)->Plan(s);
    EXPECT_FALSE(plan.separate_merge);
    EXPECT_EQ(plan.launches_per_layer, 1);
  }
  // Per-request never carries the flag.
  o.separate_merge = true;
  o.fixed_kernel = KernelId::kPerRequest;
  EXPECT_FALSE(Scheduler::Create(o)->Plan(s).separate_merge);
}

// Sequence-split fuses its merge (one launch) unless the profile measured the separate merge
// cheaper (ss_separate_merge_delta_us < 0: the plan then carries it, two launches, and the price
// moves by the delta); an unsplit step has no merge; a scheduler option pins it; the profile file
// keeps the delta, and an absurd one is refused.
TEST(SchedulerTest, SequenceSplitMergeIsFusedOrSeparateByItsDelta) {
  Scheduler::Options o;
  o.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  o.fixed_kernel = KernelId::kSequenceSplit;
  const StepShape s = Shape({8192});
  const double fused_us = CostModel(o.profile).SequenceSplit(s, 32).us;
  {
    const StepPlan plan = Scheduler::Create(o)->Plan(s);
    EXPECT_GT(plan.num_splits, 1);
    EXPECT_FALSE(plan.separate_merge);
    EXPECT_EQ(plan.launches_per_layer, 1);
  }
  o.profile.ss_separate_merge_delta_us = 2.0;  // dearer: still fused
  EXPECT_FALSE(Scheduler::Create(o)->Plan(s).separate_merge);
  o.profile.ss_separate_merge_delta_us = -3.0;
  {
    const ArmCost c = CostModel(o.profile).SequenceSplit(s, 32);
    EXPECT_TRUE(c.separate_merge);
    EXPECT_EQ(c.launches, 2);
    EXPECT_NEAR(c.us, fused_us - 3.0, 1e-9);
    const ArmCost whole = CostModel(o.profile).SequenceSplit(s, 1);
    EXPECT_FALSE(whole.separate_merge);
    EXPECT_EQ(whole.launches, 1);
    const StepPlan plan = Scheduler::Create(o)->Plan(s);
    EXPECT_TRUE(plan.separate_merge);
    EXPECT_EQ(plan.launches_per_layer, 2);
  }
  o.separate_merge = false;
  EXPECT_FALSE(Scheduler::Create(o)->Plan(s).separate_merge);
  o.separate_merge = true;
  o.profile.ss_separate_merge_delta_us = 0.0;
  EXPECT_TRUE(Scheduler::Create(o)->Plan(s).separate_merge);
  // The profile file.
  CostProfile p = DefaultCostProfile();
  p.ss_separate_merge_delta_us = -3.25;
  auto back = ParseCostProfile(CostProfileToJson(p));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_DOUBLE_EQ(back->ss_separate_merge_delta_us, -3.25);
  std::string json = CostProfileToJson(p);
  const std::string priced = "\"ss_separate_merge_delta_us\": -3.250";
  ASSERT_NE(json.find(priced), std::string::npos);
  json.replace(json.find(priced), priced.size(), "\"ss_separate_merge_delta_us\": 5e6");
  EXPECT_EQ(ParseCostProfile(json).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pkv::scheduler

namespace pkv::scheduler {
namespace {

// Every page of every (row, KV head) in exactly one task, each task within the plan's task size,
// and the row splits, partial slots and counts consistent with the task size.
void ExpectWorkListCovers(std::span<const int32_t> row_pages, int32_t heads, const StepPlan& plan) {
  const auto batch = static_cast<int32_t>(row_pages.size());
  ASSERT_EQ(static_cast<int32_t>(plan.row_splits.size()), batch);
  ASSERT_EQ(static_cast<int32_t>(plan.partial_offset.size()), batch);
  const WorkListUsage usage = WorkListUsageFor(row_pages, heads, plan.pages_per_task);
  EXPECT_EQ(static_cast<int64_t>(plan.tasks.size()), usage.tasks);
  EXPECT_EQ(plan.num_partials, usage.partials);
  std::vector<int64_t> covered(static_cast<size_t>(batch) * heads, 0);
  for (const DecodeTask& t : plan.tasks) {
    ASSERT_LT(t.row, batch);
    EXPECT_EQ(t.num_splits, plan.row_splits[t.row]);
    EXPECT_LE(t.page_end - t.page_begin, plan.pages_per_task);
    covered[static_cast<size_t>(t.row) * heads + t.kv_head] += t.page_end - t.page_begin;
  }
  int32_t next_partial = 0;
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t want = row_pages[b] > 0 ? (row_pages[b] + plan.pages_per_task - 1) / plan.pages_per_task : 1;
    EXPECT_EQ(plan.row_splits[b], want) << "row " << b;
    if (want > 1) {
      EXPECT_EQ(plan.partial_offset[b], next_partial) << "row " << b;
      next_partial += want;
    }
    for (int32_t h = 0; h < heads; ++h) EXPECT_EQ(covered[static_cast<size_t>(b) * heads + h], row_pages[b]);
  }
  EXPECT_EQ(next_partial, plan.num_partials);
}

// A balanced work list: every page of every (row, KV head) in exactly one task; a row's tasks
// are its consecutive splits 0..n-1 in page order, cut at the same pages for every KV head; the
// CTA ranges cover the list and each CTA runs one head's tasks within the cut's budget.
void ExpectBalancedWorkListCovers(std::span<const int32_t> row_pages, int32_t heads, const BalancedCut& cut,
                                  const StepPlan& plan) {
  const auto batch = static_cast<int32_t>(row_pages.size());
  ASSERT_EQ(static_cast<int32_t>(plan.row_splits.size()), batch);
  ASSERT_EQ(static_cast<int32_t>(plan.partial_offset.size()), batch);
  ASSERT_EQ(plan.balanced_ctas, cut.ctas_per_head * heads);
  ASSERT_EQ(static_cast<int32_t>(plan.cta_task_begin.size()), plan.balanced_ctas + 1);
  EXPECT_EQ(plan.cta_task_begin.front(), 0);
  EXPECT_EQ(plan.cta_task_begin.back(), static_cast<int32_t>(plan.tasks.size()));
  // (row, head) -> the end of the pages covered so far and the next split expected.
  std::vector<int32_t> at(static_cast<size_t>(batch) * heads, 0), split(static_cast<size_t>(batch) * heads, 0);
  for (int32_t c = 0; c < plan.balanced_ctas; ++c) {
    ASSERT_LT(plan.cta_task_begin[c], plan.cta_task_begin[c + 1]) << "CTA " << c << " runs no task";
    int64_t load = 0;
    for (int32_t i = plan.cta_task_begin[c]; i < plan.cta_task_begin[c + 1]; ++i) {
      const DecodeTask& t = plan.tasks[i];
      ASSERT_GE(t.row, 0);
      ASSERT_LT(t.row, batch);
      EXPECT_EQ(t.kv_head, c % heads) << "CTA " << c;
      EXPECT_EQ(t.num_splits, plan.row_splits[t.row]);
      const size_t key = static_cast<size_t>(t.row) * heads + t.kv_head;
      EXPECT_EQ(t.page_begin, at[key]) << "row " << t.row << " head " << t.kv_head;
      EXPECT_EQ(t.split, split[key]) << "row " << t.row << " head " << t.kv_head;
      EXPECT_GE(t.page_end, t.page_begin);
      at[key] = t.page_end;
      split[key] += 1;
      load += t.page_end - t.page_begin;
    }
    EXPECT_LE(load, cut.max_cta_pages) << "CTA " << c;
  }
  int32_t next_partial = 0;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t h = 0; h < heads; ++h) {
      EXPECT_EQ(at[static_cast<size_t>(b) * heads + h], std::max(0, row_pages[b])) << "row " << b;
      EXPECT_EQ(split[static_cast<size_t>(b) * heads + h], plan.row_splits[b]) << "row " << b;
    }
    if (plan.row_splits[b] > 1) {
      EXPECT_EQ(plan.partial_offset[b], next_partial) << "row " << b;
      next_partial += plan.row_splits[b];
    }
  }
  EXPECT_EQ(next_partial, plan.num_partials);
}

TEST(BalancedWorkListTest, OneCtaTakesEveryRowAndEmptyRowsGetATask) {
  const std::vector<int32_t> pages = {10, 0, 3};
  const BalancedCut cut = CutBalanced(pages, 1, 2);
  EXPECT_EQ(cut.ctas_per_head, 1);
  EXPECT_EQ(cut.max_cta_pages, 13);
  EXPECT_EQ(cut.max_cta_pieces, 3);
  StepPlan plan;
  BuildBalancedWorkList(pages, 2, cut, &plan);
  EXPECT_EQ(plan.row_splits, (std::vector<int32_t>{1, 1, 1}));
  EXPECT_EQ(plan.num_partials, 0);
  EXPECT_EQ(plan.cta_task_begin, (std::vector<int32_t>{0, 3, 6}));
  EXPECT_EQ(plan.tasks[1].page_begin, plan.tasks[1].page_end);  // the empty row
  ExpectBalancedWorkListCovers(pages, 2, cut, plan);
}

TEST(BalancedWorkListTest, CtasEndOneRowAndStartTheNext) {
  // 30 pages over 3 CTAs, a piece costing 1 page. A budget of 11 needs a fourth CTA
  // ([0,10) | [10,15) [0,4) | [4,14) | [14,15)); 12 fits: [0,11) | [11,15) [0,6) | [6,15).
  const std::vector<int32_t> pages = {15, 15};
  const BalancedCut cut = CutBalanced(pages, 3, 1);
  EXPECT_EQ(cut.budget_pages, 12);
  EXPECT_EQ(cut.ctas_per_head, 3);
  StepPlan plan;
  BuildBalancedWorkList(pages, 1, cut, &plan);
  EXPECT_EQ(plan.row_splits, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(plan.num_partials, 4);
  EXPECT_EQ(plan.partial_offset, (std::vector<int32_t>{0, 2}));
  ASSERT_EQ(plan.tasks.size(), 4u);
  EXPECT_EQ(plan.cta_task_begin, (std::vector<int32_t>{0, 1, 3, 4}));
  EXPECT_EQ(plan.tasks[1].row, 0);
  EXPECT_EQ(plan.tasks[2].row, 1);
  ExpectBalancedWorkListCovers(pages, 1, cut, plan);
}

TEST(BalancedWorkListTest, RandomRowsAreCoveredAndEveryCtaCarriesItsShare) {
  std::mt19937 rng(20261203);
  std::uniform_int_distribution<int32_t> len(0, 3000), heads(1, 8), batch(1, 24), ctas(1, 300), cost(0, 12);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> pages(batch(rng));
    for (int32_t& p : pages) p = len(rng) < 300 ? 0 : len(rng);
    const int32_t h = heads(rng), c = ctas(rng), f = cost(rng);
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    const BalancedCut cut = CutBalanced(pages, c, f);
    ASSERT_GE(cut.ctas_per_head, 1);
    ASSERT_LE(cut.ctas_per_head, c);
    int64_t total = 0;
    for (int32_t p : pages) total += p;
    // Every CTA but the last is closed only when a piece no longer fits, so the smallest budget
    // is at most the mean load with a piece's cost for every row and every CTA, plus one piece.
    const int64_t bound =
        (total + int64_t{f} * (static_cast<int64_t>(pages.size()) + c) + c - 1) / c + f + 1;
    EXPECT_LE(cut.budget_pages, std::max<int64_t>(bound, 1));
    EXPECT_LE(cut.max_cta_pages, cut.budget_pages);
    StepPlan plan;
    BuildBalancedWorkList(pages, h, cut, &plan);
    ExpectBalancedWorkListCovers(pages, h, cut, plan);
    // The strided list's fields are replaced, not left over.
    BuildWorkList(pages, h, 7, &plan);
    EXPECT_TRUE(plan.cta_task_begin.empty());
    EXPECT_EQ(plan.balanced_ctas, 0);
  }
}

TEST(WorkListTest, SplitsAndSlots) {
  const std::vector<int32_t> pages = {10, 0, 3};
  StepPlan plan;
  BuildWorkList(pages, 2, 4, &plan);
  EXPECT_EQ(plan.pages_per_task, 4);
  EXPECT_EQ(plan.row_splits, (std::vector<int32_t>{3, 1, 1}));
  EXPECT_EQ(plan.partial_offset, (std::vector<int32_t>{0, 0, 0}));
  EXPECT_EQ(plan.num_partials, 3);
  EXPECT_EQ(plan.tasks.size(), 2u * (3 + 1 + 1));
  EXPECT_LE(plan.tasks.front().page_end - plan.tasks.front().page_begin, 4);
  for (size_t i = 1; i < plan.tasks.size(); ++i) {  // largest first
    const DecodeTask &prev = plan.tasks[i - 1], &cur = plan.tasks[i];
    EXPECT_GE(prev.page_end - prev.page_begin, cur.page_end - cur.page_begin);
  }
  ExpectWorkListCovers(pages, 2, plan);
}

TEST(WorkListTest, UsageMatchesTheBuiltListOnRandomRows) {
  std::mt19937 rng(20260701);
  std::uniform_int_distribution<int32_t> len(0, 300), cap(1, 64), heads(1, 8), batch(1, 24);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> pages(batch(rng));
    for (int32_t& p : pages) p = len(rng) < 30 ? 0 : len(rng);
    const int32_t h = heads(rng);
    StepPlan plan;
    BuildWorkList(pages, h, cap(rng), &plan);
    ExpectWorkListCovers(pages, h, plan);
  }
}

TEST(WorkListTest, TasksAreLargestFirstInTaskOrderAmongEqualSizes) {
  // The definition: every (row, KV head, split) task in that order, then a stable sort by size,
  // largest first. BuildWorkList must produce exactly this list (the kernels' tail depends on it).
  std::mt19937 rng(20260702);
  std::uniform_int_distribution<int32_t> len(0, 400), cap(1, 80), heads(1, 8), batch(1, 24);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> pages(batch(rng));
    for (int32_t& p : pages) p = len(rng) < 30 ? 0 : len(rng);
    const int32_t h = heads(rng), c = cap(rng);
    StepPlan plan;
    BuildWorkList(pages, h, c, &plan);
    std::vector<DecodeTask> want;
    for (int32_t b = 0; b < static_cast<int32_t>(pages.size()); ++b) {
      const int32_t splits = pages[b] > 0 ? (pages[b] + c - 1) / c : 1;
      for (int32_t k = 0; k < h; ++k) {
        for (int32_t s = 0; s < splits; ++s) {
          want.push_back(DecodeTask{b, k, s, splits, pages[b] * s / splits, pages[b] * (s + 1) / splits});
        }
      }
    }
    std::stable_sort(want.begin(), want.end(), [](const DecodeTask& a, const DecodeTask& b) {
      return a.page_end - a.page_begin > b.page_end - b.page_begin;
    });
    ASSERT_EQ(plan.tasks.size(), want.size()) << "trial " << trial;
    for (size_t i = 0; i < want.size(); ++i) {
      const DecodeTask& g = plan.tasks[i];
      const DecodeTask& w = want[i];
      ASSERT_TRUE(g.row == w.row && g.kv_head == w.kv_head && g.split == w.split && g.num_splits == w.num_splits &&
                  g.page_begin == w.page_begin && g.page_end == w.page_end)
          << "trial " << trial << " task " << i;
    }
  }
}

TEST(PagesPerTaskForTest, SmallestTaskSizeThatFitsTheTarget) {
  const std::vector<int32_t> pages = {10, 0, 3};
  // Task size 4 gives (3 + 1 + 1) x 2 = 10 tasks, size 3 gives (4 + 1 + 1) x 2 = 12.
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 10), 4);
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 11), 4);
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 12), 3);
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 1000), 1);
  // Cannot fit (one task per (row, KV head) is 6) or no target: the longest row.
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 1), 10);
  EXPECT_EQ(PagesPerTaskFor(pages, 2, 0), 10);
  EXPECT_EQ(PagesPerTaskFor(std::vector<int32_t>{0, 0}, 8, 4), 1);
  // Exact, not ceil(total / target): rows {5, 5, 5} x 1 head for 4 tasks need size 5 (3 tasks);
  // ceil(15 / 4) = 4 would cut every row in two (6 tasks).
  EXPECT_EQ(PagesPerTaskFor(std::vector<int32_t>{5, 5, 5}, 1, 4), 5);
  EXPECT_LE(WorkListUsageFor(std::vector<int32_t>{5, 5, 5}, 1, 5).tasks, 4);
}

TEST(FitTest, SplitsClampToThePartialSlotsPerRow) {
  PlanLimits limits;
  EXPECT_EQ(FitNumSplits(128, 64, limits), 128);  // unbounded
  EXPECT_EQ(FitNumSplits(0, 64, limits), 1);
  limits.max_partial_slots = 4096;
  EXPECT_EQ(FitNumSplits(128, 64, limits), 64);
  EXPECT_EQ(FitNumSplits(32, 64, limits), 32);
  EXPECT_EQ(FitNumSplits(128, 5000, limits), 1);  // one split uses no partial slots
}

TEST(FitTest, TaskSizeDoublesUntilTheWorkListFits) {
  const std::vector<int32_t> pages = {100, 100};
  PlanLimits limits;
  EXPECT_EQ(FitPagesPerTask(pages, 8, 1, limits), 1);  // unbounded
  EXPECT_EQ(FitPagesPerTask(pages, 8, 0, limits), 1);
  // Partials 2 x ceil(100 / size) <= 50 needs size >= 4: 1 -> 2 -> 4.
  limits.max_partial_slots = 50;
  EXPECT_EQ(FitPagesPerTask(pages, 8, 1, limits), 4);
  EXPECT_EQ(FitPagesPerTask(pages, 8, 3, limits), 6);  // 3 -> 6, not the smallest size that fits
  // Tasks 8 x 2 x ceil(100 / size) <= 64 needs size >= 25: 1 -> ... -> 32.
  limits.max_tasks = 64;
  EXPECT_EQ(FitPagesPerTask(pages, 8, 1, limits), 32);
  // Even one task per (row, KV head) (16) exceeds 10: doubling stops once no row is cut.
  limits.max_tasks = 10;
  EXPECT_EQ(FitPagesPerTask(pages, 8, 1, limits), 128);
  EXPECT_EQ(WorkListUsageFor(pages, 8, 128).partials, 0);
}

// The plan the scheduler returns is the one the backend runs: it fits the limits, its work list is
// built at its task size, and its prediction is for that plan.
void ExpectPlanFits(const StepShape& s, const StepPlan& p) {
  const PlanLimits& limits = s.device.limits;
  const auto batch = static_cast<int64_t>(s.row_tokens.size());
  const std::vector<int32_t> pages = RowPages(s);
  CostModel model(DefaultCostProfile());
  if (p.kernel == KernelId::kSequenceSplit) {
    EXPECT_GE(p.num_splits, 1);
    if (p.num_splits > 1) EXPECT_LE(p.num_splits * batch, limits.max_partial_slots);
    EXPECT_TRUE(p.tasks.empty());
    EXPECT_DOUBLE_EQ(p.predicted_us, model.SequenceSplit(s, p.num_splits).us);
  } else if (p.kernel == KernelId::kWorkQueue) {
    ASSERT_GE(p.pages_per_task, 1);
    EXPECT_LE(p.num_partials, limits.max_partial_slots);
    EXPECT_LE(static_cast<int64_t>(p.tasks.size()), limits.max_tasks);
    if (p.balanced_ctas > 0) {
      const ArmCost c = model.BalancedWorkQueue(s, p.balanced_ctas);
      const BalancedCut cut =
          CutBalanced(pages, p.balanced_ctas / s.model.num_kv_heads, model.PieceCostPages(s));
      ExpectBalancedWorkListCovers(pages, s.model.num_kv_heads, cut, p);
      EXPECT_EQ(c.balanced_ctas, p.balanced_ctas);
      EXPECT_DOUBLE_EQ(p.predicted_us, c.us);
    } else {
      ExpectWorkListCovers(pages, s.model.num_kv_heads, p);
      EXPECT_DOUBLE_EQ(p.predicted_us, model.WorkQueue(s, p.pages_per_task).us);
    }
  } else {
    EXPECT_TRUE(p.tasks.empty());
    EXPECT_EQ(p.num_splits, 1);
  }
}

TEST(SchedulerLimitsTest, PlansAlwaysFitTheBackendsLimits) {
  std::mt19937 rng(20260702);
  std::uniform_int_distribution<int64_t> tokens(0, 40000);
  std::uniform_int_distribution<int32_t> batch(1, 96), slots(16, 4096), tasks(800, 20000);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<int64_t> rows(batch(rng));
    for (int64_t& t : rows) t = tokens(rng);
    StepShape s = Shape(std::move(rows));
    s.device.limits.max_partial_slots = slots(rng);
    s.device.limits.max_tasks = tasks(rng);  // >= 96 rows x 8 heads: every step can fit
    for (std::optional<KernelId> k : {std::optional<KernelId>(), std::optional<KernelId>(KernelId::kSequenceSplit),
                                      std::optional<KernelId>(KernelId::kWorkQueue)}) {
      SCOPED_TRACE(testing::Message() << "trial " << trial << " fixed " << (k ? KernelName(*k) : "none"));
      ExpectPlanFits(s, GpuScheduler(k).Plan(s));
    }
  }
}

TEST(SchedulerLimitsTest, PinnedParametersAreClampedAndCoarsened) {
  Scheduler::Options o;
  o.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  o.fixed_kernel = KernelId::kSequenceSplit;
  o.fixed_parameter = 128;
  StepShape s = Shape(std::vector<int64_t>(64, 8192));  // 64 rows x 512 pages
  s.device.limits.max_partial_slots = 4096;
  s.device.limits.max_tasks = 1 << 20;
  StepPlan p = Scheduler::Create(o)->Plan(s);
  EXPECT_EQ(p.num_splits, 64);  // 128 x 64 rows would need 8192 partial slots
  ExpectPlanFits(s, p);

  o.fixed_kernel = KernelId::kWorkQueue;
  o.fixed_parameter = 1;  // 64 rows x 512 partials; size 8 is the first doubling that fits (64 x 64 = 4096)
  p = Scheduler::Create(o)->Plan(s);
  EXPECT_EQ(p.pages_per_task, 8);
  EXPECT_EQ(p.num_partials, 64 * 64);
  ExpectPlanFits(s, p);

  s.device.limits.max_tasks = 64 * 8 * 4;  // at most 4 tasks per (row, KV head)
  p = Scheduler::Create(o)->Plan(s);
  EXPECT_EQ(p.pages_per_task, 128);
  ExpectPlanFits(s, p);
}

TEST(SchedulerLimitsTest, AdaptivePlanOfAWideBatchIsClamped) {
  // B96 x 2K with 256 partial slots: they hold at most 2 splits of each of the 96 rows.
  StepShape s = Shape(std::vector<int64_t>(96, 2048));
  s.device.limits.max_partial_slots = 256;
  s.device.limits.max_tasks = 1 << 20;
  for (KernelId k : {KernelId::kSequenceSplit, KernelId::kWorkQueue}) {
    const StepPlan p = GpuScheduler(k).Plan(s);
    ExpectPlanFits(s, p);
    if (k == KernelId::kSequenceSplit) EXPECT_LE(p.num_splits, 2);
    if (k == KernelId::kWorkQueue) EXPECT_LE(p.num_partials, 256);
  }
}

}  // namespace
}  // namespace pkv::scheduler
