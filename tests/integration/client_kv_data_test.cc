// Tests of the client's reproducible data (client/kv_data.h), its double reference, the
// replay's percentile helper and the WriteKV chunk encoding (client/kv_chunk_wire.h): the pieces
// every integration check relies on.
#include "client/kv_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>

#include "client/kv_chunk_wire.h"
#include "client/payload_pool.h"
#include "client/replay.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "pkv/v1/worker.pb.h"

namespace pkv::client {
namespace {

ModelShape Shape(DType dtype) {
  ModelShape s;
  s.num_layers = 2;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.dtype = dtype;
  return s;
}

TEST(KvDataGenTest, BytesAndValuesAgreeAndAreReproducible) {
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const ModelShape s = Shape(dtype);
    const KvDataGen a(s, 11), b(s, 11), c(s, 12);
    std::string k1, v1, k2, v2, k3, v3;
    a.AppendKv(5, 1, 10, 3, &k1, &v1);
    b.AppendKv(5, 1, 10, 3, &k2, &v2);
    c.AppendKv(5, 1, 10, 3, &k3, &v3);
    ASSERT_EQ(k1.size(), 3u * 2 * 64 * 2);
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
    EXPECT_NE(k1, k3);
    EXPECT_NE(k1, v1);
    const std::vector<double> hist = a.History(DataKind::kK, 5, 1, 13);
    for (int t = 0; t < 3; ++t) {
      for (int i = 0; i < 2 * 64; ++i) {
        uint16_t raw;
        std::memcpy(&raw, k1.data() + 2 * (t * 128 + i), 2);
        EXPECT_EQ(ToFloat(dtype, raw), hist[(10 + t) * 128 + i]);
        EXPECT_EQ(raw, a.Raw(DataKind::kK, 5, 1, 10 + t, i / 64, i % 64));
      }
    }
    std::string q;
    a.AppendQ(5, 1, 10, &q);
    const std::vector<double> qd = a.Query(5, 1, 10);
    ASSERT_EQ(q.size(), qd.size() * 2);
    for (size_t i = 0; i < qd.size(); ++i) {
      uint16_t raw;
      std::memcpy(&raw, q.data() + 2 * i, 2);
      EXPECT_EQ(ToFloat(dtype, raw), qd[i]);
    }
  }
}

// The pool's History/Query are exactly the bytes AppendKv/AppendQ send (what the replay's checks
// rely on), reproducible, spread over its rows; rows = 0 is the generator itself.
TEST(PayloadPoolTest, SentBytesAndCheckedValuesAgree) {
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const ModelShape s = Shape(dtype);
    const KvDataGen gen(s, 11);
    const PayloadPool pool(gen, 11, 32), same(gen, 11, 32), reseeded(gen, 12, 32), none(gen, 11, 0);
    EXPECT_EQ(pool.rows(), 32);
    std::string k, v, k2, v2, k3, v3;
    pool.AppendKv(5, 1, 0, 40, &k, &v);
    same.AppendKv(5, 1, 0, 40, &k2, &v2);
    reseeded.AppendKv(5, 1, 0, 40, &k3, &v3);
    ASSERT_EQ(k.size(), 40u * 2 * 64 * 2);
    EXPECT_EQ(k, k2);
    EXPECT_EQ(v, v2);
    EXPECT_NE(k, k3);
    // Chunks compose: tokens [10, 40) appended alone equal that part of the whole.
    std::string kt, vt;
    pool.AppendKv(5, 1, 10, 30, &kt, &vt);
    EXPECT_EQ(kt, k.substr(10 * 256));
    const std::vector<double> hk = pool.History(DataKind::kK, 5, 1, 40), hv = pool.History(DataKind::kV, 5, 1, 40);
    ASSERT_EQ(hk.size(), 40u * 128);
    std::set<std::string> distinct;
    for (int t = 0; t < 40; ++t) {
      distinct.insert(k.substr(t * 256, 256));
      for (int i = 0; i < 128; ++i) {
        uint16_t rk, rv;
        std::memcpy(&rk, k.data() + 2 * (t * 128 + i), 2);
        std::memcpy(&rv, v.data() + 2 * (t * 128 + i), 2);
        EXPECT_EQ(ToFloat(dtype, rk), hk[t * 128 + i]);
        EXPECT_EQ(ToFloat(dtype, rv), hv[t * 128 + i]);
      }
    }
    EXPECT_GT(distinct.size(), 15u);  // 40 positions over 32 rows
    std::string q;
    pool.AppendQ(5, 1, 39, &q);
    const std::vector<double> qd = pool.Query(5, 1, 39);
    ASSERT_EQ(q.size(), qd.size() * 2);
    for (size_t i = 0; i < qd.size(); ++i) {
      uint16_t raw;
      std::memcpy(&raw, q.data() + 2 * i, 2);
      EXPECT_EQ(ToFloat(dtype, raw), qd[i]);
    }
    // Without a pool every element comes from the generator.
    std::string kg, vg, kn, vn;
    gen.AppendKv(5, 1, 0, 4, &kg, &vg);
    none.AppendKv(5, 1, 0, 4, &kn, &vn);
    EXPECT_EQ(kn, kg);
    EXPECT_EQ(none.History(DataKind::kV, 5, 1, 4), gen.History(DataKind::kV, 5, 1, 4));
  }
}

