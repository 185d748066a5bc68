#include "scheduler/scheduler.h"

#include "gtest/gtest.h"

namespace pkv::scheduler {
namespace {

TEST(SchedulerTest, RejectsFixedKernelTheBackendLacks) {
  Scheduler::Options o;
  o.available = {KernelId::kReference};
  o.fixed_kernel = KernelId::kWorkQueue;
  EXPECT_EQ(Scheduler::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.available.clear();
  o.fixed_kernel.reset();
  EXPECT_FALSE(Scheduler::Create(o).ok());
}

TEST(SchedulerTest, CpuPlansTheReference) {
  auto s = Scheduler::Create(Scheduler::Options{});
  ASSERT_TRUE(s.ok());
  StepShape shape;
  shape.row_tokens = {100, 2000};
  EXPECT_EQ(s->Plan(shape).kernel, KernelId::kReference);
}

}  // namespace
}  // namespace pkv::scheduler
