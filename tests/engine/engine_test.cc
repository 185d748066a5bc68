// Engine semantics on the CPU backend: token steps, deltas, retries, prompts, and all-or-nothing
// validation (each bad request gets its code and leaves the state fingerprint unchanged).
#include "engine/engine.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <random>
#include <thread>

#include "engine/output_pool.h"
#include "gtest/gtest.h"

namespace pkv::engine {
namespace {

ModelShape SmallShape() {
  ModelShape s;
  s.num_layers = 3;
  s.num_q_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 4;
  s.dtype = DType::kF16;
  return s;
}

EngineOptions DefaultOptions() {
  EngineOptions opts;
  opts.max_batch = 8;
  opts.scatter_seed = 4242;
  return opts;
}

std::unique_ptr<Engine> MakeEngine(int64_t pages = 64, ModelShape shape = SmallShape(),
                                   EngineOptions opts = DefaultOptions()) {
  auto backend = CreateCpuBackend(shape, pages, 2);
  EXPECT_TRUE(backend.ok());
  auto sched = scheduler::Scheduler::Create(scheduler::Scheduler::Options{});
  EXPECT_TRUE(sched.ok());
  auto engine = Engine::Create(opts, std::move(*backend), std::move(*sched));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return std::move(*engine);
}

// Random fp16 bytes of `elems` elements.
std::vector<uint8_t> RandomBytes(size_t elems, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> bytes(elems * 2);
  for (size_t i = 0; i < elems; ++i) {
    const uint16_t h = FloatToHalf(normal(rng));
    bytes[2 * i] = static_cast<uint8_t>(h & 0xFF);
    bytes[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  return bytes;
}

float Half(const std::vector<uint8_t>& b, size_t i) {
  return HalfToFloat(static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8)));
}

// Writes a full prompt of `n` tokens for every layer, in two chunks per layer.
void WritePrompt(Engine& e, SeqId id, int64_t n, std::mt19937_64& rng,
                 std::vector<std::vector<uint8_t>>* k_hist = nullptr,
                 std::vector<std::vector<uint8_t>>* v_hist = nullptr, const std::string& owner = "") {
  const ModelShape& s = e.shape();
  auto w = e.BeginPrompt(id, n, owner);
  ASSERT_TRUE(w.ok()) << w.status();
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  for (int layer = 0; layer < s.num_layers; ++layer) {
    auto k = RandomBytes(n * tok, rng), v = RandomBytes(n * tok, rng);
    const int64_t half = n / 2;
    if (half > 0) {
      ASSERT_TRUE((*w)->Write(layer, half, n - half, std::span(k).subspan(half * tok * 2),
                              std::span(v).subspan(half * tok * 2)).ok());
      ASSERT_TRUE((*w)->Write(layer, 0, half, std::span(k).first(half * tok * 2),
                              std::span(v).first(half * tok * 2)).ok());
    } else {
      ASSERT_TRUE((*w)->Write(layer, 0, n, k, v).ok());
    }
    if (k_hist) (*k_hist)[layer] = k;
    if (v_hist) (*v_hist)[layer] = v;
  }
  ASSERT_TRUE((*w)->Commit().ok());
}

StepInput MakeStep(const ModelShape& s, uint64_t id, int layer, std::vector<SeqId> rows, std::mt19937_64& rng) {
  StepInput in;
  in.token_step_id = id;
  in.layer = layer;
  in.rows = std::move(rows);
  static thread_local std::vector<std::vector<uint8_t>> keep;  // spans need owners
  const size_t b = in.rows.size();
  keep.push_back(RandomBytes(b * s.num_q_heads * s.head_dim, rng));
  in.q = keep.back();
  keep.push_back(RandomBytes(b * s.num_kv_heads * s.head_dim, rng));
  in.k = keep.back();
  keep.push_back(RandomBytes(b * s.num_kv_heads * s.head_dim, rng));
  in.v = keep.back();
  return in;
}

// Relative L2 error of one layer's output `out` for query `q` of a single row against a float64
// attention over that row's K,V history `k_hist`/`v_hist` ([n, Hkv, d] fp16 bytes, the new token
// included); also checks `lse` when given.
double RelErrorVsDoubleReference(const ModelShape& s, std::span<const uint8_t> q, const std::vector<uint8_t>& k_hist,
                                 const std::vector<uint8_t>& v_hist, const std::string& out,
                                 const std::vector<float>* lse) {
  const size_t tok = s.num_kv_heads * s.head_dim;
  const size_t n = k_hist.size() / (tok * 2);
  std::vector<uint8_t> qb(q.begin(), q.end());
  std::vector<uint8_t> ob(out.begin(), out.end());
  double err2 = 0, ref2 = 0;
  for (int h = 0; h < s.num_q_heads; ++h) {
    const int kvh = h / s.group_size();
    std::vector<double> sc(n);
    double mx = -INFINITY;
    for (size_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int i = 0; i < s.head_dim; ++i) {
        dot += double(Half(qb, h * s.head_dim + i)) * Half(k_hist, t * tok + kvh * s.head_dim + i);
      }
      sc[t] = dot / std::sqrt(double(s.head_dim));
      mx = std::max(mx, sc[t]);
    }
    double sum = 0;
    for (double x : sc) sum += std::exp(x - mx);
    if (lse != nullptr) EXPECT_NEAR((*lse)[h], mx + std::log(sum), 1e-3);
    for (int i = 0; i < s.head_dim; ++i) {
      double acc = 0;
      for (size_t t = 0; t < n; ++t) acc += std::exp(sc[t] - mx) / sum * Half(v_hist, t * tok + kvh * s.head_dim + i);
      const double got = Half(ob, h * s.head_dim + i);
      err2 += (got - acc) * (got - acc);
      ref2 += acc * acc;
    }
  }
  return std::sqrt(err2 / ref2);
}

// Decodes `steps` token steps of one sequence after a prompt of `prompt` tokens and checks every
// layer's output against the float64 reference.
void CheckDecodeAgainstReference(Engine& e, int64_t prompt, int steps, uint64_t seed) {
  const ModelShape s = e.shape();
  std::mt19937_64 rng(seed);
  const size_t tok = s.num_kv_heads * s.head_dim;
  std::vector<std::vector<uint8_t>> k_hist(s.num_layers), v_hist(s.num_layers);
  WritePrompt(e, 7, prompt, rng, &k_hist, &v_hist);
  for (int step = 1; step <= steps; ++step) {
    for (int layer = 0; layer < s.num_layers; ++layer) {
      StepInput in = MakeStep(s, step, layer, {7}, rng);
      in.want_lse = true;
      auto out = e.Step(in);
      ASSERT_TRUE(out.ok()) << out.status();
      k_hist[layer].insert(k_hist[layer].end(), in.k.begin(), in.k.end());
      v_hist[layer].insert(v_hist[layer].end(), in.v.begin(), in.v.end());
      ASSERT_EQ(k_hist[layer].size() / (tok * 2), static_cast<size_t>(prompt + step));
      EXPECT_LT(RelErrorVsDoubleReference(s, in.q, k_hist[layer], v_hist[layer], out->out, &out->lse), 2e-3)
          << "step " << step << " layer " << layer;
    }
  }
  EXPECT_TRUE(e.CheckConsistency().ok());
}

TEST(OutputPoolTest, SizeClassesAreQuartersOfAPowerOfTwoAndAtLeastAPage) {
  EXPECT_EQ(OutputPool::SizeClass(1), 4096u);
  EXPECT_EQ(OutputPool::SizeClass(4096), 4096u);
  EXPECT_EQ(OutputPool::SizeClass(4097), 8192u);
  EXPECT_EQ(OutputPool::SizeClass(49152), 49152u);  // B6 x Hq 32 x d 128 x fp16
  EXPECT_EQ(OutputPool::SizeClass(65536), 65536u);  // B8
  EXPECT_EQ(OutputPool::SizeClass(65537), 81920u);
  for (size_t n : {size_t{1000}, size_t{70000}, size_t{3} << 20, (size_t{5} << 20) + 1}) {
    const size_t c = OutputPool::SizeClass(n);
    EXPECT_GE(c, n);
    EXPECT_LE(c, std::max<size_t>(4096, n + n / 2)) << n;  // at most a quarter octave (or a page) above
    EXPECT_EQ(OutputPool::SizeClass(c), c);
  }
}

TEST(OutputPoolTest, ReleasedBuffersComeBackUpToTheCap) {
  constexpr size_t kB8 = 65536;  // one class
  OutputPool pool(/*max_idle_bytes=*/3 * kB8);
  OutputBuffer a = pool.Take(kB8);
  ASSERT_EQ(a.size, kB8);
  EXPECT_EQ(a.device, nullptr);  // heap memory: no device address
  const char* a_bytes = a.data;
  OutputBuffer b = pool.Take(kB8);
  EXPECT_NE(b.data, a_bytes);
  // The last reference returns the buffer: the next Take of that class gets it back.
  std::shared_ptr<const char> shared = a.owner;
  a = OutputBuffer{};
  EXPECT_EQ(pool.idle_buffers(), 0u);  // still referenced
  shared.reset();
  EXPECT_EQ(pool.idle_buffers(), 1u);
  EXPECT_EQ(pool.idle_bytes(), kB8);
  // Fewer rows (B7: one class below) reuse it.
  OutputBuffer again = pool.Take(kB8 - 8192);
  EXPECT_EQ(again.data, a_bytes);
  EXPECT_EQ(again.size, kB8 - 8192);
  EXPECT_EQ(again.capacity, kB8);
  EXPECT_EQ(pool.idle_buffers(), 0u);
  // A size of another class is a new buffer of that class.
  EXPECT_EQ(pool.Take(1000).size, 1000u);  // returned at once: one page idle
  EXPECT_EQ(pool.idle_bytes(), 4096u);
  // Past max_idle_bytes, released buffers are freed instead of kept.
  std::vector<OutputBuffer> many;
  for (int i = 0; i < 4; ++i) many.push_back(pool.Take(kB8));
  for (const auto& m : many) std::memset(m.data, 7, m.size);  // writable to the last byte
  many.clear();
  EXPECT_LE(pool.idle_bytes(), 3 * kB8);
  EXPECT_EQ(pool.idle_bytes(), 4096u + 2 * kB8);
  again = OutputBuffer{};  // back to its own class (its capacity)
  b = OutputBuffer{};
  EXPECT_LE(pool.idle_bytes(), 3 * kB8);
  // Three classes down is too far: a new buffer.
  EXPECT_EQ(pool.Take(OutputPool::SizeClass(40000)).capacity, OutputPool::SizeClass(40000));
}

TEST(OutputPoolTest, BuffersOutlivingThePoolAreFreed) {
  std::shared_ptr<char> kept;
  {
    OutputPool pool(1 << 20);
    OutputBuffer b = pool.Take(4096);
    b.data[0] = 'x';
    kept = b.owner;
  }
  EXPECT_EQ(kept.get()[0], 'x');
  kept.reset();  // the pool is gone: freed, not returned (ASan/valgrind would see a leak or a use after free)
}

// An OutputMemory of `blocks` blocks carved from one host allocation, with made-up device
// addresses (host + 1 TiB), counting what it hands out.
class FakeOutputMemory final : public OutputMemory {
 public:
  FakeOutputMemory(size_t block_bytes, int blocks)
      : block_bytes_(block_bytes), left_(blocks),
        memory_(static_cast<char*>(std::aligned_alloc(4096, block_bytes * blocks)), [](char* p) { std::free(p); }) {}
  Block Allocate(size_t bytes) override {
    if (bytes != block_bytes_ || left_ == 0) return Block{};
    char* host = memory_.get() + (handed_out_++) * block_bytes_;
    --left_;
    return Block{host, host + (size_t{1} << 40), memory_};
  }
  int handed_out() const { return handed_out_; }
  long memory_users() const { return memory_.use_count(); }

