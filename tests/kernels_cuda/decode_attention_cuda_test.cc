// GPU tests of kernels/cuda: every route against an independent double-precision host reference
// and the CPU executable specification (kernels/reference), on random normal data with scattered
// (randomly permuted) pages, partial last pages, empty rows and empty splits. Outputs are poisoned
// with NaN first, so an unwritten element fails. Also the kernel-driven host-to-device copy
// (host_pull.h). Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/cuda/host_pull.h"
#include "kernels/reference/paged_decode.h"
#include "scheduler/step_plan.h"
#include "scheduler/work_list.h"

namespace pkv::kernels::cuda {
namespace {

bool HaveGpu() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // cudaErrorNoDevice / cudaErrorInsufficientDriver: no GPU
    return false;
  }
  return n > 0;
}

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

// Owns one device allocation.
struct DevBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  cudaError_t Alloc(size_t n) {
    bytes = n;
    return n == 0 ? cudaSuccess : cudaMalloc(&ptr, n);
  }
  template <typename T>
  cudaError_t Upload(const std::vector<T>& v) {
    if (v.empty()) return cudaSuccess;
    if (cudaError_t e = Alloc(v.size() * sizeof(T)); e != cudaSuccess) return e;
    return cudaMemcpy(ptr, v.data(), bytes, cudaMemcpyHostToDevice);
  }
};

struct Route {
  KernelId kernel;
  int splits = 1;             // kSequenceSplit
  int pages_per_task = 0;     // kWorkQueue (0: about 2 tasks per SM slot)
  MergeMode merge = MergeMode::kFused;
  // kWorkQueue balanced over this many CTAs per KV head (-1: the device's persistent grid), each
  // task's start costing `piece_cost` pages; 0: a strided list of `pages_per_task`.
  int balanced_per_head = 0;
  int piece_cost = 0;
  std::string Name() const {
    std::string n(KernelName(kernel));
    if (kernel == KernelId::kSequenceSplit) n += "/S" + std::to_string(splits);
    if (kernel == KernelId::kWorkQueue && balanced_per_head == 0) n += "/ppt" + std::to_string(pages_per_task);
    if (kernel == KernelId::kWorkQueue && balanced_per_head != 0) {
      n += "/balanced" + std::to_string(balanced_per_head) + "c" + std::to_string(piece_cost);
    }
    if (kernel != KernelId::kPerRequest) n += merge == MergeMode::kFused ? "/fused" : "/separate";
    return n;
  }
};

struct Case {
  DType dtype = DType::kF16;
  int hq = 8, hkv = 2, d = 128, page = 16;
  std::vector<int64_t> lengths;
  uint64_t seed = 1;
};

// Host data for one case: pages scattered over a pool by a random permutation.
struct HostData {
  std::vector<uint16_t> q, kv;
  std::vector<int32_t> indptr, indices, last;
  int64_t num_pages = 0;
};

HostData MakeData(const Case& c) {
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  HostData h;
  const int B = static_cast<int>(c.lengths.size());
  h.indptr.push_back(0);
  int64_t total = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t pages = (c.lengths[b] + c.page - 1) / c.page;
    total += pages;
    h.indptr.push_back(static_cast<int32_t>(total));
    h.last.push_back(pages == 0 ? 1 : static_cast<int32_t>(c.lengths[b] - (pages - 1) * c.page));
  }
  h.num_pages = total + 3;  // a few pages nobody owns
  std::vector<int32_t> perm(h.num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  h.indices.assign(perm.begin(), perm.begin() + total);
  h.q.resize(static_cast<size_t>(B) * c.hq * c.d);
  for (auto& x : h.q) x = FromFloat(c.dtype, normal(rng));
  h.kv.resize(static_cast<size_t>(h.num_pages) * 2 * c.hkv * c.page * c.d);
  for (auto& x : h.kv) x = FromFloat(c.dtype, normal(rng));
  // The slots past each row's last token hold NaN (K and V, every KV head): a kernel that reads
  // whole pages must mask them, not just weight them by zero.
  const uint16_t nan = FromFloat(c.dtype, std::numeric_limits<float>::quiet_NaN());
  for (int b = 0; b < B; ++b) {
    if (h.indptr[b + 1] == h.indptr[b]) continue;
    const int64_t page = h.indices[h.indptr[b + 1] - 1];
    for (int kv = 0; kv < 2; ++kv) {
      for (int head = 0; head < c.hkv; ++head) {
        for (int slot = h.last[b]; slot < c.page; ++slot) {
          const int64_t at = (((page * 2 + kv) * c.hkv + head) * c.page + slot) * c.d;
          std::fill_n(h.kv.begin() + at, c.d, nan);
        }
      }
    }
  }
  return h;
}

