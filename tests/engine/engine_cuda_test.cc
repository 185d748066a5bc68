// The engine on the CUDA backend against the engine on the CPU backend (kernels/reference, the
// executable specification) fed identical prompts and steps: every route the scheduler can pick
// (adaptive and each fixed arm), fp16 and bf16, scattered pages, ragged rows; and which layers
// carry the backend's sampled stage times. Label gpu: skips without a device.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "gtest/gtest.h"

namespace pkv::engine {
namespace {

ModelShape Shape(DType dtype) {
  ModelShape s;
  s.num_layers = 3;
  s.num_q_heads = 32;
  s.num_kv_heads = 8;
  s.head_dim = 128;
  s.page_size = 16;
  s.dtype = dtype;
  return s;
}

std::unique_ptr<Engine> MakeEngine(ExecutionBackendPtr backend, std::optional<KernelId> fixed, uint64_t seed,
                                   int64_t static_slot_tokens = 0, std::optional<bool> separate_merge = std::nullopt) {
  scheduler::Scheduler::Options so;
  so.available = backend->kernels();
  so.fixed_kernel = fixed;
  so.separate_merge = separate_merge;
  auto sched = scheduler::Scheduler::Create(so);
  EXPECT_TRUE(sched.ok());
  EngineOptions eo;
  eo.max_batch = 16;
  eo.scatter_seed = seed;
  eo.static_slot_tokens = static_slot_tokens;
  auto e = Engine::Create(eo, std::move(backend), std::move(*sched));
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

std::vector<uint8_t> RandomBytes(DType dt, size_t elems, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> b(elems * 2);
  for (size_t i = 0; i < elems; ++i) {
    const uint16_t h = FromFloat(dt, normal(rng));
    b[2 * i] = static_cast<uint8_t>(h & 0xFF);
    b[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  return b;
}

double RelL2(DType dt, const std::string& got, const std::string& want) {
  double e = 0, r = 0;
  for (size_t i = 0; i + 1 < want.size(); i += 2) {
    const double g = ToFloat(dt, static_cast<uint8_t>(got[i]) | (static_cast<uint8_t>(got[i + 1]) << 8));
    const double w = ToFloat(dt, static_cast<uint8_t>(want[i]) | (static_cast<uint8_t>(want[i + 1]) << 8));
    if (std::isnan(g)) return INFINITY;
    e += (g - w) * (g - w);
    r += w * w;
  }
  return std::sqrt(e / r);
}

// Where a layer-step's q, k, v and out_copy live (RunAgainstCpu).
enum class Io {
  kHeap,                 // q, k, v in heap vectors, no out_copy
  kRegistered,           // all four in a POSIX shared-memory object registered with the engine
  kRegisteredMisaligned, // the same object, at offsets off 16 bytes: the engine copies instead
};

// A POSIX shared-memory object mapped MAP_SHARED, as a router's region is in the worker.
struct SharedRegion {
  explicit SharedRegion(size_t n) : bytes(n) {
    const std::string name = "/pkv-engine-cuda-test-" + std::to_string(getpid());
    const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(n)), 0);
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    shm_unlink(name.c_str());
    EXPECT_NE(p, MAP_FAILED);
    base = static_cast<uint8_t*>(p);
  }
  ~SharedRegion() { munmap(base, bytes); }
  uint8_t* base = nullptr;
  size_t bytes = 0;
};

// static_slot_tokens > 0: the GPU engine runs the static baseline (every sequence holds pages
// for that many tokens from the start); the CPU reference engine pages as usual.
// pinned_output_bytes >= 0 replaces the backend's default (0: outputs copied out of the slots'
// buffers instead of written in place). `io`: where the GPU engine's tensors live; with a
// registered region the last token step runs after the registration was released (copies again).
// refuse_nan: before every other later layer, the GPU engine is sent other q, K,V for it with a NaN
// in k; it refuses that, and the real layer that follows must still match the reference.
void RunAgainstCpu(DType dt, std::optional<KernelId> fixed, const std::vector<int64_t>& prompts,
                   int64_t static_slot_tokens = 0, int64_t pinned_output_bytes = -1, Io io = Io::kHeap,
                   bool refuse_nan = false, DecodeUpload upload = DecodeUpload::kAuto,
                   std::optional<bool> separate_merge = std::nullopt) {
  const ModelShape shape = Shape(dt);
  CudaBackendOptions co;
  co.num_pages = 4096;
  co.max_batch = 16;
  co.decode_upload = upload;
  if (pinned_output_bytes >= 0) co.pinned_output_bytes = pinned_output_bytes;
  auto gpu_backend = CreateCudaBackend(shape, co);
  ASSERT_TRUE(gpu_backend.ok()) << gpu_backend.status();
  auto cpu_backend = CreateCpuBackend(shape, 4096, 4);
  ASSERT_TRUE(cpu_backend.ok());
  auto gpu = MakeEngine(std::move(*gpu_backend), fixed, 77, static_slot_tokens, separate_merge);
  // Counts the token steps planned with a work queue or a split sequence-split, and those of them
  // whose plan merges in a launch of its own (two launches per layer).
  struct MergeCount final : StepObserver {
    void OnTokenStepPlanned(const TokenStepEvent& e) override {
      if (e.kernel != KernelId::kWorkQueue && !(e.kernel == KernelId::kSequenceSplit && e.num_splits > 1)) return;
      ++split_route;
      separate += e.launches_per_layer == 2 ? 1 : 0;
    }
    int split_route = 0, separate = 0;
  } merges;
  gpu->SetObserver(&merges);
  auto cpu = MakeEngine(std::move(*cpu_backend), std::nullopt, 99);
  std::mt19937_64 rng(20260622 + static_cast<int>(dt) + (fixed ? static_cast<int>(*fixed) * 7 : 0));
  const size_t tok = static_cast<size_t>(shape.num_kv_heads) * shape.head_dim;
  std::vector<SeqId> rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const SeqId id = 100 + i;
    rows.push_back(id);
    auto wg = gpu->BeginPrompt(id, prompts[i]);
    auto wc = cpu->BeginPrompt(id, prompts[i]);
    ASSERT_TRUE(wg.ok() && wc.ok());
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      auto k = RandomBytes(dt, prompts[i] * tok, rng), v = RandomBytes(dt, prompts[i] * tok, rng);
      ASSERT_TRUE((*wg)->Write(layer, 0, prompts[i], k, v).ok());
      ASSERT_TRUE((*wc)->Write(layer, 0, prompts[i], k, v).ok());
    }
    ASSERT_TRUE((*wg)->Commit().ok());
    ASSERT_TRUE((*wc)->Commit().ok());
  }
  const size_t b = rows.size();
  std::unique_ptr<SharedRegion> region;
  std::shared_ptr<void> registered;
  if (io != Io::kHeap) {
    region = std::make_unique<SharedRegion>(size_t{4} << 20);
    auto r = gpu->RegisterHostMemory(region->base, region->bytes);
    ASSERT_TRUE(r.ok()) << r.status();
    registered = *std::move(r);
  }
  for (uint64_t step = 1; step <= 3; ++step) {
    if (step == 3) registered.reset();
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      // The lse flag flips off once mid-step (no lse written into the mapped output buffer).
      const bool want_lse = !(step == 2 && layer == 1);
      auto q = RandomBytes(dt, b * shape.num_q_heads * shape.head_dim, rng);
      auto k = RandomBytes(dt, b * tok, rng), v = RandomBytes(dt, b * tok, rng);
      StepInput in;
      in.token_step_id = step;
      in.layer = layer;
      in.rows = rows;
      in.q = q;
      in.k = k;
      in.v = v;
      in.want_lse = want_lse;
      StepInput in_gpu = in;
      std::span<uint8_t> out_copy;
      // q | k | v | out at 4 KiB boundaries of the region (plus 2 bytes when misaligned).
      const size_t skew = io == Io::kRegisteredMisaligned ? 2 : 0;
      auto place = [&](size_t at, std::span<const uint8_t> bytes) {
        std::memcpy(region->base + at + skew, bytes.data(), bytes.size());
        return std::span<const uint8_t>(region->base + at + skew, bytes.size());
      };
      if (refuse_nan && layer > 0 && (step + layer) % 2 == 1) {
        auto bad_q = RandomBytes(dt, q.size() / 2, rng);
        auto bad_k = RandomBytes(dt, k.size() / 2, rng), bad_v = RandomBytes(dt, v.size() / 2, rng);
        const size_t at = (b - 1) * tok + 5;  // the last row's KV head 0, element 5
        bad_k[2 * at] = 0xC0;
        bad_k[2 * at + 1] = 0xFF;  // 0xFFC0: NaN in fp16 and in bf16
        StepInput bad = in;
        bad.q = bad_q;
        bad.k = bad_k;
        bad.v = bad_v;
        if (io != Io::kHeap) {
          bad.q = place(0, bad_q);
          bad.k = place(size_t{1} << 20, bad_k);
          bad.v = place(size_t{2} << 20, bad_v);
          bad.out_copy = std::span<uint8_t>(region->base + (size_t{3} << 20) + skew, q.size());
        }
        auto refused = gpu->Step(bad);
        EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
        EXPECT_EQ(refused.status().message().rfind("k: element [" + std::to_string(b - 1) + ", 0, 5] is NaN", 0), 0u)
            << refused.status();
      }
      if (io != Io::kHeap) {
        in_gpu.q = place(0, q);
        in_gpu.k = place(size_t{1} << 20, k);
        in_gpu.v = place(size_t{2} << 20, v);
        out_copy = std::span<uint8_t>(region->base + (size_t{3} << 20) + skew, q.size());
        std::memset(out_copy.data(), 0xFF, out_copy.size());
        in_gpu.out_copy = out_copy;
      }
      auto og = gpu->Step(in_gpu);
      auto oc = cpu->Step(in);
      ASSERT_TRUE(og.ok()) << og.status();
      ASSERT_TRUE(oc.ok()) << oc.status();
      EXPECT_EQ(og->in_place, io == Io::kRegistered && step < 3) << "step " << step << " layer " << layer;
      if (io != Io::kHeap) {
        EXPECT_TRUE(std::string(out_copy.begin(), out_copy.end()) == og->out.str()) << "out_copy differs from out";
      }
      if (fixed) EXPECT_EQ(og->kernel, *fixed);
      const double rel = RelL2(dt, og->out, oc->out);
      EXPECT_LT(rel, dt == DType::kF16 ? 2e-3 : 1e-2)
          << KernelName(og->kernel) << " " << DTypeName(dt) << " step " << step << " layer " << layer;
      double lse_err = 0;
      for (size_t i = 0; i < oc->lse.size(); ++i) lse_err = std::max(lse_err, double(std::fabs(og->lse[i] - oc->lse[i])));
      EXPECT_LT(lse_err, 1e-2) << KernelName(og->kernel);
    }
  }
  EXPECT_TRUE(gpu->CheckConsistency().ok());
  gpu->SetObserver(nullptr);
  if (separate_merge.has_value() && (fixed == KernelId::kWorkQueue || fixed == KernelId::kSequenceSplit)) {
    // Every step here splits a row, so each plan carries the pinned merge.
    EXPECT_EQ(merges.split_route, 3);
    EXPECT_EQ(merges.separate, *separate_merge ? 3 : 0);
  }
}

class EngineCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(EngineCudaTest, EveryRouteMatchesTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  for (DType dt : {DType::kF16, DType::kBF16}) {
    RunAgainstCpu(dt, std::nullopt, ragged);
    RunAgainstCpu(dt, KernelId::kPerRequest, ragged);
    RunAgainstCpu(dt, KernelId::kSequenceSplit, ragged);
    RunAgainstCpu(dt, KernelId::kWorkQueue, ragged);
  }
}

// The staged q|k|v and each token step's descriptor go up by a copy engine or by the pull kernel
// (kAuto, every other test, takes the copy engine while no prompt-ingest flush is in flight):
// each path, forced, matches the reference on every route.
TEST_F(EngineCudaTest, EveryUploadPathMatchesTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  for (DecodeUpload upload : {DecodeUpload::kPull, DecodeUpload::kCopy}) {
    RunAgainstCpu(DType::kF16, std::nullopt, ragged, 0, -1, Io::kHeap, false, upload);
    RunAgainstCpu(DType::kF16, KernelId::kPerRequest, ragged, 0, -1, Io::kHeap, false, upload);
    RunAgainstCpu(DType::kF16, KernelId::kSequenceSplit, ragged, 0, -1, Io::kHeap, false, upload);
    RunAgainstCpu(DType::kBF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kHeap, false, upload);
    // One row and two: the smallest uploads.
    RunAgainstCpu(DType::kF16, std::nullopt, {3000}, 0, -1, Io::kHeap, false, upload);
    RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, {4096, 33}, 0, -1, Io::kHeap, false, upload);
  }
}