 private:
  const size_t block_bytes_;
  int left_;
  int handed_out_ = 0;
  std::shared_ptr<char> memory_;
};

TEST(OutputPoolTest, OutputMemoryBlocksFirstAreAlwaysKeptThenTheHeap) {
  constexpr size_t kB8 = 65536;
  FakeOutputMemory memory(kB8, 2);
  std::shared_ptr<char> outliving;
  {
    OutputPool pool(/*max_idle_bytes=*/0, &memory);  // no idle heap buffers at all
    OutputBuffer a = pool.Take(kB8), b = pool.Take(kB8), c = pool.Take(kB8);
    EXPECT_EQ(memory.handed_out(), 2);
    EXPECT_EQ(a.device, a.data + (size_t{1} << 40));  // the memory's blocks carry their device address
    EXPECT_EQ(b.device, b.data + (size_t{1} << 40));
    EXPECT_EQ(c.device, nullptr);  // the memory is used up: the heap
    const char* a_bytes = a.data;
    a = OutputBuffer{};
    c = OutputBuffer{};
    // The block is kept despite max_idle_bytes 0; the heap buffer is freed.
    EXPECT_EQ(pool.idle_buffers(), 1u);
    EXPECT_EQ(pool.idle_bytes(), kB8);
    OutputBuffer again = pool.Take(kB8 - 4096);  // one class below: the block again
    EXPECT_EQ(again.data, a_bytes);
    EXPECT_NE(again.device, nullptr);
    EXPECT_EQ(memory.handed_out(), 2);
    outliving = b.owner;
  }
  // A block released after the pool is gone keeps the memory alive until then, then lets go.
  outliving.get()[0] = 'x';
  const long users = memory.memory_users();
  outliving.reset();
  EXPECT_EQ(memory.memory_users(), users - 1);
  EXPECT_EQ(memory.memory_users(), 1);
}

TEST(EngineTest, StepMatchesDoubleReferenceIncludingTheNewToken) {
  auto e = MakeEngine();
  CheckDecodeAgainstReference(*e, 9, 6, 1);
}

TEST(EngineTest, StaticSlotBaselineMatchesDoubleReference) {
  // A static-baseline sequence holds pages for static_slot_tokens from the start; attention must
  // still read only its tokens.
  EngineOptions opts = DefaultOptions();
  opts.static_slot_tokens = 64;
  auto e = MakeEngine(64, SmallShape(), opts);
  CheckDecodeAgainstReference(*e, 9, 6, 11);
  EXPECT_EQ(e->Info().pager.reserved_tokens, 64);
}

TEST(EngineTest, StepTimingsAreFilledAndFitTheCall) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(5);
  WritePrompt(*e, 3, 20, rng);
  for (int layer = 0; layer < s.num_layers; ++layer) {
    const StepInput in = MakeStep(s, 40, layer, {3}, rng);
    const auto t0 = std::chrono::steady_clock::now();
    auto out = e->Step(in);
    const double call = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(out.ok()) << out.status();
    const StepTimings& t = out->timings;
    EXPECT_FALSE(out->attention_skipped);
    EXPECT_GT(t.validate_seconds, 0.0);
    EXPECT_GT(t.host_seconds, 0.0);
    EXPECT_GT(t.kernel_seconds, 0.0);
    EXPECT_GE(t.kernel_seconds, out->attend_seconds);  // the KV write plus the attention
    EXPECT_EQ(t.h2d_seconds, 0.0);  // no copies on the CPU backend
    EXPECT_EQ(t.d2h_seconds, 0.0);
    // Disjoint intervals of the call on one clock.
    EXPECT_LE(t.validate_seconds + t.host_seconds + t.kernel_seconds, call);
  }
  // A retry reports only its own (validation) time.
  auto again = e->Step(MakeStep(s, 40, 0, {3}, rng));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->replayed);
  EXPECT_GT(again->timings.validate_seconds, 0.0);
  EXPECT_EQ(again->timings.host_seconds + again->timings.kernel_seconds, 0.0);
}

// pkv-worker --attention=skip: every host step runs (deltas, pager, plan, descriptor slots), no
// attention: zero outputs, the token flagged, the pool's accounting exactly as in a real run.
TEST(EngineTest, SkipAttentionKeepsTheHostWorkAndAnswersZeros) {
  const ModelShape s = SmallShape();
  auto backend = CreateCpuBackend(s, 64, 1);
  ASSERT_TRUE(backend.ok());
  ExecutionBackendPtr skip = SkipAttention(std::move(*backend));
  EXPECT_STREQ(skip->name(), "cpu+skip");
  auto sched = scheduler::Scheduler::Create(scheduler::Scheduler::Options{});
  ASSERT_TRUE(sched.ok());
  EngineOptions opts;
  opts.max_batch = 8;
  auto created = Engine::Create(opts, std::move(skip), std::move(*sched));
  ASSERT_TRUE(created.ok()) << created.status();
  Engine& e = **created;
  EXPECT_EQ(e.Info().backend, "cpu+skip");
  std::mt19937_64 rng(6);
  WritePrompt(e, 1, 7, rng);
  WritePrompt(e, 2, 3, rng);
  for (uint64_t step = 1; step <= 5; ++step) {
    for (int layer = 0; layer < s.num_layers; ++layer) {
      StepInput in = MakeStep(s, step, layer, {1, 2}, rng);
      in.want_lse = true;
      auto out = e.Step(in);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_TRUE(out->attention_skipped);
      EXPECT_EQ(out->out, std::string(out->out.size(), '\0'));
      ASSERT_EQ(out->lse.size(), 2u * s.num_q_heads);
      for (float x : out->lse) EXPECT_EQ(x, 0.0f);
      EXPECT_EQ(out->timings.kernel_seconds, 0.0);
      EXPECT_GE(out->timings.host_seconds, 0.0);
    }
  }
  EXPECT_EQ(e.Info().pager.used_tokens, 7 + 3 + 2 * 5);
  EXPECT_TRUE(e.CheckConsistency().ok());
  ASSERT_TRUE(e.Release(std::vector<SeqId>{1, 2}).ok());
  EXPECT_EQ(e.Info().pager.free_pages, 64);
}

