#include <algorithm>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "gtest/gtest.h"
#include "common/piece_bytes.h"
#include "kvpool/kv_arena.h"

namespace pkv::kvpool {
namespace {

// Two layers of d 64 and 4-token pages, with `hkv` KV heads (G 2).
ModelShape ArenaShape(int32_t hkv) {
  ModelShape shape;
  shape.num_layers = 2;
  shape.num_q_heads = 2 * hkv;
  shape.num_kv_heads = hkv;
  shape.head_dim = 64;
  shape.page_size = 4;
  return shape;
}

TEST(HostKvArenaTest, WriteThenReadRoundTripsAndUsesTheLayout) {
  const ModelShape shape = ArenaShape(2);
  auto arena = HostKvArena::Create(shape, 8);
  ASSERT_TRUE(arena.ok());
  std::mt19937 rng(1);
  const std::vector<SlotAddr> slots = {{5, 3}, {0, 0}, {7, 1}};
  std::vector<uint16_t> k(3 * 2 * 64), v(k.size());
  for (auto& x : k) x = static_cast<uint16_t>(rng());
  for (auto& x : v) x = static_cast<uint16_t>(rng());
  ASSERT_TRUE((*arena)->WriteTokens(1, slots, k.data(), v.data()).ok());
  std::vector<uint16_t> k2(k.size()), v2(v.size());
  ASSERT_TRUE((*arena)->ReadTokens(1, slots, k2.data(), v2.data()).ok());
  EXPECT_EQ(k, k2);
  EXPECT_EQ(v, v2);
  // Layout [page][K|V][kv_head][slot][d]: V of head 1 for slot (7, 1).
  const auto* base = static_cast<const uint16_t*>((*arena)->layer_data(1));
  const int64_t off = (((7 * 2 + 1) * 2 + 1) * 4 + 1) * 64;
  EXPECT_EQ(base[off], v[(2 * 2 + 1) * 64]);
  EXPECT_FALSE((*arena)->WriteTokens(2, slots, k.data(), v.data()).ok());
  const std::vector<SlotAddr> bad = {{8, 0}};
  EXPECT_FALSE((*arena)->WriteTokens(0, bad, k.data(), v.data()).ok());
  ASSERT_TRUE((*arena)->CopyPage(5, 6).ok());
  const std::vector<SlotAddr> copied = {{6, 3}};
  std::vector<uint16_t> k3(2 * 64), v3(2 * 64);
  ASSERT_TRUE((*arena)->ReadTokens(1, copied, k3.data(), v3.data()).ok());
  EXPECT_TRUE(std::equal(k3.begin(), k3.end(), k.begin()));
}

// WriteKV hands the arena K and V in the pieces gRPC received them in. Staged from pieces cut at
// random bytes (inside rows and inside elements), the pool must hold what WriteTokens of the
// same rows writes; a NaN in an element split between two pieces refuses the chunk and changes
// nothing.
TEST(HostKvArenaTest, StageTokensFromPiecesCutAnywhereMatchesWriteTokens) {
  const ModelShape shape = ArenaShape(4);
  auto staged = HostKvArena::Create(shape, 16);
  auto written = HostKvArena::Create(shape, 16);
  ASSERT_TRUE(staged.ok()) << staged.status();
  ASSERT_TRUE(written.ok()) << written.status();
  std::mt19937 rng(7);
  const size_t pool_bytes = static_cast<size_t>(16 * (*staged)->page_elems() * 2);
  for (int round = 0; round < 20; ++round) {
    // A random set of distinct slots in random order.
    std::vector<SlotAddr> all;
    for (int p = 0; p < 16; ++p)
      for (int s = 0; s < 4; ++s) all.push_back({p, s});
    std::shuffle(all.begin(), all.end(), rng);
    const std::vector<SlotAddr> slots(all.begin(), all.begin() + 1 + rng() % 20);
    const size_t bytes = slots.size() * 4 * 64 * 2;
    // Finite fp16 values (exponent below all-ones).
    auto finite = [&] { return static_cast<uint16_t>(rng() & 0xBBFF); };
    std::vector<uint16_t> k(bytes / 2), v(bytes / 2);
    for (auto& x : k) x = finite();
    for (auto& x : v) x = finite();
    auto cut = [&](const std::vector<uint16_t>& t, std::vector<std::span<const uint8_t>>* pieces) {
      const auto* b = reinterpret_cast<const uint8_t*>(t.data());
      size_t at = 0;
      while (at < bytes) {
        const size_t n = std::min(bytes - at, size_t{1} + rng() % 300);
        pieces->emplace_back(b + at, n);
        if (rng() % 5 == 0) pieces->emplace_back(b + at + n, 0);  // empty pieces are allowed
        at += n;
      }
    };
    std::vector<std::span<const uint8_t>> kp, vp;
    cut(k, &kp);
    cut(v, &vp);
    const int32_t layer = static_cast<int32_t>(rng() % 2);
    StageScan scan;
    ASSERT_TRUE((*staged)->StageTokens(layer, slots, PieceBytes(kp), PieceBytes(vp), &scan).ok());
    EXPECT_TRUE(scan.clean());
    ASSERT_TRUE((*written)->WriteTokens(layer, slots, k.data(), v.data()).ok());
    ASSERT_EQ(0, std::memcmp((*staged)->layer_data(0), (*written)->layer_data(0), pool_bytes)) << "round " << round;
  }

  // A NaN whose two bytes lie in two pieces: refused, element index named, nothing written.
  const std::vector<SlotAddr> slots = {{3, 1}, {9, 2}};
  const size_t bytes = 2 * 4 * 64 * 2;
  std::vector<uint16_t> k(bytes / 2, 0x3C00), v(bytes / 2, 0x3C00);
  v[77] = 0x7E00;
  const auto* kb = reinterpret_cast<const uint8_t*>(k.data());
  const auto* vb = reinterpret_cast<const uint8_t*>(v.data());
  const std::vector<std::span<const uint8_t>> kp = {{kb, bytes}};
  const std::vector<std::span<const uint8_t>> vp = {{vb, 155}, {vb + 155, bytes - 155}};
  std::vector<uint8_t> before(pool_bytes);
  std::memcpy(before.data(), (*staged)->layer_data(0), pool_bytes);
  StageScan scan;
  ASSERT_TRUE((*staged)->StageTokens(1, slots, PieceBytes(kp), PieceBytes(vp), &scan).ok());
  EXPECT_EQ(scan.first_k, -1);
  EXPECT_EQ(scan.first_v, 77);
  EXPECT_EQ(0, std::memcmp(before.data(), (*staged)->layer_data(0), pool_bytes));

  // Wrong sizes and slots out of range are refused before anything is written.
  const std::vector<std::span<const uint8_t>> short_k = {{kb, bytes - 2}};
  EXPECT_FALSE((*staged)->StageTokens(1, slots, PieceBytes(short_k), PieceBytes(kp), nullptr).ok());
  const std::vector<SlotAddr> bad = {{3, 1}, {16, 0}};
  EXPECT_FALSE((*staged)->StageTokens(1, bad, PieceBytes(kp), PieceBytes(kp), nullptr).ok());
  EXPECT_EQ(0, std::memcmp(before.data(), (*staged)->layer_data(0), pool_bytes));
}

}  // namespace
}  // namespace pkv::kvpool
