#include "bench/benchmarks/ingest_bench.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "common/model_shape.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "kvpool/cuda/device_kv_arena.h"
#include "scheduler/scheduler.h"

namespace pkv::bench {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One round: begin every prompt, stream the interleaved chunks, commit all, release all.
// Returns the wall seconds (BeginPrompt of the first .. Commit of the last) or < 0 on error.
double IngestRound(engine::Engine& e, const ModelShape& shape, const std::vector<int64_t>& lengths, int chunk,
                   int writers, const std::vector<uint8_t>& k_src, const std::vector<uint8_t>& v_src,
                   engine::SeqId first_id) {
  const int64_t row = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim * 2;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<engine::PromptWrite>> writes;
  for (size_t i = 0; i < lengths.size(); ++i) {
    auto w = e.BeginPrompt(first_id + static_cast<engine::SeqId>(i), lengths[i]);
    if (!w.ok()) {
      std::fprintf(stderr, "ingest: BeginPrompt: %s\n", w.status().ToString().c_str());
      return -1;
    }
    writes.push_back(std::move(*w));
  }
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  // Writer w writes prompts w, w + writers, ... interleaved, then commits them.
  auto write_share = [&](int w) -> absl::Status {
    size_t src_at = (k_src.size() / static_cast<size_t>(writers)) * static_cast<size_t>(w) / 4096 * 4096;
    for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
      for (int64_t t0c = 0; t0c < longest; t0c += chunk) {
        for (size_t i = static_cast<size_t>(w); i < lengths.size(); i += static_cast<size_t>(writers)) {
          if (t0c >= lengths[i]) continue;
          const int64_t n = std::min<int64_t>(chunk, lengths[i] - t0c);
          const size_t bytes = static_cast<size_t>(n * row);
          if (src_at + bytes > k_src.size()) src_at = 0;  // walk the pageable source: no one hot buffer
          if (absl::Status s = writes[i]->Write(layer, t0c, n, std::span(k_src).subspan(src_at, bytes),
                                                std::span(v_src).subspan(src_at, bytes));
              !s.ok()) {
            return s;
          }
          src_at += bytes;
        }
      }
    }
    for (size_t i = static_cast<size_t>(w); i < lengths.size(); i += static_cast<size_t>(writers)) {
      if (absl::Status s = writes[i]->Commit(); !s.ok()) return s;
    }
    return absl::OkStatus();
  };
  std::vector<absl::Status> results(static_cast<size_t>(writers));
  std::vector<std::thread> threads;
  for (int w = 1; w < writers; ++w) threads.emplace_back([&, w] { results[w] = write_share(w); });
  results[0] = write_share(0);
  for (auto& t : threads) t.join();
  for (const absl::Status& s : results) {
    if (!s.ok()) {
      std::fprintf(stderr, "ingest: Write/Commit: %s\n", s.ToString().c_str());
      return -1;
    }
  }
  const double seconds = Seconds(t0);
  std::vector<engine::SeqId> ids;
  for (auto& w : writes) ids.push_back(w->seq());
  if (absl::Status s = e.Release(ids); !s.ok()) {
    std::fprintf(stderr, "ingest: Release: %s\n", s.ToString().c_str());
    return -1;
  }
  return seconds;
}

// Plain pinned host -> device copies of `total` bytes in 256 MiB pieces; GB/s or < 0.
double PinnedMemcpyGbps(int64_t total) {
  const size_t piece = size_t{256} << 20;
  void* host = nullptr;
  void* dev = nullptr;
  if (cudaMallocHost(&host, piece) != cudaSuccess || cudaMalloc(&dev, piece) != cudaSuccess) {
    std::fprintf(stderr, "ingest: cannot allocate the memcpy baseline buffers\n");
    cudaFreeHost(host);
    return -1;
  }
  std::memset(host, 1, piece);
  cudaMemcpy(dev, host, piece, cudaMemcpyHostToDevice);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t done = 0; done < total;) {
    const size_t n = static_cast<size_t>(std::min<int64_t>(piece, total - done));
    cudaMemcpyAsync(dev, host, n, cudaMemcpyHostToDevice, nullptr);
    done += static_cast<int64_t>(n);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  const double seconds = Seconds(t0);
  cudaFree(dev);
  cudaFreeHost(host);
  if (err != cudaSuccess) {
    std::fprintf(stderr, "ingest: memcpy baseline: %s\n", cudaGetErrorString(err));
    return -1;
  }
  return total / seconds / 1e9;
}

}  // namespace

