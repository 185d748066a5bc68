#include "bench/benchmarks/kernel_bench.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/benchmarks/device_utils.h"
#ifdef PKV_WITH_FLASHINFER
#include "bench/flashinfer/flashinfer_arm.h"
#endif
#include "common/decode_types.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/decode_attention.h"
#include "scheduler/cost_profile.h"
#include "scheduler/scheduler.h"
#include "scheduler/step_plan.h"
#include "scheduler/work_list.h"

namespace pkv::bench {
namespace {

// The limits the "planned" configuration is fitted to: the CUDA backend's defaults (partial slots
// of its workspace, CudaBackendOptions::max_partial_slots; tasks its descriptor holds).
constexpr int32_t kPlanMaxPartialSlots = 4096;
constexpr int64_t kPlanMaxTasks = int64_t{1} << 20;

using kernels::DecodeParams;
namespace kc = kernels::cuda;

// One line per planned launch of a diagnostic build: CTA starts and ends relative to the first
// start (us), and the CTAs' mean busy share of the span.
void PrintTimeline(const std::string& name, const std::vector<std::pair<uint64_t, uint64_t>>& tl) {
  uint64_t t0 = tl.front().first, t1 = 0;
  for (const auto& [a, b] : tl) {
    t0 = std::min(t0, a);
    t1 = std::max(t1, b);
  }
  std::vector<double> starts, ends;
  double busy = 0;
  for (const auto& [a, b] : tl) {
    starts.push_back((a - t0) * 1e-3);
    ends.push_back((b - t0) * 1e-3);
    busy += (b - a) * 1e-3;
  }
  std::sort(starts.begin(), starts.end());
  std::sort(ends.begin(), ends.end());
  auto q = [](const std::vector<double>& v, double f) { return v[static_cast<size_t>(f * (v.size() - 1))]; };
  const double span = (t1 - t0) * 1e-3;
  std::printf("#   %s CTA timeline: %zu CTAs, span %.1f us; starts p50 / p90 / max %.1f / %.1f / %.1f us; "
              "ends min / p10 / p50 / p90 / max %.1f / %.1f / %.1f / %.1f / %.1f us; mean CTA busy %.1f%% of the span\n",
              name.c_str(), tl.size(), span, q(starts, 0.5), q(starts, 0.9), starts.back(), ends.front(), q(ends, 0.1),
              q(ends, 0.5), q(ends, 0.9), ends.back(), 100.0 * busy / (tl.size() * span));
}

#define BENCH_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, \
                   #expr);                                                                       \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

// A work-queue plan's arrays in device memory (tasks, row splits, partial offsets, CTA ranges),
// pointed to by the DecodeParams they were uploaded for; freed with the object.
class PlanMemory {
 public:
  PlanMemory() = default;
  PlanMemory(const PlanMemory&) = delete;
  PlanMemory& operator=(const PlanMemory&) = delete;
  ~PlanMemory() {
    for (void* m : mem_) cudaFree(m);
  }
  void Upload(const scheduler::StepPlan& plan, DecodeParams* p) {
    p->tasks = static_cast<const DecodeTask*>(Put(plan.tasks.data(), plan.tasks.size() * sizeof(DecodeTask)));
    p->num_tasks = static_cast<int32_t>(plan.tasks.size());
    p->row_splits = static_cast<const int32_t*>(Put(plan.row_splits.data(), plan.row_splits.size() * 4));
    p->partial_offset = static_cast<const int32_t*>(Put(plan.partial_offset.data(), plan.partial_offset.size() * 4));
    p->num_partials = plan.num_partials;
    if (plan.balanced_ctas > 0) {
      p->cta_task_begin = static_cast<const int32_t*>(Put(plan.cta_task_begin.data(), plan.cta_task_begin.size() * 4));
      p->num_ctas = plan.balanced_ctas;
    }
  }

