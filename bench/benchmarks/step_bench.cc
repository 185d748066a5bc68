// bench/benchmarks/step_bench.cc — `pkv-step-bench` (Google Benchmark): the engine's own host cost
// of one decode layer-step, with attention skipped (the CPU backend in skip mode: no KV write, no
// attention, zero outputs), for the model shape the benchmarks use (32 layers, Hq 32, Hkv 8,
// d 128, page 16, fp16) at B1 / B8 / B16 / B64. What it times is what Engine::Step adds around
// any attention kernel: validation (sizes, rows, the NaN/inf scan of q, k and v), the token
// step's bookkeeping, output buffers and the observer; `pkv-bench trace` on a GPU host compares
// the same layer-step with FlashInfer's thinner loop.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "common/log.h"
#include "engine/engine.h"
#include "engine/engine_factory.h"

namespace {

void BM_LayerStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const bool check_finite = state.range(1) != 0;
  pkv::engine::EngineConfig c;
  c.shape.num_layers = 32;
  c.shape.num_q_heads = 32;
  c.shape.num_kv_heads = 8;
  c.shape.head_dim = 128;
  c.shape.page_size = 16;
  c.backend = "cpu";
  c.cpu_threads = 1;
  c.num_pages = 1024;
  c.attention = "skip";
  c.check_finite = check_finite;
  auto engine = pkv::engine::BuildEngine(c);
  PKV_CHECK(engine.ok()) << engine.status();
  pkv::engine::Engine& e = **engine;
  std::vector<pkv::engine::SeqId> rows;
  for (int b = 0; b < batch; ++b) {
    rows.push_back(b + 1);
    PKV_CHECK(e.AdoptUnwrittenPromptForBenchmark(rows.back(), 64).ok()) << "adopt";
  }
  const size_t qb = static_cast<size_t>(batch) * 32 * 128 * 2, kvb = static_cast<size_t>(batch) * 8 * 128 * 2;
  std::vector<uint8_t> q(qb, 0x3c), k(kvb, 0x3c), v(kvb, 0x3c);  // 0x3c3c: a finite fp16
  pkv::engine::StepInput in;
  in.rows = rows;
  in.q = q;
  in.k = k;
  in.v = v;
  uint64_t step = 0;
  // Warm up past the retry window (32 token steps): until it recycles, every layer-step's output
  // buffer is new memory (the fill a worker pays once per batch shape).
  for (int t = 0; t < 40; ++t) {
    in.token_step_id = ++step;
    for (int32_t l = 0; l < 32; ++l) {
      in.layer = l;
      PKV_CHECK(e.Step(in).ok()) << "warm-up";
    }
  }
  int32_t layer = 32;
  for (auto _ : state) {
    if (layer == 32) {
      layer = 0;
      in.token_step_id = ++step;
    }
    in.layer = layer++;
    auto out = e.Step(in);
    if (!out.ok()) {
      state.SkipWithError(std::string(out.status().message()).c_str());
      break;
    }
    benchmark::DoNotOptimize(out->out);
    // A token step's rows grow by one token; keep them short so that the pool never fills.
    if (layer == 32 && step % 48 == 0) {
      state.PauseTiming();
      PKV_CHECK(e.Release(rows).ok()) << "release";
      for (pkv::engine::SeqId id : rows) PKV_CHECK(e.AdoptUnwrittenPromptForBenchmark(id, 64).ok()) << "adopt";
      state.ResumeTiming();
    }
  }
  state.SetLabel("B" + std::to_string(batch) + (check_finite ? "" : " --check_finite=false"));
}

BENCHMARK(BM_LayerStep)->Args({1, 1})->Args({8, 1})->Args({16, 1})->Args({64, 1})->Args({8, 0})->Args({64, 0});

}  // namespace

BENCHMARK_MAIN();