TEST(EngineTest, RetriedStepReplaysWithoutAppending) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(2);
  WritePrompt(*e, 1, 5, rng);
  StepInput l0 = MakeStep(s, 10, 0, {1}, rng);
  auto first = e->Step(l0);
  ASSERT_TRUE(first.ok());
  const auto tokens = e->Info().pager.used_tokens;
  auto again = e->Step(l0);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(again->out, first->out);
  EXPECT_EQ(e->Info().pager.used_tokens, tokens);
  for (int layer = 1; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, 10, layer, {1}, rng)).ok());
  // Completed token steps still replay.
  auto late = e->Step(l0);
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(late->out, first->out);
  EXPECT_EQ(e->Info().pager.used_tokens, tokens);
}

// StepInput::out_copy receives the outputs on every layer and on a replay; on the CPU backend the
// engine copies them (nothing is registered: RegisterHostMemory is UNIMPLEMENTED there). A
// wrongly sized out_copy is refused before anything changes.
TEST(EngineTest, OutCopyGetsTheOutputsAndReplays) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(21);
  WritePrompt(*e, 1, 5, rng);
  WritePrompt(*e, 2, 9, rng);
  std::vector<uint8_t> region(1 << 16, 0xEE);
  EXPECT_EQ(e->RegisterHostMemory(region.data(), region.size()).status().code(), absl::StatusCode::kUnimplemented);
  const size_t out_bytes = 2 * s.num_q_heads * s.head_dim * 2;
  StepInput l0 = MakeStep(s, 30, 0, {1, 2}, rng);
  l0.out_copy = std::span<uint8_t>(region).subspan(64, out_bytes + 2);
  const auto tokens = e->Info().pager.used_tokens;
  const auto bad = e->Step(l0);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("out_copy"), absl::string_view::npos) << bad.status();
  EXPECT_EQ(e->Info().pager.used_tokens, tokens);
  EXPECT_EQ(region[64], 0xEE);
  l0.out_copy = std::span<uint8_t>(region).subspan(64, out_bytes);
  auto first = e->Step(l0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->in_place);
  EXPECT_EQ(std::string(region.begin() + 64, region.begin() + 64 + out_bytes), first->out.str());
  EXPECT_EQ(region[64 + out_bytes], 0xEE);  // nothing past it
  std::fill(region.begin(), region.end(), 0);
  auto again = e->Step(l0);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(std::string(region.begin() + 64, region.begin() + 64 + out_bytes), first->out.str());
  EXPECT_EQ(e->Info().pager.used_tokens, tokens + 2);
}

