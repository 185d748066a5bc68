#include "kvpool/block_pager.h"

#include <random>

#include "gtest/gtest.h"

namespace pkv::kvpool {
namespace {

BlockPager MakePager(int64_t pages, int32_t page_size = 16, uint64_t seed = 7) {
  return BlockPager(BlockPager::Options{pages, page_size, seed});
}

TEST(BlockPagerTest, CreateAllocatesCeilPages) {
  BlockPager p = MakePager(10);
  ASSERT_TRUE(p.Create(1, 33).ok());
  EXPECT_EQ(p.Find(1)->pages.size(), 3u);
  EXPECT_EQ(p.Find(1)->num_tokens, 33);
  EXPECT_EQ(p.free_pages(), 7);
  ASSERT_TRUE(p.Create(2, 0).ok());
  EXPECT_EQ(p.Find(2)->pages.size(), 0u);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, AppendCrossesPageBoundaries) {
  BlockPager p = MakePager(10, 4);
  ASSERT_TRUE(p.Create(1, 3).ok());
  EXPECT_EQ(*p.PagesToAppend(1, 1), 0);
  ASSERT_TRUE(p.Append(1, 1).ok());  // fills page 0
  EXPECT_EQ(p.Find(1)->pages.size(), 1u);
  EXPECT_EQ(*p.PagesToAppend(1, 1), 1);
  ASSERT_TRUE(p.Append(1, 1).ok());  // token 4 opens page 1
  EXPECT_EQ(p.Find(1)->pages.size(), 2u);
  ASSERT_TRUE(p.Append(1, 9).ok());  // 14 tokens -> 4 pages
  EXPECT_EQ(p.Find(1)->pages.size(), 4u);
  const SlotAddr last = p.Locate(*p.Find(1), 13);
  EXPECT_EQ(last.page, p.Find(1)->pages[3]);
  EXPECT_EQ(last.slot, 1);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, ScatteredOrderIsAPermutation) {
  BlockPager p = MakePager(64, 16, 12345);
  ASSERT_TRUE(p.Create(1, 64 * 16).ok());
  std::vector<PageId> pages = p.Find(1)->pages;
  bool ascending = true;
  for (size_t i = 1; i < pages.size(); ++i) ascending &= pages[i] == pages[i - 1] + 1;
  EXPECT_FALSE(ascending);
  std::sort(pages.begin(), pages.end());
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(pages[i], static_cast<PageId>(i));
}

TEST(BlockPagerTest, ExhaustionChangesNothing) {
  BlockPager p = MakePager(4);
  ASSERT_TRUE(p.Create(1, 48).ok());  // 3 pages
  const PagerStats before = p.Stats();
  absl::Status s = p.Create(2, 17);   // needs 2, 1 free
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("1 free"), std::string_view::npos) << s;
  EXPECT_FALSE(p.Contains(2));
  ASSERT_TRUE(p.Create(3, 16).ok());  // takes the last page
  s = p.Append(1, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(p.Find(1)->num_tokens, 48);
  EXPECT_EQ(p.Find(1)->pages.size(), 3u);
  EXPECT_EQ(p.Stats().used_tokens, before.used_tokens + 16);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, ErrorsOnUnknownAndDuplicate) {
  BlockPager p = MakePager(4);
  EXPECT_EQ(p.Append(9, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(p.Release(9).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(p.Truncate(9, 0).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(p.Create(1, 1).ok());
  EXPECT_EQ(p.Create(1, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(p.Fork(1, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(p.Fork(5, 6).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(p.Truncate(1, 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.Create(2, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.free_pages(), 3);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, ForkSharesPagesAndCopiesOnWrite) {
  BlockPager p = MakePager(8, 4);
  ASSERT_TRUE(p.Create(1, 6).ok());  // 2 pages, last partial
  ASSERT_TRUE(p.Fork(1, 2).ok());
  const auto src_pages = p.Find(1)->pages;
  EXPECT_EQ(p.Find(2)->pages, src_pages);
  EXPECT_EQ(p.refcount(src_pages[0]), 2);
  EXPECT_EQ(p.free_pages(), 6);
  // Appending into the shared partial page copies it.
  EXPECT_EQ(*p.PagesToAppend(2, 1), 1);
  std::vector<PageCopy> copies;
  ASSERT_TRUE(p.Append(2, 1, &copies).ok());
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, src_pages[1]);
  EXPECT_NE(p.Find(2)->pages[1], src_pages[1]);
  EXPECT_EQ(p.Find(2)->pages[0], src_pages[0]);
  EXPECT_EQ(p.refcount(src_pages[1]), 1);
  EXPECT_EQ(p.refcount(src_pages[0]), 2);
  // Releasing one owner keeps shared pages alive.
  ASSERT_TRUE(p.Release(1).ok());
  EXPECT_EQ(p.refcount(src_pages[0]), 1);
  EXPECT_TRUE(p.CheckConsistency().ok());
  ASSERT_TRUE(p.Release(2).ok());
  EXPECT_EQ(p.free_pages(), 8);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, PagesReleasedByCountsSharedPagesOnce) {
  BlockPager p = MakePager(8, 4);
  ASSERT_TRUE(p.Create(1, 8).ok());
  ASSERT_TRUE(p.Fork(1, 2).ok());
  const SeqId one[] = {1};
  const SeqId both[] = {1, 2};
  EXPECT_EQ(p.PagesReleasedBy(one), 0);
  EXPECT_EQ(p.PagesReleasedBy(both), 2);
}

TEST(BlockPagerTest, TruncateUndoesAppend) {
  BlockPager p = MakePager(8, 4);
  ASSERT_TRUE(p.Create(1, 4).ok());
  ASSERT_TRUE(p.Append(1, 1).ok());
  EXPECT_EQ(p.free_pages(), 6);
  ASSERT_TRUE(p.Truncate(1, 4).ok());
  EXPECT_EQ(p.free_pages(), 7);
  EXPECT_EQ(p.Find(1)->num_tokens, 4);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

TEST(BlockPagerTest, RandomOperationsKeepAccountingExact) {
  BlockPager p = MakePager(200, 16, 99);
  std::mt19937_64 rng(20260622);
  std::vector<SeqId> live;
  SeqId next = 1;
  for (int i = 0; i < 5000; ++i) {
    const int op = static_cast<int>(rng() % 5);
    if (op == 0 || live.empty()) {
      const int64_t n = static_cast<int64_t>(rng() % 400);
      if (p.Create(next, n).ok()) live.push_back(next);
      ++next;
    } else if (op == 1) {
      const SeqId s = live[rng() % live.size()];
      std::vector<PageCopy> copies;
      (void)p.Append(s, static_cast<int64_t>(rng() % 40), &copies);
    } else if (op == 2) {
      const size_t idx = rng() % live.size();
      ASSERT_TRUE(p.Release(live[idx]).ok());
      live.erase(live.begin() + static_cast<long>(idx));
    } else if (op == 3) {
      if (p.Fork(live[rng() % live.size()], next).ok()) live.push_back(next);
      ++next;
    } else {
      const SeqId s = live[rng() % live.size()];
      ASSERT_TRUE(p.Truncate(s, p.Find(s)->num_tokens / 2).ok());
    }
    ASSERT_TRUE(p.CheckConsistency().ok()) << "after op " << i;
  }
  for (SeqId s : live) ASSERT_TRUE(p.Release(s).ok());
  EXPECT_EQ(p.free_pages(), 200);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

}  // namespace
}  // namespace pkv::kvpool

namespace pkv::kvpool {
namespace {

TEST(BlockPagerTest, StaticCapacityHoldsPagesFromCreation) {
  BlockPager p(BlockPager::Options{16, 16, 3});
  ASSERT_TRUE(p.Create(1, 5, 64).ok());  // 4 pages held for a 5-token prompt
  EXPECT_EQ(p.Find(1)->pages.size(), 4u);
  EXPECT_EQ(p.Stats().reserved_tokens, 64);
  EXPECT_EQ(*p.PagesToAppend(1, 59), 0);
  ASSERT_TRUE(p.Append(1, 59).ok());      // 64 tokens: still 4 pages
  EXPECT_EQ(p.free_pages(), 12);
  EXPECT_EQ(*p.PagesToAppend(1, 1), 1);   // the 65th token grows past the slot
  ASSERT_TRUE(p.Append(1, 1).ok());
  EXPECT_EQ(p.Find(1)->pages.size(), 5u);
  ASSERT_TRUE(p.Truncate(1, 10).ok());    // back to the slot, never below it
  EXPECT_EQ(p.Find(1)->pages.size(), 4u);
  EXPECT_TRUE(p.CheckConsistency().ok());
  // Copy-on-write still finds the partial page inside the slot.
  ASSERT_TRUE(p.Fork(1, 2).ok());
  std::vector<PageCopy> copies;
  ASSERT_TRUE(p.Append(2, 1, &copies).ok());
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, p.Find(1)->pages[0]);
  EXPECT_NE(p.Find(2)->pages[0], p.Find(1)->pages[0]);
  EXPECT_TRUE(p.CheckConsistency().ok());
  ASSERT_TRUE(p.Release(1).ok());
  ASSERT_TRUE(p.Release(2).ok());
  EXPECT_EQ(p.free_pages(), 16);
  EXPECT_EQ(p.Create(3, 1, 17 * 16).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(p.CheckConsistency().ok());
}

}  // namespace
}  // namespace pkv::kvpool
