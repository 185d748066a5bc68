#include "bench/benchmarks/trace_bench.h"

#include <atomic>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <sstream>

#include "bench/benchmarks/device_utils.h"
#include "bench/benchmarks/random_data.h"
#include "common/log.h"
#include "common/workload.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "scheduler/cost_profile.h"
#ifdef PKV_WITH_FLASHINFER
#include <cuda_runtime.h>

#include <numeric>

#include "bench/flashinfer/flashinfer_arm.h"
#include "kvpool/cuda/append_kv.h"
#endif

namespace pkv::bench {
namespace {

struct Arm {
  std::string name;
  std::optional<KernelId> fixed;
  int flashinfer_path = -1;  // >= 0: a FlashInfer arm (FlashInferPath), driven outside the engine
};

struct RunStats {
  int64_t tokens = 0;
  double attend_s = 0;
  double wall_s = 0;
  double kv_bytes = 0;  // KV bytes the attention read (all layers)
  // Host time of the layer-steps (engine arms: the engine's validation and host work, the
  // backend's staging, launches and output copy; FlashInfer arms: the same staging, launches and
  // timing query done inline) and their count, for the time per layer beyond attention.
  double host_s = 0;
  int64_t layers = 0;
  std::vector<double> step_attend_s;
  std::vector<double> step_wall_s;
  std::map<std::string, int64_t> mix;  // kernel -> token steps
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p * (v.size() - 1);
  const size_t lo = static_cast<size_t>(idx);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

void MeanStd(const std::vector<double>& v, double* mean, double* sd) {
  *mean = 0;
  for (double x : v) *mean += x;
  *mean /= std::max<size_t>(1, v.size());
  double s = 0;
  for (double x : v) s += (x - *mean) * (x - *mean);
  *sd = v.size() > 1 ? std::sqrt(s / (v.size() - 1)) : 0;
}

// Streaming-read ceiling over `bytes` of the pool (median of 10, events).
double StreamCeilingGbps(const void* data, size_t bytes, int sms) {
  uint32_t* sink = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&sink), sizeof(uint32_t));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int i = 0; i < 13; ++i) {
    cudaEventRecord(a);
    StreamRead(data, bytes, sink, sms * 4, 256, 8, nullptr);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    if (i >= 3) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(sink);
  return bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

// Remembers the KV tokens of the last planned token step (bytes the attention reads).
class KvTokensObserver final : public engine::StepObserver {
 public:
  void OnTokenStepPlanned(const engine::TokenStepEvent& e) override { last_kv_tokens = e.kv_tokens; }
  int64_t last_kv_tokens = 0;
};

// One workload x seed x arm: continuous batching through the engine.
absl::StatusOr<RunStats> RunOnce(engine::Engine& e, const ModelShape& shape, WorkloadKind kind, int batch,
                                 int num_requests, int warmup, int measured, uint64_t seed,
                                 const std::vector<uint8_t>& q, const std::vector<uint8_t>& kv,
                                 const KvTokensObserver& observer) {
  std::vector<WorkloadRequest> reqs = GenerateWorkload(kind, num_requests, seed);
  struct Row {
    engine::SeqId id;
    int64_t left;
  };
  std::vector<Row> active;
  size_t next = 0;
  engine::SeqId next_id = seed * 1000;
  // Token step ids are never reused on one engine (it remembers completed ones and refuses a
  // resent id): every run of every arm draws from one process-wide counter.
  static std::atomic<uint64_t> next_step_id{1};
  auto refill = [&]() -> absl::Status {
    while (static_cast<int>(active.size()) < batch && next < reqs.size()) {
      const engine::SeqId id = ++next_id;
      if (auto s = e.AdoptUnwrittenPromptForBenchmark(id, reqs[next].input_tokens); !s.ok()) {
        // A full pool makes the request wait for rows to finish, as a serving loop would.
        if (s.code() == absl::StatusCode::kResourceExhausted && !active.empty()) return absl::OkStatus();
        return s;
      }
      active.push_back(Row{id, reqs[next].output_tokens});
      ++next;
    }
    return absl::OkStatus();
  };
  RunStats st;
  for (int step = 0; step < warmup + measured && (!active.empty() || next < reqs.size()); ++step) {
    if (auto s = refill(); !s.ok()) return s;
    engine::StepInput in;
    in.token_step_id = next_step_id.fetch_add(1);
    for (const Row& r : active) in.rows.push_back(r.id);
    const size_t b = in.rows.size();
    in.q = std::span<const uint8_t>(q).first(b * shape.num_q_heads * shape.head_dim * 2);
    in.k = std::span<const uint8_t>(kv).first(b * shape.num_kv_heads * shape.head_dim * 2);
    in.v = std::span<const uint8_t>(kv).subspan(kv.size() / 2, b * shape.num_kv_heads * shape.head_dim * 2);
    double attend = 0, host = 0;
    int timed = 0;
    KernelId kernel = KernelId::kReference;
    const auto t0 = std::chrono::steady_clock::now();
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      in.layer = layer;
      auto out = e.Step(in);
      if (!out.ok()) return out.status();
      // The engine times the attention on the layer-steps of its sampling (attention_timed).
      if (out->attention_timed) {
        attend += out->attend_seconds;
        ++timed;
      }
      host += out->timings.validate_seconds + out->timings.host_seconds;
      kernel = out->kernel;
    }
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (step >= warmup && timed > 0) {
      attend *= static_cast<double>(shape.num_layers) / timed;  // the timed layer-steps, scaled to all
      st.tokens += static_cast<int64_t>(b);
      st.attend_s += attend;
      st.wall_s += wall;
      st.host_s += host;
      st.layers += shape.num_layers;
      st.step_attend_s.push_back(attend);
      st.step_wall_s.push_back(wall);
      st.kv_bytes += static_cast<double>(observer.last_kv_tokens) * shape.kv_bytes_per_token_layer() * shape.num_layers;
      st.mix[KernelName(kernel)] += 1;
    }
    for (Row& r : active) --r.left;
    std::vector<engine::SeqId> done;
    for (const Row& r : active) {
      if (r.left <= 0) done.push_back(r.id);
    }
    if (!done.empty()) {
      if (auto s = e.Release(done); !s.ok()) return s;
      active.erase(std::remove_if(active.begin(), active.end(), [](const Row& r) { return r.left <= 0; }),
                   active.end());
    }
  }
  std::vector<engine::SeqId> rest;
  for (const Row& r : active) rest.push_back(r.id);
  if (!rest.empty()) {
    if (auto s = e.Release(rest); !s.ok()) return s;
  }
  return st;
}

#ifdef PKV_WITH_FLASHINFER
// The same continuous-batching loop as RunOnce for a FlashInfer arm, which the engine cannot run:
// rows get pages from a free list scattered like the engine's (seeded shuffle), over the
// engine's own device arena while the engine holds no sequence (KV content is random either way).
// Per token step, as the engine's CUDA backend does: the CSR page table and the new-token slots
// are packed into pinned memory and uploaded with one copy, then FlashInfer's planner runs on the
// host (charged to the step's wall time, outside the GPU timing). Per layer: one upload of q|k|v,
// one append launch (kvpool/cuda/append_kv) and FlashInfer's attention, between two CUDA events on
// the layer-steps the engine's sampling would time (`timing_interval`; the attention time: the
// engine's attention launch writes the new tokens itself, so both times cover the append and the
// attention), FlashInfer writing out straight into mapped pinned host memory as the engine's kernels do
// (no download), one stream synchronisation.
absl::StatusOr<RunStats> RunFlashInferOnce(FlashInferArm& arm, kvpool::KvArena& arena, const ModelShape& shape,
                                           WorkloadKind kind, int batch, int num_requests, int warmup, int measured,
                                           uint64_t seed, const std::vector<uint8_t>& q,
                                           const std::vector<uint8_t>& kv, int timing_interval) {
  const std::vector<WorkloadRequest> reqs = GenerateWorkload(kind, num_requests, seed);
  const int P = shape.page_size;
  const int64_t num_pages = arena.num_pages();
  std::vector<int32_t> free_pages(num_pages);
  std::iota(free_pages.begin(), free_pages.end(), 0);
  std::mt19937_64 rng(20260622);
  std::shuffle(free_pages.begin(), free_pages.end(), rng);
  struct Row {
    std::vector<int32_t> pages;
    int64_t len;
    int64_t left;
  };
  std::vector<Row> active;
  size_t next = 0;
  const size_t q_bytes = static_cast<size_t>(64) * shape.num_q_heads * shape.head_dim * 2;
  const size_t kv_row_bytes = static_cast<size_t>(shape.num_kv_heads) * shape.head_dim * 2;
  // Device and pinned buffers, allocated once per run (never on the step path).
  cudaStream_t stream = nullptr;
  cudaEvent_t ev0 = nullptr, ev1 = nullptr;
  int32_t* d_table = nullptr;  // [indptr B+1 | last B | slots 2B | indices]
  void* d_qkv = nullptr;       // [q | k | v]
  void* d_out = nullptr;       // device address of h_out (mapped)
  int32_t* h_table = nullptr;
  uint8_t* h_qkv = nullptr;
  uint8_t* h_out = nullptr;
  const size_t table_ints = 4 * 65 + static_cast<size_t>(num_pages);
  const size_t qkv_bytes = q_bytes + 2 * 64 * kv_row_bytes;
  auto fail = [](cudaError_t e) { return absl::InternalError(cudaGetErrorString(e)); };
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) return fail(e);
  cudaEventCreate(&ev0);
  cudaEventCreate(&ev1);
  for (cudaError_t e : {cudaMalloc(reinterpret_cast<void**>(&d_table), table_ints * 4), cudaMalloc(&d_qkv, qkv_bytes),
                        cudaMallocHost(reinterpret_cast<void**>(&h_table), table_ints * 4),
                        cudaMallocHost(reinterpret_cast<void**>(&h_qkv), qkv_bytes),
                        cudaHostAlloc(reinterpret_cast<void**>(&h_out), q_bytes, cudaHostAllocMapped)}) {
    if (e != cudaSuccess) return fail(e);
  }
  if (cudaError_t e = cudaHostGetDevicePointer(&d_out, h_out, 0); e != cudaSuccess) return fail(e);
  RunStats st;
  absl::Status status;
  int64_t layer_steps = 0;  // the engine's sampling: counted over layer-steps, shifted per token step
  for (int step = 0; step < warmup + measured && (!active.empty() || next < reqs.size()) && status.ok(); ++step) {
    // Admission, as RunOnce: a request waits while its prompt's pages (+1) are not free.
    while (static_cast<int>(active.size()) < batch && next < reqs.size()) {
      const int64_t need = (reqs[next].input_tokens + P - 1) / P + 1;
      if (need > static_cast<int64_t>(free_pages.size())) {
        if (!active.empty()) break;
        status = absl::ResourceExhaustedError("flashinfer arm: pool too small for one request");
        break;
      }
      Row r{{}, reqs[next].input_tokens, reqs[next].output_tokens};
      for (int64_t i = 0; i < (r.len + P - 1) / P; ++i) {
        r.pages.push_back(free_pages.back());
        free_pages.pop_back();
      }
      active.push_back(std::move(r));
      ++next;
    }
    if (!status.ok() || active.empty()) break;
    const int B = static_cast<int>(active.size());
    const auto t0 = std::chrono::steady_clock::now();
    // Append one token slot per row (a new page when the last is full), then the CSR + slots.
    int32_t* indptr = h_table;
    int32_t* last = h_table + (B + 1);
    int32_t* slots = last + B;
    int32_t* indices = slots + 2 * B;
    indptr[0] = 0;
    int64_t kv_tokens = 0;
    for (int b = 0; b < B; ++b) {
      Row& r = active[b];
      if (r.len % P == 0) {
        if (free_pages.empty()) {
          status = absl::ResourceExhaustedError("flashinfer arm: pool full");
          break;
        }
        r.pages.push_back(free_pages.back());
        free_pages.pop_back();
      }
      slots[2 * b] = r.pages.back();
      slots[2 * b + 1] = static_cast<int32_t>(r.len % P);
      ++r.len;
      kv_tokens += r.len;
      std::copy(r.pages.begin(), r.pages.end(), indices + indptr[b]);
      indptr[b + 1] = indptr[b] + static_cast<int32_t>(r.pages.size());
      last[b] = static_cast<int32_t>(r.len - static_cast<int64_t>(r.pages.size() - 1) * P);
    }
    if (!status.ok()) break;
    const size_t ints = 4 * static_cast<size_t>(B) + 1 + indptr[B];
    cudaMemcpyAsync(d_table, h_table, ints * 4, cudaMemcpyHostToDevice, stream);
    if (status = arm.Plan(std::span<const int32_t>(indptr, B + 1), stream); !status.ok()) break;
    kernels::DecodeParams p;
    p.dtype = shape.dtype;
    p.batch = B;
    p.num_q_heads = shape.num_q_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    p.page_size = P;
    p.sm_scale = 1.f / std::sqrt(static_cast<float>(shape.head_dim));
    p.num_pages = num_pages;
    p.page_indptr = d_table;
    p.last_page_len = d_table + (B + 1);
    p.page_indices = d_table + (B + 1) + 3 * B;
    p.q = d_qkv;
    p.out = d_out;
    const size_t bq = static_cast<size_t>(B) * shape.num_q_heads * shape.head_dim * 2;
    const size_t bkv = static_cast<size_t>(B) * kv_row_bytes;
    kvpool::cuda::AppendKvParams ap;
    ap.layer_stride = arena.num_pages() * arena.page_elems();
    ap.num_kv_heads = shape.num_kv_heads;
    ap.page_size = P;
    ap.head_dim = shape.head_dim;
    ap.num_tokens = B;
    ap.slots = d_table + (B + 1) + B;
    ap.k = static_cast<uint8_t*>(d_qkv) + bq;
    ap.v = static_cast<uint8_t*>(d_qkv) + bq + bkv;
    double attend = 0, host = 0;
    int timed_layers = 0;
    for (int layer = 0; layer < shape.num_layers && status.ok(); ++layer) {
      const bool timed = (layer_steps++ + step) % timing_interval == 0;
      const auto h0 = std::chrono::steady_clock::now();
      std::memcpy(h_qkv, q.data(), bq);
      std::memcpy(h_qkv + bq, kv.data(), bkv);
      std::memcpy(h_qkv + bq + bkv, kv.data() + kv.size() / 2, bkv);
      cudaMemcpyAsync(d_qkv, h_qkv, bq + 2 * bkv, cudaMemcpyHostToDevice, stream);
      ap.arena = arena.layer_data(0);
      ap.first_layer = layer;
      if (timed) cudaEventRecord(ev0, stream);
      if (cudaError_t e = kvpool::cuda::LaunchAppendKv(ap, stream); e != cudaSuccess) status = fail(e);
      p.kv = arena.layer_data(layer);
      if (status.ok()) status = arm.Run(p, stream);
      if (timed) cudaEventRecord(ev1, stream);
      const auto h1 = std::chrono::steady_clock::now();
      if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess && status.ok()) status = fail(e);
      const auto h2 = std::chrono::steady_clock::now();
      if (timed) {
        float ms = 0;
        cudaEventElapsedTime(&ms, ev0, ev1);
        attend += ms * 1e-3;
        ++timed_layers;
      }
      host += std::chrono::duration<double>(h1 - h0 + (std::chrono::steady_clock::now() - h2)).count();
    }
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (step >= warmup && status.ok() && timed_layers > 0) {
      attend *= static_cast<double>(shape.num_layers) / timed_layers;  // the timed layer-steps, scaled to all
      st.tokens += B;
      st.attend_s += attend;
      st.wall_s += wall;
      st.host_s += host;
      st.layers += shape.num_layers;
      st.step_attend_s.push_back(attend);
      st.step_wall_s.push_back(wall);
      st.kv_bytes += static_cast<double>(kv_tokens) * shape.kv_bytes_per_token_layer() * shape.num_layers;
      st.mix[FlashInferPathName(arm.options().path)] += 1;
    }
    for (auto it = active.begin(); it != active.end();) {
      if (--it->left <= 0) {
        free_pages.insert(free_pages.end(), it->pages.begin(), it->pages.end());
        it = active.erase(it);
      } else {
        ++it;
      }
    }
  }
  cudaStreamSynchronize(stream);
  cudaFree(d_table);
  cudaFree(d_qkv);
  cudaFreeHost(h_table);
  cudaFreeHost(h_qkv);
  cudaFreeHost(h_out);
  cudaEventDestroy(ev0);
  cudaEventDestroy(ev1);
  cudaStreamDestroy(stream);
  if (!status.ok()) return status;
  return st;
}
#endif

}  // namespace