DecodeParams HostParams(const Case& c, const HostData& h) {
  DecodeParams p;
  p.dtype = c.dtype;
  p.batch = static_cast<int32_t>(c.lengths.size());
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.head_dim = c.d;
  p.page_size = c.page;
  p.sm_scale = 1.f / std::sqrt(static_cast<float>(c.d));
  p.q = h.q.data();
  p.kv = h.kv.data();
  p.num_pages = h.num_pages;
  p.page_indptr = h.indptr.data();
  p.page_indices = h.indices.data();
  p.last_page_len = h.last.data();
  return p;
}

// Independent double-precision reference: two passes (max, then sums) per (row, query head).
void DoubleReference(const Case& c, const HostData& h, std::vector<double>* out, std::vector<double>* lse) {
  const DecodeParams p = HostParams(c, h);
  const int B = p.batch, G = c.hq / c.hkv, d = c.d;
  out->assign(static_cast<size_t>(B) * c.hq * d, 0.0);
  lse->assign(static_cast<size_t>(B) * c.hq, -INFINITY);
  std::vector<double> s;
  for (int b = 0; b < B; ++b) {
    const int64_t n = c.lengths[b];
    if (n == 0) continue;
    for (int hq = 0; hq < c.hq; ++hq) {
      const int kvh = hq / G;
      const uint16_t* q = &h.q[(static_cast<size_t>(b) * c.hq + hq) * d];
      s.assign(n, 0.0);
      double mx = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t page = h.indices[h.indptr[b] + t / c.page];
        const uint16_t* k = &h.kv[KvOffset(p, page, 0, kvh, static_cast<int32_t>(t % c.page))];
        double acc = 0.0;
        for (int i = 0; i < d; ++i) acc += static_cast<double>(ToFloat(c.dtype, q[i])) * ToFloat(c.dtype, k[i]);
        s[t] = acc * (1.0 / std::sqrt(static_cast<double>(d)));
        mx = std::max(mx, s[t]);
      }
      double sum = 0.0;
      double* o = &(*out)[(static_cast<size_t>(b) * c.hq + hq) * d];
      for (int64_t t = 0; t < n; ++t) {
        const double w = std::exp(s[t] - mx);
        sum += w;
        const int64_t page = h.indices[h.indptr[b] + t / c.page];
        const uint16_t* v = &h.kv[KvOffset(p, page, 1, kvh, static_cast<int32_t>(t % c.page))];
        for (int i = 0; i < d; ++i) o[i] += w * ToFloat(c.dtype, v[i]);
      }
      for (int i = 0; i < d; ++i) o[i] /= sum;
      (*lse)[static_cast<size_t>(b) * c.hq + hq] = mx + std::log(sum);
    }
  }
}

struct Errors {
  double rel_l2 = 0;
  double lse_max_abs = 0;
  int64_t nan = 0;
};

Errors Compare(DType dtype, const std::vector<uint16_t>& got, const std::vector<float>& got_lse,
               const std::vector<double>& ref, const std::vector<double>& ref_lse) {
  Errors e;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = ToFloat(dtype, got[i]);
    if (!std::isfinite(g)) {
      ++e.nan;
      continue;
    }
    num += (g - ref[i]) * (g - ref[i]);
    den += ref[i] * ref[i];
  }
  e.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  for (size_t i = 0; i < got_lse.size(); ++i) {
    if (std::isinf(ref_lse[i])) {
      if (!(std::isinf(got_lse[i]) && got_lse[i] < 0)) ++e.nan;
      continue;
    }
    if (!std::isfinite(got_lse[i])) {
      ++e.nan;
      continue;
    }
    e.lse_max_abs = std::max(e.lse_max_abs, std::abs(got_lse[i] - ref_lse[i]));
  }
  return e;
}

