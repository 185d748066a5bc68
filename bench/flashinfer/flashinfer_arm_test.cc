// GPU test of the FlashInfer arm: FlashInfer's two decode paths (CUDA-core batch decode and the
// tensor-core batch prefill kernel with one query per row), run on our pool layout through
// bench/flashinfer/flashinfer_arm.h, against the CPU executable specification (kernels/reference) on
// random normal data with pages scattered by a random permutation of the pool and partial last
// pages; fp16 and bf16, G = 1, 4, 8. Rows long enough for FlashInfer's planner to split the KV
// are included (and checked to have split). This proves the layout wrapping (HND strides, K/V
// offsets, CSR) is right. Outputs are poisoned with NaN first. Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/flashinfer/flashinfer_arm.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/reference/paged_decode.h"

namespace pkv::bench {
namespace {

bool HaveGpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

struct DevBuf {
  void* ptr = nullptr;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  template <typename T>
  cudaError_t Upload(const std::vector<T>& v) {
    if (cudaError_t e = cudaMalloc(&ptr, v.size() * sizeof(T)); e != cudaSuccess) return e;
    return cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
};

struct Case {
  FlashInferPath path = FlashInferPath::kDecode;
  DType dtype = DType::kF16;
  int hq = 8, hkv = 2, page = 16;
  std::vector<int64_t> lengths;
  uint64_t seed = 1;
  bool expect_split = false;
  std::string Name() const {
    return std::string(FlashInferPathName(path)) + "/" + DTypeName(dtype) + "/G" + std::to_string(hq / hkv) + "/B" +
           std::to_string(lengths.size()) + "/seed" + std::to_string(seed);
  }
};

constexpr int kD = 128;

void RunCase(const Case& c) {
  SCOPED_TRACE(c.Name());
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int B = static_cast<int>(c.lengths.size());
  std::vector<int32_t> indptr{0}, last;
  int64_t total = 0;
  for (int64_t len : c.lengths) {
    const int64_t pages = (len + c.page - 1) / c.page;
    total += pages;
    indptr.push_back(static_cast<int32_t>(total));
    last.push_back(static_cast<int32_t>(len - (pages - 1) * c.page));
  }
  const int64_t num_pages = total + 5;  // pages nobody owns, scattered in between
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> indices(perm.begin(), perm.begin() + total);
  std::vector<uint16_t> q(static_cast<size_t>(B) * c.hq * kD);
  for (auto& x : q) x = FromFloat(c.dtype, normal(rng));
  std::vector<uint16_t> kv(static_cast<size_t>(num_pages) * 2 * c.hkv * c.page * kD);
  for (auto& x : kv) x = FromFloat(c.dtype, normal(rng));

  kernels::DecodeParams p;
  p.dtype = c.dtype;
  p.batch = B;
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.head_dim = kD;
  p.page_size = c.page;
  p.sm_scale = 1.f / std::sqrt(static_cast<float>(kD));
  p.num_pages = num_pages;

  // CPU reference.
  std::vector<uint16_t> ref(q.size());
  std::vector<float> ref_lse(static_cast<size_t>(B) * c.hq);
  kernels::DecodeParams hp = p;
  hp.q = q.data();
  hp.kv = kv.data();
  hp.page_indptr = indptr.data();
  hp.page_indices = indices.data();
  hp.last_page_len = last.data();
  hp.out = ref.data();
  hp.lse = ref_lse.data();
  ASSERT_TRUE(kernels::reference::Launch(hp, nullptr, nullptr, 4).ok());

  DevBuf dq, dkv, dindptr, dindices, dlast, dout, dlse;
  CUDA_OK(dq.Upload(q));
  CUDA_OK(dkv.Upload(kv));
  CUDA_OK(dindptr.Upload(indptr));
  CUDA_OK(dindices.Upload(indices));
  CUDA_OK(dlast.Upload(last));
  CUDA_OK(dout.Upload(std::vector<uint16_t>(q.size(), 0x7FFF)));  // NaN in fp16 and bf16
  CUDA_OK(dlse.Upload(std::vector<float>(ref_lse.size(), NAN)));
  p.q = dq.ptr;
  p.kv = dkv.ptr;
  p.page_indptr = static_cast<int32_t*>(dindptr.ptr);
  p.page_indices = static_cast<int32_t*>(dindices.ptr);
  p.last_page_len = static_cast<int32_t*>(dlast.ptr);
  p.out = dout.ptr;
  p.lse = static_cast<float*>(dlse.ptr);

  FlashInferArm::Options o;
  o.path = c.path;
  o.dtype = c.dtype;
  o.num_q_heads = c.hq;
  o.num_kv_heads = c.hkv;
  o.head_dim = kD;
  o.page_size = c.page;
  auto arm = FlashInferArm::Create(o);
  ASSERT_TRUE(arm.ok()) << arm.status();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  const absl::Status planned = (*arm)->Plan(indptr, stream);
  ASSERT_TRUE(planned.ok()) << planned;
  if (c.expect_split) EXPECT_TRUE((*arm)->planned_split_kv()) << "the planner was expected to split the KV";
  for (int layer = 0; layer < 2; ++layer) {  // one plan, several layers (the plan is reused)
    const absl::Status ran = (*arm)->Run(p, stream);
    ASSERT_TRUE(ran.ok()) << ran;
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaStreamDestroy(stream));

  std::vector<uint16_t> got(q.size());
  std::vector<float> got_lse(ref_lse.size());
  CUDA_OK(cudaMemcpy(got.data(), dout.ptr, got.size() * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got_lse.data(), dlse.ptr, got_lse.size() * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0, lse_err = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = ToFloat(c.dtype, got[i]), r = ToFloat(c.dtype, ref[i]);
    if (!std::isfinite(g)) {
      ++bad;
      continue;
    }
    num += (g - r) * (g - r);
    den += r * r;
  }
  for (size_t i = 0; i < got_lse.size(); ++i) {
    const double g = got_lse[i] * std::log(2.0);  // FlashInfer's lse is base 2
    if (!std::isfinite(g)) {
      ++bad;
      continue;
    }
    lse_err = std::max(lse_err, std::abs(g - ref_lse[i]));
  }
  const double rel_l2 = std::sqrt(num / den);
  const double tol = c.dtype == DType::kF16 ? 3e-3 : 1.5e-2;
  EXPECT_EQ(bad, 0) << "non-finite or unwritten elements";
  EXPECT_LT(rel_l2, tol);
  EXPECT_LT(lse_err, 5e-3);
}

class FlashInferArmTest : public ::testing::TestWithParam<FlashInferPath> {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(FlashInferArmTest, MatchesReferenceOnScatteredPages) {
  uint64_t seed = 1;
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int g : {1, 4, 8}) {
      const int hkv = 2;
      // Mixed lengths: a 1-token row, partial and full last pages, a long row.
      RunCase(Case{GetParam(), dt, g * hkv, hkv, 16, {1, 17, 300, 4096, 5000, 33}, seed++});
      // One long row: few CTAs, so FlashInfer's planner splits the KV and merges.
      RunCase(Case{GetParam(), dt, g * hkv, hkv, 16, {40000}, seed++, /*expect_split=*/true});
      // A wider batch of random lengths.
      std::mt19937_64 rng(seed);
      std::vector<int64_t> lengths(24);
      for (auto& l : lengths) l = std::uniform_int_distribution<int64_t>(1, 3000)(rng);
      RunCase(Case{GetParam(), dt, g * hkv, hkv, 16, lengths, seed++});
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, FlashInferArmTest, ::testing::Values(FlashInferPath::kDecode, FlashInferPath::kPrefill),
                         [](const auto& info) { return std::string(FlashInferPathName(info.param)); });

// Shape checks need no device.
TEST(FlashInferArmShapes, UnsupportedShapesAreUnimplemented) {
  for (FlashInferPath path : {FlashInferPath::kDecode, FlashInferPath::kPrefill}) {
    FlashInferArm::Options o;
    o.path = path;
    o.num_q_heads = 32;
    o.num_kv_heads = 8;
    o.page_size = 16;
    o.head_dim = 96;
    EXPECT_EQ(FlashInferArm::CanImplement(o).code(), absl::StatusCode::kUnimplemented);
    o.head_dim = 128;
    o.num_q_heads = 40;  // G = 5
    EXPECT_EQ(FlashInferArm::CanImplement(o).code(), absl::StatusCode::kUnimplemented);
    o.num_q_heads = 32;
    EXPECT_TRUE(FlashInferArm::CanImplement(o).ok());
  }
}

}  // namespace
}  // namespace pkv::bench