// The work queue's split rows merged by a launch of their own (the plan's separate_merge, pinned
// here; the cost model picks it where the profile prices it below the fused merge): ragged and
// single long rows, both dtypes, outputs in place in registered memory and copied out of the slot.
TEST_F(EngineCudaTest, WorkQueueWithASeparateMergeMatchesTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kBF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, {4096}, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kRegistered, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, ragged, 0, 0, Io::kHeap, true, DecodeUpload::kAuto, true);
}

// Sequence-split's merge as a launch of its own (pinned here; the cost model picks it where the
// profile measured it cheaper than the fused merge): ragged rows and one long row, both dtypes,
// outputs in place in registered memory and copied out of the slot, NaN refusals.
TEST_F(EngineCudaTest, SequenceSplitWithASeparateMergeMatchesTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  const auto ss = KernelId::kSequenceSplit;
  RunAgainstCpu(DType::kF16, ss, ragged, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kBF16, ss, ragged, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, ss, {4096}, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, ss, ragged, 0, -1, Io::kRegistered, false, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, ss, ragged, 0, 0, Io::kHeap, true, DecodeUpload::kAuto, true);
  RunAgainstCpu(DType::kF16, ss, {4096}, 0, -1, Io::kHeap, false, DecodeUpload::kAuto, false);
}