TEST(EngineTest, EveryBadRequestGetsItsCodeAndChangesNothing) {
  auto e = MakeEngine(8);  // 8 pages of 4 tokens
  const ModelShape s = e->shape();
  std::mt19937_64 rng(3);
  WritePrompt(*e, 1, 8, rng);   // 2 pages, full
  WritePrompt(*e, 2, 6, rng);   // 2 pages
  auto writing = e->BeginPrompt(3, 4);  // 1 page, not committed
  ASSERT_TRUE(writing.ok());
  // Open token step 50 on row 2 (layer 0 only).
  ASSERT_TRUE(e->Step(MakeStep(s, 50, 0, {2}, rng)).ok());

  struct Bad {
    const char* what;
    StepInput in;
    absl::StatusCode code;
    const char* field;
  };
  std::vector<Bad> bad;
  auto step = [&](uint64_t id, int layer, std::vector<SeqId> rows) { return MakeStep(s, id, layer, rows, rng); };
  bad.push_back({"zero id", step(0, 0, {1}), absl::StatusCode::kInvalidArgument, "token_step_id"});
  bad.push_back({"layer range", step(60, 3, {1}), absl::StatusCode::kInvalidArgument, "layer"});
  bad.push_back({"dup rows", step(60, 0, {1, 1}), absl::StatusCode::kInvalidArgument, "rows[1]"});
  bad.push_back({"unknown row", step(60, 0, {1, 99}), absl::StatusCode::kNotFound, "rows[1]"});
  bad.push_back({"writing row", step(60, 0, {3}), absl::StatusCode::kFailedPrecondition, "rows[0]"});
  bad.push_back({"busy row", step(60, 0, {2}), absl::StatusCode::kFailedPrecondition, "rows[0]"});
  {
    StepInput in = step(60, 0, {1});
    in.q = in.q.first(in.q.size() - 2);
    bad.push_back({"short q", in, absl::StatusCode::kInvalidArgument, "q:"});
  }
  {
    StepInput in = step(60, 0, {1});
    in.v = {};
    bad.push_back({"missing v", in, absl::StatusCode::kInvalidArgument, "v:"});
  }
  {
    StepInput in = step(60, 0, {1});
    in.free = {99};
    bad.push_back({"free unknown", in, absl::StatusCode::kNotFound, "free[0]"});
  }
  {
    StepInput in = step(60, 0, {1});
    in.free = {1};
    bad.push_back({"free a row", in, absl::StatusCode::kInvalidArgument, "free[0]"});
  }
  {
    StepInput in = step(60, 0, {1});
    in.open = {2};
    bad.push_back({"open existing", in, absl::StatusCode::kAlreadyExists, "open[0]"});
  }
  {
    StepInput in = step(60, 0, {1, 4, 5, 6, 7});
    in.open = {4, 5, 6, 7};  // 1 + 4 pages needed, 3 free
    bad.push_back({"pool full", in, absl::StatusCode::kResourceExhausted, "3 free"});
  }
  {
    StepInput in = step(50, 1, {2});
    in.open = {9};
    bad.push_back({"delta on layer 1", in, absl::StatusCode::kInvalidArgument, "open"});
  }
  bad.push_back({"rows differ", step(50, 1, {1}), absl::StatusCode::kInvalidArgument, "rows"});
  bad.push_back({"not begun", step(61, 1, {1}), absl::StatusCode::kFailedPrecondition, "token_step_id"});
  bad.push_back({"id reused", step(50, 0, {1}), absl::StatusCode::kInvalidArgument, "token_step_id"});
  bad.push_back({"too many rows", step(62, 0, {1, 2, 3, 4, 5, 6, 7, 8, 9}), absl::StatusCode::kInvalidArgument, "max_batch"});

  for (const Bad& b : bad) {
    const uint64_t before = e->StateFingerprint();
    auto r = e->Step(b.in);
    EXPECT_EQ(r.status().code(), b.code) << b.what << ": " << r.status();
    EXPECT_NE(r.status().message().find(b.field), std::string_view::npos) << b.what << ": " << r.status();
    EXPECT_EQ(e->StateFingerprint(), before) << b.what << " changed state";
    EXPECT_TRUE(e->CheckConsistency().ok());
  }
  const uint64_t before = e->StateFingerprint();
  const SeqId unknown[] = {1, 99};
  EXPECT_EQ(e->Release(unknown).code(), absl::StatusCode::kNotFound);
  const SeqId still_writing[] = {3};
  EXPECT_EQ(e->Release(still_writing).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(e->BeginPrompt(1, 4).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(e->BeginPrompt(9, 100).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(e->BeginPrompt(9, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->StateFingerprint(), before);
}

TEST(EngineTest, PromptWriteIsAllOrNothing) {
  auto e = MakeEngine(16);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(4);
  const auto free0 = e->Info().pager.free_pages;
  {
    auto w = e->BeginPrompt(5, 10);
    ASSERT_TRUE(w.ok());
    const size_t tok = s.num_kv_heads * s.head_dim;
    auto k = RandomBytes(10 * tok, rng), v = RandomBytes(10 * tok, rng);
    EXPECT_EQ((*w)->Write(0, 5, 6, std::span(k).first(6 * tok * 2), std::span(v).first(6 * tok * 2)).code(),
              absl::StatusCode::kInvalidArgument);  // past the end
    EXPECT_EQ((*w)->Write(3, 0, 10, k, v).code(), absl::StatusCode::kInvalidArgument);  // layer
    EXPECT_EQ((*w)->Write(0, 0, 10, std::span(k).first(10), v).code(), absl::StatusCode::kInvalidArgument);
    ASSERT_TRUE((*w)->Write(0, 0, 10, k, v).ok());
    absl::Status c = (*w)->Commit();
    EXPECT_EQ(c.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(c.message().find("layer 1"), std::string_view::npos) << c;
    EXPECT_EQ(e->Step(MakeStep(s, 1, 0, {5}, rng)).status().code(), absl::StatusCode::kFailedPrecondition);
  }  // destroyed uncommitted: a cut stream leaves nothing behind
  EXPECT_EQ(e->Info().pager.free_pages, free0);
  EXPECT_EQ(e->Info().pager.num_sequences, 0);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineTest, DeltasOpenFreeAndReleaseAbortsOpenTokenStep) {
  auto e = MakeEngine(32);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(5);
  WritePrompt(*e, 1, 4, rng);
  // Open sequence 2 empty in the same step that steps it; free nothing.
  StepInput l0 = MakeStep(s, 1, 0, {1, 2}, rng);
  l0.open = {2};
  ASSERT_TRUE(e->Step(l0).ok());
  for (int layer = 1; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, 1, layer, {1, 2}, rng)).ok());
  EXPECT_EQ(e->Info().pager.used_tokens, 5 + 1);
  // Free 2 in the next token step.
  StepInput n0 = MakeStep(s, 2, 0, {1}, rng);
  n0.free = {2};
  ASSERT_TRUE(e->Step(n0).ok());
  EXPECT_EQ(e->Info().pager.num_sequences, 1);
  EXPECT_EQ(e->Info().open_token_steps, 1);
  // Releasing a row of the open token step aborts it; the appended token is undone.
  const SeqId one[] = {1};
  ASSERT_TRUE(e->Release(one).ok());
  EXPECT_EQ(e->Info().open_token_steps, 0);
  EXPECT_EQ(e->Step(MakeStep(s, 2, 1, {1}, rng)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(e->Info().pager.free_pages, 32);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineTest, AbortedTokenStepUndoesAppendOfOtherRows) {
  auto e = MakeEngine(32);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(6);
  WritePrompt(*e, 1, 4, rng);
  WritePrompt(*e, 2, 4, rng);
  ASSERT_TRUE(e->Step(MakeStep(s, 1, 0, {1, 2}, rng)).ok());
  EXPECT_EQ(e->Info().pager.used_tokens, 10);
  const SeqId two[] = {2};
  ASSERT_TRUE(e->Release(two).ok());
  EXPECT_EQ(e->Info().pager.used_tokens, 4);  // row 1 back to its 4 tokens
  ASSERT_TRUE(e->Step(MakeStep(s, 2, 0, {1}, rng)).ok());  // and steppable again
  EXPECT_TRUE(e->CheckConsistency().ok());
}

}  // namespace
}  // namespace pkv::engine

namespace pkv::engine {
namespace {

// Records events so the test can check what the engine reports.
class RecordingObserver final : public StepObserver {
 public:
  void OnTokenStepPlanned(const TokenStepEvent& e) override { planned.push_back(e); }
  void OnLayerStep(const LayerStepEvent& e) override { layers.push_back(e); }
  void OnTokenStepCompleted(int32_t rows) override { completed_rows += rows; }
  void OnTokenStepAborted(int32_t rows) override { aborted_rows += rows; }
  void OnPromptCommitted(int64_t bytes, double) override { prompt_bytes += bytes; }
  std::vector<TokenStepEvent> planned;
  std::vector<LayerStepEvent> layers;
  int completed_rows = 0, aborted_rows = 0;
  int64_t prompt_bytes = 0;
};

TEST(EngineObserverTest, ReportsPlansLayersCompletionsAndPrompts) {
  auto e = MakeEngine(32);
  RecordingObserver obs;
  e->SetObserver(&obs);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(7);
  WritePrompt(*e, 1, 5, rng);
  WritePrompt(*e, 2, 3, rng);
  EXPECT_EQ(obs.prompt_bytes, 2LL * (5 + 3) * s.num_layers * s.num_kv_heads * s.head_dim * 2);
  for (int layer = 0; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, 1, layer, {1, 2}, rng)).ok());
  ASSERT_EQ(obs.planned.size(), 1u);
  EXPECT_EQ(obs.planned[0].rows, 2);
  EXPECT_EQ(obs.planned[0].kv_tokens, 6 + 4);
  EXPECT_EQ(obs.layers.size(), static_cast<size_t>(s.num_layers));
  EXPECT_EQ(obs.completed_rows, 2);
  ASSERT_TRUE(e->Step(MakeStep(s, 1, 0, {1, 2}, rng)).ok());  // retry
  EXPECT_TRUE(obs.layers.back().replayed);
  ASSERT_TRUE(e->Step(MakeStep(s, 2, 0, {1}, rng)).ok());
  const SeqId one[] = {1};
  ASSERT_TRUE(e->Release(one).ok());
  EXPECT_EQ(obs.aborted_rows, 1);
  e->SetObserver(nullptr);
}

}  // namespace
}  // namespace pkv::engine

// ---------------------------------------------------------------------------------------------
// Pipelined layer-steps: backend RunLayer runs without the engine lock.

namespace pkv::engine {
namespace {

// Wraps the CPU backend: counts RunLayer calls running at once and, when `gate_layer` >= 0, holds
// RunLayer of that layer until Open() (so a test can act while a layer is in flight).
class GatedBackend final : public ExecutionBackend {
 public:
  explicit GatedBackend(ExecutionBackendPtr inner, std::chrono::microseconds delay = {})
      : inner_(std::move(inner)), delay_(delay) {}

  const char* name() const override { return inner_->name(); }
  kvpool::KvArena& arena() override { return inner_->arena(); }
  scheduler::DeviceInfo device_info() const override { return inner_->device_info(); }
  std::vector<KernelId> kernels() const override { return inner_->kernels(); }
  int32_t max_open_token_steps() const override { return inner_->max_open_token_steps(); }
  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    return inner_->BeginTokenStep(plan, table, new_slots);
  }
  void EndTokenStep(int32_t slot) override { inner_->EndTokenStep(slot); }

  absl::Status RunLayer(int32_t slot, int32_t layer, const LayerBuffers& io, LayerRunInfo* info) override {
    const int now = ++running_;
    for (int m = max_running_.load(); now > m && !max_running_.compare_exchange_weak(m, now);) {
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (layer == gate_layer_) {
        ++gated_;
        cv_.notify_all();
        cv_.wait(lock, [&] { return open_; });
      }
    }
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    absl::Status s = inner_->RunLayer(slot, layer, io, info);
    --running_;
    return s;
  }

  void Gate(int layer) {
    std::lock_guard<std::mutex> lock(mu_);
    gate_layer_ = layer;
    open_ = false;
  }
  // Waits until `n` calls are held at the gate.
  void AwaitGated(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return gated_ >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    gate_layer_ = -1;
    cv_.notify_all();
  }
  int max_running() const { return max_running_.load(); }

 private:
  ExecutionBackendPtr inner_;
  std::chrono::microseconds delay_;
  std::atomic<int> running_{0}, max_running_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int gate_layer_ = -1;
  int gated_ = 0;
  bool open_ = true;
};

struct GatedEngine {
  GatedBackend* backend = nullptr;  // owned by engine
  std::unique_ptr<Engine> engine;
};

GatedEngine MakeGatedEngine(int64_t pages, std::chrono::microseconds delay = {}, int max_batch = 8) {
  auto cpu = CreateCpuBackend(SmallShape(), pages, 1);
  EXPECT_TRUE(cpu.ok());
  auto gated = std::make_unique<GatedBackend>(std::move(*cpu), delay);
  GatedEngine g;
  g.backend = gated.get();
  auto sched = scheduler::Scheduler::Create(scheduler::Scheduler::Options{});
  EXPECT_TRUE(sched.ok());
  EngineOptions opts;
  opts.max_batch = max_batch;
  opts.scatter_seed = 99;
  auto engine = Engine::Create(opts, std::move(gated), std::move(*sched));
  EXPECT_TRUE(engine.ok()) << engine.status();
  g.engine = std::move(*engine);
  return g;
}

float HalfAt(std::span<const uint8_t> b, size_t i) {
  return HalfToFloat(static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8)));
}