// Runs `routes` on one case and checks each against both references.
void RunCase(const Case& c, const std::vector<Route>& routes) {
  const HostData h = MakeData(c);
  std::vector<double> ref, ref_lse;
  DoubleReference(c, h, &ref, &ref_lse);

  // The CPU executable specification on the same inputs.
  std::vector<uint16_t> cpu_out(ref.size());
  std::vector<float> cpu_lse(ref_lse.size());
  {
    DecodeParams p = HostParams(c, h);
    p.out = cpu_out.data();
    p.lse = cpu_lse.data();
    ASSERT_TRUE(reference::CanImplement(p).ok());
    ASSERT_TRUE(reference::Launch(p, nullptr, nullptr, 8).ok());
  }
  const double tol = c.dtype == DType::kF16 ? 2e-3 : 1e-2;
  const Errors cpu_err = Compare(c.dtype, cpu_out, cpu_lse, ref, ref_lse);
  EXPECT_LT(cpu_err.rel_l2, tol) << "kernels/reference vs double";

  DevBuf q, kv, indptr, indices, last, out, lse;
  CUDA_OK(q.Upload(h.q));
  CUDA_OK(kv.Upload(h.kv));
  CUDA_OK(indptr.Upload(h.indptr));
  CUDA_OK(indices.Upload(h.indices.empty() ? std::vector<int32_t>{0} : h.indices));
  CUDA_OK(last.Upload(h.last));
  CUDA_OK(out.Alloc(ref.size() * 2));
  CUDA_OK(lse.Alloc(ref_lse.size() * 4));

  std::vector<int32_t> row_pages;
  for (size_t b = 0; b + 1 < h.indptr.size(); ++b) row_pages.push_back(h.indptr[b + 1] - h.indptr[b]);

  for (const Route& r : routes) {
    SCOPED_TRACE(r.Name());
    DecodeParams p = HostParams(c, h);
    p.q = q.ptr;
    p.kv = kv.ptr;
    p.page_indptr = static_cast<const int32_t*>(indptr.ptr);
    p.page_indices = static_cast<const int32_t*>(indices.ptr);
    p.last_page_len = static_cast<const int32_t*>(last.ptr);
    p.out = out.ptr;
    p.lse = static_cast<float*>(lse.ptr);
    DevBuf tasks, row_splits, partial_offset, cta_ranges, ws;
    if (r.kernel == KernelId::kSequenceSplit) p.num_splits = r.splits;
    if (r.kernel == KernelId::kWorkQueue) {
      // The scheduler's work list (scheduler/work_list.h), as the engine hands it to the backend.
      scheduler::StepPlan plan;
      if (r.balanced_per_head != 0) {
        const int per_head = r.balanced_per_head > 0 ? r.balanced_per_head : PersistentGridSize(p) / c.hkv;
        scheduler::BuildBalancedWorkList(row_pages, c.hkv, scheduler::CutBalanced(row_pages, per_head, r.piece_cost),
                                         &plan);
        CUDA_OK(cta_ranges.Upload(plan.cta_task_begin));
        p.cta_task_begin = static_cast<const int32_t*>(cta_ranges.ptr);
        p.num_ctas = plan.balanced_ctas;
      } else {
        const int ppt = r.pages_per_task > 0
                            ? r.pages_per_task
                            : scheduler::PagesPerTaskFor(row_pages, c.hkv, 2LL * PersistentGridSize(p));
        scheduler::BuildWorkList(row_pages, c.hkv, ppt, &plan);
      }
      CUDA_OK(tasks.Upload(plan.tasks));
      CUDA_OK(row_splits.Upload(plan.row_splits));
      CUDA_OK(partial_offset.Upload(plan.partial_offset));
      p.tasks = static_cast<const DecodeTask*>(tasks.ptr);
      p.num_tasks = static_cast<int32_t>(plan.tasks.size());
      p.row_splits = static_cast<const int32_t*>(row_splits.ptr);
      p.partial_offset = static_cast<const int32_t*>(partial_offset.ptr);
      p.num_partials = plan.num_partials;
    }
    const absl::Status can = CanImplement(r.kernel, p);
    ASSERT_TRUE(can.ok()) << can;
    const size_t ws_bytes = WorkspaceBytes(r.kernel, p);
    CUDA_OK(ws.Alloc(ws_bytes));
    if (ws_bytes > 0) CUDA_OK(cudaMemset(ws.ptr, 0, ws_bytes));
    // Two launches on the same workspace: the fused counters must come back to zero. The second
    // also writes a second output (DecodeParams::out_copy), which must hold the same bytes.
    DevBuf out_copy;
    CUDA_OK(out_copy.Alloc(out.bytes));
    for (int rep = 0; rep < 2; ++rep) {
      CUDA_OK(cudaMemset(out.ptr, 0xFF, out.bytes));  // NaN in fp16 and bf16
      CUDA_OK(cudaMemset(out_copy.ptr, 0xFF, out.bytes));
      CUDA_OK(cudaMemset(lse.ptr, 0xFF, lse.bytes));
      p.out_copy = rep == 1 ? out_copy.ptr : nullptr;
      const absl::Status st = Launch(r.kernel, p, ws.ptr, nullptr, r.merge);
      ASSERT_TRUE(st.ok()) << st;
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint16_t> got(ref.size());
      std::vector<float> got_lse(ref_lse.size());
      CUDA_OK(cudaMemcpy(got.data(), out.ptr, out.bytes, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(got_lse.data(), lse.ptr, lse.bytes, cudaMemcpyDeviceToHost));
      if (rep == 1) {
        std::vector<uint16_t> got_copy(ref.size());
        CUDA_OK(cudaMemcpy(got_copy.data(), out_copy.ptr, out.bytes, cudaMemcpyDeviceToHost));
        EXPECT_TRUE(got_copy == got) << "out_copy differs from out";
      }
      const Errors e = Compare(c.dtype, got, got_lse, ref, ref_lse);
      EXPECT_EQ(e.nan, 0) << "non-finite or unwritten outputs";
      EXPECT_LT(e.rel_l2, tol) << "vs double reference";
      EXPECT_LT(e.lse_max_abs, 2e-3) << "lse vs double reference";
      // Against the CPU specification: the two fp32 implementations agree to within both tolerances.
      std::vector<double> cpu_ref(cpu_out.size());
      for (size_t i = 0; i < cpu_out.size(); ++i) cpu_ref[i] = ToFloat(c.dtype, cpu_out[i]);
      std::vector<double> cpu_lse_d(cpu_lse.begin(), cpu_lse.end());
      const Errors e2 = Compare(c.dtype, got, got_lse, cpu_ref, cpu_lse_d);
      EXPECT_LT(e2.rel_l2, 2 * tol) << "vs kernels/reference";
      if (::testing::Test::HasFailure()) return;
    }
  }
}

std::vector<Route> AllRoutes(int splits, int ppt) {
  return {Route{KernelId::kPerRequest},
          Route{KernelId::kSequenceSplit, splits, 0, MergeMode::kFused},
          Route{KernelId::kSequenceSplit, splits, 0, MergeMode::kSeparate},
          Route{KernelId::kWorkQueue, 1, ppt, MergeMode::kFused},
          Route{KernelId::kWorkQueue, 1, ppt, MergeMode::kSeparate},
          // Balanced over 3 CTAs per KV head: CTAs that end one row and start the next (an
          // empty row and single-page rows among them).
          Route{KernelId::kWorkQueue, 1, 0, MergeMode::kFused, 3, 2},
          Route{KernelId::kWorkQueue, 1, 0, MergeMode::kSeparate, 3, 2}};
}

class DecodeAttentionCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  }
};