 private:
  const void* Put(const void* src, size_t bytes) {
    void* d = nullptr;
    BENCH_CUDA(cudaMalloc(&d, std::max<size_t>(bytes, 4)));
    mem_.push_back(d);
    BENCH_CUDA(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
    return d;
  }
  std::vector<void*> mem_;
};

// ---- the MISSION.md workloads (prompts rounded up to a multiple of 16) ----
int64_t Round16(int64_t x) { return (x + 15) / 16 * 16; }
int64_t Uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
struct Request {
  int64_t prompt;
  int64_t decode;
};
Request MakeRequest(const std::string& workload, int64_t index, std::mt19937_64& rng) {
  if (workload == "uniform") return {Round16(Uniform(rng, 4096, 32768)), Uniform(rng, 16, 96)};
  if (workload == "bimodal") {
    if (index % 4 == 0) return {Round16(Uniform(rng, 24576, 65536)), Uniform(rng, 32, 128)};
    return {Round16(Uniform(rng, 2048, 12288)), Uniform(rng, 8, 64)};
  }
  if (workload == "zipf") {
    const int64_t r = Uniform(rng, 1, 32);
    const int64_t len = 2048 + static_cast<int64_t>(65536.0 / std::sqrt(static_cast<double>(r))) + Uniform(rng, -512, 512);
    return {Round16(std::max<int64_t>(len, 1024)), Uniform(rng, 8, 128)};
  }
  // bucketed
  static constexpr int64_t kBuckets[4] = {8192, 16384, 32768, 65536};
  return {kBuckets[index % 4], Uniform(rng, 32, 96)};
}
// One decode step of `batch` rows: row j serves request (step * batch + j), part-way decoded.
std::vector<int64_t> MixedStep(const std::string& workload, int batch, int step, uint64_t seed) {
  std::mt19937_64 rng(seed + 7919ULL * step);
  std::vector<int64_t> lengths;
  for (int j = 0; j < batch; ++j) {
    const int64_t index = static_cast<int64_t>(step) * batch + j;
    const Request r = MakeRequest(workload, index, rng);
    lengths.push_back(r.prompt + Uniform(rng, 0, r.decode - 1) + 1);
  }
  return lengths;
}

struct Case {
  std::string name;
  std::string group;  // "grid" or the workload name (aggregated in the summary)
  std::vector<int64_t> lengths;
};

struct Config {
  KernelId kernel;
  int splits = 1;       // kSequenceSplit
  int64_t target = 0;   // kWorkQueue target task count (strided) or CTA count (balanced)
  kc::MergeMode merge = kc::MergeMode::kFused;
  bool balanced = false;  // kWorkQueue: every CTA the same pages (scheduler's CutBalanced)
  std::string Label() const {
    switch (kernel) {
      case KernelId::kPerRequest: return "per_request";
      case KernelId::kSequenceSplit:
        return std::string(merge == kc::MergeMode::kFused ? "split_fused/S" : "split_sep/S") + std::to_string(splits);
      default:
        return std::string(merge == kc::MergeMode::kFused ? "wq_fused" : "wq_sep") + (balanced ? "/C" : "/T") +
               std::to_string(target);
    }
  }
  std::string Family() const {
    switch (kernel) {
      case KernelId::kPerRequest: return "per_request";
      case KernelId::kSequenceSplit: return "sequence_split";
      default: return merge == kc::MergeMode::kFused ? "workqueue_fused" : "workqueue_separate";
    }
  }
};

struct Result {
  std::string label;
  std::string family;
  double median_us = 0;
  int launches = 1;
};

struct Ceilings {
  double stream_gbps = 0;
  double d2d_gbps = 0;  // (read + write) bytes / time
};

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class Bench {
 public:
  explicit Bench(const KernelBenchOptions& o) : o_(o) {}

  int Run();

 private:
  Ceilings MeasureCeilings();
  std::vector<Case> BuildCases() const;
  void RunCase(DType dtype, const Case& c, int64_t case_seed);
  // The scheduler's view of one case's step, fitted to the CUDA backend's default limits.
  scheduler::StepShape PlanShape(const std::vector<int64_t>& lengths, int32_t page_size, DType dtype) const;

  const KernelBenchOptions& o_;
  cudaStream_t stream_ = nullptr;
  cudaDeviceProp prop_{};
  void* pool_ = nullptr;
  int64_t pool_pages_ = 0;
  int64_t page_bytes_ = 0;
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  void* q_ = nullptr;
  void* out_ = nullptr;
  float* lse_ = nullptr;
  uint32_t* sink_ = nullptr;
  std::vector<cudaEvent_t> ev_start_, ev_stop_;
  std::ofstream csv_;
  std::ostringstream table_;
  std::map<std::string, std::pair<double, double>> agg_;  // dtype|group -> (bytes, best us)
  std::map<std::string, double> agg_fi_;                   // dtype|group -> FlashInfer best us (sum)
#ifdef PKV_WITH_FLASHINFER
  std::vector<std::unique_ptr<FlashInferArm>> fi_arms_;  // per dtype: fi_decode, fi_prefill (those that exist)
#endif
  std::unique_ptr<scheduler::Scheduler> scheduler_;  // plans the "planned" configuration
  std::map<std::string, double> agg_planned_;        // dtype|group -> planned us (sum)
  Ceilings start_{}, end_{};
  int runs_ = 50;
  double floor_us_ = 0;
};

scheduler::StepShape Bench::PlanShape(const std::vector<int64_t>& lengths, int32_t page_size, DType dtype) const {
  scheduler::StepShape shape;
  shape.model.num_layers = 1;
  shape.model.num_q_heads = o_.num_q_heads;
  shape.model.num_kv_heads = o_.num_kv_heads;
  shape.model.head_dim = o_.head_dim;
  shape.model.page_size = page_size;
  shape.model.dtype = dtype;
  shape.row_tokens = lengths;
  shape.device.name = prop_.name;
  shape.device.is_gpu = true;
  shape.device.num_sms = prop_.multiProcessorCount;
  shape.device.limits.max_partial_slots = kPlanMaxPartialSlots;
  shape.device.limits.max_tasks = kPlanMaxTasks;
  return shape;
}

Ceilings Bench::MeasureCeilings() {
  Ceilings c;
  const size_t bytes = std::min<size_t>(static_cast<size_t>(pool_pages_) * page_bytes_, size_t{4} << 30) / 256 * 256;
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  // The streaming ceiling: the best of a few launch shapes of a plain 16-byte read kernel.
  std::vector<float> t;
  for (int mult : {2, 4, 8}) {
    for (int block : {512, 1024}) {
      for (int unroll : {4, 8}) {
        t.clear();
        for (int i = 0; i < 8; ++i) {
          BENCH_CUDA(cudaEventRecord(a, stream_));
          BENCH_CUDA(StreamRead(pool_, bytes, sink_, prop_.multiProcessorCount * mult, block, unroll, stream_));
          BENCH_CUDA(cudaEventRecord(b, stream_));
          BENCH_CUDA(cudaEventSynchronize(b));
          float ms = 0;
          BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
          if (i >= 2) t.push_back(ms);
        }
        c.stream_gbps = std::max(c.stream_gbps, bytes / (Median(t) * 1e-3) / 1e9);
      }
    }
  }
  t.clear();
  const size_t half = bytes / 2 / 256 * 256;
  char* base = static_cast<char*>(pool_);
  for (int i = 0; i < 12; ++i) {
    BENCH_CUDA(cudaEventRecord(a, stream_));
    BENCH_CUDA(cudaMemcpyAsync(base + half, base, half, cudaMemcpyDeviceToDevice, stream_));
    BENCH_CUDA(cudaEventRecord(b, stream_));
    BENCH_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    if (i >= 2) t.push_back(ms);
  }
  c.d2d_gbps = 2.0 * half / (Median(t) * 1e-3) / 1e9;
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return c;
}

std::vector<Case> Bench::BuildCases() const {
  std::vector<Case> cases;
  const double token_bytes = 2.0 * o_.num_kv_heads * o_.head_dim * 2;
  if (o_.grid) {
    for (int b : o_.batches) {
      std::vector<int64_t> ctxs = o_.contexts;
      if (b == 1) ctxs.insert(ctxs.end(), o_.b1_extra.begin(), o_.b1_extra.end());
      std::sort(ctxs.begin(), ctxs.end());
      ctxs.erase(std::unique(ctxs.begin(), ctxs.end()), ctxs.end());
      for (int64_t ctx : ctxs) {
        if (token_bytes * ctx * b > o_.max_kv_gib * (1LL << 30)) continue;
        cases.push_back(Case{"B" + std::to_string(b) + "x" + std::to_string(ctx), "grid",
                             std::vector<int64_t>(b, ctx)});
      }
    }
  }
  if (o_.mixed) {
    const struct {
      const char* workload;
      int batch;
    } kMixed[] = {{"uniform", 8}, {"bimodal", 8}, {"zipf", 8}, {"bimodal", 4}};
    for (const auto& m : kMixed) {
      for (int s = 0; s < o_.mixed_steps; ++s) {
        const std::string group = "B" + std::to_string(m.batch) + "_" + m.workload;
        cases.push_back(Case{group + "/s" + std::to_string(s), group, MixedStep(m.workload, m.batch, s, o_.seed)});
      }
    }
    for (int s = 0; s < 4; ++s) {  // B1 bucketed: one step per bucket (8K, 16K, 32K, 64K)
      cases.push_back(Case{"B1_bucketed/s" + std::to_string(s), "B1_bucketed", MixedStep("bucketed", 1, s, o_.seed)});
    }
  }
  return cases;
}

void Bench::RunCase(DType dtype, const Case& c, int64_t case_seed) {
  const int B = static_cast<int>(c.lengths.size());
  const int P = o_.page_size;
  std::vector<int32_t> indptr{0}, last, row_pages;
  int64_t total_pages = 0, tokens = 0;
  for (int64_t len : c.lengths) {
    const int64_t pages = (len + P - 1) / P;
    total_pages += pages;
    tokens += len;
    indptr.push_back(static_cast<int32_t>(total_pages));
    row_pages.push_back(static_cast<int32_t>(pages));
    last.push_back(static_cast<int32_t>(len - (pages - 1) * P));
  }
  const double kv_bytes = static_cast<double>(tokens) * 2 * o_.num_kv_heads * o_.head_dim * 2;
  // Rotate page-table copies (disjoint random pages) so the footprint exceeds L2 several times.
  const double want = std::max<double>(4.0 * prop_.l2CacheSize, 256e6);
  int copies = static_cast<int>(std::ceil(want / (total_pages * page_bytes_)));
  copies = std::clamp<int>(copies, 1, static_cast<int>(pool_pages_ / total_pages));
  copies = std::min(copies, 64);
  std::mt19937_64 rng(case_seed);
  std::vector<int32_t> perm(pool_pages_);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> indices(perm.begin(), perm.begin() + total_pages * copies);

  int32_t *d_indptr, *d_indices, *d_last;
  BENCH_CUDA(cudaMalloc(&d_indptr, indptr.size() * 4));
  BENCH_CUDA(cudaMalloc(&d_indices, indices.size() * 4));
  BENCH_CUDA(cudaMalloc(&d_last, last.size() * 4));
  BENCH_CUDA(cudaMemcpy(d_indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(d_indices, indices.data(), indices.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(d_last, last.data(), last.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(FillNormal(q_, static_cast<size_t>(B) * o_.num_q_heads * o_.head_dim, dtype == DType::kBF16,
                        case_seed, stream_));

  DecodeParams base;
  base.dtype = dtype;
  base.batch = B;
  base.num_q_heads = o_.num_q_heads;
  base.num_kv_heads = o_.num_kv_heads;
  base.head_dim = o_.head_dim;
  base.page_size = P;
  base.sm_scale = 1.f / std::sqrt(static_cast<float>(o_.head_dim));
  base.q = q_;
  base.kv = pool_;
  base.num_pages = pool_pages_;
  base.page_indptr = d_indptr;
  base.page_indices = d_indices;
  base.last_page_len = d_last;
  base.out = out_;
  base.lse = lse_;

  // Configurations: per-request; split counts around "one wave"; work queue at 1/2/4 waves.
  const int grid = kc::PersistentGridSize(base);
  const int max_pages = *std::max_element(row_pages.begin(), row_pages.end());
  std::vector<Config> configs{Config{KernelId::kPerRequest}};
  {
    int s0 = 1;
    while (static_cast<int64_t>(s0) * 2 * B * o_.num_kv_heads <= grid) s0 *= 2;
    for (int s : {s0 / 2, s0, s0 * 2, s0 * 4}) {
      if (s >= 2 && s <= max_pages) {
        configs.push_back(Config{KernelId::kSequenceSplit, s, 0, kc::MergeMode::kFused});
        configs.push_back(Config{KernelId::kSequenceSplit, s, 0, kc::MergeMode::kSeparate});
      }
    }
  }
  for (int64_t waves : {1, 2, 4}) {
    configs.push_back(Config{KernelId::kWorkQueue, 1, waves * grid, kc::MergeMode::kFused});
    configs.push_back(Config{KernelId::kWorkQueue, 1, waves * grid, kc::MergeMode::kSeparate});
  }
  // One balanced wave: `grid` CTAs, each the same pages (a task's start priced as the planner does).
  configs.push_back(Config{KernelId::kWorkQueue, 1, grid, kc::MergeMode::kFused, true});
  configs.push_back(Config{KernelId::kWorkQueue, 1, grid, kc::MergeMode::kSeparate, true});

  // Warm-up, a spin kernel to queue behind, then runs_ launches each between two events: median us.
  auto time_launches = [&](const auto& launch) {
    for (int i = 0; i < o_.warmup; ++i) launch(i);
    BENCH_CUDA(Spin(2'000'000, stream_));  // let the timed launches queue up behind it
    for (int i = 0; i < runs_; ++i) {
      BENCH_CUDA(cudaEventRecord(ev_start_[i], stream_));
      launch(i + o_.warmup);
      BENCH_CUDA(cudaEventRecord(ev_stop_[i], stream_));
    }
    BENCH_CUDA(cudaStreamSynchronize(stream_));
    BENCH_CUDA(cudaGetLastError());
    std::vector<float> t(runs_);
    for (int i = 0; i < runs_; ++i) BENCH_CUDA(cudaEventElapsedTime(&t[i], ev_start_[i], ev_stop_[i]));
    return Median(t) * 1e3;
  };

  std::vector<Result> results;
  for (const Config& cfg : configs) {
    DecodeParams p = base;
    PlanMemory plan_mem;
    if (cfg.kernel == KernelId::kSequenceSplit) p.num_splits = cfg.splits;
    if (cfg.kernel == KernelId::kWorkQueue) {
      // The scheduler's work list (scheduler/work_list.h): the task size for one wave of `target`
      // CTAs, or the balanced cut over `target` CTAs.
      scheduler::StepPlan plan;
      if (cfg.balanced) {
        const int32_t per_head = std::max<int32_t>(1, static_cast<int32_t>(cfg.target) / o_.num_kv_heads);
        const int32_t cost = scheduler_->cost_model().PieceCostPages(PlanShape(c.lengths, P, dtype));
        scheduler::BuildBalancedWorkList(row_pages, o_.num_kv_heads, scheduler::CutBalanced(row_pages, per_head, cost),
                                         &plan);
      } else {
        const int32_t ppt = scheduler::PagesPerTaskFor(row_pages, o_.num_kv_heads, cfg.target);
        scheduler::BuildWorkList(row_pages, o_.num_kv_heads, ppt, &plan);
      }
      plan_mem.Upload(plan, &p);
    }
    const bool ok = kc::CanImplement(cfg.kernel, p).ok() && kc::WorkspaceBytes(cfg.kernel, p) <= ws_bytes_;
    if (ok) {
      auto launch = [&](int i) {
        DecodeParams pi = p;
        pi.page_indices = d_indices + static_cast<int64_t>(i % copies) * total_pages;
        const absl::Status st = kc::Launch(cfg.kernel, pi, ws_, stream_, cfg.merge);
        if (!st.ok()) {
          std::fprintf(stderr, "launch failed: %s\n", std::string(st.message()).c_str());
          std::exit(1);
        }
      };
      results.push_back(Result{cfg.Label(), cfg.Family(), time_launches(launch), kc::LaunchesPerCall(cfg.kernel, p, cfg.merge)});
    }
  }
  // FlashInfer's paths on the same inputs and rotated page tables, timed the same way. Its planner
  // runs once per case on the host page table (outside the timed region), as once per token step.
  std::vector<Result> fi_results;
#ifdef PKV_WITH_FLASHINFER
  for (const auto& arm : fi_arms_) {
    const absl::Status planned = arm->Plan(indptr, stream_);
    if (!planned.ok()) {
      std::fprintf(stderr, "%s plan failed: %s\n", FlashInferPathName(arm->options().path),
                   std::string(planned.message()).c_str());
      std::exit(1);
    }
    auto launch = [&](int i) {
      DecodeParams pi = base;
      pi.page_indices = d_indices + static_cast<int64_t>(i % copies) * total_pages;
      const absl::Status st = arm->Run(pi, stream_);
      if (!st.ok()) {
        std::fprintf(stderr, "%s launch failed: %s\n", FlashInferPathName(arm->options().path),
                     std::string(st.message()).c_str());
        std::exit(1);
      }
    };
    const std::string name = FlashInferPathName(arm->options().path);
    fi_results.push_back(Result{name + (arm->planned_split_kv() ? "/split" : ""), name, time_launches(launch),
                                arm->planned_split_kv() ? 2 : 1});
  }
#endif
  // The configuration the engine runs: the scheduler's plan for this step (route, split count or
  // task size and work list, fitted to the CUDA backend's default limits), timed the same way.
  // It is one of the searched configurations or near one; `best` below is the search's pick (an
  // oracle the engine does not run).
  Result planned_result;
  {
    const scheduler::StepPlan plan = scheduler_->Plan(PlanShape(c.lengths, P, dtype));
    DecodeParams p = base;
    PlanMemory plan_mem;
    std::string label = "planned:";
    if (plan.kernel == KernelId::kSequenceSplit) {
      p.num_splits = plan.num_splits;
      label += (plan.separate_merge ? "split_sep/S" : "split_fused/S") + std::to_string(plan.num_splits);
    } else if (plan.kernel == KernelId::kWorkQueue) {
      plan_mem.Upload(plan, &p);
      const std::string wq = plan.separate_merge ? "wq_sep" : "wq_fused";
      label += plan.balanced_ctas > 0
                   ? wq + "/C" + std::to_string(plan.balanced_ctas) + "x" + std::to_string(plan.tasks.size())
                   : wq + "/P" + std::to_string(plan.pages_per_task) + "x" + std::to_string(plan.tasks.size());
    } else {
      label += "per_request";
    }
    if (!kc::CanImplement(plan.kernel, p).ok() || kc::WorkspaceBytes(plan.kernel, p) > ws_bytes_) {
      std::fprintf(stderr, "case %s: the planned %s does not fit the benchmark's workspace\n", c.name.c_str(),
                   label.c_str());
      std::exit(1);
    }
    const kc::MergeMode merge = plan.separate_merge ? kc::MergeMode::kSeparate : kc::MergeMode::kFused;
    auto launch = [&](int i) {
      DecodeParams pi = p;
      pi.page_indices = d_indices + static_cast<int64_t>(i % copies) * total_pages;
      const absl::Status st = kc::Launch(plan.kernel, pi, ws_, stream_, merge);  // the merge the engine runs
      if (!st.ok()) {
        std::fprintf(stderr, "planned launch failed: %s\n", std::string(st.message()).c_str());
        std::exit(1);
      }
    };
    planned_result = Result{label, "planned", time_launches(launch), kc::LaunchesPerCall(plan.kernel, p, merge)};
    // Diagnostic builds (PKV_CTA_TIMELINE): where the planned launch's time goes, from each CTA's
    // start and end on the GPU's global timer (one more launch, on its own).
    if (kc::ClearCtaTimeline(plan.kernel).ok()) {
      BENCH_CUDA(cudaStreamSynchronize(stream_));
      launch(0);
      BENCH_CUDA(cudaStreamSynchronize(stream_));
      absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> tl = kc::ReadCtaTimeline(plan.kernel);
      if (tl.ok() && !tl->empty()) PrintTimeline(c.name, *tl);
    }
  }
  // The paged-read ceiling of this case: the K and V of every (page, KV head) of the same rotated
  // page tables read with no arithmetic, by 16-byte loads (best of four grid sizes) and, on sm_90+,
  // by bulk copies of whole pieces into shared memory (best of 1-3 CTAs per SM); the faster of the
  // two. What any route could reach on these pages: it reads whole last pages, so it is a slightly
  // conservative ceiling.
  Result paged_result{"", "paged_read", 1e30, 1};
  {
    const int piece_bytes = P * o_.head_dim * static_cast<int>(DTypeSize(dtype));
    if (piece_bytes % 2048 == 0) {
      for (int grid : {prop_.multiProcessorCount * 2, prop_.multiProcessorCount * 4, prop_.multiProcessorCount * 8,
                       prop_.multiProcessorCount * 16}) {
        auto launch = [&](int i) {
          BENCH_CUDA(PagedRead(pool_, d_indices + static_cast<int64_t>(i % copies) * total_pages, total_pages,
                               o_.num_kv_heads, piece_bytes, sink_, grid, 256, stream_));
        };
        const double t = time_launches(launch);
        if (t < paged_result.median_us) paged_result = Result{"paged_read/G" + std::to_string(grid), "paged_read", t, 1};
      }
    }
    // Bulk copies: 16 pieces in flight per CTA must fit its shared memory (200 KB).
    if (prop_.major >= 9 && piece_bytes % 16 == 0 && piece_bytes * 16 <= 200 * 1024) {
      for (int per_sm : {1, 2, 3}) {
        const int grid = prop_.multiProcessorCount * per_sm;
        auto launch = [&](int i) {
          BENCH_CUDA(PagedReadBulk(pool_, d_indices + static_cast<int64_t>(i % copies) * total_pages, total_pages,
                                   o_.num_kv_heads, piece_bytes, sink_, grid, stream_));
        };
        const double t = time_launches(launch);
        std::printf("#   %s paged-read by bulk copies, %d CTAs/SM: %.1f us\n", c.name.c_str(), per_sm, t);
        if (t < paged_result.median_us) paged_result = Result{"paged_read_bulk/G" + std::to_string(grid), "paged_read", t, 1};
      }
    }
  }
  cudaFree(d_indptr);
  cudaFree(d_indices);
  cudaFree(d_last);

  // Per family: best configuration. Overall: best of ours (FlashInfer is reported beside it).
  std::map<std::string, Result> best_of;
  for (const auto* rs : {&results, &fi_results}) {
    for (const Result& r : *rs) {
      auto it = best_of.find(r.family);
      if (it == best_of.end() || r.median_us < it->second.median_us) best_of[r.family] = r;
    }
  }
  const Result* best = nullptr;
  for (const Result& r : results) {
    if (best == nullptr || r.median_us < best->median_us) best = &r;
  }
  const Result* fi_best = nullptr;
  for (const Result& r : fi_results) {
    if (fi_best == nullptr || r.median_us < fi_best->median_us) fi_best = &r;
  }
  // Speed ratios against FlashInfer (> 1: ours is faster) of the search's best configuration (an
  // oracle) and of the planned one; empty without FlashInfer.
  std::string speedup, planned_speedup;
  if (fi_best != nullptr) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.3f", fi_best->median_us / best->median_us);
    speedup = buf;
    std::snprintf(buf, sizeof(buf), "%.3f", fi_best->median_us / planned_result.median_us);
    planned_speedup = buf;
  }
  const double stream_gbps = start_.stream_gbps;  // same-run ceilings (start; the end is printed too)
  const double d2d_gbps = start_.d2d_gbps;
  const std::string dt(DTypeName(dtype));
  std::vector<const Result*> rows;
  for (const Result& r : results) rows.push_back(&r);
  for (const Result& r : fi_results) rows.push_back(&r);
  rows.push_back(&planned_result);
  if (!paged_result.label.empty()) rows.push_back(&paged_result);
  for (const Result* rp : rows) {
    const Result& r = *rp;
    const double gbps = kv_bytes / (r.median_us * 1e-6) / 1e9;
    csv_ << dt << ',' << c.name << ',' << c.group << ',' << B << ',' << tokens << ',' << static_cast<int64_t>(kv_bytes) << ','
         << r.family << ',' << r.label << ',' << r.launches << ',' << r.median_us << ',' << gbps << ','
         << 100.0 * gbps / stream_gbps << ',' << 100.0 * gbps / d2d_gbps << ',' << (best == &r ? 1 : 0) << ','
         << copies << ',' << (rp == &planned_result ? planned_speedup : speedup) << '\n';
  }
  csv_.flush();
  auto us = [&](const char* fam) -> std::string {
    auto it = best_of.find(fam);
    if (it == best_of.end()) return "-";
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.1f", it->second.median_us);
    return buf;
  };
  const double best_gbps = kv_bytes / (best->median_us * 1e-6) / 1e9;
  const double planned_gbps = kv_bytes / (planned_result.median_us * 1e-6) / 1e9;
  char line[768];
  std::snprintf(line, sizeof(line),
                "| %s | %s | %.1f | %s | %s | %s | %s | %s | %.0f | %.1f | %.1f | %s | %.1f | %.1f | %.3f |\n", dt.c_str(),
                c.name.c_str(), kv_bytes / 1e6, us("per_request").c_str(), us("sequence_split").c_str(),
                us("workqueue_fused").c_str(), us("workqueue_separate").c_str(), best->label.c_str(), best_gbps,
                100.0 * best_gbps / stream_gbps, 100.0 * best_gbps / d2d_gbps, planned_result.label.c_str() + 8,
                planned_result.median_us, 100.0 * planned_gbps / stream_gbps, best->median_us / planned_result.median_us);
  if (fi_best != nullptr) {  // extra columns: fi_decode us | fi_prefill us | best/FI | planned/FI speed
    std::string l(line);
    l.pop_back();  // '\n'
    l += " " + us("fi_decode") + " | " + us("fi_prefill") + " | " + speedup + " | " + planned_speedup + " |\n";
    std::snprintf(line, sizeof(line), "%s", l.c_str());
  }
  table_ << line;
  std::fputs(line, stdout);
  if (!paged_result.label.empty()) {
    std::printf("#   %s paged-read ceiling %.1f us (%s); planned at %.1f%% of it, search best %.1f%%\n", c.name.c_str(),
                paged_result.median_us, paged_result.label.c_str(), 100.0 * paged_result.median_us / planned_result.median_us,
                100.0 * paged_result.median_us / best->median_us);
  }
  std::fflush(stdout);
  if (c.group != "grid") {
    auto& a = agg_[dt + "|" + c.group];
    a.first += kv_bytes;
    a.second += best->median_us;
    agg_planned_[dt + "|" + c.group] += planned_result.median_us;
    if (fi_best != nullptr) agg_fi_[dt + "|" + c.group] += fi_best->median_us;
  }
}

int Bench::Run() {
  runs_ = std::max(o_.runs, 1);
  {
    scheduler::Scheduler::Options so;
    so.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
    if (!o_.profile_path.empty()) {
      absl::StatusOr<scheduler::CostProfile> profile = scheduler::LoadCostProfile(o_.profile_path);
      if (!profile.ok()) {
        std::fprintf(stderr, "pkv-bench kernels: --profile: %s\n", std::string(profile.status().message()).c_str());
        return 2;
      }
      so.profile = *profile;
    }
    absl::StatusOr<scheduler::Scheduler> sched = scheduler::Scheduler::Create(so);
    if (!sched.ok()) {
      std::fprintf(stderr, "pkv-bench kernels: %s\n", std::string(sched.status().message()).c_str());
      return 2;
    }
    scheduler_ = std::make_unique<scheduler::Scheduler>(*std::move(sched));
  }
  int dev = 0;
  BENCH_CUDA(cudaGetDevice(&dev));
  BENCH_CUDA(cudaGetDeviceProperties(&prop_, dev));
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  page_bytes_ = 2LL * o_.num_kv_heads * o_.page_size * o_.head_dim * 2;
  size_t free_b = 0, total_b = 0;
  BENCH_CUDA(cudaMemGetInfo(&free_b, &total_b));
  const double max_kv = o_.max_kv_gib * (1LL << 30);
  const size_t pool_bytes = static_cast<size_t>(std::min<double>(max_kv + (512LL << 20), free_b * 0.8));
  pool_pages_ = static_cast<int64_t>(pool_bytes / page_bytes_);
  BENCH_CUDA(cudaMalloc(&pool_, static_cast<size_t>(pool_pages_) * page_bytes_));
  ws_bytes_ = size_t{256} << 20;
  BENCH_CUDA(cudaMalloc(&ws_, ws_bytes_));
  BENCH_CUDA(cudaMemset(ws_, 0, ws_bytes_));
  const int max_b = std::max(64, *std::max_element(o_.batches.begin(), o_.batches.end()));
  BENCH_CUDA(cudaMalloc(&q_, static_cast<size_t>(max_b) * o_.num_q_heads * o_.head_dim * 2));
  BENCH_CUDA(cudaMalloc(&out_, static_cast<size_t>(max_b) * o_.num_q_heads * o_.head_dim * 2));
  BENCH_CUDA(cudaMalloc(&lse_, static_cast<size_t>(max_b) * o_.num_q_heads * 4));
  BENCH_CUDA(cudaMalloc(&sink_, 1 << 20));
  ev_start_.resize(runs_);
  ev_stop_.resize(runs_);
  for (int i = 0; i < runs_; ++i) {
    BENCH_CUDA(cudaEventCreate(&ev_start_[i]));
    BENCH_CUDA(cudaEventCreate(&ev_stop_[i]));
  }

  start_ = MeasureCeilings();
  // Harness floor: an empty kernel timed exactly like the routes (launch + event overhead).
  {
    for (int i = 0; i < o_.warmup; ++i) BENCH_CUDA(Spin(0, stream_));
    BENCH_CUDA(Spin(2'000'000, stream_));
    for (int i = 0; i < runs_; ++i) {
      BENCH_CUDA(cudaEventRecord(ev_start_[i], stream_));
      BENCH_CUDA(Spin(0, stream_));
      BENCH_CUDA(cudaEventRecord(ev_stop_[i], stream_));
    }
    BENCH_CUDA(cudaStreamSynchronize(stream_));
    std::vector<float> t(runs_);
    for (int i = 0; i < runs_; ++i) BENCH_CUDA(cudaEventElapsedTime(&t[i], ev_start_[i], ev_stop_[i]));
    floor_us_ = Median(t) * 1e3;
  }
  std::printf("# GPU: %s (%d SMs, L2 %d MB), commit %s\n# command: %s\n", prop_.name, prop_.multiProcessorCount,
              prop_.l2CacheSize >> 20, o_.commit.c_str(), o_.command.c_str());
  std::printf("# shape: Hq=%d Hkv=%d d=%d page=%d; runs=%d warmup=%d; pool %.2f GB\n", o_.num_q_heads,
              o_.num_kv_heads, o_.head_dim, o_.page_size, runs_, o_.warmup, pool_pages_ * page_bytes_ / 1e9);
  std::printf("# ceilings (start): streaming read %.0f GB/s, D2D copy %.0f GB/s (read+write); empty-kernel floor %.2f us\n",
              start_.stream_gbps, start_.d2d_gbps, floor_us_);
  if (!o_.csv_path.empty()) {
    csv_.open(o_.csv_path);
    csv_ << "# gpu=" << prop_.name << " commit=" << o_.commit << " command=\"" << o_.command << "\"\n";
    csv_ << "# Hq=" << o_.num_q_heads << " Hkv=" << o_.num_kv_heads << " d=" << o_.head_dim << " page=" << o_.page_size
         << " stream_gbps=" << start_.stream_gbps << " d2d_gbps=" << start_.d2d_gbps << "\n";
    csv_ << "dtype,case,group,batch,tokens,kv_bytes,family,config,launches,median_us,gbps,pct_stream,pct_d2d,best,"
            "kv_copies,speedup_vs_fi\n";
  }
  // "best": the fastest configuration the search found for the case (an oracle: the engine does
  // not search); "planned": what the scheduler plans for it (what the engine runs).
  std::string header =
      "| dtype | case | KV MB | per_request us | seq_split us | wq_fused us | wq_sep us | best (search, oracle) | "
      "GB/s | % stream | % D2D | planned (engine) | planned us | planned % stream | best / planned speed |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
#ifdef PKV_WITH_FLASHINFER
  header =
      "| dtype | case | KV MB | per_request us | seq_split us | wq_fused us | wq_sep us | best (search, oracle) | "
      "GB/s | % stream | % D2D | planned (engine) | planned us | planned % stream | best / planned speed "
      "| fi_decode us | fi_prefill us | best/FI speed | planned/FI speed |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
#endif
  table_ << header;
  std::fputs(header.c_str(), stdout);

  const std::vector<Case> cases = BuildCases();
  for (DType dt : o_.dtypes) {
    BENCH_CUDA(FillNormal(pool_, static_cast<size_t>(pool_pages_) * page_bytes_ / 2, dt == DType::kBF16, o_.seed, stream_));
    BENCH_CUDA(cudaStreamSynchronize(stream_));
#ifdef PKV_WITH_FLASHINFER
    fi_arms_.clear();
    for (FlashInferPath path : {FlashInferPath::kDecode, FlashInferPath::kPrefill}) {
      FlashInferArm::Options fo;
      fo.path = path;
      fo.dtype = dt;
      fo.num_q_heads = o_.num_q_heads;
      fo.num_kv_heads = o_.num_kv_heads;
      fo.head_dim = o_.head_dim;
      fo.page_size = o_.page_size;
      fo.max_batch = std::max(64, *std::max_element(o_.batches.begin(), o_.batches.end()));
      auto arm = FlashInferArm::Create(fo);
      if (!arm.ok()) {  // e.g. a head_dim FlashInfer is not instantiated for: our columns only
        std::printf("# %s: not run (%s)\n", FlashInferPathName(path), std::string(arm.status().message()).c_str());
        continue;
      }
      std::printf("# %s %s: PDL %s\n", FlashInferPathName(path), DTypeName(dt), (*arm)->pdl() ? "on" : "off");
      fi_arms_.push_back(std::move(*arm));
    }
#endif
    int64_t i = 0;
    for (const Case& c : cases) RunCase(dt, c, static_cast<int64_t>(o_.seed) + 31 * (++i));
  }
  end_ = MeasureCeilings();
  std::printf("# ceilings (end): streaming read %.0f GB/s, D2D copy %.0f GB/s\n", end_.stream_gbps, end_.d2d_gbps);

  std::ostringstream agg;
  const bool with_fi = !agg_fi_.empty();
  agg << "\n| dtype | mixed workload (all steps) | KV MB | best (search, oracle) us (sum) | GB/s | % stream | "
         "planned us (sum) | planned % stream |"
      << (with_fi ? " FlashInfer best us (sum) | best/FI speed | planned/FI speed |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|\n"
                  : "\n|---|---|---|---|---|---|---|---|\n");
  for (const auto& [key, v] : agg_) {
    const double gbps = v.first / (v.second * 1e-6) / 1e9;
    const double planned_us = agg_planned_[key];
    const double planned_gbps = v.first / (planned_us * 1e-6) / 1e9;
    char line[320];
    const size_t bar = key.find('|');
    std::snprintf(line, sizeof(line), "| %s | %s | %.1f | %.1f | %.0f | %.1f | %.1f | %.1f |", key.substr(0, bar).c_str(),
                  key.substr(bar + 1).c_str(), v.first / 1e6, v.second, gbps, 100.0 * gbps / start_.stream_gbps,
                  planned_us, 100.0 * planned_gbps / start_.stream_gbps);
    agg << line;
    if (with_fi) {
      const double fi_us = agg_fi_.count(key) ? agg_fi_.at(key) : 0.0;
      std::snprintf(line, sizeof(line), " %.1f | %.3f | %.3f |", fi_us, fi_us / v.second, fi_us / planned_us);
      agg << line;
    }
    agg << '\n';
  }
  std::fputs(agg.str().c_str(), stdout);
  if (!o_.md_path.empty()) {
    std::ofstream md(o_.md_path);
    md << "# pkv-bench kernels\n\n- GPU: " << prop_.name << " (" << prop_.multiProcessorCount << " SMs)\n- commit: "
       << o_.commit << "\n- command: `" << o_.command << "`\n- shape: Hq=" << o_.num_q_heads
       << " Hkv=" << o_.num_kv_heads << " d=" << o_.head_dim << " page=" << o_.page_size << ", runs=" << runs_
       << " (median), KV rotated over >= max(4 x L2, 256 MB) of page-table copies\n- ceilings start: stream "
       << start_.stream_gbps << " GB/s, D2D " << start_.d2d_gbps << " GB/s; end: stream " << end_.stream_gbps
       << " GB/s, D2D " << end_.d2d_gbps << " GB/s; empty-kernel floor " << floor_us_ << " us\n\n"
       << table_.str() << agg.str();
  }
  return 0;
}

}  // namespace

int RunKernelBench(const KernelBenchOptions& options) {
  Bench bench(options);
  return bench.Run();
}

}  // namespace pkv::bench