// Relative L2 error of row `r` of `out` against a double-precision attention over the row's K,V
// history of one layer (`k_hist`, `v_hist`: [n, Hkv, d] fp16 bytes).
double RowRelError(const ModelShape& s, std::span<const uint8_t> q, size_t r, const std::vector<uint8_t>& k_hist,
                   const std::vector<uint8_t>& v_hist, std::span<const uint8_t> out) {
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  const size_t n = k_hist.size() / (tok * 2);
  double err2 = 0, ref2 = 0;
  for (int h = 0; h < s.num_q_heads; ++h) {
    const size_t qo = (r * s.num_q_heads + h) * s.head_dim;
    const int kvh = h / s.group_size();
    std::vector<double> sc(n);
    double mx = -INFINITY;
    for (size_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int i = 0; i < s.head_dim; ++i) dot += double(HalfAt(q, qo + i)) * HalfAt(k_hist, t * tok + kvh * s.head_dim + i);
      sc[t] = dot / std::sqrt(double(s.head_dim));
      mx = std::max(mx, sc[t]);
    }
    double sum = 0;
    for (double x : sc) sum += std::exp(x - mx);
    for (int i = 0; i < s.head_dim; ++i) {
      double acc = 0;
      for (size_t t = 0; t < n; ++t) acc += std::exp(sc[t] - mx) / sum * HalfAt(v_hist, t * tok + kvh * s.head_dim + i);
      const double got = HalfAt(out, qo + i);
      err2 += (got - acc) * (got - acc);
      ref2 += acc * acc;
    }
  }
  return std::sqrt(err2 / ref2);
}

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(EnginePipelineTest, MicroBatchesOnSeveralThreadsOverlapAndMatchTheReference) {
  constexpr int kThreads = 4, kRowsPerThread = 2, kSteps = 4;
  GatedEngine g = MakeGatedEngine(128, std::chrono::microseconds(2000));
  Engine& e = *g.engine;
  const ModelShape s = e.shape();
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  // hist[thread][row][layer]: K and V history of each row.
  using Hist = std::vector<std::vector<std::vector<uint8_t>>>;
  std::vector<Hist> k_hist(kThreads, Hist(kRowsPerThread, std::vector<std::vector<uint8_t>>(s.num_layers)));
  std::vector<Hist> v_hist = k_hist;
  std::mt19937_64 rng(11);
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRowsPerThread; ++r) WritePrompt(e, 100 * t + r + 1, 5 + 3 * t + r, rng, &k_hist[t][r], &v_hist[t][r]);
  }
  std::vector<std::thread> threads;
  std::atomic<int> worst_failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 trng(1000 + t);
      std::vector<SeqId> rows;
      for (int r = 0; r < kRowsPerThread; ++r) rows.push_back(100 * t + r + 1);
      for (int step = 1; step <= kSteps; ++step) {
        for (int layer = 0; layer < s.num_layers; ++layer) {
          StepInput in = MakeStep(s, 1000 * (t + 1) + step, layer, rows, trng);
          auto out = e.Step(in);
          ASSERT_TRUE(out.ok()) << out.status();
          for (int r = 0; r < kRowsPerThread; ++r) {
            auto& kh = k_hist[t][r][layer];
            auto& vh = v_hist[t][r][layer];
            kh.insert(kh.end(), in.k.begin() + r * tok * 2, in.k.begin() + (r + 1) * tok * 2);
            vh.insert(vh.end(), in.v.begin() + r * tok * 2, in.v.begin() + (r + 1) * tok * 2);
            const double err = RowRelError(s, in.q, r, kh, vh, Bytes(out->out));
            if (!(err < 2e-3)) ++worst_failures;
            EXPECT_LT(err, 2e-3) << "thread " << t << " step " << step << " layer " << layer << " row " << r;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(worst_failures.load(), 0);
  // Layer-steps of different micro-batches ran at the same time (under the old design, the
  // engine lock held across RunLayer kept this at 1).
  EXPECT_GE(g.backend->max_running(), 2);
  EXPECT_TRUE(e.CheckConsistency().ok());
  const EngineInfo info = e.Info();
  EXPECT_EQ(info.open_token_steps, 0);
  int64_t tokens = 0;
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRowsPerThread; ++r) tokens += 5 + 3 * t + r + kSteps;
  }
  EXPECT_EQ(info.pager.used_tokens, tokens);
  std::vector<SeqId> all;
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRowsPerThread; ++r) all.push_back(100 * t + r + 1);
  }
  ASSERT_TRUE(e.Release(all).ok());
  EXPECT_EQ(e.Info().pager.free_pages, 128);
  EXPECT_TRUE(e.CheckConsistency().ok());
}

TEST(EnginePipelineTest, RequestsForARunningTokenStepAreRefused) {
  GatedEngine g = MakeGatedEngine(32);
  Engine& e = *g.engine;
  const ModelShape s = e.shape();
  std::mt19937_64 rng(12);
  WritePrompt(e, 1, 6, rng);
  WritePrompt(e, 2, 3, rng);
  ASSERT_TRUE(e.Step(MakeStep(s, 7, 0, {1}, rng)).ok());
  g.backend->Gate(1);
  StepInput l1 = MakeStep(s, 7, 1, {1}, rng);
  absl::StatusOr<StepOutput> first;
  std::thread runner([&] { first = e.Step(l1); });
  g.backend->AwaitGated(1);
  // The same (token_step_id, layer) again, and another layer of it: refused, nothing changes.
  auto again = e.Step(l1);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("layer 1 is running"), std::string_view::npos) << again.status();
  auto other = e.Step(MakeStep(s, 7, 2, {1}, rng));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other.status().message().find("send layer 2 after it answers"), std::string_view::npos) << other.status();
  // Other micro-batches and the rest of the engine are not blocked by the running layer.
  ASSERT_TRUE(e.Step(MakeStep(s, 8, 0, {2}, rng)).ok());
  EXPECT_EQ(e.Info().open_token_steps, 2);
  EXPECT_TRUE(e.CheckConsistency().ok());
  g.backend->Open();
  runner.join();
  ASSERT_TRUE(first.ok()) << first.status();
  // Now it answers from the retry cache with the first execution's bytes.
  auto replay = e.Step(l1);
  ASSERT_TRUE(replay.ok());
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->out, first->out);
}

TEST(EnginePipelineTest, ReleaseWaitsForTheRunningLayerThenAbortsExactly) {
  GatedEngine g = MakeGatedEngine(32);
  Engine& e = *g.engine;
  const ModelShape s = e.shape();
  std::mt19937_64 rng(13);
  WritePrompt(e, 1, 4, rng);  // full page: the step's append takes a new page
  WritePrompt(e, 2, 5, rng);
  const int64_t free_before = e.Info().pager.free_pages;
  ASSERT_TRUE(e.Step(MakeStep(s, 3, 0, {1, 2}, rng)).ok());
  EXPECT_EQ(e.Info().pager.free_pages, free_before - 1);
  g.backend->Gate(1);
  absl::StatusOr<StepOutput> running;
  std::thread runner([&] { running = e.Step(MakeStep(s, 3, 1, {1, 2}, rng)); });
  g.backend->AwaitGated(1);
  std::atomic<bool> released{false};
  absl::Status release_status;
  std::thread releaser([&] {
    const SeqId one[] = {1};
    release_status = e.Release(one);
    released = true;
  });
  // The release must not free pages under the running append.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(released.load());
  EXPECT_EQ(e.Info().pager.free_pages, free_before - 1);
  EXPECT_EQ(e.Info().open_token_steps, 1);
  EXPECT_TRUE(e.CheckConsistency().ok());
  g.backend->Open();
  runner.join();
  releaser.join();
  EXPECT_TRUE(running.ok()) << running.status();
  EXPECT_TRUE(release_status.ok()) << release_status;
  // Aborted: row 2 lost its appended token, row 1's pages are all back.
  EXPECT_EQ(e.Info().open_token_steps, 0);
  EXPECT_EQ(e.Info().pager.used_tokens, 5);
  EXPECT_EQ(e.Step(MakeStep(s, 3, 2, {1, 2}, rng)).status().code(), absl::StatusCode::kFailedPrecondition);
  const SeqId two[] = {2};
  ASSERT_TRUE(e.Release(two).ok());
  EXPECT_EQ(e.Info().pager.free_pages, 32);
  EXPECT_TRUE(e.CheckConsistency().ok());
}

