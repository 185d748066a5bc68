// IngestPacker: packing WriteKV chunks of several sequences into one staging buffer, replayed with
// ScatterRunsOnHost (the host model of the scatter kernel), gives the same pool bytes as
// WriteTokens chunk by chunk — with the buffer big enough for everything and with one so small
// that chunks are split across flushes. Runs coalesce consecutive slots of a page.
#include "kvpool/ingest_staging.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace pkv::kvpool {
namespace {

ModelShape Shape() {
  ModelShape s;
  s.num_layers = 3;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 8;
  return s;
}

struct Chunk {
  int32_t layer;
  std::vector<SlotAddr> slots;
  std::vector<uint16_t> k, v;
};

// Three "sequences" with scattered physical pages, written in 5-token chunks interleaved across
// sequences and layers (the WriteKV pattern).
std::vector<Chunk> MakeChunks(const ModelShape& s, std::mt19937_64& rng) {
  const std::vector<std::vector<PageId>> pages = {{3, 4, 9}, {0, 7}, {12, 5, 6, 1}};
  const std::vector<int64_t> tokens = {21, 13, 30};
  std::vector<Chunk> chunks;
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    for (int64_t t0 = 0; t0 < 30; t0 += 5) {
      for (size_t q = 0; q < pages.size(); ++q) {
        if (t0 >= tokens[q]) continue;
        Chunk c;
        c.layer = layer;
        for (int64_t t = t0; t < std::min<int64_t>(t0 + 5, tokens[q]); ++t) {
          c.slots.push_back(SlotAddr{pages[q][t / s.page_size], static_cast<int32_t>(t % s.page_size)});
        }
        c.k.resize(c.slots.size() * tok);
        c.v.resize(c.slots.size() * tok);
        for (auto& x : c.k) x = static_cast<uint16_t>(rng());
        for (auto& x : c.v) x = static_cast<uint16_t>(rng());
        chunks.push_back(std::move(c));
      }
    }
  }
  return chunks;
}

// Packs every chunk, flushing (scatter on the host) whenever the buffer is full; returns flushes.
int PackAndScatter(const ModelShape& s, int64_t capacity, const std::vector<Chunk>& chunks, HostKvArena& arena,
                   int64_t* runs_total) {
  IngestPacker packer(s, capacity);
  std::vector<uint8_t> buffer(capacity);
  const int64_t stride = arena.num_pages() * arena.page_elems() * 2;
  int flushes = 0;
  auto flush = [&] {
    size_t runs_at = 0;
    const size_t bytes = packer.Finish(buffer.data(), &runs_at);
    EXPECT_LE(bytes, static_cast<size_t>(capacity));
    // The run table travels with the data: read it back from the buffer as the kernel would.
    std::vector<ScatterRun> runs(packer.num_runs());
    std::memcpy(runs.data(), buffer.data() + runs_at, runs.size() * sizeof(ScatterRun));
    ScatterRunsOnHost(s, arena.layer_data(0), stride, buffer.data(), runs);
    *runs_total += packer.num_runs();
    packer.Reset();
    ++flushes;
  };
  for (const Chunk& c : chunks) {
    const int64_t row = packer.row_bytes();
    for (size_t done = 0; done < c.slots.size();) {
      const int64_t n = packer.Pack(buffer.data(), c.layer, std::span(c.slots).subspan(done),
                                    reinterpret_cast<const char*>(c.k.data()) + done * row,
                                    reinterpret_cast<const char*>(c.v.data()) + done * row);
      if (n == 0) {
        EXPECT_FALSE(packer.empty());
        flush();
      }
      done += n;
    }
  }
  if (!packer.empty()) flush();
  return flushes;
}

