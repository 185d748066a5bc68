// ParallelCopier: every byte lands where CopyRows would put it, whatever the split — spans of odd
// lengths, more spans than helpers, copies too small to split, many callers at once sharing the
// helpers, and a copier without helpers; its NaN/inf scan reports the earliest bad element of
// each span, whichever piece holds it.
#include "kvpool/parallel_copy.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace pkv::kvpool