TEST(KvDataGenTest, ValuesAreStandardNormal) {
  const KvDataGen gen(Shape(DType::kF16), 3);
  const std::vector<double> x = gen.History(DataKind::kV, 1, 0, 2000);  // 256000 values
  double sum = 0, sq = 0, within1 = 0;
  for (double v : x) {
    sum += v;
    sq += v * v;
    within1 += std::abs(v) < 1.0;
  }
  const double n = static_cast<double>(x.size());
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.02);
  EXPECT_NEAR(within1 / n, 0.6827, 0.005);
}

TEST(ReferenceDecodeTest, MatchesHandComputedCases) {
  ModelShape s = Shape(DType::kF16);
  s.num_q_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 64;
  const int d = 64;
  // Two tokens; head 0's query prefers token 1 by a score gap of exactly log(3).
  std::vector<double> q(2 * d, 0.0), k(2 * d, 0.0), v(2 * d, 0.0);
  q[0] = std::log(3.0) * std::sqrt(64.0);  // head 0: score(t) = k[t][0] * log 3
  k[1 * d + 0] = 1.0;
  v[0 * d + 5] = 1.0;
  v[1 * d + 5] = 5.0;
  std::vector<double> out, lse;
  ReferenceDecode(s, q, k, v, 2, &out, &lse);
  EXPECT_NEAR(out[5], 0.25 * 1.0 + 0.75 * 5.0, 1e-12);
  EXPECT_NEAR(lse[0], std::log(1.0 + 3.0), 1e-12);
  EXPECT_NEAR(out[d + 5], 3.0, 1e-12);  // head 1: uniform weights
  EXPECT_NEAR(lse[1], std::log(2.0), 1e-12);
}

TEST(ReplayTest, PercentileInterpolatesBetweenRanks) {
  EXPECT_EQ(Percentile({}, 50), 0.0);
  EXPECT_EQ(Percentile({4.0}, 99), 4.0);
  EXPECT_DOUBLE_EQ(Percentile({1, 2, 3, 4}, 50), 2.5);
  EXPECT_DOUBLE_EQ(Percentile({10, 0, 5}, 100), 10.0);
  EXPECT_DOUBLE_EQ(Percentile({0, 10}, 99), 9.9);
}

