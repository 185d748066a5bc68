// ParallelCopier: every byte lands where CopyRows would put it, whatever the split — spans of odd
// lengths, more spans than helpers, many small spans at any destination offset (a received
// message's pieces), copies too small to split, many callers at once sharing the helpers, and a
// copier without helpers; its NaN/inf scan reports the earliest bad element of each span, or of
// each tensor given in pieces cut anywhere (even inside an element), whichever piece holds it.
#include "kvpool/parallel_copy.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/random_pieces.h"

namespace pkv::kvpool {
namespace {

// A source of random bytes and a destination (16-byte aligned at every span start) per span.
struct Case {
  std::vector<std::vector<uint8_t>> src;
  std::vector<std::vector<uint8_t>> dst;
  std::vector<ParallelCopier::Span> spans;
};

Case MakeCase(std::mt19937_64& rng, const std::vector<size_t>& lengths) {
  Case c;
  for (size_t n : lengths) {
    std::vector<uint8_t> s(n + 3);
    for (auto& b : s) b = static_cast<uint8_t>(rng());
    c.src.push_back(std::move(s));
    c.dst.emplace_back(n + 32, 0xEE);
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    auto* d = c.dst[i].data();
    d += (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16;
    c.spans.push_back({d, c.src[i].data() + i % 4, lengths[i]});  // unaligned sources
  }
  return c;
}

void ExpectCopied(const Case& c) {
  for (size_t i = 0; i < c.spans.size(); ++i) {
    const auto& s = c.spans[i];
    ASSERT_EQ(std::memcmp(s.dst, s.src, s.bytes), 0) << "span " << i << " of " << s.bytes << " bytes";
    // Nothing written past the span.
    const auto* after = static_cast<const uint8_t*>(s.dst) + s.bytes;
    const auto* end = c.dst[i].data() + c.dst[i].size();
    for (const uint8_t* p = after; p < end; ++p) ASSERT_EQ(*p, 0xEE) << "span " << i << " overran";
  }
}

TEST(ParallelCopierTest, CopiesEverySpanExactlyWhateverTheSplit) {
  std::mt19937_64 rng(20261203);
  for (int helpers : {0, 1, 3, 7}) {
    ParallelCopier copier(helpers, /*min_piece=*/4096);
    for (const std::vector<size_t>& lengths :
         std::vector<std::vector<size_t>>{{0}, {1}, {4095}, {4096, 4096}, {100000, 3}, {1 << 20, (1 << 20) + 17},
                                          {8191, 8192, 8193, 65536, 77777, 5, 0, 300000}}) {
      Case c = MakeCase(rng, lengths);
      copier.Copy(c.spans);
      ExpectCopied(c);
    }
  }
}

TEST(ParallelCopierTest, ConcurrentCallersShareTheHelpers) {
  ParallelCopier copier(3, /*min_piece=*/8192);
  std::vector<std::thread> callers;
  std::vector<int> failures(6, 0);
  for (int t = 0; t < 6; ++t) {
    callers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int round = 0; round < 40; ++round) {
        Case c = MakeCase(rng, {static_cast<size_t>(rng() % 200000), static_cast<size_t>(rng() % 200000)});
        copier.Copy(c.spans);
        for (const auto& s : c.spans) failures[t] += std::memcmp(s.dst, s.src, s.bytes) != 0;
      }
    });
  }
  for (auto& t : callers) t.join();
  for (int t = 0; t < 6; ++t) EXPECT_EQ(failures[t], 0) << "caller " << t;
}

TEST(ParallelCopierTest, HelpersTakePiecesOfALargeCopy) {
  // A large copy is split and its pieces are copied by the helpers too, not only by the caller
  // (a helper may wake too late for one call's pieces, not for all of many).
  std::mt19937_64 rng(7);
  ParallelCopier copier(4);
  for (int i = 0; i < 200 && copier.helper_pieces() == 0; ++i) {
    Case c = MakeCase(rng, {size_t{4} << 20});
    copier.Copy(c.spans);
    ExpectCopied(c);
  }
  EXPECT_GT(copier.helper_pieces(), 0);
  // Below two pieces' worth nothing is handed out.
  ParallelCopier small(4);
  for (int i = 0; i < 50; ++i) {
    Case c = MakeCase(rng, {2 * ParallelCopier::kDefaultMinPiece - 64});
    small.Copy(c.spans);
    ExpectCopied(c);
  }
  EXPECT_EQ(small.helper_pieces(), 0);
}

