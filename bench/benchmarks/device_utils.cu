#include "bench/benchmarks/device_utils.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pkv::bench {
namespace {

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

__global__ void FillNormalKernel(uint16_t* data, size_t count, bool bf16, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = Mix(seed * 0x9E3779B97F4A7C15ULL + i);
    const float u1 = (static_cast<float>(r >> 40) + 1.f) * (1.f / 16777217.f);
    const float u2 = static_cast<float>((r >> 16) & 0xFFFFFF) * (1.f / 16777216.f);
    const float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    if (bf16) {
      __nv_bfloat16 b = __float2bfloat16_rn(z);
      data[i] = *reinterpret_cast<uint16_t*>(&b);
    } else {
      __half h = __float2half_rn(z);
      data[i] = *reinterpret_cast<uint16_t*>(&h);
    }
  }
}

template <int kUnroll>
__global__ void StreamReadKernel(const uint4* data, size_t n, uint32_t* sink) {
  uint32_t acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  // kUnroll independent 16-byte loads in flight per thread.
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(data + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 a = __ldcs(data + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // practically never; keeps the loads alive
}

// One warp per (page, K or V, head) piece; each lane loads piece / 512 uint4 of each of two
// pieces before folding them.
__global__ void PagedReadKernel(const uint4* kv, const int32_t* pages, int64_t pieces, int heads, int piece_u4,
                                uint32_t* sink) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int per_lane = piece_u4 / 32;
  uint32_t acc = 0;
  auto base = [&](int64_t piece) {
    const int64_t page = pages[piece / (2 * heads)];
    return kv + (page * 2 * heads + piece % (2 * heads)) * piece_u4;
  };
  for (; w + warps < pieces; w += 2 * warps) {
    const uint4* a = base(w);
    const uint4* b = base(w + warps);
    for (int i = 0; i < per_lane; i += 4) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        v[u] = __ldcs(a + (i + u) * 32 + lane);
        v[4 + u] = __ldcs(b + (i + u) * 32 + lane);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
  }
  for (; w < pieces; w += warps) {
    const uint4* a = base(w);
    for (int i = 0; i < per_lane; ++i) {
      const uint4 v = __ldcs(a + i * 32 + lane);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // practically never; keeps the loads alive
}

// The same pieces by bulk copies: lane 0 of each warp keeps kBulkStages pieces in flight, each one
// cp.async.bulk of the whole piece into its own shared buffer, completing on that buffer's
// mbarrier; it folds one word of each landed piece into the sink.
constexpr int kBulkStages = 4;
constexpr int kBulkWarps = 4;
__global__ void __launch_bounds__(kBulkWarps * 32)
    PagedReadBulkKernel(const char* kv, const int32_t* pages, int64_t pieces, int heads, int piece_bytes,
                        uint32_t* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t bars[kBulkWarps][kBulkStages];
  if ((threadIdx.x & 31) != 0) return;
  const int warp = threadIdx.x >> 5;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kBulkWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBulkWarps + warp;
  const uint32_t buf0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + warp * kBulkStages * piece_bytes;
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(&bars[warp][0]));
  for (int s = 0; s < kBulkStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar0 + 8 * s) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  auto issue = [&](int64_t piece, int s) {
    const int64_t page = pages[piece / (2 * heads)];
    const char* src = kv + (page * 2 * heads + piece % (2 * heads)) * piece_bytes;
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar0 + 8 * s), "r"(piece_bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            buf0 + s * piece_bytes),
        "l"(src), "r"(piece_bytes), "r"(bar0 + 8 * s)
        : "memory");
  };
  int s = 0;
  for (int64_t w = first; w < pieces && s < kBulkStages; w += warps, ++s) issue(w, s);
  uint32_t acc = 0, phase = 0;
  s = 0;
  for (int64_t w = first; w < pieces; w += warps) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(bar0 + 8 * s),
        "r"((phase >> s) & 1u)
        : "memory");
    phase ^= 1u << s;
    acc ^= *reinterpret_cast<const uint32_t*>(smem + (warp * kBulkStages + s) * piece_bytes);
    const int64_t nw = w + kBulkStages * warps;
    if (nw < pieces) issue(nw, s);
    s = s + 1 == kBulkStages ? 0 : s + 1;
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // practically never; keeps the copies alive
#endif
}

__global__ void SpinKernel(int64_t ns) {
  const int64_t start = clock64();
  // clock64 ticks at the SM clock (~1.7-2 GHz); 2 ticks per ns is a safe over-estimate.
  while (clock64() - start < 2 * ns) {
  }
}

}  // namespace

cudaError_t FillNormal(void* data, size_t count, bool bf16, uint64_t seed, cudaStream_t stream) {
  FillNormalKernel<<<4096, 256, 0, stream>>>(static_cast<uint16_t*>(data), count, bf16, seed);
  return cudaGetLastError();
}

cudaError_t StreamRead(const void* data, size_t bytes, uint32_t* sink, int grid, int block, int unroll,
                       cudaStream_t stream) {
  const auto* d = static_cast<const uint4*>(data);
  if (unroll >= 8) {
    StreamReadKernel<8><<<grid, block, 0, stream>>>(d, bytes / 16, sink);
  } else {
    StreamReadKernel<4><<<grid, block, 0, stream>>>(d, bytes / 16, sink);
  }
  return cudaGetLastError();
}

cudaError_t PagedRead(const void* kv, const int32_t* pages, int64_t count, int heads, int piece_bytes,
                      uint32_t* sink, int grid, int block, cudaStream_t stream) {
  // Whole groups of 4 x 32 lanes x 16 bytes per piece (2 KB granules).
  if (piece_bytes % 2048 != 0) return cudaErrorInvalidValue;
  PagedReadKernel<<<grid, block, 0, stream>>>(static_cast<const uint4*>(kv), pages, count * 2 * heads, heads,
                                              piece_bytes / 16, sink);
  return cudaGetLastError();
}

cudaError_t PagedReadBulk(const void* kv, const int32_t* pages, int64_t count, int heads, int piece_bytes,
                          uint32_t* sink, int grid, cudaStream_t stream) {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < 9) return cudaErrorNotSupported;
  const int smem = kBulkWarps * kBulkStages * piece_bytes;
  if (piece_bytes % 16 != 0 || smem > 200 * 1024) return cudaErrorInvalidValue;
  static const cudaError_t attr =
      cudaFuncSetAttribute(PagedReadBulkKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  if (attr != cudaSuccess) return attr;
  PagedReadBulkKernel<<<grid, kBulkWarps * 32, smem, stream>>>(static_cast<const char*>(kv), pages,
                                                               count * 2 * heads, heads, piece_bytes, sink);
  return cudaGetLastError();
}

cudaError_t Spin(int64_t ns, cudaStream_t stream) {
  SpinKernel<<<1, 32, 0, stream>>>(ns);
  return cudaGetLastError();
}

}  // namespace pkv::bench