TEST(ReplayTest, SlidingWindowFindsTheWorstSecond) {
  // 10 tokens every 0.1 s (off the 10 ms window grid) for 3 s, with no completions in (1.5, 2.0):
  // the worst 1 s window, (0.91, 1.91], holds only 1.005 .. 1.405 (5 completions).
  std::vector<std::pair<double, int64_t>> c;
  for (int i = 1; i <= 30; ++i) {
    const double t = 0.1 * i + 0.005;
    if (t > 1.5 && t < 2.0) continue;
    c.emplace_back(t, 10);
  }
  const std::vector<std::pair<double, double>> always{{0.0, 5.0}};
  const WindowStats w = SlidingWindowThroughput(c, always, 0.0, 3.0, 1.0);
  EXPECT_NEAR(w.worst_tokens_per_s, 50.0, 1e-9);
  EXPECT_NEAR(w.worst_start_s, 0.91, 0.006);
  EXPECT_NEAR(w.median_tokens_per_s, 80.0, 1e-9);
  // Shorter than one window: nothing to report.
  const WindowStats none = SlidingWindowThroughput(c, always, 0.0, 0.5, 1.0);
  EXPECT_EQ(none.worst_tokens_per_s, 0.0);
  EXPECT_EQ(none.median_tokens_per_s, 0.0);
  // A steady stream: every window holds 10 completions of 10 tokens.
  std::vector<std::pair<double, int64_t>> steady;
  for (int i = 0; i < 50; ++i) steady.emplace_back(0.055 + 0.1 * i, 10);
  const WindowStats s = SlidingWindowThroughput(steady, always, 0.0, 5.0, 1.0);
  EXPECT_NEAR(s.worst_tokens_per_s, 100.0, 1e-9);
  EXPECT_NEAR(s.median_tokens_per_s, 100.0, 1e-9);
  EXPECT_EQ(s.windows, 401);
  // Idle time is not slow decode: with the worker busy only in [0, 1.5] and [2.0, 3.0], no window
  // overlapping the idle gap by more than 5% counts, so the worst window is no longer the gap.
  const WindowStats gap = SlidingWindowThroughput(c, {{0.0, 1.5}, {2.0, 3.0}}, 0.0, 3.0, 1.0);
  EXPECT_GT(gap.windows, 0);
  EXPECT_GE(gap.worst_tokens_per_s, 90.0);
}

