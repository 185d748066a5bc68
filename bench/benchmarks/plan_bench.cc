// bench/benchmarks/plan_bench.cc — `pkv-plan-bench` (Google Benchmark): host cost of planning one token step
// (Scheduler::Plan over every route and parameter, including the work-queue task list it builds) for
// the paper's workload shapes. The plan is made once per token step and reused by all layers, so
// it should stay far below the step's GPU time (about 9 ms for 32 layers of B8 bimodal on an H100,
// bench/results/serving-b3b088f/trace.md).
#include <benchmark/benchmark.h>

#include <vector>

#include "common/workload.h"
#include "scheduler/cost_profile.h"
#include "scheduler/scheduler.h"

namespace {

pkv::scheduler::StepShape ShapeFor(pkv::WorkloadKind kind, int batch) {
  pkv::scheduler::StepShape s;
  s.model.num_q_heads = 32;
  s.model.num_kv_heads = 8;
  s.model.head_dim = 128;
  s.model.page_size = 16;
  s.device.is_gpu = true;
  for (const auto& r : pkv::GenerateWorkload(kind, batch, 20260623)) s.row_tokens.push_back(r.input_tokens + 1);
  return s;
}

void BM_Plan(benchmark::State& state) {
  const auto kind = static_cast<pkv::WorkloadKind>(state.range(0));
  const int batch = static_cast<int>(state.range(1));
  pkv::scheduler::Scheduler::Options o;
  o.available = {pkv::KernelId::kPerRequest, pkv::KernelId::kSequenceSplit, pkv::KernelId::kWorkQueue};
  auto sched = pkv::scheduler::Scheduler::Create(o);
  const pkv::scheduler::StepShape shape = ShapeFor(kind, batch);
  for (auto _ : state) {
    pkv::scheduler::StepPlan plan = sched->Plan(shape);
    benchmark::DoNotOptimize(plan.tasks.data());
    benchmark::DoNotOptimize(plan);
  }
  state.SetLabel(std::string(pkv::WorkloadKindName(kind)) + " B" + std::to_string(batch));
}

BENCHMARK(BM_Plan)
    ->Args({static_cast<int>(pkv::WorkloadKind::kBimodal), 8})
    ->Args({static_cast<int>(pkv::WorkloadKind::kUniform), 8})
    ->Args({static_cast<int>(pkv::WorkloadKind::kZipf), 8})
    ->Args({static_cast<int>(pkv::WorkloadKind::kBimodal), 4})
    ->Args({static_cast<int>(pkv::WorkloadKind::kBucketed), 1})
    ->Args({static_cast<int>(pkv::WorkloadKind::kUniform), 64});

}  // namespace

BENCHMARK_MAIN();