// Without pinned output memory every layer's outputs are copied out of the slot's mapped buffer
// (the path the engine falls back to once that memory is used up); with it (the default, every
// other test) the kernels write them into the engine's buffers directly.
TEST_F(EngineCudaTest, OutputsCopiedOutOfTheSlotMatchTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  RunAgainstCpu(DType::kF16, std::nullopt, ragged, 0, 0);
  RunAgainstCpu(DType::kBF16, KernelId::kWorkQueue, ragged, 0, 0);
  RunAgainstCpu(DType::kF16, KernelId::kSequenceSplit, ragged, 0, 0);
}

// q, k, v and the outputs in registered shared memory (a router's region): the device reads and
// writes them there itself on every route, and the outputs match; misaligned, or once the
// registration is released, the engine copies instead, with the same results.
TEST_F(EngineCudaTest, RegisteredSharedMemoryIsReadAndWrittenInPlace) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  RunAgainstCpu(DType::kF16, std::nullopt, ragged, 0, -1, Io::kRegistered);
  RunAgainstCpu(DType::kBF16, KernelId::kPerRequest, ragged, 0, -1, Io::kRegistered);
  RunAgainstCpu(DType::kF16, KernelId::kSequenceSplit, ragged, 0, -1, Io::kRegistered);
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, ragged, 0, 0, Io::kRegistered);
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kRegisteredMisaligned);
}