TEST(ParallelCopierTest, FirstNonFiniteFindsTheEarliestWhateverPieceHoldsIt) {
  // fp16 and bf16 spans of finite values with NaN / infinity planted at element indices that fall
  // in different pieces; the scan must report the earliest per span, exactly as the serial
  // FirstNonFinite does, with helpers and without.
  std::mt19937_64 rng(11);
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const uint16_t inf = dtype == DType::kF16 ? 0x7C00 : 0x7F80;
    const uint16_t nan = dtype == DType::kF16 ? 0x7E01 : 0xFFC1;
    for (int helpers : {0, 3}) {
      ParallelCopier copier(helpers, /*min_piece=*/4096);
      const size_t n = 100000;  // elements per span: about 49 pieces of 4 KiB
      std::vector<uint16_t> a(n), b(n), c(n);
      for (auto* vec : {&a, &b, &c}) {
        for (auto& x : *vec) x = static_cast<uint16_t>(rng() & 0x3BFF);  // finite in both dtypes
      }
      a[n - 1] = inf;        // last element, last piece
      a[77777] = nan;        // earlier, another piece: the answer
      b[5] = nan;            // first piece
      b[99999] = inf;
      // c: all finite
      const ParallelCopier::Span spans[] = {{nullptr, a.data(), 2 * n}, {nullptr, b.data(), 2 * n},
                                            {nullptr, c.data(), 2 * n}};
      int64_t first[3] = {0, 0, 0};
      copier.FirstNonFinite(spans, dtype, first);
      EXPECT_EQ(first[0], 77777) << DTypeName(dtype) << " helpers " << helpers;
      EXPECT_EQ(first[1], 5) << DTypeName(dtype) << " helpers " << helpers;
      EXPECT_EQ(first[2], -1) << DTypeName(dtype) << " helpers " << helpers;
      EXPECT_EQ(first[0], FirstNonFinite(dtype, reinterpret_cast<const uint8_t*>(a.data()), 2 * n));
    }
  }
}

using testing_support::RandomPieces;

TEST(ParallelCopierTest, CopiesManySmallPiecesIntoOneDestinationAtAnyOffset) {
  // A tensor received in pieces copied into one staging range: one span per piece, each
  // destination at the piece's (any) offset, so most destinations are not 16-byte aligned.
  std::mt19937_64 rng(20261205);
  for (int helpers : {0, 3}) {
    ParallelCopier copier(helpers, /*min_piece=*/4096);
    for (int round = 0; round < 30; ++round) {
      const size_t size = 1 + rng() % 300000;
      std::vector<uint8_t> src(size);
      for (auto& b : src) b = static_cast<uint8_t>(rng());
      std::vector<uint8_t> dst_store(size + 64, 0xEE);
      uint8_t* dst = dst_store.data() + (16 - reinterpret_cast<uintptr_t>(dst_store.data()) % 16) % 16;
      const auto pieces = RandomPieces(src.data(), size, static_cast<int>(rng() % 200), rng);
      const PieceBytes bytes(pieces);
      std::vector<ParallelCopier::Span> spans;
      bytes.ForEachPart(0, size, [&](size_t at, const uint8_t* from, size_t len) {
        spans.push_back({dst + at, from, len});
      });
      copier.Copy(spans);
      ASSERT_EQ(std::memcmp(dst, src.data(), size), 0) << "round " << round << " helpers " << helpers;
      for (const uint8_t* p = dst + size; p < dst_store.data() + dst_store.size(); ++p) ASSERT_EQ(*p, 0xEE);
    }
  }
}