// Several threads stepping their micro-batches while another releases random sequences: every
// error is one of the documented ones, and after releasing everything the pool is all free.
TEST(EnginePipelineTest, ReleasesRacingWithInFlightLayersKeepAccountingExact) {
  constexpr int kThreads = 3;
  constexpr int64_t kPages = 96;
  GatedEngine g = MakeGatedEngine(kPages, std::chrono::microseconds(300));
  Engine& e = *g.engine;
  const ModelShape s = e.shape();
  std::atomic<SeqId> next_id{1};
  std::atomic<bool> stop{false};
  std::atomic<int> completed{0}, aborted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 trng(2000 + t);
      std::vector<SeqId> rows;
      uint64_t step_id = 1'000'000ULL * (t + 1);
      for (int iter = 0; iter < 12; ++iter) {
        while (rows.size() < 2) {
          const SeqId id = next_id++;
          WritePrompt(e, id, 1 + static_cast<int64_t>(trng() % 7), trng);
          rows.push_back(id);
        }
        ++step_id;
        bool ok = true;
        for (int layer = 0; layer < s.num_layers && ok; ++layer) {
          auto out = e.Step(MakeStep(s, step_id, layer, rows, trng));
          if (!out.ok()) {
            const auto c = out.status().code();
            EXPECT_TRUE(c == absl::StatusCode::kNotFound || c == absl::StatusCode::kFailedPrecondition) << out.status();
            ok = false;
          }
        }
        if (ok) {
          ++completed;
        } else {
          ++aborted;
          // Drop whatever of the rows is left (the other thread may have released them).
          for (SeqId id : rows) {
            const SeqId one[] = {id};
            const absl::Status st = e.Release(one);
            EXPECT_TRUE(st.ok() || st.code() == absl::StatusCode::kNotFound) << st;
          }
          rows.clear();
        }
      }
      if (!rows.empty()) {
        for (SeqId id : rows) {
          const SeqId one[] = {id};
          const absl::Status st = e.Release(one);
          EXPECT_TRUE(st.ok() || st.code() == absl::StatusCode::kNotFound) << st;
        }
      }
    });
  }
  std::thread chaos([&] {
    std::mt19937_64 crng(77);
    while (!stop.load()) {
      const SeqId hi = next_id.load();
      const SeqId id = 1 + static_cast<SeqId>(crng() % static_cast<uint64_t>(hi));
      const SeqId one[] = {id};
      const absl::Status st = e.Release(one);
      EXPECT_TRUE(st.ok() || st.code() == absl::StatusCode::kNotFound ||
                  st.code() == absl::StatusCode::kFailedPrecondition)  // prompt being written
          << st;
      EXPECT_TRUE(e.CheckConsistency().ok());
      std::this_thread::sleep_for(std::chrono::microseconds(1500));
    }
  });
  for (auto& th : threads) th.join();
  stop = true;
  chaos.join();
  EXPECT_GT(completed.load(), 0);
  EXPECT_TRUE(e.CheckConsistency().ok());
  const EngineInfo info = e.Info();
  EXPECT_EQ(info.open_token_steps, 0);
  EXPECT_EQ(info.pager.num_sequences, 0);
  EXPECT_EQ(info.pager.free_pages, kPages);
}

// ---------------------------------------------------------------------------------------------
// One router cannot crash, jam or read another's work.

TEST(EngineRobustnessTest, HugePromptHeadersAreRefusedWithoutAllocating) {
  auto e = MakeEngine();
  const uint64_t before = e->StateFingerprint();
  for (int64_t n : {INT64_MAX, INT64_MAX - 1, INT64_MAX - 14, INT64_MAX - 15, int64_t{1} << 62}) {
    auto w = e->BeginPrompt(5, n);
    EXPECT_EQ(w.status().code(), absl::StatusCode::kResourceExhausted) << n << ": " << w.status();
    EXPECT_NE(w.status().message().find("free"), std::string::npos) << w.status();
  }
  EXPECT_EQ(e->StateFingerprint(), before);
  EXPECT_EQ(e->Info().pager.free_pages, 64);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineRobustnessTest, OperatorPromptCapIsARequestError) {
  EngineOptions opts = DefaultOptions();
  opts.max_prompt_tokens = 32;
  auto e = MakeEngine(64, SmallShape(), opts);
  EXPECT_EQ(e->limits().max_prompt_tokens, 32);
  auto w = e->BeginPrompt(5, 33);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("num_tokens"), std::string::npos) << w.status();
  EXPECT_TRUE(e->BeginPrompt(5, 32).ok());
}

TEST(EngineRobustnessTest, AbandonedTokenStepsAreReclaimedByTheLease) {
  auto e = MakeEngine(256);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(31);
  const int32_t slots = e->limits().max_open_token_steps;
  ASSERT_GT(slots, 0);
  for (int i = 0; i <= slots; ++i) WritePrompt(*e, 100 + i, 5, rng, nullptr, nullptr, "router-" + std::to_string(i));
  const int64_t tokens = e->Info().pager.used_tokens;
  // Routers that die after layer 0 hold every slot.
  for (int i = 0; i < slots; ++i) {
    StepInput in = MakeStep(s, 1000 + i, 0, {static_cast<SeqId>(100 + i)}, rng);
    in.owner = "router-" + std::to_string(i);
    ASSERT_TRUE(e->Step(in).ok());
  }
  EngineInfo info = e->Info();
  ASSERT_EQ(info.open_steps.size(), static_cast<size_t>(slots));
  EXPECT_EQ(info.open_steps[0].token_step_id, 1000u);
  EXPECT_EQ(info.open_steps[0].owner, "router-0");
  EXPECT_EQ(info.open_steps[0].layers_done, 1);
  StepInput next = MakeStep(s, 2000, 0, {static_cast<SeqId>(100 + slots)}, rng);
  next.owner = "router-" + std::to_string(slots);
  absl::StatusOr<StepOutput> refused = e->Step(next);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("open token steps full"), std::string::npos) << refused.status();
  // Not idle yet: nothing is taken.
  EXPECT_TRUE(e->ReclaimIdle(std::chrono::steady_clock::now()).token_steps.empty());
  const auto later = std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(e->limits().token_step_idle_seconds + 1));
  const Reclaimed r = e->ReclaimIdle(later);
  ASSERT_EQ(r.token_steps.size(), static_cast<size_t>(slots));
  EXPECT_EQ(r.token_steps[0].owner, "router-0");
  EXPECT_EQ(r.token_steps[0].layers_done, 1);
  EXPECT_EQ(e->Info().open_token_steps, 0);
  EXPECT_EQ(e->Info().pager.used_tokens, tokens) << "aborted token steps keep their appended token";
  EXPECT_TRUE(e->Step(next).ok());
  // A late layer of a reclaimed token step is refused and changes nothing.
  StepInput late = MakeStep(s, 1000, 1, {100}, rng);
  late.owner = "router-0";
  EXPECT_EQ(e->Step(late).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineRobustnessTest, DeltaOnlyTokenStepsHoldNoSlot) {
  auto e = MakeEngine(256);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(32);
  const int32_t slots = e->limits().max_open_token_steps;
  for (int i = 0; i < 2 * slots + 3; ++i) {
    WritePrompt(*e, 300 + i, 3, rng);
    StepInput in = MakeStep(s, 3000 + i, 0, {}, rng);
    in.free = {static_cast<SeqId>(300 + i)};
    auto out = e->Step(in);
    ASSERT_TRUE(out.ok()) << i << ": " << out.status();
    EXPECT_TRUE(out->out.empty());
    // Its later layers may be sent (answered empty, nothing appended) or not.
    if (i % 2 == 0) {
      for (int layer = 1; layer < s.num_layers; ++layer) {
        auto later = e->Step(MakeStep(s, 3000 + i, layer, {}, rng));
        ASSERT_TRUE(later.ok()) << later.status();
        EXPECT_TRUE(later->replayed);
      }
    }
    EXPECT_EQ(e->Info().open_token_steps, 0);
  }
  EXPECT_EQ(e->Info().pager.free_pages, 256);
  WritePrompt(*e, 1, 3, rng);
  EXPECT_TRUE(e->Step(MakeStep(s, 9000, 0, {1}, rng)).ok());
}

