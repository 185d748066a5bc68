// GPU tests of the device KV arena: token writes/reads against the host arena's layout, the
// one-launch append of all rows and layers, copy-on-write page copies, and coalesced prompt
// ingest (with its bandwidth printed). Skipped without a GPU.
#include "kvpool/cuda/device_kv_arena.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvpool/cuda/append_kv.h"
#include "tests/support/random_pieces.h"

namespace pkv::kvpool {
namespace {

bool HaveGpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

ModelShape SmallShape() {
  ModelShape s;
  s.num_layers = 3;
  s.num_q_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 16;
  return s;
}

std::vector<uint16_t> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = static_cast<uint16_t>(rng());
  return v;
}

std::vector<uint16_t> Download(const DeviceKvArena& a, int32_t layer) {
  std::vector<uint16_t> h(a.layer_bytes() / 2);
  EXPECT_EQ(cudaMemcpy(h.data(), a.layer_data(layer), a.layer_bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

class DeviceKvArenaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(DeviceKvArenaTest, WriteReadMatchesHostLayout) {
  const ModelShape s = SmallShape();
  auto dev = DeviceKvArena::Create(s, {.num_pages = 40});
  ASSERT_TRUE(dev.ok()) << dev.status();
  auto host = HostKvArena::Create(s, 40);
  ASSERT_TRUE(host.ok());
  std::vector<SlotAddr> slots;
  for (int i = 0; i < 37; ++i) slots.push_back(SlotAddr{(i * 7) % 40, (i * 5) % 16});
  // Unique slots only (a later write would overwrite an earlier one in both arenas anyway).
  const size_t elems = slots.size() * s.num_kv_heads * s.head_dim;
  for (int layer = 0; layer < s.num_layers; ++layer) {
    const auto k = Random(elems, 1 + layer), v = Random(elems, 100 + layer);
    ASSERT_TRUE((*dev)->WriteTokens(layer, slots, k.data(), v.data()).ok());
    ASSERT_TRUE((*host)->WriteTokens(layer, slots, k.data(), v.data()).ok());
    std::vector<uint16_t> k2(elems), v2(elems), k3(elems), v3(elems);
    ASSERT_TRUE((*dev)->ReadTokens(layer, slots, k2.data(), v2.data()).ok());
    ASSERT_TRUE((*host)->ReadTokens(layer, slots, k3.data(), v3.data()).ok());
    EXPECT_EQ(k2, k3);
    EXPECT_EQ(v2, v3);
  }
  for (int layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    const auto* h = static_cast<const uint16_t*>((*host)->layer_data(layer));
    EXPECT_EQ(0, std::memcmp(d.data(), h, d.size() * 2)) << "layer " << layer;
  }
  EXPECT_FALSE((*dev)->WriteTokens(0, std::vector<SlotAddr>{{40, 0}}, nullptr, nullptr).ok());
  EXPECT_FALSE((*dev)->WriteTokens(3, slots, nullptr, nullptr).ok());
}

TEST_F(DeviceKvArenaTest, AppendAllRowsAndLayersInOneLaunch) {
  const ModelShape s = SmallShape();
  auto dev = DeviceKvArena::Create(s, {.num_pages = 16});
  ASSERT_TRUE(dev.ok());
  auto host = HostKvArena::Create(s, 16);
  ASSERT_TRUE(host.ok());
  const std::vector<SlotAddr> slots = {{3, 0}, {9, 15}, {0, 7}, {15, 1}, {4, 4}};
  const int n = static_cast<int>(slots.size());
  const size_t per_layer = static_cast<size_t>(n) * s.num_kv_heads * s.head_dim;
  const auto k = Random(per_layer * s.num_layers, 7), v = Random(per_layer * s.num_layers, 8);
  void *d_slots, *d_k, *d_v;
  ASSERT_EQ(cudaMalloc(&d_slots, n * 8), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_k, k.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_v, v.size() * 2), cudaSuccess);
  cudaMemcpy(d_slots, slots.data(), n * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(d_k, k.data(), k.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_v, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
  cuda::AppendKvParams p;
  p.arena = (*dev)->layer_data(0);
  p.layer_stride = (*dev)->layer_bytes() / 2;
  p.num_layers = s.num_layers;
  p.num_kv_heads = s.num_kv_heads;
  p.page_size = s.page_size;
  p.head_dim = s.head_dim;
  p.num_tokens = n;
  p.slots = static_cast<const int32_t*>(d_slots);
  p.k = d_k;
  p.v = d_v;
  ASSERT_EQ(cuda::LaunchAppendKv(p, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (int layer = 0; layer < s.num_layers; ++layer) {
    ASSERT_TRUE((*host)->WriteTokens(layer, slots, k.data() + layer * per_layer, v.data() + layer * per_layer).ok());
    const auto d = Download(**dev, layer);
    EXPECT_EQ(0, std::memcmp(d.data(), (*host)->layer_data(layer), d.size() * 2)) << "layer " << layer;
  }
  cudaFree(d_slots);
  cudaFree(d_k);
  cudaFree(d_v);
}

TEST_F(DeviceKvArenaTest, CopyPageAllLayers) {
  const ModelShape s = SmallShape();
  auto dev = DeviceKvArena::Create(s, {.num_pages = 8});
  ASSERT_TRUE(dev.ok());
  std::vector<SlotAddr> slots;
  for (int t = 0; t < 16; ++t) slots.push_back({2, t});
  const size_t elems = slots.size() * s.num_kv_heads * s.head_dim;
  for (int layer = 0; layer < s.num_layers; ++layer) {
    const auto k = Random(elems, 30 + layer), v = Random(elems, 40 + layer);
    ASSERT_TRUE((*dev)->WriteTokens(layer, slots, k.data(), v.data()).ok());
  }
  ASSERT_TRUE((*dev)->CopyPage(2, 5).ok());
  const int64_t pe = (*dev)->page_elems();
  for (int layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    EXPECT_EQ(0, std::memcmp(d.data() + 2 * pe, d.data() + 5 * pe, pe * 2));
  }
  EXPECT_FALSE((*dev)->CopyPage(2, 8).ok());
}

TEST_F(DeviceKvArenaTest, IngestCoalescesRunsAndReportsBandwidth) {
  ModelShape s;  // the default 32-layer, Hkv 8, d 128, page 16 shape
  auto dev = DeviceKvArena::Create(s, {.num_pages = 2048});
  ASSERT_TRUE(dev.ok()) << dev.status();
  // 1024 pages in runs of 64 consecutive physical pages, runs in shuffled order.
  std::vector<PageId> pages;
  std::vector<int> runs(16);
  for (int i = 0; i < 16; ++i) runs[i] = i;
  std::shuffle(runs.begin(), runs.end(), std::mt19937_64(3));
  for (int r : runs) {
    for (int j = 0; j < 64; ++j) pages.push_back(r * 128 + j);
  }
  const int64_t pe = (*dev)->page_elems();
  const size_t n = pages.size();
  std::vector<uint16_t> src(static_cast<size_t>(s.num_layers) * n * pe);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i * 2654435761u >> 7);
  auto stats = (*dev)->IngestPages(pages, src.data());
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->bytes, static_cast<int64_t>(src.size() * 2));
  EXPECT_LE(stats->copies, static_cast<int64_t>(s.num_layers) * (16 + 8));  // runs, plus staging cuts
  std::printf("ingest: %.1f MB in %lld copies, %.2f GB/s\n", stats->bytes / 1e6,
              static_cast<long long>(stats->copies), stats->gbps());
  // The same from a pinned source: direct DMA per run (the path a prefill receiver would use).
  void* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(&pinned, src.size() * 2, cudaHostAllocDefault), cudaSuccess);
  std::memcpy(pinned, src.data(), src.size() * 2);
  auto pstats = (*dev)->IngestPages(pages, pinned);
  ASSERT_TRUE(pstats.ok()) << pstats.status();
  EXPECT_EQ(pstats->copies, static_cast<int64_t>(s.num_layers) * 16);
  std::printf("ingest (pinned source): %.1f MB in %lld copies, %.2f GB/s\n", pstats->bytes / 1e6,
              static_cast<long long>(pstats->copies), pstats->gbps());
  cudaFreeHost(pinned);
  for (int layer : {0, 17, 31}) {
    const auto d = Download(**dev, layer);
    for (size_t i : {size_t{0}, n / 3, n - 1}) {
      EXPECT_EQ(0, std::memcmp(d.data() + pages[i] * pe, src.data() + (layer * n + i) * pe, pe * 2))
          << "layer " << layer << " page index " << i;
    }
  }
}

TEST_F(DeviceKvArenaTest, StagedIngestOfInterleavedChunksMatchesHostWrites) {
  const ModelShape s = SmallShape();
  // The chunks below carry 0.74 MB of K,V; a 256 KiB ingest buffer forces several flushes (and
  // chunks split across them).
  auto dev = DeviceKvArena::Create(s, {.num_pages = 64, .ingest_bytes = 256 << 10});
  ASSERT_TRUE(dev.ok()) << dev.status();
  auto host = HostKvArena::Create(s, 64);
  ASSERT_TRUE(host.ok());
  // Four sequences with scattered pages, 24-token chunks interleaved across sequences and layers.
  std::vector<std::vector<SlotAddr>> seq_slots(4);
  const int64_t tokens[] = {200, 37, 150, 96};
  int32_t next_page = 0;
  for (int q = 0; q < 4; ++q) {
    for (int64_t t = 0; t < tokens[q]; ++t) {
      if (t % s.page_size == 0) next_page = (next_page + 13) % 64;
      seq_slots[q].push_back(SlotAddr{next_page, static_cast<int32_t>(t % s.page_size)});
    }
  }
  // Unique pages per sequence: 13 is coprime with 64 and the pages needed (<= 32) stay < 64.
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  uint64_t seed = 1;
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    for (int64_t t0 = 0; t0 < 200; t0 += 24) {
      for (int q = 0; q < 4; ++q) {
        if (t0 >= tokens[q]) continue;
        const int64_t n = std::min<int64_t>(24, tokens[q] - t0);
        const auto k = Random(n * tok, ++seed), v = Random(n * tok, ++seed);
        const std::span<const SlotAddr> slots(seq_slots[q].data() + t0, n);
        ASSERT_TRUE((*dev)->StageTokens(layer, slots, k.data(), v.data(), nullptr).ok());
        ASSERT_TRUE((*host)->WriteTokens(layer, slots, k.data(), v.data()).ok());
      }
    }
  }
  ASSERT_TRUE((*dev)->FlushStaged().ok());
  const IngestStats st = (*dev)->staged_stats();
  EXPECT_EQ(st.bytes, (200 + 37 + 150 + 96) * s.num_layers * 2 * static_cast<int64_t>(tok) * 2);
  EXPECT_GT(st.copies, 1);
  EXPECT_LT(st.copies, 40);  // far fewer copies than the ~100 chunks
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    EXPECT_EQ(std::memcmp(d.data(), (*host)->layer_data(layer), (*dev)->layer_bytes()), 0) << "layer " << layer;
  }
  std::printf("staged ingest: %lld bytes in %lld copies, %.2f GB/s\n", static_cast<long long>(st.bytes),
              static_cast<long long>(st.copies), st.gbps());
}

TEST_F(DeviceKvArenaTest, ConcurrentStagingFromSeveralThreadsMatchesHostWrites) {
  const ModelShape s = SmallShape();
  // Four writer threads (like four WriteKV streams), each its own sequence; a 128 KiB ingest
  // buffer makes flushes race with rows being copied into the buffer; one writer commits
  // (FlushStaged) early while the others go on.
  auto dev = DeviceKvArena::Create(s, {.num_pages = 64, .ingest_bytes = 128 << 10});
  ASSERT_TRUE(dev.ok()) << dev.status();
  auto host = HostKvArena::Create(s, 64);
  ASSERT_TRUE(host.ok());
  const int64_t tokens[] = {200, 37, 150, 96};
  std::vector<std::vector<SlotAddr>> seq_slots(4);
  int32_t next_page = 0;
  for (int q = 0; q < 4; ++q) {
    for (int64_t t = 0; t < tokens[q]; ++t) {
      if (t % s.page_size == 0) next_page = (next_page + 13) % 64;
      seq_slots[q].push_back(SlotAddr{next_page, static_cast<int32_t>(t % s.page_size)});
    }
  }
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  std::vector<std::thread> writers;
  std::vector<int> failures(4, 0);
  for (int q = 0; q < 4; ++q) {
    writers.emplace_back([&, q] {
      uint64_t seed = 1000 * (q + 1);
      for (int32_t layer = 0; layer < s.num_layers; ++layer) {
        for (int64_t t0 = 0; t0 < tokens[q]; t0 += 16) {
          const int64_t n = std::min<int64_t>(16, tokens[q] - t0);
          const auto k = Random(n * tok, ++seed), v = Random(n * tok, ++seed);
          const std::span<const SlotAddr> slots(seq_slots[q].data() + t0, n);
          if (!(*dev)->StageTokens(layer, slots, k.data(), v.data(), nullptr).ok()) ++failures[q];
          if (!(*host)->WriteTokens(layer, slots, k.data(), v.data()).ok()) ++failures[q];  // disjoint pages
        }
      }
      if (!(*dev)->FlushStaged().ok()) ++failures[q];
    });
  }
  for (auto& t : writers) t.join();
  for (int q = 0; q < 4; ++q) EXPECT_EQ(failures[q], 0) << "writer " << q;
  const IngestStats st = (*dev)->staged_stats();
  EXPECT_EQ(st.bytes, (200 + 37 + 150 + 96) * s.num_layers * 2 * static_cast<int64_t>(tok) * 2);
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    EXPECT_EQ(std::memcmp(d.data(), (*host)->layer_data(layer), (*dev)->layer_bytes()), 0) << "layer " << layer;
  }
}

TEST_F(DeviceKvArenaTest, StagedIngestWithCopyHelpersMatchesHostWrites) {
  // Chunks of 256 tokens of Hkv 8 x d 128 (512 KiB of K and of V each) are large enough for the
  // copy helpers to split; two writers share three helpers, and a 3 MiB buffer makes flushes
  // land between pieces being copied.
  ModelShape s;
  s.num_layers = 2;
  s.num_q_heads = 32;
  s.num_kv_heads = 8;
  s.head_dim = 128;
  s.page_size = 16;
  const int64_t pages = 160;
  auto dev = DeviceKvArena::Create(s, {.num_pages = pages, .ingest_bytes = 3 << 20, .ingest_copy_threads = 3});
  ASSERT_TRUE(dev.ok()) << dev.status();
  auto host = HostKvArena::Create(s, pages);
  ASSERT_TRUE(host.ok());
  const int64_t tokens[] = {1280, 1000};  // 80 + 63 pages, scattered: 37 is coprime with 160
  std::vector<std::vector<SlotAddr>> seq_slots(2);
  int32_t next_page = 0;
  for (int q = 0; q < 2; ++q) {
    for (int64_t t = 0; t < tokens[q]; ++t) {
      if (t % s.page_size == 0) next_page = (next_page + 37) % pages;
      seq_slots[q].push_back(SlotAddr{next_page, static_cast<int32_t>(t % s.page_size)});
    }
  }
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  std::vector<std::thread> writers;
  std::vector<int> failures(2, 0);
  for (int q = 0; q < 2; ++q) {
    writers.emplace_back([&, q] {
      uint64_t seed = 5000 * (q + 1);
      for (int32_t layer = 0; layer < s.num_layers; ++layer) {
        for (int64_t t0 = 0; t0 < tokens[q]; t0 += 256) {
          const int64_t n = std::min<int64_t>(256, tokens[q] - t0);
          const auto k = Random(n * tok, ++seed), v = Random(n * tok, ++seed);
          const std::span<const SlotAddr> slots(seq_slots[q].data() + t0, n);
          if (!(*dev)->StageTokens(layer, slots, k.data(), v.data(), nullptr).ok()) ++failures[q];
          if (!(*host)->WriteTokens(layer, slots, k.data(), v.data()).ok()) ++failures[q];  // disjoint pages
        }
      }
      if (!(*dev)->FlushStaged().ok()) ++failures[q];
    });
  }
  for (auto& t : writers) t.join();
  for (int q = 0; q < 2; ++q) EXPECT_EQ(failures[q], 0) << "writer " << q;
  EXPECT_EQ((*dev)->staged_stats().bytes, (1280 + 1000) * s.num_layers * 2 * static_cast<int64_t>(tok) * 2);
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    EXPECT_EQ(std::memcmp(d.data(), (*host)->layer_data(layer), (*dev)->layer_bytes()), 0) << "layer " << layer;
  }
}

