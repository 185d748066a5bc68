// bench/calibrate/calibrate_main.cc — `pkv-calibrate`: fits the scheduler's cost-model constants on this GPU
// for one model shape and writes the JSON profile (scheduler/cost_profile.h) the worker loads.
//
// It runs each route through engine::Engine on the CUDA backend (the same path the worker uses)
// with pinned parameters on a few synthetic shapes, takes the median attention time (CUDA events)
// of the layer-steps, and solves the cost model's terms one at a time:
//   stream_read_gbps  KV bytes / time of a large, fully occupied step (B64 x 16K; best route)
//   cta_read_gbps     one (row, KV head) unit's bytes / time at B1 x 64K per-request (8 units)
//   launch_us         split S=2 minus per-request on a 2-page row (one extra launch + merge),
//                     the median over alternating rounds of many samples (tiny steps are noisy)
//   task_us           per-request on a 1-page row minus one launch
//   merge_gbps        merge bytes / the rest of a B8 x 2K S=32 split step
//   wq_merge_us, wq_separate_merge_us  the work queue's merge, fused and as a launch of its own
//   ss_separate_merge_delta_us         sequence-split with a separate merge minus fused
//   resident_ctas_per_sm from the kernel's occupancy (kernels/cuda)
// then checks the fitted model on mixed-length steps of the calibration seed 20260622 and
// prints the prediction error of every route. Takes a few seconds on an H200 (pool set-up included).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "bench/benchmarks/device_utils.h"
#include "bench/benchmarks/random_data.h"
#include "common/log.h"
#include "common/workload.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "scheduler/cost_model.h"
#include "scheduler/cost_profile.h"

namespace {

using pkv::KernelId;
using pkv::engine::Engine;

struct Flags {
  int hq = 32, hkv = 8, d = 128, page = 16;
  std::string dtype = "fp16";
  std::string out = "pkv-profile.json";
  int samples = 12;
};

class Calibrator {
 public:
  Calibrator(Engine* e, pkv::ModelShape shape, int samples)
      : e_(e), shape_(shape), samples_(samples),
        q_(pkv::bench::RandomNormalBytes(shape.dtype, 64 * shape.num_q_heads * shape.head_dim, 1)),
        kv_(pkv::bench::RandomNormalBytes(shape.dtype, 2 * 64 * shape.num_kv_heads * shape.head_dim, 2)) {}