TEST(IngestPackerTest, MergedScatterEqualsChunkByChunkWrites) {
  const ModelShape s = Shape();
  std::mt19937_64 rng(31);
  const auto chunks = MakeChunks(s, rng);
  auto want = HostKvArena::Create(s, 16);
  ASSERT_TRUE(want.ok());
  for (const Chunk& c : chunks) ASSERT_TRUE((*want)->WriteTokens(c.layer, c.slots, c.k.data(), c.v.data()).ok());
  const size_t bytes = static_cast<size_t>((*want)->num_pages() * (*want)->page_elems() * 2);

  for (int64_t capacity : {int64_t{1} << 22, IngestPacker::MinCapacity(s), int64_t{7000}}) {
    auto got = HostKvArena::Create(s, 16);
    ASSERT_TRUE(got.ok());
    int64_t runs = 0;
    const int flushes = PackAndScatter(s, capacity, chunks, **got, &runs);
    for (int32_t layer = 0; layer < s.num_layers; ++layer) {
      EXPECT_EQ(std::memcmp((*got)->layer_data(layer), (*want)->layer_data(layer), bytes), 0)
          << "capacity " << capacity << " layer " << layer;
    }
    if (capacity == (int64_t{1} << 22)) {
      EXPECT_EQ(flushes, 1);  // everything in one copy + one scatter
      // A 5-token chunk is one run unless it crosses a page boundary (then two).
      int64_t want_runs = 0;
      for (const Chunk& c : chunks) {
        want_runs += 1;
        for (size_t t = 1; t < c.slots.size(); ++t) want_runs += c.slots[t].page != c.slots[t - 1].page ? 1 : 0;
      }
      EXPECT_EQ(runs, want_runs);
    } else {
      EXPECT_GT(flushes, 1) << "capacity " << capacity;
    }
  }
}

TEST(IngestPackerTest, FullBufferTakesNothingAndResetEmptiesIt) {
  const ModelShape s = Shape();
  const int64_t capacity = IngestPacker::MinCapacity(s);
  IngestPacker packer(s, capacity);
  std::vector<uint8_t> buffer(capacity);
  const std::vector<SlotAddr> slots = {{0, 0}, {0, 1}};
  std::vector<uint16_t> k(2 * s.num_kv_heads * s.head_dim), v(k.size());
  EXPECT_EQ(packer.Pack(buffer.data(), 0, slots, k.data(), v.data()), 1);
  EXPECT_EQ(packer.Pack(buffer.data(), 0, std::span(slots).subspan(1), k.data(), v.data()), 0);
  EXPECT_EQ(packer.num_tokens(), 1);
  packer.Reset();
  EXPECT_TRUE(packer.empty());
  EXPECT_EQ(packer.Pack(buffer.data(), 0, std::span(slots).subspan(1), k.data(), v.data()), 1);
}

}  // namespace
}  // namespace pkv::kvpool