TEST(EngineRobustnessTest, ListSizesAndSequenceCountAreBoundedBeforeAllocating) {
  EngineOptions opts = DefaultOptions();
  opts.max_sequences = 6;
  opts.max_free_per_step = 3;
  auto e = MakeEngine(64, SmallShape(), opts);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(33);
  WritePrompt(*e, 1, 3, rng);
  const uint64_t before = e->StateFingerprint();
  StepInput in = MakeStep(s, 1, 0, {}, rng);
  for (int i = 0; i < 9; ++i) in.open.push_back(100 + i);  // max_open_per_step = max_batch = 8
  absl::StatusOr<StepOutput> out = e->Step(in);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out.status().message().rfind("open:", 0), 0u) << out.status();
  in.open.clear();
  in.free = {1, 2, 3, 4};
  out = e->Step(in);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out.status().message().rfind("free:", 0), 0u) << out.status();
  EXPECT_EQ(e->ValidateListSizes(9, 0, 0).code(), absl::StatusCode::kInvalidArgument);
  in.free.clear();
  in.open = {200, 201, 202, 203, 204, 205};  // 1 + 6 > 6 sequences
  out = e->Step(in);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(out.status().message().find("sequences full"), std::string::npos) << out.status();
  EXPECT_EQ(e->StateFingerprint(), before);
  in.open = {200, 201, 202, 203, 204};
  ASSERT_TRUE(e->Step(in).ok());
  EXPECT_EQ(e->BeginPrompt(9, 4).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineRobustnessTest, SequencesAndTokenStepsBelongToTheirRouter) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(34);
  {
    auto w = e->BeginPrompt(1, 1, "alice");
    ASSERT_TRUE(w.ok());
    auto k = RandomBytes(s.num_kv_heads * s.head_dim, rng);
    for (int layer = 0; layer < s.num_layers; ++layer) ASSERT_TRUE((*w)->Write(layer, 0, 1, k, k).ok());
    ASSERT_TRUE((*w)->Commit().ok());
  }
  WritePrompt(*e, 2, 3, rng);  // anonymous
  StepInput a0 = MakeStep(s, 50, 0, {1}, rng);
  a0.owner = "alice";
  auto first = e->Step(a0);
  ASSERT_TRUE(first.ok()) << first.status();
  const uint64_t before = e->StateFingerprint();
  StepInput b = a0;
  b.owner = "bob";
  // Bob resending alice's request names his own token step 50 (token step ids are per router),
  // whose row is alice's: refused; her later layer is no token step of his.
  EXPECT_EQ(e->Step(b).status().code(), absl::StatusCode::kPermissionDenied);
  b.layer = 1;
  EXPECT_EQ(e->Step(b).status().code(), absl::StatusCode::kFailedPrecondition);
  StepInput b2 = MakeStep(s, 51, 0, {2, 1}, rng);
  b2.owner = "";
  absl::StatusOr<StepOutput> denied = e->Step(b2);
  EXPECT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(denied.status().message().find("rows[1]"), std::string::npos) << denied.status();
  StepInput f = MakeStep(s, 52, 0, {2}, rng);
  f.free = {1};
  EXPECT_EQ(e->Step(f).status().code(), absl::StatusCode::kPermissionDenied);
  const SeqId one[] = {1};
  EXPECT_EQ(e->Release(one, "bob").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(e->StateFingerprint(), before);
  // Alice replays and finishes her own token step, and releases her sequence.
  auto replay = e->Step(a0);
  ASSERT_TRUE(replay.ok());
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->out, first->out);
  for (int layer = 1; layer < s.num_layers; ++layer) {
    StepInput in = MakeStep(s, 50, layer, {1}, rng);
    in.owner = "alice";
    ASSERT_TRUE(e->Step(in).ok());
  }
  EXPECT_TRUE(e->Release(one, "alice").ok());
}

TEST(EngineRobustnessTest, TokenStepIdsArePerRouter) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(40);
  WritePrompt(*e, 1, 3, rng, nullptr, nullptr, "alice");
  WritePrompt(*e, 2, 3, rng, nullptr, nullptr, "mallory");
  // Mallory takes the token step ids alice will use next, with and without rows.
  StepInput squat = MakeStep(s, 101, 0, {}, rng);
  squat.owner = "mallory";
  ASSERT_TRUE(e->Step(squat).ok());
  StepInput squat2 = MakeStep(s, 102, 0, {2}, rng);
  squat2.owner = "mallory";
  ASSERT_TRUE(e->Step(squat2).ok());
  for (uint64_t id : {101, 102}) {
    for (int layer = 0; layer < s.num_layers; ++layer) {
      StepInput in = MakeStep(s, id, layer, {1}, rng);
      in.owner = "alice";
      auto out = e->Step(in);
      ASSERT_TRUE(out.ok()) << id << "/" << layer << ": " << out.status();
      EXPECT_FALSE(out->replayed);
    }
  }
  EXPECT_EQ(e->Info().pager.used_tokens, 3 + 2 + 3 + 1);
  EXPECT_EQ(e->Info().open_token_steps, 1);  // mallory's 102
  EXPECT_TRUE(e->CheckConsistency().ok());
}

TEST(EngineRobustnessTest, NonFiniteInputsAreRefusedNamingTheTensor) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(35);
  WritePrompt(*e, 1, 3, rng);
  const uint64_t before = e->StateFingerprint();
  const uint16_t nan = 0x7E00, inf = 0x7C00, neg_inf = 0xFC00;
  struct Case {
    int tensor;  // 0 q, 1 k, 2 v
    size_t element;
    uint16_t bits;
    const char* want;
  };
  for (const Case& c : {Case{0, 17, nan, "q: element [0, 0, 17] is NaN"},
                        Case{1, static_cast<size_t>(s.head_dim) + 3, inf, "k: element [0, 1, 3] is infinite"},
                        Case{2, 5, neg_inf, "v: element [0, 0, 5] is infinite"}}) {
    StepInput in = MakeStep(s, 7, 0, {1}, rng);
    std::span<const uint8_t>* t = c.tensor == 0 ? &in.q : c.tensor == 1 ? &in.k : &in.v;
    std::vector<uint8_t> bytes(t->begin(), t->end());
    bytes[2 * c.element] = static_cast<uint8_t>(c.bits & 0xFF);
    bytes[2 * c.element + 1] = static_cast<uint8_t>(c.bits >> 8);
    *t = bytes;
    absl::StatusOr<StepOutput> out = e->Step(in);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(out.status().message().rfind(c.want, 0), 0u) << out.status();
    EXPECT_EQ(e->StateFingerprint(), before);
  }
  // Prompt chunks too.
  auto w = e->BeginPrompt(2, 2);
  ASSERT_TRUE(w.ok());
  auto k = RandomBytes(2 * s.num_kv_heads * s.head_dim, rng);
  auto v = k;
  v[2 * 70 + 1] = 0x7F;  // 0x7Fxx: NaN
  absl::Status bad = (*w)->Write(0, 0, 2, k, v);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message().rfind("v: element [0, 1, 6] is NaN", 0), 0u) << bad;
  // An operator may turn the check off.
  EngineOptions opts = DefaultOptions();
  opts.check_finite = false;
  auto unchecked = MakeEngine(64, SmallShape(), opts);
  WritePrompt(*unchecked, 1, 3, rng);
  StepInput in = MakeStep(s, 7, 0, {1}, rng);
  std::vector<uint8_t> q(in.q.begin(), in.q.end());
  q[1] = 0x7E;
  in.q = q;
  EXPECT_TRUE(unchecked->Step(in).ok());
}

TEST(EngineRobustnessTest, LayersRunInOrder) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(36);
  WritePrompt(*e, 1, 3, rng);
  ASSERT_TRUE(e->Step(MakeStep(s, 5, 0, {1}, rng)).ok());
  const uint64_t before = e->StateFingerprint();
  absl::StatusOr<StepOutput> skipped = e->Step(MakeStep(s, 5, 2, {1}, rng));
  EXPECT_EQ(skipped.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(skipped.status().message().find("layer 1"), std::string::npos) << skipped.status();
  EXPECT_EQ(e->StateFingerprint(), before);
  ASSERT_TRUE(e->Step(MakeStep(s, 5, 1, {1}, rng)).ok());
  ASSERT_TRUE(e->Step(MakeStep(s, 5, 2, {1}, rng)).ok());
}

TEST(EngineRobustnessTest, RetryWindowCoversMicroBatchesAndALateLayerZeroAppendsNothing) {
  EngineOptions opts = DefaultOptions();
  opts.retained_token_steps = 4;
  auto e = MakeEngine(64, SmallShape(), opts);
  const ModelShape s = e->shape();
  std::mt19937_64 rng(37);
  WritePrompt(*e, 1, 3, rng);
  WritePrompt(*e, 2, 3, rng);
  // Micro-batch A's last layer answer is lost while micro-batch B runs three token steps.
  std::vector<StepInput> a;
  std::vector<std::string> a_out;
  for (int layer = 0; layer < s.num_layers; ++layer) {
    a.push_back(MakeStep(s, 100, layer, {1}, rng));
    auto out = e->Step(a.back());
    ASSERT_TRUE(out.ok());
    a_out.push_back(out->out);
  }
  for (uint64_t t = 200; t < 203; ++t) {
    for (int layer = 0; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, t, layer, {2}, rng)).ok());
  }
  auto replay = e->Step(a.back());
  ASSERT_TRUE(replay.ok());
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->out, a_out.back());
  // Past the window: a resent layer 0 is refused, nothing is appended twice.
  for (uint64_t t = 203; t < 210; ++t) {
    for (int layer = 0; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, t, layer, {2}, rng)).ok());
  }
  const uint64_t before = e->StateFingerprint();
  absl::StatusOr<StepOutput> late = e->Step(a.front());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.status().message().find("retry window"), std::string::npos) << late.status();
  EXPECT_EQ(e->StateFingerprint(), before);
  EXPECT_EQ(e->limits().retry_window_token_steps, 4);
}