TEST(IngestHoldTest, ComparesOverlappedStepsWithQuietOnesOfTheirBatchSizeAndLayerKind) {
  std::vector<IngestOverlapSample> samples;
  // Batch 8: quiet steps of 0.20 ms (median 0.20), three overlapped ones of 0.20, 0.30 and 0.60.
  for (int i = 0; i < 24; ++i) samples.push_back({8, i % 2 == 0 ? 0.19 : 0.21, false});
  samples.push_back({8, 0.20, false});
  samples.push_back({8, 0.20, true});
  samples.push_back({8, 0.30, true});
  samples.push_back({8, 0.60, true});
  // Batch 2: quiet median 0.10; one overlapped step of 0.15.
  for (int i = 0; i < 20; ++i) samples.push_back({2, 0.10, false});
  samples.push_back({2, 0.15, true});
  // Batch 5: overlapped, but too few quiet steps to compare against.
  for (int i = 0; i < 19; ++i) samples.push_back({5, 0.12, false});
  samples.push_back({5, 9.0, true});
  const IngestHold hold = MeasureIngestHold(samples);
  EXPECT_EQ(hold.overlapped, 5);
  EXPECT_EQ(hold.quiet, 25 + 20 + 19);
  ASSERT_EQ(hold.excess_ms.size(), 4u);
  ASSERT_EQ(hold.excess_steps.size(), 4u);
  const double want_ms[] = {0.0, 0.10, 0.40, 0.05};
  const double want_steps[] = {0.0, 0.5, 2.0, 0.5};
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(hold.excess_ms[i], want_ms[i], 1e-12) << i;
    EXPECT_NEAR(hold.excess_steps[i], want_steps[i], 1e-12) << i;
  }
  // The control: the quiet steps of the compared kinds (batch 8: 25, batch 2: 20; batch 5 has
  // too few) against the same medians, in the same units: batch 8's 0.19 / 0.21 ms are 0.05 of a
  // layer-step either side.
  ASSERT_EQ(hold.quiet_excess_steps.size(), 45u);
  EXPECT_NEAR(*std::max_element(hold.quiet_excess_steps.begin(), hold.quiet_excess_steps.end()), 0.05, 1e-9);
  EXPECT_NEAR(*std::min_element(hold.quiet_excess_steps.begin(), hold.quiet_excess_steps.end()), -0.05, 1e-9);
  // The worst held layer-steps, largest first, with their sample (stages included).
  ASSERT_EQ(hold.worst.size(), 4u);
  EXPECT_NEAR(hold.worst[0].excess_steps, 2.0, 1e-12);
  EXPECT_NEAR(hold.worst[0].sample.ms, 0.60, 1e-12);
  EXPECT_NEAR(hold.worst[0].median_ms, 0.20, 1e-12);
  EXPECT_NEAR(hold.worst[3].excess_steps, 0.0, 1e-12);
  std::vector<IngestOverlapSample> many;
  for (int i = 0; i < 20; ++i) many.push_back({1, 0.10, false});
  for (int i = 1; i <= 9; ++i) {
    many.push_back({1, 0.10 + 0.01 * i, true});
    many.back().stages[static_cast<int32_t>(Stage::kQueue)] = 0.01 * i;
  }
  const IngestHold kept = MeasureIngestHold(many);
  ASSERT_EQ(kept.worst.size(), IngestHold::kWorstKept);
  EXPECT_NEAR(kept.worst[0].excess_steps, 0.9, 1e-9);
  EXPECT_NEAR(kept.worst[0].sample.stages[static_cast<int32_t>(Stage::kQueue)], 0.09, 1e-12);
  EXPECT_NEAR(kept.worst.back().excess_steps, 0.5, 1e-9);
  // Layer 0 (page-table deltas and the plan) against quiet layer-0 steps, counted in later layers'
  // time: quiet layer 0 takes 0.50 ms, later layers 0.20 ms; an overlapped layer 0 of 0.60 ms is
  // held back by 0.10 ms = 0.5 layer-steps, and an overlapped later layer of 0.50 ms by 1.5.
  std::vector<IngestOverlapSample> kinds;
  for (int i = 0; i < 20; ++i) kinds.push_back({4, 0.50, false, true});
  for (int i = 0; i < 20; ++i) kinds.push_back({4, 0.20, false, false});
  kinds.push_back({4, 0.60, true, true});
  kinds.push_back({4, 0.50, true, false});
  // Batch 6: quiet layer 0 known, later layers not: layer 0 counted in its own time.
  for (int i = 0; i < 20; ++i) kinds.push_back({6, 0.40, false, true});
  kinds.push_back({6, 0.60, true, true});
  const IngestHold by_kind = MeasureIngestHold(kinds);
  ASSERT_EQ(by_kind.excess_ms.size(), 3u);
  EXPECT_NEAR(by_kind.excess_ms[0], 0.10, 1e-12);
  EXPECT_NEAR(by_kind.excess_steps[0], 0.5, 1e-12);
  EXPECT_NEAR(by_kind.excess_ms[1], 0.30, 1e-12);
  EXPECT_NEAR(by_kind.excess_steps[1], 1.5, 1e-12);
  EXPECT_NEAR(by_kind.excess_ms[2], 0.20, 1e-12);
  EXPECT_NEAR(by_kind.excess_steps[2], 0.5, 1e-12);
  // Nothing overlapped: nothing to compare.
  const IngestHold none = MeasureIngestHold({{8, 0.2, false}, {8, 0.3, false}});
  EXPECT_EQ(none.overlapped, 0);
  EXPECT_TRUE(none.excess_ms.empty());
  EXPECT_TRUE(none.quiet_excess_steps.empty());
  EXPECT_TRUE(none.worst.empty());
}