// A later layer refused for a NaN (in place or not) leaves nothing behind: the real layer sent
// next and every later one still match the reference, on every route.
TEST_F(EngineCudaTest, ALaterLayerRefusedForNaNIsRewrittenByItsRetry) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4096, 33};
  RunAgainstCpu(DType::kF16, std::nullopt, ragged, 0, -1, Io::kHeap, true);
  RunAgainstCpu(DType::kBF16, KernelId::kWorkQueue, ragged, 0, -1, Io::kHeap, true);
  RunAgainstCpu(DType::kF16, KernelId::kSequenceSplit, ragged, 0, -1, Io::kRegistered, true);
  RunAgainstCpu(DType::kF16, KernelId::kPerRequest, ragged, 0, 0, Io::kRegistered, true);
}

// The static-reservation baseline (--static_slot_tokens) reads only the tokens a sequence holds,
// not its whole reserved slot, on every route.
TEST_F(EngineCudaTest, StaticSlotBaselineMatchesTheCpuReference) {
  const std::vector<int64_t> ragged = {3000, 17, 1, 700, 4000, 33};
  RunAgainstCpu(DType::kF16, std::nullopt, ragged, 8192);
  RunAgainstCpu(DType::kF16, KernelId::kPerRequest, ragged, 8192);
  RunAgainstCpu(DType::kF16, KernelId::kSequenceSplit, ragged, 8192);
  RunAgainstCpu(DType::kBF16, KernelId::kWorkQueue, ragged, 8192);
}

