#include <random>

#include "gtest/gtest.h"
#include "kvpool/kv_arena.h"

namespace pkv::kvpool {
namespace {

TEST(HostKvArenaTest, WriteThenReadRoundTripsAndUsesTheLayout) {
  ModelShape shape;
  shape.num_layers = 2;
  shape.num_q_heads = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 64;
  shape.page_size = 4;
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

}  // namespace
}  // namespace pkv::kvpool