TEST_F(DeviceKvArenaTest, StagingScanRefusesNonFiniteRowsAndStagesNothing) {
  // A 256-token chunk (512 KiB of K and of V, split over the copy helpers) with an infinity in V
  // well past its first piece: the scan reports that element and nothing reaches the pool; the
  // same chunk made finite then stages and lands.
  ModelShape s;
  s.num_layers = 1;
  s.num_q_heads = 32;
  s.num_kv_heads = 8;
  s.head_dim = 128;
  s.page_size = 16;
  auto dev = DeviceKvArena::Create(s, {.num_pages = 32, .ingest_copy_threads = 3});
  ASSERT_TRUE(dev.ok()) << dev.status();
  std::vector<SlotAddr> slots;
  for (int32_t t = 0; t < 256; ++t) slots.push_back(SlotAddr{31 - t / 16, t % 16});
  const size_t elems = 256 * static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  std::vector<uint16_t> k(elems), v(elems);
  std::mt19937_64 rng(3);
  for (auto& x : k) x = static_cast<uint16_t>(rng() & 0x3BFF);  // finite fp16
  for (auto& x : v) x = static_cast<uint16_t>(rng() & 0x3BFF);
  const int64_t bad = 200000;  // token 195, head 2, dim 64
  v[bad] = 0xFC00;             // -infinity
  v[bad + 5000] = 0x7E00;      // a later NaN
  const auto before = Download(**dev, 0);
  StageScan scan;
  ASSERT_TRUE((*dev)->StageTokens(0, slots, k.data(), v.data(), &scan).ok());
  EXPECT_EQ(scan.first_k, -1);
  EXPECT_EQ(scan.first_v, bad);
  ASSERT_TRUE((*dev)->FlushStaged().ok());
  EXPECT_EQ((*dev)->staged_stats().bytes, 0);
  EXPECT_EQ(Download(**dev, 0), before) << "a refused chunk changed the pool";
  v[bad] = 0x3C00;
  v[bad + 5000] = 0x3C00;
  StageScan clean;
  ASSERT_TRUE((*dev)->StageTokens(0, slots, k.data(), v.data(), &clean).ok());
  EXPECT_TRUE(clean.clean());
  ASSERT_TRUE((*dev)->FlushStaged().ok());
  std::vector<uint16_t> k_back(elems), v_back(elems);
  ASSERT_TRUE((*dev)->ReadTokens(0, slots, k_back.data(), v_back.data()).ok());
  EXPECT_EQ(k_back, k);
  EXPECT_EQ(v_back, v);
}

