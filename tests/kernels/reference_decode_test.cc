// The CPU reference kernel against a naive double-precision softmax written independently here.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/paged_decode.h"

namespace pkv::kernels {
namespace {

struct Case {
  DType dtype;
  int hq, hkv, d, page;
  std::vector<int> lens;
};

// Builds random paged KV with a random physical page order and checks out/lse.
void RunCase(const Case& c, uint64_t seed, int threads) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int b = static_cast<int>(c.lens.size());
  std::vector<int32_t> indptr(b + 1, 0), last(b);
  for (int i = 0; i < b; ++i) {
    const int pages = (c.lens[i] + c.page - 1) / c.page;
    indptr[i + 1] = indptr[i] + pages;
    last[i] = pages == 0 ? 0 : c.lens[i] - (pages - 1) * c.page;
  }
  const int total_pages = indptr[b] + 3;  // a few unused pages
  std::vector<int32_t> perm(total_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> indices(perm.begin(), perm.begin() + indptr[b]);

  const int64_t page_elems = 2LL * c.hkv * c.page * c.d;
  std::vector<uint16_t> kv(page_elems * total_pages);
  for (auto& x : kv) x = FromFloat(c.dtype, normal(rng));
  std::vector<uint16_t> q(static_cast<size_t>(b) * c.hq * c.d);
  for (auto& x : q) x = FromFloat(c.dtype, normal(rng));
  std::vector<uint16_t> out(q.size(), 0xFFFF);  // poison (NaN in both dtypes)
  std::vector<float> lse(static_cast<size_t>(b) * c.hq, std::nanf(""));

  DecodeParams p;
  p.dtype = c.dtype;
  p.batch = b;
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.head_dim = c.d;
  p.page_size = c.page;
  p.sm_scale = 1.f / std::sqrt(static_cast<float>(c.d));
  p.q = q.data();
  p.kv = kv.data();
  p.num_pages = total_pages;
  p.page_indptr = indptr.data();
  p.page_indices = indices.data();
  p.last_page_len = last.data();
  p.out = out.data();
  p.lse = lse.data();
  ASSERT_TRUE(reference::CanImplement(p).ok());
  ASSERT_TRUE(reference::Launch(p, nullptr, nullptr, threads).ok());

  // Naive double precision: gather the row's tokens in logical order, full softmax.
  double err2 = 0, ref2 = 0, lse_err = 0;
  const int g = c.hq / c.hkv;
  for (int row = 0; row < b; ++row) {
    for (int h = 0; h < c.hq; ++h) {
      const int kvh = h / g;
      const int n = c.lens[row];
      std::vector<double> s(n);
      double mx = -INFINITY;
      for (int t = 0; t < n; ++t) {
        const int64_t page = indices[indptr[row] + t / c.page];
        const int64_t koff = ((page * 2 + 0) * c.hkv + kvh) * c.page * c.d + (t % c.page) * c.d;
        double dot = 0;
        for (int i = 0; i < c.d; ++i) {
          dot += static_cast<double>(ToFloat(c.dtype, q[(row * c.hq + h) * c.d + i])) *
                 ToFloat(c.dtype, kv[koff + i]);
        }
        s[t] = dot / std::sqrt(static_cast<double>(c.d));
        mx = std::max(mx, s[t]);
      }
      double sum = 0;
      for (int t = 0; t < n; ++t) sum += std::exp(s[t] - mx);
      for (int i = 0; i < c.d; ++i) {
        double acc = 0;
        for (int t = 0; t < n; ++t) {
          const int64_t page = indices[indptr[row] + t / c.page];
          const int64_t voff = ((page * 2 + 1) * c.hkv + kvh) * c.page * c.d + (t % c.page) * c.d;
          acc += std::exp(s[t] - mx) / sum * ToFloat(c.dtype, kv[voff + i]);
        }
        const double got = ToFloat(c.dtype, out[(row * c.hq + h) * c.d + i]);
        ASSERT_FALSE(std::isnan(got)) << "unwritten or NaN output at row " << row << " head " << h;
        err2 += (got - acc) * (got - acc);
        ref2 += acc * acc;
      }
      lse_err = std::max(lse_err, std::fabs(lse[row * c.hq + h] - (mx + std::log(sum))));
    }
  }
  const double rel = std::sqrt(err2 / ref2);
  EXPECT_LT(rel, c.dtype == DType::kF16 ? 2e-3 : 1e-2)
      << DTypeName(c.dtype) << " hq=" << c.hq << " hkv=" << c.hkv << " d=" << c.d;
  EXPECT_LT(lse_err, 1e-3);
}

TEST(ReferenceDecodeTest, MatchesDoubleAcrossGqaHeadDimsAndPageBoundaries) {
  uint64_t seed = 20260622;
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int g : {1, 2, 4, 8}) {
      for (int d : {64, 128, 256}) {
        // Lengths hit exact page multiples, partial last pages and a single token.
        Case c{dt, 2 * g, 2, d, 16, {1, 15, 16, 17, 100}};
        RunCase(c, seed++, 1);
      }
    }
  }
}

TEST(ReferenceDecodeTest, ThreadedMatchesAndOddPageSizes) {
  RunCase(Case{DType::kF16, 32, 8, 128, 16, {513, 1000, 64, 7}}, 11, 4);
  RunCase(Case{DType::kBF16, 8, 8, 64, 3, {10, 11, 1}}, 12, 3);
  RunCase(Case{DType::kF16, 16, 2, 128, 128, {300, 129}}, 13, 2);
}

TEST(ReferenceDecodeTest, EmptyRowYieldsZerosAndRejectsBadTables) {
  std::vector<int32_t> indptr = {0, 0}, indices = {0}, last = {0};
  std::vector<uint16_t> q(4 * 64, FromFloat(DType::kF16, 1.f)), out(4 * 64, 0xFFFF), kv(2 * 4 * 16 * 64);
  DecodeParams p;
  p.batch = 1;
  p.num_q_heads = 4;
  p.num_kv_heads = 4;
  p.head_dim = 64;
  p.page_size = 16;
  p.sm_scale = 0.125f;
  p.q = q.data();
  p.kv = kv.data();
  p.num_pages = 1;
  p.page_indptr = indptr.data();
  p.page_indices = indices.data();
  p.last_page_len = last.data();
  p.out = out.data();
  ASSERT_TRUE(reference::Launch(p, nullptr, nullptr).ok());
  for (uint16_t x : out) EXPECT_EQ(x, 0u);
  indptr = {0, 1};
  indices = {5};
  last = {3};
  EXPECT_EQ(reference::CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  indices = {0};
  last = {17};
  EXPECT_EQ(reference::CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pkv::kernels
