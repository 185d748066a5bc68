// Engine semantics on the CPU backend: token steps, deltas, retries, prompts, and all-or-nothing
// validation (each bad request gets its code and leaves the state fingerprint unchanged).
#include "engine/engine.h"

#include <cmath>
#include <random>

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

std::unique_ptr<Engine> MakeEngine(int64_t pages = 64, ModelShape shape = SmallShape()) {
  auto backend = CreateCpuBackend(shape, pages, 2);
  EXPECT_TRUE(backend.ok());
  auto sched = scheduler::Scheduler::Create(scheduler::Scheduler::Options{});
  EXPECT_TRUE(sched.ok());
  EngineOptions opts;
  opts.max_batch = 8;
  opts.scatter_seed = 4242;
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
                 std::vector<std::vector<uint8_t>>* v_hist = nullptr) {
  const ModelShape& s = e.shape();
  auto w = e.BeginPrompt(id, n);
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

TEST(EngineTest, StepMatchesDoubleReferenceIncludingTheNewToken) {
  auto e = MakeEngine();
  const ModelShape s = e->shape();
  std::mt19937_64 rng(1);
  const size_t tok = s.num_kv_heads * s.head_dim;
  std::vector<std::vector<uint8_t>> k_hist(s.num_layers), v_hist(s.num_layers);
  WritePrompt(*e, 7, 9, rng, &k_hist, &v_hist);
  for (int step = 1; step <= 6; ++step) {
    for (int layer = 0; layer < s.num_layers; ++layer) {
      StepInput in = MakeStep(s, step, layer, {7}, rng);
      in.want_lse = true;
      auto out = e->Step(in);
      ASSERT_TRUE(out.ok()) << out.status();
      k_hist[layer].insert(k_hist[layer].end(), in.k.begin(), in.k.end());
      v_hist[layer].insert(v_hist[layer].end(), in.v.begin(), in.v.end());
      const size_t n = k_hist[layer].size() / (tok * 2);
      ASSERT_EQ(n, 9u + step);
      std::vector<uint8_t> qb(in.q.begin(), in.q.end());
      std::vector<uint8_t> ob(out->out.begin(), out->out.end());
      double err2 = 0, ref2 = 0;
      for (int h = 0; h < s.num_q_heads; ++h) {
        const int kvh = h / s.group_size();
        std::vector<double> sc(n);
        double mx = -INFINITY;
        for (size_t t = 0; t < n; ++t) {
          double dot = 0;
          for (int i = 0; i < s.head_dim; ++i) {
            dot += double(Half(qb, h * s.head_dim + i)) * Half(k_hist[layer], t * tok + kvh * s.head_dim + i);
          }
          sc[t] = dot / std::sqrt(double(s.head_dim));
          mx = std::max(mx, sc[t]);
        }
        double sum = 0;
        for (double x : sc) sum += std::exp(x - mx);
        EXPECT_NEAR(out->lse[h], mx + std::log(sum), 1e-3);
        for (int i = 0; i < s.head_dim; ++i) {
          double acc = 0;
          for (size_t t = 0; t < n; ++t) acc += std::exp(sc[t] - mx) / sum * Half(v_hist[layer], t * tok + kvh * s.head_dim + i);
          const double got = Half(ob, h * s.head_dim + i);
          err2 += (got - acc) * (got - acc);
          ref2 += acc * acc;
        }
      }
      EXPECT_LT(std::sqrt(err2 / ref2), 2e-3);
    }
  }
  EXPECT_TRUE(e->CheckConsistency().ok());
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