  // Median attention seconds of a layer-step over rows of `lens` with a pinned route (and, when
  // set, the split routes' merge pinned: true a launch of its own, false fused).
  // `samples` overrides the calibrator's sample count when > 0.
  double Measure(const std::vector<int64_t>& lens, KernelId kernel, int32_t parameter,
                 std::optional<bool> separate_merge = std::nullopt, int samples = 0) {
    pkv::scheduler::Scheduler::Options so;
    so.available = {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
    so.fixed_kernel = kernel;
    so.fixed_parameter = parameter;
    so.separate_merge = separate_merge;
    so.profile = profile_;  // a parameter of 0 runs the plan this profile's model picks
    PKV_CHECK(e_->SetScheduler(*pkv::scheduler::Scheduler::Create(so)).ok()) << "scheduler";
    std::vector<pkv::engine::SeqId> rows;
    for (int64_t len : lens) {
      rows.push_back(++next_id_);
      auto s = e_->AdoptUnwrittenPromptForBenchmark(rows.back(), len);
      PKV_CHECK(s.ok()) << s;
    }
    std::vector<double> t;
    const int want = samples > 0 ? samples : samples_;
    const int steps = (want + shape_.num_layers - 1) / shape_.num_layers + 1;
    for (int step = 0; step < steps; ++step) {
      pkv::engine::StepInput in;
      in.token_step_id = ++step_id_;
      in.rows = rows;
      const size_t b = rows.size();
      in.q = std::span<const uint8_t>(q_).first(b * shape_.num_q_heads * shape_.head_dim * 2);
      in.k = std::span<const uint8_t>(kv_).first(b * shape_.num_kv_heads * shape_.head_dim * 2);
      in.v = std::span<const uint8_t>(kv_).subspan(kv_.size() / 2, b * shape_.num_kv_heads * shape_.head_dim * 2);
      for (int layer = 0; layer < shape_.num_layers; ++layer) {
        in.layer = layer;
        auto out = e_->Step(in);
        PKV_CHECK(out.ok()) << out.status();
        if (step > 0) t.push_back(out->attend_seconds);  // the first token step warms up
      }
    }
    PKV_CHECK(e_->Release(rows).ok()) << "release";
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

  // The profile the pinned routes plan with (the constants fitted so far).
  void SetProfile(const pkv::scheduler::CostProfile& p) { profile_ = p; }

 private:
  pkv::scheduler::CostProfile profile_ = pkv::scheduler::DefaultCostProfile();
  Engine* e_;
  pkv::ModelShape shape_;
  int samples_;
  std::vector<uint8_t> q_, kv_;
  uint64_t next_id_ = 0, step_id_ = 0;
};

// The parameter that makes a fixed-route scheduler run `c`'s plan: the split count, the task size
// of a strided work queue, or 0 (the cost model's own pick) for the balanced work queue, which a
// task size cannot pin.
int32_t PinnedParameter(const pkv::scheduler::ArmCost& c) {
  if (c.kernel == KernelId::kSequenceSplit) return c.num_splits;
  if (c.kernel == KernelId::kWorkQueue) return c.balanced_ctas > 0 ? 0 : c.pages_per_task;
  return 0;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Two measurements (us) alternated over `rounds`: the first's values and each round's second minus
// first, for constants that are small differences between noisy steps.
struct Alternated {
  std::vector<double> first, diff;
  double min_diff() const { return *std::min_element(diff.begin(), diff.end()); }
  double max_diff() const { return *std::max_element(diff.begin(), diff.end()); }
};
template <typename A, typename B>
Alternated Alternate(int rounds, A measure_first, B measure_second) {
  Alternated r;
  for (int round = 0; round < rounds; ++round) {
    const double a = measure_first();
    const double b = measure_second();
    r.first.push_back(a);
    r.diff.push_back(b - a);
  }
  return r;
}

pkv::scheduler::StepShape ShapeOf(const pkv::ModelShape& m, const std::vector<int64_t>& lens) {
  pkv::scheduler::StepShape s;
  s.model = m;
  // The step attends the history plus the appended token.
  for (int64_t l : lens) s.row_tokens.push_back(l + 1);
  s.device.is_gpu = true;
  return s;
}

int Usage() {
  std::fprintf(stderr,
               "usage: pkv-calibrate [--hq=32] [--hkv=8] [--d=128] [--page=16] [--dtype=fp16|bf16]\n"
               "                     [--samples=12] [--out=pkv-profile.json]\n"
               "Fits the scheduler's cost-model constants on this GPU and writes the JSON profile\n"
               "that pkv-worker --calibration_profile loads (format: scheduler/cost_profile.h).\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a == "--help" || a == "-h" || a.rfind("--", 0) != 0 || eq == std::string::npos) return Usage();
    const std::string k = a.substr(2, eq - 2), v = a.substr(eq + 1);
    if (k == "hq") f.hq = std::atoi(v.c_str());
    else if (k == "hkv") f.hkv = std::atoi(v.c_str());
    else if (k == "d") f.d = std::atoi(v.c_str());
    else if (k == "page") f.page = std::atoi(v.c_str());
    else if (k == "dtype") f.dtype = v;
    else if (k == "out") f.out = v;
    else if (k == "samples") f.samples = std::max(4, std::atoi(v.c_str()));
    else return Usage();
  }
  pkv::ModelShape shape;
  shape.num_layers = 4;  // the profile is per layer-step; a few layers give the samples
  shape.num_q_heads = f.hq;
  shape.num_kv_heads = f.hkv;
  shape.head_dim = f.d;
  shape.page_size = f.page;
  auto dt = pkv::ParseDType(f.dtype);
  if (!dt.ok()) return Usage();
  shape.dtype = *dt;
  if (auto s = shape.Validate(); !s.ok()) {
    std::fprintf(stderr, "pkv-calibrate: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  pkv::engine::CudaBackendOptions bo;
  bo.free_memory_fraction = 0.6;
  bo.max_batch = 64;
  bo.attention_timing_interval = 1;  // every layer-step's attention is a calibration sample
  auto backend = pkv::engine::CreateCudaBackend(shape, bo);
  if (!backend.ok()) {
    std::fprintf(stderr, "pkv-calibrate: %s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  pkv::kvpool::KvArena& arena = (*backend)->arena();
  pkv::bench::FillNormal(arena.layer_data(0), static_cast<size_t>(arena.num_pages()) * arena.page_elems() * shape.num_layers,
                         shape.dtype == pkv::DType::kBF16, 20260622, nullptr);
  cudaDeviceSynchronize();
  const pkv::scheduler::DeviceInfo dev = (*backend)->device_info();
  pkv::kernels::DecodeParams occ;
  occ.dtype = shape.dtype;
  occ.num_q_heads = shape.num_q_heads;
  occ.num_kv_heads = shape.num_kv_heads;
  occ.head_dim = shape.head_dim;
  occ.page_size = shape.page_size;
  const int resident = std::max(1, pkv::kernels::cuda::ResidentCtasPerSm(occ));
  pkv::scheduler::Scheduler::Options so;
  so.available = (*backend)->kernels();
  pkv::engine::EngineOptions eo;
  eo.max_batch = 64;
  eo.scatter_seed = 20260622;
  auto eng = Engine::Create(eo, std::move(*backend), *pkv::scheduler::Scheduler::Create(so));
  if (!eng.ok()) {
    std::fprintf(stderr, "pkv-calibrate: %s\n", std::string(eng.status().message()).c_str());
    return 1;
  }
  Calibrator cal(eng->get(), shape, f.samples);
  std::printf("pkv-calibrate on %s (%d SMs, %d resident CTAs/SM), %s\n", dev.name.c_str(), dev.num_sms, resident,
              shape.DebugString().c_str());

  pkv::scheduler::CostProfile p;
  p.gpu = dev.name;
  p.num_sms = dev.num_sms;
  p.num_q_heads = shape.num_q_heads;
  p.num_kv_heads = shape.num_kv_heads;
  p.head_dim = shape.head_dim;
  p.page_size = shape.page_size;
  p.dtype = pkv::DTypeName(shape.dtype);
  p.resident_ctas_per_sm = resident;

  // 1. Streaming bandwidth: a large step with every SM busy.
  const std::vector<int64_t> big(64, 16383);
  const double big_bytes = static_cast<double>(pkv::scheduler::CostModel::KvBytes(ShapeOf(shape, big)));
  const double t_big_pr = cal.Measure(big, KernelId::kPerRequest, 0);
  const double t_big_wq = cal.Measure(big, KernelId::kWorkQueue, 64);
  p.stream_read_gbps = big_bytes / std::min(t_big_pr, t_big_wq) / 1e9;
  std::printf("  B64x16K: per_request %.1f us, workqueue %.1f us -> stream_read_gbps %.0f\n", t_big_pr * 1e6,
              t_big_wq * 1e6, p.stream_read_gbps);
  // 2./3. Launch and per-unit costs from tiny steps. A tiny step takes a few microseconds, and a
  // median of a few of them moved between runs by more than the launch it is meant to isolate
  // (per-request 5.2-12.7 us on one H200), which then skews every constant fitted after it. So
  // the two tiny steps alternate over several rounds of many samples each; launch_us is the
  // median over rounds of each round's difference, task_us the median per-request time less it.
  constexpr int kTinyRounds = 5;
  const int tiny_samples = std::max(64, 4 * f.samples);
  const Alternated tiny = Alternate(
      kTinyRounds, [&] { return cal.Measure({15}, KernelId::kPerRequest, 0, std::nullopt, tiny_samples) * 1e6; },
      [&] {
        return cal.Measure({2 * shape.page_size - 1}, KernelId::kSequenceSplit, 2, std::nullopt, tiny_samples) * 1e6;
      });
  const double t_tiny_us = Median(tiny.first), diff_us = Median(tiny.diff);
  p.launch_us = std::max(0.5, diff_us);
  p.task_us = std::max(0.1, t_tiny_us - p.launch_us);
  std::printf("  tiny, %d rounds of %d samples: per_request %.2f us (rounds %.2f-%.2f), split S=2 minus it %.2f us "
              "(rounds %.2f-%.2f) -> launch_us %.2f task_us %.2f\n",
              kTinyRounds, tiny_samples, t_tiny_us, *std::min_element(tiny.first.begin(), tiny.first.end()),
              *std::max_element(tiny.first.begin(), tiny.first.end()), diff_us, tiny.min_diff(), tiny.max_diff(),
              p.launch_us, p.task_us);
  // 4. One unit streaming alone: B1 x 64K per-request (Hkv units).
  const std::vector<int64_t> one(1, 65535);
  const double t_one = cal.Measure(one, KernelId::kPerRequest, 0);
  const double unit_bytes = 65536.0 * 2 * shape.head_dim * pkv::DTypeSize(shape.dtype);
  p.cta_read_gbps = unit_bytes / std::max(1e-7, t_one - (p.launch_us + p.task_us) * 1e-6) / 1e9;
  std::printf("  B1x64K per_request %.1f us -> cta_read_gbps %.2f\n", t_one * 1e6, p.cta_read_gbps);
  // 5. Merge bandwidth from a finely split step.
  const std::vector<int64_t> mid(8, 2047);
  const double t_split = cal.Measure(mid, KernelId::kSequenceSplit, 32);
  {
    pkv::scheduler::CostProfile no_merge = p;
    no_merge.merge_gbps = 1e12;
    const pkv::scheduler::ArmCost c = pkv::scheduler::CostModel(no_merge).SequenceSplit(ShapeOf(shape, mid), 32);
    const double rest_us = t_split * 1e6 - c.us;
    p.merge_gbps = std::clamp(c.merge_bytes / std::max(0.05, rest_us) / 1e3, 100.0, 20000.0);
    std::printf("  B8x2K split S=32 %.1f us (model without merge %.1f us) -> merge_gbps %.0f\n", t_split * 1e6, c.us,
                p.merge_gbps);
  }

  // 6. How much of β a uniform split keeps on ragged rows: bimodal B8 of the calibration seed.
  auto lens_of = [](pkv::WorkloadKind kind, int batch) {
    std::vector<int64_t> lens;
    for (const auto& r : pkv::GenerateWorkload(kind, batch, 20260622)) lens.push_back(r.input_tokens);
    return lens;
  };
  {
    const std::vector<int64_t> ragged = lens_of(pkv::WorkloadKind::kBimodal, 8);
    const auto ss = ShapeOf(shape, ragged);
    const pkv::scheduler::ArmCost c = pkv::scheduler::CostModel(p).BestOf(KernelId::kSequenceSplit, ss);
    const double t = cal.Measure(ragged, KernelId::kSequenceSplit, c.num_splits) * 1e6;
    const double stream_us = c.kv_bytes / (p.stream_read_gbps * 1e3);
    const double other_us = c.us - stream_us;  // streaming dominates this step
    p.split_stream_efficiency = std::clamp(stream_us / std::max(1e-3, t - other_us), 0.3, 1.0);
    std::printf("  bimodal B8 split S=%d %.1f us (model %.1f us) -> split_stream_efficiency %.3f\n", c.num_splits, t,
                c.us, p.split_stream_efficiency);
  }
  // 7. The work queue's merge tail, fused and as a launch of its own: one long row (bucketed B1 of
  // the calibration seed), each form pinned, against the model without either.
  cal.SetProfile(p);
  {
    const std::vector<int64_t> row = lens_of(pkv::WorkloadKind::kBucketed, 1);
    const auto ss = ShapeOf(shape, row);
    const pkv::scheduler::ArmCost c = pkv::scheduler::CostModel(p, false).BestOf(KernelId::kWorkQueue, ss);
    const double t = cal.Measure(row, KernelId::kWorkQueue, PinnedParameter(c), false) * 1e6;
    const double t_sep = cal.Measure(row, KernelId::kWorkQueue, PinnedParameter(c), true) * 1e6;
    p.wq_merge_us = c.merge_bytes > 0 ? std::clamp(t - c.us, 0.0, 50.0) : 0.0;
    // Never 0 when measured (0 reads as "not measured"); the model then picks the cheaper form.
    p.wq_separate_merge_us = c.merge_bytes > 0 ? std::clamp(t_sep - c.us, 0.01, 50.0) : 0.0;
    std::printf("  bucketed B1 workqueue %s %d pages: fused merge %.1f us, separate %.1f us (model without "
                "either %.1f us) -> wq_merge_us %.2f wq_separate_merge_us %.2f\n",
                c.balanced_ctas > 0 ? "balanced, largest CTA" : "strided, task size", c.pages_per_task, t, t_sep,
                c.us, p.wq_merge_us, p.wq_separate_merge_us);
  }

  // 8. Sequence-split's merge, fused and as a launch of its own, at the model's split count for the
  // same row: alternating rounds (the difference is a few microseconds of a 20-80 us step).
  cal.SetProfile(p);
  {
    const std::vector<int64_t> row = lens_of(pkv::WorkloadKind::kBucketed, 1);
    const pkv::scheduler::ArmCost c =
        pkv::scheduler::CostModel(p, false).BestOf(KernelId::kSequenceSplit, ShapeOf(shape, row));
    p.ss_separate_merge_delta_us = 0;
    if (c.num_splits > 1) {
      constexpr int kRounds = 3;
      const int samples = std::max(32, 2 * f.samples);
      const Alternated merge = Alternate(
          kRounds, [&] { return cal.Measure(row, KernelId::kSequenceSplit, c.num_splits, false, samples) * 1e6; },
          [&] { return cal.Measure(row, KernelId::kSequenceSplit, c.num_splits, true, samples) * 1e6; });
      p.ss_separate_merge_delta_us = std::clamp(Median(merge.diff), -50.0, 50.0);
      std::printf("  bucketed B1 sequence_split S=%d: fused merge %.1f us, separate minus fused %.2f us (rounds "
                  "%.2f-%.2f) -> ss_separate_merge_delta_us %.2f\n",
                  c.num_splits, Median(merge.first), Median(merge.diff), merge.min_diff(), merge.max_diff(),
                  p.ss_separate_merge_delta_us);
    }
  }

  // Check on mixed-length steps of the paper's workloads (calibration seed; the trace benchmark holds out 20260623-27).
  cal.SetProfile(p);
  pkv::scheduler::CostModel model(p);
  std::printf("  check on mixed steps of the calibration seed 20260622: measured / predicted us per route\n");
  double err_sum = 0;
  int err_n = 0, right = 0, total = 0;
  for (auto [kind, batch] : {std::pair{pkv::WorkloadKind::kBimodal, 8}, std::pair{pkv::WorkloadKind::kZipf, 8},
                             std::pair{pkv::WorkloadKind::kBimodal, 4}, std::pair{pkv::WorkloadKind::kBucketed, 1},
                             std::pair{pkv::WorkloadKind::kUniform, 8}}) {
    auto reqs = pkv::GenerateWorkload(kind, batch, 20260622);
    std::vector<int64_t> lens;
    for (const auto& r : reqs) lens.push_back(r.input_tokens);
    const auto ss = ShapeOf(shape, lens);
    double best_meas = 1e30, best_pred = 1e30;
    KernelId meas_k = KernelId::kPerRequest, pred_k = KernelId::kPerRequest;
    for (KernelId k : {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue}) {
      const pkv::scheduler::ArmCost c = model.BestOf(k, ss);
      const double t = cal.Measure(lens, k, PinnedParameter(c), c.separate_merge) * 1e6;
      std::printf("    %-8s B%d %-15s %9.1f / %9.1f\n", std::string(pkv::WorkloadKindName(kind)).c_str(), batch,
                  pkv::KernelName(k), t, c.us);
      err_sum += std::fabs(t - c.us) / t;
      ++err_n;
      if (t < best_meas) best_meas = t, meas_k = k;
      if (c.us < best_pred) best_pred = c.us, pred_k = k;
    }
    ++total;
    right += meas_k == pred_k ? 1 : 0;
  }
  std::printf("  mean |error| %.1f%%, model picked the measured-fastest route in %d of %d steps\n",
              100.0 * err_sum / err_n, right, total);
  if (right + 1 < total) {
    std::printf("  WARNING: the fitted model picked the measured-fastest route in only %d of %d check steps; the "
                "GPU or host was probably busy or changing clocks while it measured. Run pkv-calibrate again "
                "before a worker loads this profile.\n",
                right, total);
  }

  std::ofstream out(f.out);
  out << pkv::scheduler::CostProfileToJson(p);
  if (!out) {
    std::fprintf(stderr, "pkv-calibrate: cannot write %s\n", f.out.c_str());
    return 1;
  }
  std::printf("wrote %s\n", f.out.c_str());
  return 0;
}