// A tensor's bytes cut at up to 39 random offsets (tests/support/random_pieces.h).
std::vector<std::span<const uint8_t>> CutAnywhere(const std::vector<uint16_t>& t, std::mt19937_64& rng) {
  const int cuts = static_cast<int>(rng() % 40);
  return testing_support::RandomPieces(reinterpret_cast<const uint8_t*>(t.data()), 2 * t.size(), cuts, rng);
}

TEST_F(DeviceKvArenaTest, StagedIngestFromPiecesCutAnywhereMatchesHostWrites) {
  // Chunks staged from their pieces (copy helpers taking pieces at any destination offset), with
  // a 256 KiB buffer forcing flushes; then a chunk whose only bad element is split between two
  // pieces: the scan finds it and nothing reaches the pool.
  const ModelShape s = SmallShape();
  auto dev = DeviceKvArena::Create(s, {.num_pages = 64, .ingest_bytes = 256 << 10, .ingest_copy_threads = 3});
  ASSERT_TRUE(dev.ok()) << dev.status();
  auto host = HostKvArena::Create(s, 64);
  ASSERT_TRUE(host.ok());
  std::vector<SlotAddr> slots;
  for (int32_t t = 0; t < 500; ++t) slots.push_back(SlotAddr{(t / 16 * 29) % 64, t % 16});
  const size_t tok = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  std::mt19937_64 rng(20261207);
  uint64_t seed = 500;
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    for (int64_t t0 = 0; t0 < 500;) {
      const int64_t n = std::min<int64_t>(1 + rng() % 120, 500 - t0);
      auto k = Random(n * tok, ++seed), v = Random(n * tok, ++seed);
      for (auto* t : {&k, &v}) {
        for (auto& x : *t) x = static_cast<uint16_t>(x & 0xBBFF);  // finite in fp16 (SmallShape's dtype)
      }
      const auto k_pieces = CutAnywhere(k, rng), v_pieces = CutAnywhere(v, rng);
      const std::span<const SlotAddr> chunk(slots.data() + t0, n);
      StageScan scan;
      ASSERT_TRUE((*dev)->StageTokens(layer, chunk, PieceBytes(k_pieces), PieceBytes(v_pieces), &scan).ok());
      ASSERT_TRUE(scan.clean());
      ASSERT_TRUE((*host)->WriteTokens(layer, chunk, k.data(), v.data()).ok());
      t0 += n;
    }
  }
  ASSERT_TRUE((*dev)->FlushStaged().ok());
  for (int32_t layer = 0; layer < s.num_layers; ++layer) {
    const auto d = Download(**dev, layer);
    EXPECT_EQ(std::memcmp(d.data(), (*host)->layer_data(layer), (*dev)->layer_bytes()), 0) << "layer " << layer;
  }
  // Element 1001 of V (bytes 2002-2003) infinite, the pieces cut at byte 2003.
  auto k = Random(40 * tok, 1), v = Random(40 * tok, 2);
  for (auto* t : {&k, &v}) {
    for (auto& x : *t) x = static_cast<uint16_t>(x & 0x3BFF);
  }
  v[1001] = 0x7C00;
  const auto* vb = reinterpret_cast<const uint8_t*>(v.data());
  const std::span<const uint8_t> v_pieces[] = {{vb, 2003}, {vb + 2003, 2 * v.size() - 2003}};
  const auto before = Download(**dev, 0);
  StageScan scan;
  const PieceBytes k_bytes(reinterpret_cast<const uint8_t*>(k.data()), 2 * k.size());
  ASSERT_TRUE(
      (*dev)->StageTokens(0, std::span<const SlotAddr>(slots.data(), 40), k_bytes, PieceBytes(v_pieces), &scan).ok());
  EXPECT_EQ(scan.first_k, -1);
  EXPECT_EQ(scan.first_v, 1001);
  ASSERT_TRUE((*dev)->FlushStaged().ok());
  EXPECT_EQ(Download(**dev, 0), before) << "a refused chunk changed the pool";
}

TEST_F(DeviceKvArenaTest, CapacityFromFreeMemoryFraction) {
  ModelShape s = SmallShape();
  auto dev = DeviceKvArena::Create(s, {.free_memory_fraction = 0.01});
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_GT((*dev)->num_pages(), 100);
  EXPECT_FALSE(DeviceKvArena::Create(s, {}).ok());
}

}  // namespace
}  // namespace pkv::kvpool