// Every dtype x head_dim x G on short ragged rows: partial pages, a 1-token row, an empty row, and
// splits that outnumber a row's pages (empty splits).
TEST_F(DecodeAttentionCudaTest, ShapesSweep) {
  uint64_t seed = 100;
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int d : {64, 128, 256}) {
      for (int g : {1, 2, 4, 8}) {
        SCOPED_TRACE(std::string(DTypeName(dt)) + " d=" + std::to_string(d) + " G=" + std::to_string(g));
        Case c;
        c.dtype = dt;
        c.d = d;
        c.hkv = 2;
        c.hq = 2 * g;
        c.lengths = {1, 0, 37, 16, 517, 129};
        c.seed = ++seed;
        RunCase(c, AllRoutes(/*splits=*/5, /*ppt=*/3));
        if (HasFailure()) return;
      }
    }
  }
}

// Page sizes other than 16 (powers of two) on the default shape.
TEST_F(DecodeAttentionCudaTest, PageSizes) {
  for (int page : {1, 8, 32, 64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      SCOPED_TRACE("page=" + std::to_string(page));
      Case c;
      c.dtype = dt;
      c.page = page;
      c.lengths = {3, 200, 1000, page, page + 1};
      c.seed = 7 + page;
      RunCase(c, AllRoutes(3, 2));
      if (HasFailure()) return;
    }
  }
}