TEST(EngineRobustnessTest, StopNewWorkLetsOpenTokenStepsFinish) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(38);
  WritePrompt(*e, 1, 3, rng);
  WritePrompt(*e, 2, 3, rng);
  ASSERT_TRUE(e->Step(MakeStep(s, 5, 0, {1}, rng)).ok());
  e->StopNewWork();
  absl::StatusOr<StepOutput> fresh = e->Step(MakeStep(s, 6, 0, {2}, rng));
  EXPECT_EQ(fresh.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(e->BeginPrompt(3, 2).status().code(), absl::StatusCode::kUnavailable);
  for (int layer = 1; layer < s.num_layers; ++layer) ASSERT_TRUE(e->Step(MakeStep(s, 5, layer, {1}, rng)).ok());
  StepInput free_only = MakeStep(s, 7, 0, {}, rng);
  free_only.free = {2};
  EXPECT_TRUE(e->Step(free_only).ok());
  const SeqId one[] = {1};
  EXPECT_TRUE(e->Release(one).ok());
  EXPECT_EQ(e->Info().pager.free_pages, 64);
}

TEST(EngineRobustnessTest, IdleSequencesAreReleasedWhenTheirLeaseIsOn) {
  EngineOptions opts = DefaultOptions();
  opts.sequence_idle_seconds = 10;
  auto e = MakeEngine(64, SmallShape(), opts);
  std::mt19937_64 rng(39);
  WritePrompt(*e, 1, 9, rng);
  auto writing = e->BeginPrompt(2, 4, "carol");  // being written: never taken by this lease
  ASSERT_TRUE(writing.ok());
  const auto later = std::chrono::steady_clock::now() + std::chrono::seconds(11);
  const Reclaimed r = e->ReclaimIdle(later);
  ASSERT_EQ(r.sequences.size(), 1u);
  EXPECT_EQ(r.sequences[0].id, 1u);
  EXPECT_EQ(r.sequences[0].pages, 3);
  EXPECT_EQ(e->Info().writing_sequences, 1);
  EXPECT_EQ(e->Info().active_sequences, 0);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

}  // namespace
}  // namespace pkv::engine

// ---------------------------------------------------------------------------------------------
// The plan that runs: the scheduler fits it to the backend's limits, the backend gets it as it
// stands and the observer reports it.

namespace pkv::engine {
namespace {

// Wraps the CPU backend as a backend of the split routes with small capacity: records the plan
// BeginTokenStep receives, then runs the CPU reference in its place.
class PlanRecordingBackend final : public ExecutionBackend {
 public:
  PlanRecordingBackend(ExecutionBackendPtr inner, scheduler::PlanLimits limits)
      : inner_(std::move(inner)), limits_(limits) {}

  const char* name() const override { return "plan-recording"; }
  kvpool::KvArena& arena() override { return inner_->arena(); }
  scheduler::DeviceInfo device_info() const override {
    scheduler::DeviceInfo info = inner_->device_info();
    info.is_gpu = true;
    info.limits = limits_;
    return info;
  }
  std::vector<KernelId> kernels() const override {
    return {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  }
  int32_t max_open_token_steps() const override { return inner_->max_open_token_steps(); }
  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    plans.push_back(plan);
    return inner_->BeginTokenStep(scheduler::StepPlan{}, table, new_slots);  // the reference
  }
  void EndTokenStep(int32_t slot) override { inner_->EndTokenStep(slot); }
  absl::Status RunLayer(int32_t slot, int32_t layer, const LayerBuffers& io, LayerRunInfo* info) override {
    return inner_->RunLayer(slot, layer, io, info);
  }

  std::vector<scheduler::StepPlan> plans;

 private:
  ExecutionBackendPtr inner_;
  scheduler::PlanLimits limits_;
};

TEST(EnginePlanTest, PlanFitsTheBackendsLimitsAndIsReportedAsRun) {
  scheduler::PlanLimits limits;
  limits.max_partial_slots = 6;
  limits.max_tasks = 1000;
  auto cpu = CreateCpuBackend(SmallShape(), 64, 1);
  ASSERT_TRUE(cpu.ok());
  auto recording = std::make_unique<PlanRecordingBackend>(std::move(*cpu), limits);
  PlanRecordingBackend* backend = recording.get();
  scheduler::Scheduler::Options o;
  o.available = backend->kernels();
  auto e = Engine::Create(DefaultOptions(), std::move(recording), *scheduler::Scheduler::Create(o));
  ASSERT_TRUE(e.ok()) << e.status();
  RecordingObserver obs;
  (*e)->SetObserver(&obs);
  const ModelShape s = (*e)->shape();
  std::mt19937_64 rng(11);
  WritePrompt(**e, 1, 40, rng);  // 41 tokens in the step: 11 pages of 4
  WritePrompt(**e, 2, 9, rng);   // 10 tokens: 3 pages

  o.fixed_kernel = KernelId::kWorkQueue;
  o.fixed_parameter = 1;  // 11 + 3 partial slots > 6; size 2: 6 + 2 > 6; size 4: 3 (row 2 is not cut)
  ASSERT_TRUE((*e)->SetScheduler(*scheduler::Scheduler::Create(o)).ok());
  ASSERT_TRUE((*e)->Step(MakeStep(s, 1, 0, {1, 2}, rng)).ok());
  ASSERT_EQ(backend->plans.size(), 1u);
  const scheduler::StepPlan& wq = backend->plans[0];
  EXPECT_EQ(wq.kernel, KernelId::kWorkQueue);
  EXPECT_EQ(wq.pages_per_task, 4);
  EXPECT_EQ(wq.row_splits, (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(wq.num_partials, 3);
  EXPECT_EQ(wq.tasks.size(), static_cast<size_t>(s.num_kv_heads) * (3 + 1));
  ASSERT_EQ(obs.planned.size(), 1u);
  EXPECT_EQ(obs.planned[0].kernel, KernelId::kWorkQueue);
  EXPECT_EQ(obs.planned[0].pages_per_task, 4);
  EXPECT_EQ(obs.planned[0].max_row_splits, 3);
  for (int layer = 1; layer < s.num_layers; ++layer) ASSERT_TRUE((*e)->Step(MakeStep(s, 1, layer, {1, 2}, rng)).ok());

  o.fixed_kernel = KernelId::kSequenceSplit;
  o.fixed_parameter = 8;  // 8 splits x 2 rows > 6 partial slots: clamped to 3
  ASSERT_TRUE((*e)->SetScheduler(*scheduler::Scheduler::Create(o)).ok());
  ASSERT_TRUE((*e)->Step(MakeStep(s, 2, 0, {1, 2}, rng)).ok());
  ASSERT_EQ(backend->plans.size(), 2u);
  EXPECT_EQ(backend->plans[1].kernel, KernelId::kSequenceSplit);
  EXPECT_EQ(backend->plans[1].num_splits, 3);
  ASSERT_EQ(obs.planned.size(), 2u);
  EXPECT_EQ(obs.planned[1].num_splits, 3);
  EXPECT_EQ(obs.planned[1].max_row_splits, 3);
  (*e)->SetObserver(nullptr);
}

TEST(EngineRobustnessTest, ALaterLayerRefusedForNaNChangesNothingAndItsRetryRuns) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(63);
  WritePrompt(*e, 1, 5, rng);
  ASSERT_TRUE(e->Step(MakeStep(s, 1, 0, {1}, rng)).ok());
  const uint64_t before = e->StateFingerprint();
  StepInput in = MakeStep(s, 1, 1, {1}, rng);
  std::vector<uint8_t> v(in.v.begin(), in.v.end());
  v[2 * (s.head_dim + 1)] = 0x00;
  v[2 * (s.head_dim + 1) + 1] = 0x7E;  // NaN
  StepInput bad = in;
  bad.v = v;
  absl::StatusOr<StepOutput> refused = e->Step(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message().rfind("v: element [0, 1, 1] is NaN", 0), 0u) << refused.status();
  EXPECT_EQ(e->StateFingerprint(), before);
  ASSERT_TRUE(e->Step(in).ok());
  // A resend of the layer that ran is refused for the NaN too, not answered from the retry cache.
  EXPECT_EQ(e->Step(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(e->CheckConsistency().ok());
}

}  // namespace
}  // namespace pkv::engine