TEST(ParallelCopierTest, FirstNonFiniteOfTensorsInPiecesCutAnywhere) {
  // Tensors in pieces cut at any byte, so some elements are split between two pieces; NaN or
  // infinity planted at random elements (split ones included). Each tensor's answer must be the
  // serial scan's of the whole buffer.
  std::mt19937_64 rng(20261206);
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const uint16_t bad[] = {static_cast<uint16_t>(dtype == DType::kF16 ? 0x7C00 : 0x7F80),
                            static_cast<uint16_t>(dtype == DType::kF16 ? 0xFE01 : 0x7FC1)};
    for (int helpers : {0, 3}) {
      ParallelCopier copier(helpers, /*min_piece=*/4096);
      for (int round = 0; round < 40; ++round) {
        const size_t n = 1 + rng() % 60000;
        std::vector<uint16_t> a(n), b(n);
        for (auto* vec : {&a, &b}) {
          for (auto& x : *vec) x = static_cast<uint16_t>(rng() & 0x3BFF);
          const int planted = static_cast<int>(rng() % 3);
          for (int i = 0; i < planted; ++i) (*vec)[rng() % n] = bad[rng() % 2];
        }
        const auto* ab = reinterpret_cast<const uint8_t*>(a.data());
        const auto* bb = reinterpret_cast<const uint8_t*>(b.data());
        const auto a_pieces = RandomPieces(ab, 2 * n, static_cast<int>(rng() % 100), rng);
        const auto b_pieces = RandomPieces(bb, 2 * n, static_cast<int>(rng() % 100), rng);
        const PieceBytes ta(a_pieces), tb(b_pieces);
        const PieceBytes* tensors[] = {&ta, &tb};
        int64_t first[2] = {0, 0};
        copier.FirstNonFinite(tensors, dtype, first);
        EXPECT_EQ(first[0], FirstNonFinite(dtype, ab, 2 * n)) << "round " << round;
        EXPECT_EQ(first[1], FirstNonFinite(dtype, bb, 2 * n)) << "round " << round;
      }
      // A bad element split across two pieces and nothing else.
      std::vector<uint16_t> c(1000, 0x3C00);
      c[321] = bad[0];
      const auto* cb = reinterpret_cast<const uint8_t*>(c.data());
      const std::span<const uint8_t> split[] = {{cb, 643}, {cb + 643, 2000 - 643}};
      const PieceBytes tc(split);
      const PieceBytes* one[] = {&tc};
      int64_t found = 0;
      copier.FirstNonFinite(one, dtype, std::span<int64_t>(&found, 1));
      EXPECT_EQ(found, 321);
    }
  }
}

TEST(ParallelCopierTest, CopyAndScanStagesPiecesAndFindsTheEarliestBadElement) {
  // Two tensors in pieces cut anywhere staged with AppendStaging + CopyAndScan (as the device
  // arena stages a chunk that fits its buffer), the split elements checked here: every byte lands
  // and each tensor's answer is the serial scan's of the whole buffer.
  std::mt19937_64 rng(20261208);
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const uint16_t bad[] = {static_cast<uint16_t>(dtype == DType::kF16 ? 0xFC00 : 0xFF80),
                            static_cast<uint16_t>(dtype == DType::kF16 ? 0x7E01 : 0x7FC1)};
    for (int helpers : {0, 3}) {
      ParallelCopier copier(helpers, /*min_piece=*/4096);
      for (int round = 0; round < 40; ++round) {
        const size_t n = 1 + rng() % 50000;
        std::vector<uint16_t> t[2] = {std::vector<uint16_t>(n), std::vector<uint16_t>(n)};
        for (auto& vec : t) {
          for (auto& x : vec) x = static_cast<uint16_t>(rng() & 0x3BFF);
          for (int i = static_cast<int>(rng() % 3); i > 0; --i) vec[rng() % n] = bad[rng() % 2];
        }
        std::vector<std::vector<std::span<const uint8_t>>> pieces;
        for (auto& vec : t) {
          pieces.push_back(
              RandomPieces(reinterpret_cast<const uint8_t*>(vec.data()), 2 * n, static_cast<int>(rng() % 80), rng));
        }
        const PieceBytes bytes[2] = {PieceBytes(pieces[0]), PieceBytes(pieces[1])};
        std::vector<uint8_t> dst(4 * n + 64, 0xEE);
        std::vector<ParallelCopier::Span> spans;
        std::vector<ParallelCopier::ScanOf> scans;
        std::vector<int64_t> split[2];
        for (int i = 0; i < 2; ++i) {
          ParallelCopier::AppendStaging(bytes[i], 0, 2 * n, reinterpret_cast<char*>(dst.data()) + i * 2 * n, i,
                                        &spans, &scans, &split[i]);
        }
        int64_t first[2] = {0, 0};
        copier.CopyAndScan(spans, scans, dtype, first);
        for (int i = 0; i < 2; ++i) {
          for (int64_t e : split[i]) {
            if (FirstNonFinite(dtype, reinterpret_cast<const uint8_t*>(t[i].data() + e), 2) == 0 &&
                (first[i] < 0 || e < first[i])) {
              first[i] = e;
            }
          }
          const auto* whole = reinterpret_cast<const uint8_t*>(t[i].data());
          EXPECT_EQ(first[i], FirstNonFinite(dtype, whole, 2 * n)) << "round " << round << " tensor " << i;
          ASSERT_EQ(std::memcmp(dst.data() + i * 2 * n, whole, 2 * n), 0) << "round " << round << " tensor " << i;
        }
        for (size_t b = 4 * n; b < dst.size(); ++b) ASSERT_EQ(dst[b], 0xEE);
      }
    }
  }
}

}  // namespace
}  // namespace pkv::kvpool