int RunTraceBench(const TraceBenchOptions& o) {
  if (o.attention_timing_interval < 1 || o.attention_timing_interval > o.num_layers) {
    std::fprintf(stderr, "pkv-bench trace: --attention_timing_interval must be in [1, --layers]\n");
    return 2;
  }
  engine::DecodeUpload upload = engine::DecodeUpload::kAuto;
  if (o.decode_upload == "pull") {
    upload = engine::DecodeUpload::kPull;
  } else if (o.decode_upload == "copy") {
    upload = engine::DecodeUpload::kCopy;
  } else if (o.decode_upload != "auto") {
    std::fprintf(stderr, "pkv-bench trace: --decode_upload must be auto, pull or copy\n");
    return 2;
  }
  if (!engine::CudaDeviceAvailable()) {
    std::fprintf(stderr, "pkv-bench trace: no CUDA device\n");
    return 2;
  }
  scheduler::CostProfile profile = scheduler::DefaultCostProfile();
  std::string profile_name = "default";
  if (!o.profile_path.empty()) {
    auto p = scheduler::LoadCostProfile(o.profile_path);
    if (!p.ok()) {
      std::fprintf(stderr, "pkv-bench trace: %s\n", std::string(p.status().message()).c_str());
      return 2;
    }
    profile = *p;
    profile_name = o.profile_path;
  }
  std::ofstream csv;
  if (!o.csv_path.empty()) {
    csv.open(o.csv_path);
    csv << "dtype,workload,batch,seed,arm,tokens,attend_s,wall_s,tok_per_s_attend,tok_per_s_wall,"
           "p50_step_attend_ms,p99_step_attend_ms,p50_step_wall_ms,p99_step_wall_ms,kv_gbps,beyond_attention_us_per_layer,host_us_per_layer,mix\n";
  }
  std::ostringstream md;
  std::vector<Arm> arms = {{"adaptive", std::nullopt},
                           {"per_request", KernelId::kPerRequest},
                           {"sequence_split", KernelId::kSequenceSplit},
                           {"workqueue", KernelId::kWorkQueue}};
#ifdef PKV_WITH_FLASHINFER
  for (FlashInferPath path : {FlashInferPath::kDecode, FlashInferPath::kPrefill}) {
    arms.push_back(Arm{FlashInferPathName(path), std::nullopt, static_cast<int>(path)});
  }
#endif
  for (DType dt : o.dtypes) {
    ModelShape shape;
    shape.num_layers = o.num_layers;
    shape.num_q_heads = o.num_q_heads;
    shape.num_kv_heads = o.num_kv_heads;
    shape.head_dim = o.head_dim;
    shape.page_size = o.page_size;
    shape.dtype = dt;
    engine::CudaBackendOptions bo;
    bo.free_memory_fraction = o.pool_fraction;
    bo.max_batch = 64;
    bo.attention_timing_interval = o.attention_timing_interval;
    bo.decode_upload = upload;
    auto backend = engine::CreateCudaBackend(shape, bo);
    if (!backend.ok()) {
      std::fprintf(stderr, "pkv-bench trace: %s\n", std::string(backend.status().message()).c_str());
      return 1;
    }
    kvpool::KvArena& arena = (*backend)->arena();
    const size_t elems = static_cast<size_t>(arena.num_pages()) * arena.page_elems() * shape.num_layers;
    FillNormal(arena.layer_data(0), elems, dt == DType::kBF16, 20260622, nullptr);
    cudaDeviceSynchronize();
    const scheduler::DeviceInfo dev = (*backend)->device_info();
    const size_t ceil_bytes = std::min<size_t>(elems * 2, size_t{8} << 30);
    const void* arena_base = arena.layer_data(0);
    const double ceiling0 = StreamCeilingGbps(arena_base, ceil_bytes / 16 * 16, dev.num_sms);
    const auto kernels = (*backend)->kernels();
    scheduler::Scheduler::Options so;
    so.available = kernels;
    so.profile = profile;
    auto sched = scheduler::Scheduler::Create(so);
    engine::EngineOptions eo;
    eo.max_batch = 64;
    eo.scatter_seed = 20260622;
    auto eng = engine::Engine::Create(eo, std::move(*backend), std::move(*sched));
    if (!eng.ok()) {
      std::fprintf(stderr, "pkv-bench trace: %s\n", std::string(eng.status().message()).c_str());
      return 1;
    }
    engine::Engine& e = **eng;
    KvTokensObserver observer;
    e.SetObserver(&observer);
#ifdef PKV_WITH_FLASHINFER
    std::map<int, std::unique_ptr<FlashInferArm>> fi_arms;  // by FlashInferPath; a missing one is skipped
    for (const Arm& arm : arms) {
      if (arm.flashinfer_path < 0) continue;
      FlashInferArm::Options fo;
      fo.path = static_cast<FlashInferPath>(arm.flashinfer_path);
      fo.dtype = dt;
      fo.num_q_heads = shape.num_q_heads;
      fo.num_kv_heads = shape.num_kv_heads;
      fo.head_dim = shape.head_dim;
      fo.page_size = shape.page_size;
      fo.max_batch = 64;
      auto fa = FlashInferArm::Create(fo);
      if (!fa.ok()) {
        std::printf("# %s: not run (%s)\n", arm.name.c_str(), std::string(fa.status().message()).c_str());
        continue;
      }
      fi_arms[arm.flashinfer_path] = std::move(*fa);
    }
#endif
    const auto q = RandomNormalBytes(dt, 64 * shape.num_q_heads * shape.head_dim, 1);
    const auto kv = RandomNormalBytes(dt, 2 * 64 * shape.num_kv_heads * shape.head_dim, 2);
    std::printf("# pkv-bench trace on %s, %s, layers=%d hq=%d hkv=%d d=%d page=%d, profile %s, "
                "stream-read ceiling %.0f GB/s\n",
                dev.name.c_str(), DTypeName(dt), shape.num_layers, shape.num_q_heads, shape.num_kv_heads,
                shape.head_dim, shape.page_size, profile_name.c_str(), ceiling0);
    // One untimed run of the first workload through the engine before any arm is measured: the
    // engine's first token steps fill its recycled output buffers (the retry window's worth),
    // which would otherwise be charged to whichever arm runs first.
    if (!o.workloads.empty()) {
      const std::string& w0 = o.workloads.front();
      const size_t colon0 = w0.find(':');
      auto kind0 = ParseWorkloadKind(w0.substr(0, colon0));
      const int batch0 = colon0 == std::string::npos ? 8 : std::atoi(w0.c_str() + colon0 + 1);
      if (kind0.ok() && batch0 >= 1 && batch0 <= 64) {
        auto warm = RunOnce(e, shape, *kind0, batch0, batch0 == 1 ? 16 : 24, 0, 40, o.seeds.empty() ? 1 : o.seeds.front(), q,
                            kv, observer);
        if (!warm.ok()) {
          std::fprintf(stderr, "pkv-bench trace: warm-up: %s\n", std::string(warm.status().message()).c_str());
          return 1;
        }
      }
    }
    md << "\n### " << DTypeName(dt) << " on " << dev.name << " (ceiling " << static_cast<int>(ceiling0)
       << " GB/s)\n\n| workload | arm | tok/s (attention) | % of read ceiling | tok/s (wall) | p50 / p99 token-step attention ms | "
          "us per layer beyond attention (host) | mix | vs best fixed |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const std::string& w : o.workloads) {
      const size_t colon = w.find(':');
      auto kind = ParseWorkloadKind(w.substr(0, colon));
      const int batch = colon == std::string::npos ? 8 : std::atoi(w.c_str() + colon + 1);
      if (!kind.ok() || batch < 1 || batch > 64) {
        std::fprintf(stderr, "pkv-bench trace: bad workload '%s'\n", w.c_str());
        return 2;
      }
      const int measured = o.measured_steps > 0 ? o.measured_steps : (batch == 1 ? 64 : 48);
      const int nreq = o.num_requests > 0 ? o.num_requests : (batch == 1 ? 16 : 24);
      // beyond: (wall - attention) per layer-step, us; host: its host share (RunStats::host_s).
      std::map<std::string, std::vector<double>> tps_attend, tps_wall, p50, p99, roof, beyond, host;
      std::map<std::string, std::map<std::string, int64_t>> mixes;
      for (uint64_t seed : o.seeds) {
        for (const Arm& arm : arms) {
          absl::StatusOr<RunStats> st;
          if (arm.flashinfer_path >= 0) {
#ifdef PKV_WITH_FLASHINFER
            if (!fi_arms.count(arm.flashinfer_path)) continue;
            st = RunFlashInferOnce(*fi_arms[arm.flashinfer_path], arena, shape, *kind, batch, nreq, o.warmup_steps,
                                   measured, seed, q, kv, o.attention_timing_interval);
#endif
          } else {
            scheduler::Scheduler::Options aso = so;
            aso.fixed_kernel = arm.fixed;
            if (auto s = e.SetScheduler(*scheduler::Scheduler::Create(aso)); !s.ok()) return 1;
            st = RunOnce(e, shape, *kind, batch, nreq, o.warmup_steps, measured, seed, q, kv, observer);
          }
          if (!st.ok()) {
            std::fprintf(stderr, "pkv-bench trace: %s %s seed %llu: %s\n", w.c_str(), arm.name.c_str(),
                         static_cast<unsigned long long>(seed), std::string(st.status().message()).c_str());
            return 1;
          }
          const double ta = st->tokens / st->attend_s, tw = st->tokens / st->wall_s;
          tps_attend[arm.name].push_back(ta);
          tps_wall[arm.name].push_back(tw);
          roof[arm.name].push_back(st->kv_bytes / st->attend_s / 1e9 / ceiling0 * 100.0);
          p50[arm.name].push_back(Percentile(st->step_attend_s, 0.5) * 1e3);
          p99[arm.name].push_back(Percentile(st->step_attend_s, 0.99) * 1e3);
          const double layers = static_cast<double>(std::max<int64_t>(st->layers, 1));
          beyond[arm.name].push_back((st->wall_s - st->attend_s) / layers * 1e6);
          host[arm.name].push_back(st->host_s / layers * 1e6);
          for (const auto& [k, n] : st->mix) mixes[arm.name][k] += n;
          std::string mix;
          for (const auto& [k, n] : st->mix) mix += k + "=" + std::to_string(n) + ";";
          if (csv.is_open()) {
            csv << DTypeName(dt) << "," << w.substr(0, colon) << "," << batch << "," << seed << "," << arm.name
                << "," << st->tokens << "," << st->attend_s << "," << st->wall_s << "," << ta << "," << tw << ","
                << Percentile(st->step_attend_s, 0.5) * 1e3 << "," << Percentile(st->step_attend_s, 0.99) * 1e3
                << "," << Percentile(st->step_wall_s, 0.5) * 1e3 << "," << Percentile(st->step_wall_s, 0.99) * 1e3
                << "," << st->kv_bytes / st->attend_s / 1e9 << "," << beyond[arm.name].back() << ","
                << host[arm.name].back() << "," << mix << "\n";
          }
        }
      }
      double best_fixed = 0;
      std::string best_name;
      for (const Arm& arm : arms) {
        if (!arm.fixed) continue;
        double m, sd;
        MeanStd(tps_attend[arm.name], &m, &sd);
        if (m > best_fixed) {
          best_fixed = m;
          best_name = arm.name;
        }
      }
      for (const Arm& arm : arms) {
        if (tps_attend[arm.name].empty()) continue;  // an arm that did not run
        double ma, sa, mw, sw, m50, s50, m99, s99, mr, sr, mb, sb, mh, sh;
        MeanStd(roof[arm.name], &mr, &sr);
        MeanStd(beyond[arm.name], &mb, &sb);
        MeanStd(host[arm.name], &mh, &sh);
        MeanStd(tps_attend[arm.name], &ma, &sa);
        MeanStd(tps_wall[arm.name], &mw, &sw);
        MeanStd(p50[arm.name], &m50, &s50);
        MeanStd(p99[arm.name], &m99, &s99);
        std::string mix;
        for (const auto& [k, n] : mixes[arm.name]) mix += k + ":" + std::to_string(n) + " ";
        std::printf("%-12s B%-2d %-15s attn %9.0f ± %6.0f tok/s (%5.1f%% roof)  wall %9.0f ± %6.0f tok/s  step p50 %7.3f p99 %7.3f ms  "
                    "beyond attention %5.1f us/layer (host %5.1f)  %s%s\n",
                    w.substr(0, colon).c_str(), batch, arm.name.c_str(), ma, sa, mr, mw, sw, m50, m99, mb, mh,
                    arm.fixed || arm.flashinfer_path >= 0
                        ? ""
                        : ("vs best fixed (" + best_name + ") " + std::to_string(ma / best_fixed) + "  ").c_str(),
                    mix.c_str());
        char line[512];
        std::snprintf(line, sizeof(line), "| %s B%d | %s | %.0f ± %.0f | %.1f | %.0f ± %.0f | %.3f / %.3f | %.1f (%.1f) | %s | %.3f |\n",
                      w.substr(0, colon).c_str(), batch, arm.name.c_str(), ma, sa, mr, mw, sw, m50, m99, mb, mh,
                      mix.c_str(), ma / best_fixed);
        md << line;
      }
      // adaptive vs FlashInfer's best path (by mean attention tok/s), attention and wall.
      double fi_best = 0, fi_wall = 0;
      std::string fi_name;
      for (const Arm& arm : arms) {
        if (arm.flashinfer_path < 0 || tps_attend[arm.name].empty()) continue;
        double m, sd, mw, sw;
        MeanStd(tps_attend[arm.name], &m, &sd);
        MeanStd(tps_wall[arm.name], &mw, &sw);
        if (m > fi_best) {
          fi_best = m;
          fi_wall = mw;
          fi_name = arm.name;
        }
      }
      if (fi_best > 0) {
        double ma, sa, mw, sw;
        MeanStd(tps_attend["adaptive"], &ma, &sa);
        MeanStd(tps_wall["adaptive"], &mw, &sw);
        std::printf("%-12s B%-2d adaptive / flashinfer (%s): attention %.3f, wall %.3f\n", w.substr(0, colon).c_str(),
                    batch, fi_name.c_str(), ma / fi_best, mw / fi_wall);
        char line[256];
        std::snprintf(line, sizeof(line), "| %s B%d | adaptive / flashinfer (%s) | %.3f (attention) | | %.3f (wall) | | | | |\n",
                      w.substr(0, colon).c_str(), batch, fi_name.c_str(), ma / fi_best, mw / fi_wall);
        md << line;
      }
      std::fflush(stdout);
    }
    e.SetObserver(nullptr);
    const double ceiling1 = StreamCeilingGbps(arena_base, ceil_bytes / 16 * 16, dev.num_sms);
    std::printf("# stream-read ceiling at start %.0f GB/s, at end %.0f GB/s\n", ceiling0, ceiling1);
    md << "\nStream-read ceiling at start " << static_cast<int>(ceiling0) << " GB/s, at end "
       << static_cast<int>(ceiling1) << " GB/s. Every arm timed its attention with GPU events on one layer-step in "
       << o.attention_timing_interval << " (attention figures: those, scaled to every layer-step). The engine's "
       << "decode uploads: --decode_upload=" << o.decode_upload << ".\n";
  }
  if (!o.md_path.empty()) {
    std::ofstream out(o.md_path);
    out << "# pkv-bench trace\n\ncommit " << o.commit << ", command `" << o.command << "`\n" << md.str();
  }
  return 0;
}

}  // namespace pkv::bench