int RunIngestBench(const IngestBenchOptions& o) {
  if (!engine::CudaDeviceAvailable()) {
    std::fprintf(stderr, "pkv-bench ingest: no CUDA device is available (this benchmark measures the GPU ingest path)\n");
    return 1;
  }
  if (o.num_prompts < 1 || o.min_tokens < 1 || o.max_tokens < o.min_tokens || o.chunk_tokens < 1 || o.repeats < 1 ||
      o.writers < 1 || o.writers > o.num_prompts || o.copy_threads < 0) {
    std::fprintf(stderr, "pkv-bench ingest: need prompts >= 1, 1 <= min_tokens <= max_tokens, chunk >= 1, repeats >= 1, "
                         "1 <= writers <= prompts, copy_threads >= 0\n");
    return 2;
  }
  ModelShape shape;
  shape.num_layers = o.num_layers;
  shape.num_q_heads = o.num_kv_heads * 4;
  shape.num_kv_heads = o.num_kv_heads;
  shape.head_dim = o.head_dim;
  shape.page_size = o.page_size;
  shape.dtype = DType::kF16;
  if (absl::Status s = shape.Validate(); !s.ok()) {
    std::fprintf(stderr, "pkv-bench ingest: %s\n", s.ToString().c_str());
    return 2;
  }
  std::vector<int64_t> lengths;
  for (int i = 0; i < o.num_prompts; ++i) {
    lengths.push_back(o.num_prompts == 1 ? o.max_tokens
                                         : o.min_tokens + (o.max_tokens - o.min_tokens) * i / (o.num_prompts - 1));
  }
  int64_t pages = 0, tokens = 0;
  for (int64_t n : lengths) {
    pages += (n + o.page_size - 1) / o.page_size;
    tokens += n;
  }
  const int64_t row = static_cast<int64_t>(o.num_kv_heads) * o.head_dim * 2;
  const int64_t bytes = tokens * o.num_layers * 2 * row;

  engine::CudaBackendOptions bo;
  bo.num_pages = pages + 16;
  bo.max_batch = 8;
  bo.max_open_token_steps = 1;
  bo.ingest_copy_threads = o.copy_threads;
  auto backend = engine::CreateCudaBackend(shape, bo);
  if (!backend.ok()) {
    std::fprintf(stderr, "pkv-bench ingest: %s\n", backend.status().ToString().c_str());
    return 1;
  }
  auto* arena = dynamic_cast<kvpool::DeviceKvArena*>(&(*backend)->arena());
  scheduler::Scheduler::Options so;
  so.available = {KernelId::kPerRequest};
  auto sched = scheduler::Scheduler::Create(so);
  if (!sched.ok()) return 1;
  engine::EngineOptions eo;
  eo.max_batch = 8;
  eo.scatter_seed = 20260701;  // scattered physical pages, as in a long-running pool
  eo.check_finite = o.check_finite;
  auto eng = engine::Engine::Create(eo, std::move(*backend), std::move(*sched));
  if (!eng.ok()) {
    std::fprintf(stderr, "pkv-bench ingest: %s\n", eng.status().ToString().c_str());
    return 1;
  }
  // Pageable sources (like gRPC message bytes), 64 MiB of random fp16 each for K and V.
  std::mt19937_64 rng(7);
  std::vector<uint8_t> k_src(size_t{64} << 20), v_src(size_t{64} << 20);
  // Random bits with the top exponent bit cleared: finite fp16 and bf16 values, as the engine
  // refuses NaN and infinity.
  for (size_t i = 0; i < k_src.size(); ++i) k_src[i] = static_cast<uint8_t>(rng()) & (i % 2 ? 0xBF : 0xFF);
  for (size_t i = 0; i < v_src.size(); ++i) v_src[i] = static_cast<uint8_t>(rng()) & (i % 2 ? 0xBF : 0xFF);

  std::printf("ingest: %d prompts of %lld..%lld tokens, %d layers, Hkv %d, d %d, page %d, %d-token chunks, %d writer "
              "threads, %d copy helpers%s: %.2f GiB of K,V per round\n",
              o.num_prompts, static_cast<long long>(o.min_tokens), static_cast<long long>(o.max_tokens), o.num_layers,
              o.num_kv_heads, o.head_dim, o.page_size, o.chunk_tokens, o.writers, o.copy_threads,
              o.check_finite ? "" : ", no NaN/inf scan", bytes / double(1 << 30));
  if (IngestRound(**eng, shape, lengths, o.chunk_tokens, o.writers, k_src, v_src, 1) < 0) return 1;  // warm-up
  const kvpool::IngestStats before = arena != nullptr ? arena->staged_stats() : kvpool::IngestStats{};
  double best = 1e30, sum = 0;
  for (int r = 0; r < o.repeats; ++r) {
    const double s = IngestRound(**eng, shape, lengths, o.chunk_tokens, o.writers, k_src, v_src, 1000 * (r + 1));
    if (s < 0) return 1;
    best = std::min(best, s);
    sum += s;
  }
  const kvpool::IngestStats after = arena != nullptr ? arena->staged_stats() : kvpool::IngestStats{};
  const int64_t chunks_per_round = [&] {
    int64_t c = 0;
    for (int64_t n : lengths) c += (n + o.chunk_tokens - 1) / o.chunk_tokens;
    return c * o.num_layers;
  }();
  const double staged_gbps = bytes / best / 1e9;
  const double mean_gbps = bytes / (sum / o.repeats) / 1e9;
  const double pinned_gbps = PinnedMemcpyGbps(bytes);
  if (pinned_gbps < 0) return 1;
  const double copies_per_round = static_cast<double>(after.copies - before.copies) / o.repeats;
  std::printf("staged ingest (engine WriteKV path): best %.2f GB/s, mean %.2f GB/s; %.0f merged copies+scatters per "
              "round for %lld chunks\n",
              staged_gbps, mean_gbps, copies_per_round, static_cast<long long>(chunks_per_round));
  std::printf("pinned cudaMemcpy of the same bytes (256 MiB copies): %.2f GB/s; staged/pinned = %.2f\n", pinned_gbps,
              staged_gbps / pinned_gbps);
  if (!o.md_path.empty()) {
    FILE* f = std::fopen(o.md_path.c_str(), "a");
    if (f == nullptr) {
      std::fprintf(stderr, "pkv-bench ingest: cannot open %s\n", o.md_path.c_str());
      return 1;
    }
    std::fprintf(f, "\n## pkv-bench ingest (commit %s)\n\n`%s`\n\n", o.commit.c_str(), o.command.c_str());
    std::fprintf(f, "| writers | copy helpers | bytes/round | chunks/round | merged copies/round | staged GB/s (best) | staged GB/s (mean) | "
                    "pinned memcpy GB/s | staged/pinned |\n|---|---|---|---|---|---|---|---|---|\n");
    std::fprintf(f, "| %d | %d | %lld | %lld | %.0f | %.2f | %.2f | %.2f | %.2f |\n", o.writers, o.copy_threads,
                 static_cast<long long>(bytes), static_cast<long long>(chunks_per_round), copies_per_round, staged_gbps, mean_gbps, pinned_gbps,
                 staged_gbps / pinned_gbps);
    std::fclose(f);
  }
  return 0;
}

}  // namespace pkv::bench