// Long rows up to 128K tokens (one KV head to keep the host reference quick).
TEST_F(DecodeAttentionCudaTest, LongRows) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int64_t n : {4096 + 5, 16384, 131072}) {
      SCOPED_TRACE(std::string(DTypeName(dt)) + " n=" + std::to_string(n));
      Case c;
      c.dtype = dt;
      c.hkv = 1;
      c.hq = 4;
      c.lengths = {n};
      c.seed = 1000 + n;
      RunCase(c, {Route{KernelId::kPerRequest}, Route{KernelId::kSequenceSplit, 64},
                  Route{KernelId::kSequenceSplit, 64, 0, MergeMode::kSeparate},
                  Route{KernelId::kWorkQueue, 1, 0, MergeMode::kFused},
                  Route{KernelId::kWorkQueue, 1, 0, MergeMode::kSeparate},
                  Route{KernelId::kWorkQueue, 1, 0, MergeMode::kFused, -1, 7}});
      if (HasFailure()) return;
    }
  }
}

// A mixed batch like the paper's steps (Hq 32, Hkv 8), tasks sized for the device.
TEST_F(DecodeAttentionCudaTest, MixedBatch) {
  std::mt19937_64 rng(20260622);
  for (DType dt : {DType::kF16, DType::kBF16}) {
    Case c;
    c.dtype = dt;
    c.hq = 32;
    c.hkv = 8;
    for (int b = 0; b < 8; ++b) c.lengths.push_back(1 + static_cast<int64_t>(rng() % 12000));
    c.seed = 55;
    std::vector<Route> routes = AllRoutes(4, 0);
    // One page per task: ~90 tasks per persistent CTA and ~750-way merges.
    routes.push_back(Route{KernelId::kWorkQueue, 1, 1, MergeMode::kFused});
    routes.push_back(Route{KernelId::kWorkQueue, 1, 1, MergeMode::kSeparate});
    // Balanced as the planner cuts it for the device, and over many CTAs: short pieces, CTAs
    // that span several rows, rows cut into many pieces.
    routes.push_back(Route{KernelId::kWorkQueue, 1, 0, MergeMode::kFused, -1, 7});
    routes.push_back(Route{KernelId::kWorkQueue, 1, 0, MergeMode::kFused, 200, 1});
    routes.push_back(Route{KernelId::kWorkQueue, 1, 0, MergeMode::kSeparate, 200, 1});
    RunCase(c, routes);
    if (HasFailure()) return;
  }
}

// Shapes the routes refuse.
TEST(DecodeAttentionCudaContract, CanImplementRejects) {
  DecodeParams p;
  p.batch = 1;
  p.num_q_heads = 32;
  p.num_kv_heads = 2;  // G = 16
  p.head_dim = 128;
  p.page_size = 16;
  EXPECT_FALSE(CanImplement(KernelId::kPerRequest, p).ok());
  p.num_kv_heads = 8;
  p.head_dim = 96;
  EXPECT_FALSE(CanImplement(KernelId::kPerRequest, p).ok());
  p.head_dim = 128;
  p.page_size = 24;
  EXPECT_FALSE(CanImplement(KernelId::kPerRequest, p).ok());
  p.page_size = 16;
  EXPECT_FALSE(CanImplement(KernelId::kReference, p).ok());
}

// LaunchHostPull copies mapped pinned host bytes exactly (random bytes, sizes from one 16-byte
// piece to several MiB, partial CTAs included) and writes nothing past `bytes`.
TEST(HostPullTest, CopiesMappedHostBytes) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(20261204);
  cudaStream_t stream = nullptr;
  int least = 0, greatest = 0;
  CUDA_OK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUDA_OK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest));
  constexpr size_t kGuard = 4096;
  for (const size_t bytes : {size_t{16}, size_t{4096}, size_t{16400}, size_t{99984}, size_t{3} << 20}) {
    SCOPED_TRACE(bytes);
    void* host = nullptr;
    void* mapped = nullptr;
    CUDA_OK(cudaHostAlloc(&host, bytes, cudaHostAllocMapped));
    CUDA_OK(cudaHostGetDevicePointer(&mapped, host, 0));
    auto* h = static_cast<uint8_t*>(host);
    for (size_t i = 0; i < bytes; ++i) h[i] = static_cast<uint8_t>(rng());
    DevBuf dst;
    CUDA_OK(dst.Alloc(bytes + kGuard));
    CUDA_OK(cudaMemset(dst.ptr, 0xA5, bytes + kGuard));
    ASSERT_TRUE(LaunchHostPull(dst.ptr, mapped, bytes, stream).ok());
    CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<uint8_t> got(bytes + kGuard);
    CUDA_OK(cudaMemcpy(got.data(), dst.ptr, got.size(), cudaMemcpyDeviceToHost));
    size_t wrong = 0;
    for (size_t i = 0; i < bytes; ++i) wrong += got[i] != h[i];
    size_t overrun = 0;
    for (size_t i = bytes; i < got.size(); ++i) overrun += got[i] != 0xA5;
    EXPECT_EQ(wrong, 0u);
    EXPECT_EQ(overrun, 0u);
    CUDA_OK(cudaFreeHost(host));
  }
  CUDA_OK(cudaStreamDestroy(stream));
}