// Micro-batches on several threads: their layer-steps run concurrently on the slots' streams;
// each output matches the CPU engine fed the same inputs.
TEST_F(EngineCudaTest, ConcurrentMicroBatchesMatchTheCpuReference) {
  const ModelShape shape = Shape(DType::kF16);
  CudaBackendOptions co;
  co.num_pages = 4096;
  co.max_batch = 16;
  auto gpu_backend = CreateCudaBackend(shape, co);
  ASSERT_TRUE(gpu_backend.ok()) << gpu_backend.status();
  auto cpu_backend = CreateCpuBackend(shape, 4096, 2);
  ASSERT_TRUE(cpu_backend.ok());
  auto gpu = MakeEngine(std::move(*gpu_backend), std::nullopt, 5);
  auto cpu = MakeEngine(std::move(*cpu_backend), std::nullopt, 6);
  const size_t tok = static_cast<size_t>(shape.num_kv_heads) * shape.head_dim;
  constexpr int kThreads = 3;
  std::mt19937_64 rng(123);
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < 3; ++r) {
      const SeqId id = 10 * static_cast<SeqId>(t + 1) + r;
      const int64_t n = 200 + 900 * r + 300 * t;
      auto wg = gpu->BeginPrompt(id, n);
      auto wc = cpu->BeginPrompt(id, n);
      ASSERT_TRUE(wg.ok() && wc.ok());
      for (int layer = 0; layer < shape.num_layers; ++layer) {
        auto k = RandomBytes(DType::kF16, n * tok, rng), v = RandomBytes(DType::kF16, n * tok, rng);
        for (int64_t t0 = 0; t0 < n; t0 += 256) {  // staged chunks
          const int64_t c = std::min<int64_t>(256, n - t0);
          const auto ks = std::span(k).subspan(t0 * tok * 2, c * tok * 2);
          const auto vs = std::span(v).subspan(t0 * tok * 2, c * tok * 2);
          ASSERT_TRUE((*wg)->Write(layer, t0, c, ks, vs).ok());
          ASSERT_TRUE((*wc)->Write(layer, t0, c, ks, vs).ok());
        }
      }
      ASSERT_TRUE((*wg)->Commit().ok());
      ASSERT_TRUE((*wc)->Commit().ok());
    }
  }
  // Meanwhile prompts stream into the GPU engine (staged chunks, so ingest flushes are in flight
  // while layers run): kAuto moves between the copy engine and the pull kernel step by step.
  std::atomic<bool> decoding{true};
  std::atomic<int> prompts_streamed{0};
  std::thread streaming([&] {
    std::mt19937_64 prng(77);
    const int64_t n = 2048;
    auto k = RandomBytes(DType::kF16, n * tok, prng), v = RandomBytes(DType::kF16, n * tok, prng);
    for (SeqId id = 900; decoding.load(); ++id) {
      auto w = gpu->BeginPrompt(id, n);
      ASSERT_TRUE(w.ok()) << w.status();
      for (int layer = 0; layer < shape.num_layers; ++layer) {
        for (int64_t t0 = 0; t0 < n; t0 += 256) {
          ASSERT_TRUE((*w)->Write(layer, t0, 256, std::span(k).subspan(t0 * tok * 2, 256 * tok * 2),
                                  std::span(v).subspan(t0 * tok * 2, 256 * tok * 2))
                          .ok());
        }
      }
      ASSERT_TRUE((*w)->Commit().ok());
      const SeqId done[] = {id};
      ASSERT_TRUE(gpu->Release(done).ok());
      ++prompts_streamed;
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 trng(500 + t);
      const SeqId base = 10 * static_cast<SeqId>(t + 1);
      const std::vector<SeqId> rows = {base, base + 1, base + 2};
      for (uint64_t step = 1; step <= 4; ++step) {
        for (int layer = 0; layer < shape.num_layers; ++layer) {
          auto q = RandomBytes(DType::kF16, rows.size() * shape.num_q_heads * shape.head_dim, trng);
          auto k = RandomBytes(DType::kF16, rows.size() * tok, trng), v = RandomBytes(DType::kF16, rows.size() * tok, trng);
          StepInput in;
          in.token_step_id = 100 * (t + 1) + step;
          in.layer = layer;
          in.rows = rows;
          in.q = q;
          in.k = k;
          in.v = v;
          auto og = gpu->Step(in);
          auto oc = cpu->Step(in);
          ASSERT_TRUE(og.ok()) << og.status();
          ASSERT_TRUE(oc.ok()) << oc.status();
          EXPECT_LT(RelL2(DType::kF16, og->out, oc->out), 2e-3) << "thread " << t << " step " << step;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  decoding = false;
  streaming.join();
  EXPECT_GT(prompts_streamed.load(), 0);
  EXPECT_TRUE(gpu->CheckConsistency().ok());
}

// Device times are sampled per slot, counted over its layer-steps and shifted by one per token
// step (so the timed layers move through every layer): the attention's device time
// (attend_seconds, attention_timed) on one layer-step in attention_timing_interval, the upload
// and kernel stages (h2d_seconds, kernel_seconds) on one in stage_timing_interval (attention
// timed there too), the first included; 0 and untimed on the others. Token steps run one after
// another here, so always on slot 0. d2h_seconds is always 0 (the kernels write the outputs to
// host memory). Sampling changes no output byte: an engine timing every layer answers the same.
TEST_F(EngineCudaTest, StageTimesAreSampledOneLayerStepInN) {
  const ModelShape shape = Shape(DType::kF16);
  const std::vector<int64_t> prompts = {3000, 17, 1, 700};
  constexpr int32_t kInterval = 4;
  constexpr int32_t kAttentionInterval = 3;
  CudaBackendOptions co;
  co.num_pages = 4096;
  co.max_batch = 16;
  co.stage_timing_interval = kInterval;
  co.attention_timing_interval = kAttentionInterval;
  auto sampled_backend = CreateCudaBackend(shape, co);
  ASSERT_TRUE(sampled_backend.ok()) << sampled_backend.status();
  co.stage_timing_interval = 1;
  co.attention_timing_interval = 1;
  auto every_backend = CreateCudaBackend(shape, co);
  ASSERT_TRUE(every_backend.ok()) << every_backend.status();
  co.stage_timing_interval = 0;
  EXPECT_EQ(CreateCudaBackend(shape, co).status().code(), absl::StatusCode::kInvalidArgument);
  co.stage_timing_interval = 1;
  co.attention_timing_interval = 0;
  EXPECT_EQ(CreateCudaBackend(shape, co).status().code(), absl::StatusCode::kInvalidArgument);
  auto sampled = MakeEngine(std::move(*sampled_backend), std::nullopt, 77);
  auto every = MakeEngine(std::move(*every_backend), std::nullopt, 77);
  std::mt19937_64 rng(9090);
  const size_t tok = static_cast<size_t>(shape.num_kv_heads) * shape.head_dim;
  std::vector<SeqId> rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const SeqId id = 100 + i;
    rows.push_back(id);
    auto ws = sampled->BeginPrompt(id, prompts[i]);
    auto we = every->BeginPrompt(id, prompts[i]);
    ASSERT_TRUE(ws.ok() && we.ok());
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      auto k = RandomBytes(DType::kF16, prompts[i] * tok, rng), v = RandomBytes(DType::kF16, prompts[i] * tok, rng);
      ASSERT_TRUE((*ws)->Write(layer, 0, prompts[i], k, v).ok());
      ASSERT_TRUE((*we)->Write(layer, 0, prompts[i], k, v).ok());
    }
    ASSERT_TRUE((*ws)->Commit().ok());
    ASSERT_TRUE((*we)->Commit().ok());
  }
  int64_t layer_steps = 0, attention_timed = 0;
  std::set<int32_t> timed_layers;
  for (uint64_t step = 1; step <= 4; ++step) {
    for (int layer = 0; layer < shape.num_layers; ++layer, ++layer_steps) {
      auto q = RandomBytes(DType::kF16, rows.size() * shape.num_q_heads * shape.head_dim, rng);
      auto k = RandomBytes(DType::kF16, rows.size() * tok, rng), v = RandomBytes(DType::kF16, rows.size() * tok, rng);
      StepInput in;
      in.token_step_id = step;
      in.layer = layer;
      in.rows = rows;
      in.q = q;
      in.k = k;
      in.v = v;
      in.want_lse = true;
      auto os = sampled->Step(in);
      auto oe = every->Step(in);
      ASSERT_TRUE(os.ok()) << os.status();
      ASSERT_TRUE(oe.ok()) << oe.status();
      const std::string where = absl::StrCat("step ", step, " layer ", layer);
      EXPECT_TRUE(os->out == oe->out) << where;
      EXPECT_EQ(os->lse, oe->lse) << where;
      EXPECT_EQ(os->timings.d2h_seconds, 0.0) << where;
      const int64_t n = layer_steps + static_cast<int64_t>(step - 1);
      const bool stages = n % kInterval == 0;
      EXPECT_EQ(os->attention_timed, stages || n % kAttentionInterval == 0) << where;
      if (os->attention_timed) {
        EXPECT_GT(os->attend_seconds, 0.0) << where;
        ++attention_timed;
        timed_layers.insert(layer);
      } else {
        EXPECT_EQ(os->attend_seconds, 0.0) << where;
      }
      EXPECT_TRUE(oe->attention_timed) << where;
      EXPECT_GT(oe->attend_seconds, 0.0) << where;
      if (stages) {
        EXPECT_GT(os->timings.h2d_seconds, 0.0) << where;
        EXPECT_GE(os->timings.kernel_seconds, os->attend_seconds) << where;
      } else {
        EXPECT_EQ(os->timings.h2d_seconds, 0.0) << where;
        EXPECT_EQ(os->timings.kernel_seconds, 0.0) << where;
      }
      EXPECT_GT(oe->timings.h2d_seconds, 0.0) << where;
      EXPECT_GE(oe->timings.kernel_seconds, oe->attend_seconds) << where;
      EXPECT_EQ(oe->timings.d2h_seconds, 0.0) << where;
    }
  }
  // About one in kAttentionInterval (more: the stage-timed ones too), and not the same layers
  // every token step.
  EXPECT_GE(attention_timed, layer_steps / kAttentionInterval);
  EXPECT_LE(attention_timed, layer_steps / kAttentionInterval + layer_steps / kInterval + 2);
  EXPECT_GT(timed_layers.size(), static_cast<size_t>(shape.num_layers / kAttentionInterval + 1));
  EXPECT_TRUE(sampled->CheckConsistency().ok());
}

TEST_F(EngineCudaTest, SingleLongRow) {
  RunAgainstCpu(DType::kF16, std::nullopt, {20000});
  RunAgainstCpu(DType::kF16, KernelId::kWorkQueue, {20000});
}

}  // namespace
}  // namespace pkv::engine