// The slices of a ByteBuffer, joined.
std::string Joined(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

TEST(KvChunkWireTest, MessageIsProtobufsOwnEncoding) {
  // Zeros (omitted by proto3), multi-byte varints, a negative layer (10-byte varint), both
  // dtypes, empty and odd-sized data: each must be byte-identical to protobuf's serialisation.
  struct Case {
    int32_t dtype, layer;
    int64_t offset, tokens, hkv, d;
    size_t k_bytes, v_bytes;
  };
  const Case cases[] = {{1, 0, 0, 1, 1, 1, 2, 2},          {2, 31, 300, 256, 8, 128, 524288, 524288},
                        {1, -1, 1 << 20, 3, 2, 64, 777, 0}, {0, 5, 0, 0, 0, 0, 0, 5},
                        {1, 127, 128, 200000, 16, 256, 131, 70000}};
  std::mt19937_64 rng(7);
  for (const Case& c : cases) {
    auto k = std::make_shared<std::string>(c.k_bytes, '\0'), v = std::make_shared<std::string>(c.v_bytes, '\0');
    for (char& x : *k) x = static_cast<char>(rng());
    for (char& x : *v) x = static_cast<char>(rng());
    v1::WriteKVRequest want;
    v1::KVChunk* chunk = want.mutable_chunk();
    chunk->set_layer(c.layer);
    chunk->set_token_offset(c.offset);
    chunk->set_num_tokens(c.tokens);
    for (v1::Tensor* t : {chunk->mutable_k(), chunk->mutable_v()}) {
      t->set_dtype(static_cast<v1::DType>(c.dtype));
      for (int64_t dim : {c.tokens, c.hkv, c.d}) t->add_shape(dim);
    }
    chunk->mutable_k()->set_data(*k);
    chunk->mutable_v()->set_data(*v);

    const ChunkFields fields{.wire_dtype = c.dtype, .layer = c.layer, .token_offset = c.offset,
                             .num_tokens = c.tokens, .num_kv_heads = c.hkv, .head_dim = c.d};
    const grpc::ByteBuffer got = ChunkMessage(fields, BorrowedSlice({k, *k}), BorrowedSlice({v, *v}));
    const std::string bytes = Joined(got);
    EXPECT_EQ(bytes, want.SerializeAsString()) << "layer " << c.layer << " k " << c.k_bytes;
    v1::WriteKVRequest parsed;
    ASSERT_TRUE(parsed.ParseFromString(bytes));
    EXPECT_EQ(parsed.chunk().k().data(), *k);
    EXPECT_EQ(parsed.chunk().v().data(), *v);
  }
}

TEST(KvChunkWireTest, BorrowedBytesAreNotCopiedAndTheirOwnerIsHeldUntilReleased) {
  auto data = std::make_shared<std::string>(4096, 'x');
  std::weak_ptr<std::string> alive = data;
  {
    grpc::ByteBuffer message = ChunkMessage({.wire_dtype = 1, .layer = 1, .num_tokens = 1, .num_kv_heads = 1,
                                             .head_dim = 2048},
                                            BorrowedSlice({data, *data}), BorrowedSlice({data, *data}));
    const char* first = data->data();
    data.reset();
    ASSERT_FALSE(alive.expired());  // the message holds it
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(message.Dump(&slices).ok());
    ASSERT_EQ(slices.size(), 4u);
    EXPECT_EQ(reinterpret_cast<const char*>(slices[1].begin()), first);  // the caller's bytes, not a copy
    EXPECT_EQ(reinterpret_cast<const char*>(slices[3].begin()), first);
  }
  EXPECT_TRUE(alive.expired());  // every slice released: so is the owner
}

TEST(KvChunkWireTest, PooledBuffersComeBackWhenTheirSlicesAreReleased) {
  std::shared_ptr<ChunkBufferPool> pool = ChunkBufferPool::Create(/*max_idle=*/1);
  std::unique_ptr<std::string> a = pool->Take(), b = pool->Take();
  a->assign(1000, 'a');
  b->assign(2000, 'b');
  const char* a_bytes = a->data();
  {
    grpc::ByteBuffer message = ChunkMessage({.wire_dtype = 1, .num_tokens = 1, .num_kv_heads = 1, .head_dim = 500},
                                            pool->Wrap(std::move(a)), pool->Wrap(std::move(b)));
    EXPECT_EQ(pool->idle(), 0u);
    std::weak_ptr<ChunkBufferPool> weak = pool;
    pool.reset();
    EXPECT_FALSE(weak.expired());  // the slices keep the pool alive
    pool = weak.lock();
  }
  EXPECT_EQ(pool->idle(), 1u);  // both came back; one is kept (max_idle), the other freed
  std::unique_ptr<std::string> again = pool->Take();
  EXPECT_TRUE(again->empty());
  EXPECT_GE(again->capacity(), 1000u);
  EXPECT_TRUE(again->data() == a_bytes || again->capacity() >= 2000u);
}

}  // namespace
}  // namespace pkv::client
