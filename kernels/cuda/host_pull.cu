// kernels/cuda/host_pull.cu — LaunchHostPull (kernels/cuda/host_pull.h).
#include "kernels/cuda/host_pull.h"

#include <cstdint>

#include "absl/strings/str_cat.h"

namespace pkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // 16-byte loads in flight per thread: PCIe reads are long-latency

// Each thread moves up to kPerThread 16-byte pieces, all loads issued before any store.
__global__ void __launch_bounds__(kThreads) HostPullKernel(uint4* __restrict__ dst, const uint4* __restrict__ src,
                                                           int64_t n) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kPerThread + threadIdx.x;
  uint4 piece[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + static_cast<int64_t>(j) * kThreads;
    if (i < n) piece[j] = src[i];
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + static_cast<int64_t>(j) * kThreads;
    if (i < n) dst[i] = piece[j];
  }
}

}  // namespace

absl::Status LaunchHostPull(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchHostPull: dst, src and bytes must be multiples of 16 (bytes ", bytes, ")"));
  }
  if (bytes == 0) return absl::OkStatus();
  const int64_t n = static_cast<int64_t>(bytes / 16);
  const int64_t per_cta = static_cast<int64_t>(kThreads) * kPerThread;
  const int64_t grid = (n + per_cta - 1) / per_cta;
  if (grid > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat("LaunchHostPull: ", bytes, " bytes is too large"));
  HostPullKernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(static_cast<uint4*>(dst),
                                                                       static_cast<const uint4*>(src), n);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("LaunchHostPull: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace pkv::kernels::cuda