namespace pkv::kvpool {
namespace {

// CopyRows (streaming stores) copies exactly: every length around the 64-byte step, from
// unaligned sources, leaving the bytes after the destination alone.
TEST(CopyRowsTest, CopiesEveryLengthFromUnalignedSources) {
  std::mt19937_64 rng(5);
  std::vector<uint8_t> src(4096 + 64);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  alignas(16) static uint8_t dst[4096 + 64];
  for (size_t len : {0, 1, 15, 16, 63, 64, 65, 127, 128, 1000, 4096}) {
    for (size_t src_off : {0, 1, 7}) {
      std::memset(dst, 0xAB, sizeof(dst));
      CopyRows(dst, src.data() + src_off, len);
      EXPECT_EQ(std::memcmp(dst, src.data() + src_off, len), 0) << len << " " << src_off;
      for (size_t i = len; i < sizeof(dst); ++i) ASSERT_EQ(dst[i], 0xAB) << len << " " << i;
    }
  }
}

// CopyRowsFinite copies exactly what CopyRows does and reports a NaN or infinity wherever it
// lies (in the bytes before the destination's 16-byte boundary, in the 64-byte loop, in the
// tail), for fp16 and bf16, from sources and to destinations at any even or odd offset; the
// answer is checked against an element-by-element scan of the source written here.
TEST(CopyRowsTest, CopyRowsFiniteCopiesAndFindsEveryNonFiniteElement) {
  std::mt19937_64 rng(11);
  alignas(16) static uint8_t dst[4096 + 64];
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const uint16_t exp = dtype == DType::kF16 ? 0x7C00 : 0x7F80;
    for (int round = 0; round < 3000; ++round) {
      const size_t elems = rng() % 1500;
      std::vector<uint16_t> src(elems + 8);
      for (auto& x : src) x = static_cast<uint16_t>(rng()) & static_cast<uint16_t>(~exp | (exp >> 1));
      const int bad = static_cast<int>(rng() % 3);  // 0: none, 1: NaN, 2: infinity
      size_t at = elems > 0 ? rng() % elems : 0;
      if (bad != 0 && elems > 0) {
        if (round % 4 == 0) at = rng() % std::min<size_t>(elems, 12);  // inside the plain head
        src[at] = static_cast<uint16_t>(exp | (bad == 1 ? 1 : 0) | (rng() & 0x8000));
      }
      const size_t dst_off = rng() % 17;
      std::memset(dst, 0xAB, sizeof(dst));
      const bool finite = CopyRowsFinite(dst + dst_off, src.data(), elems * 2, dtype);
      bool expect = true;
      for (size_t i = 0; i < elems; ++i) expect = expect && (src[i] & exp) != exp;
      ASSERT_EQ(finite, expect) << DTypeName(dtype) << " round " << round << " elems " << elems << " at " << at
                                << " dst_off " << dst_off;
      ASSERT_EQ(std::memcmp(dst + dst_off, src.data(), elems * 2), 0) << round;
      for (size_t i = 0; i < dst_off; ++i) ASSERT_EQ(dst[i], 0xAB) << round;
      for (size_t i = dst_off + elems * 2; i < sizeof(dst); ++i) ASSERT_EQ(dst[i], 0xAB) << round;
    }
  }
}

TEST(IngestPackerTest, AVoidedPlacementScattersNothingAndStopsCounting) {
  // Three chunks packed; the middle one taken back (its scan found a NaN after the copy): the
  // scatter lands the other two exactly as direct writes would, and nothing of the middle one.
  const ModelShape s = Shape();
  std::mt19937_64 rng(41);
  auto chunks = MakeChunks(s, rng);
  chunks.resize(3);
  IngestPacker packer(s, int64_t{1} << 22);
  EXPECT_TRUE(packer.Fits(1000));
  EXPECT_FALSE(packer.Fits(int64_t{1} << 22));
  std::vector<uint8_t> buffer(size_t{1} << 22);
  auto want = HostKvArena::Create(s, 16);
  ASSERT_TRUE(want.ok());
  int64_t kept_tokens = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& c = chunks[i];
    const IngestPacker::Placement at = packer.Reserve(c.layer, c.slots);
    ASSERT_EQ(at.tokens, static_cast<int64_t>(c.slots.size()));
    EXPECT_GT(at.end_run, at.first_run);
    CopyRows(buffer.data() + at.k_offset, c.k.data(), c.k.size() * 2);
    CopyRows(buffer.data() + at.v_offset, c.v.data(), c.v.size() * 2);
    if (i == 1) {
      packer.Void(at);
    } else {
      ASSERT_TRUE((*want)->WriteTokens(c.layer, c.slots, c.k.data(), c.v.data()).ok());
      kept_tokens += at.tokens;
    }
  }
  EXPECT_EQ(packer.num_tokens(), kept_tokens);
  size_t runs_at = 0;
  packer.Finish(buffer.data(), &runs_at);
  auto got = HostKvArena::Create(s, 16);
  ASSERT_TRUE(got.ok());
  ScatterRunsOnHost(s, (*got)->layer_data(0), (*got)->num_pages() * (*got)->page_elems() * 2, buffer.data(),
                    packer.runs());
  const size_t bytes = static_cast<size_t>((*want)->num_pages() * (*want)->page_elems() * 2);
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    EXPECT_EQ(std::memcmp((*got)->layer_data(layer), (*want)->layer_data(layer), bytes), 0) << "layer " << layer;
  }
}

}  // namespace
}  // namespace pkv::kvpool