// Several pieces in one launch (q, k, v of a layer from three places): each lands exactly where it
// should, pieces of 0 bytes included, nothing written between or past them.
TEST(HostPullTest, CopiesSeveralPiecesInOneLaunch) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(20261205);
  const size_t sizes[kMaxHostPullPieces] = {65536, 0, 16400, 16};
  size_t total = 0;
  for (size_t b : sizes) total += b;
  void* host = nullptr;
  void* mapped = nullptr;
  CUDA_OK(cudaHostAlloc(&host, total + 4096, cudaHostAllocMapped));
  CUDA_OK(cudaHostGetDevicePointer(&mapped, host, 0));
  auto* h = static_cast<uint8_t*>(host);
  for (size_t i = 0; i < total + 4096; ++i) h[i] = static_cast<uint8_t>(rng());
  constexpr size_t kGap = 4096;  // between the destinations, to catch overruns
  DevBuf dst;
  CUDA_OK(dst.Alloc(total + kMaxHostPullPieces * kGap));
  CUDA_OK(cudaMemset(dst.ptr, 0xA5, total + kMaxHostPullPieces * kGap));
  // Sources back to back in order, destinations in the reverse order with gaps.
  HostPullPiece pieces[kMaxHostPullPieces];
  size_t dst_at = 0;
  for (int i = kMaxHostPullPieces - 1; i >= 0; --i) {
    pieces[i] = HostPullPiece{static_cast<char*>(dst.ptr) + dst_at, nullptr, sizes[i]};
    dst_at += sizes[i] + kGap;
  }
  size_t at = 0;
  for (int i = 0; i < kMaxHostPullPieces; ++i) {
    pieces[i].src = static_cast<char*>(mapped) + at;
    at += sizes[i];
  }
  ASSERT_TRUE(LaunchHostPull(pieces, kMaxHostPullPieces, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> got(total + kMaxHostPullPieces * kGap);
  CUDA_OK(cudaMemcpy(got.data(), dst.ptr, got.size(), cudaMemcpyDeviceToHost));
  std::vector<uint8_t> want(got.size(), 0xA5);
  at = 0;
  for (int i = 0; i < kMaxHostPullPieces; ++i) {
    const size_t d = static_cast<size_t>(static_cast<char*>(pieces[i].dst) - static_cast<char*>(dst.ptr));
    std::copy(h + at, h + at + sizes[i], want.begin() + static_cast<std::ptrdiff_t>(d));
    at += sizes[i];
  }
  size_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != want[i];
  EXPECT_EQ(wrong, 0u);
  EXPECT_EQ(LaunchHostPull(pieces, kMaxHostPullPieces + 1, nullptr).code(), absl::StatusCode::kInvalidArgument);
  CUDA_OK(cudaFreeHost(host));
}

// Misaligned pointers or a size that is not a multiple of 16 are refused before any launch.
TEST(HostPullTest, RejectsMisaligned) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  void* host = nullptr;
  void* mapped = nullptr;
  CUDA_OK(cudaHostAlloc(&host, 256, cudaHostAllocMapped));
  CUDA_OK(cudaHostGetDevicePointer(&mapped, host, 0));
  DevBuf dst;
  CUDA_OK(dst.Alloc(256));
  EXPECT_EQ(LaunchHostPull(dst.ptr, mapped, 24, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchHostPull(dst.ptr, static_cast<char*>(mapped) + 8, 32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchHostPull(static_cast<char*>(dst.ptr) + 4, mapped, 32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LaunchHostPull(dst.ptr, mapped, 0, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaFreeHost(host));
}

}  // namespace
}  // namespace pkv::kernels::cuda
