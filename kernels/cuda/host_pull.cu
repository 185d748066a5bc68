// kernels/cuda/host_pull.cu — LaunchHostPull (kernels/cuda/host_pull.h).
#include "kernels/cuda/host_pull.h"

#include <cstdint>

#include "absl/strings/str_cat.h"

namespace pkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // 16-byte loads in flight per thread: PCIe reads are long-latency

// The pieces of one launch, in 16-byte units; begin[i] is piece i's first unit in the launch's
// index space, begin[n] the total.
struct Pieces {
  uint4* dst[kMaxHostPullPieces];
  const uint4* src[kMaxHostPullPieces];
  int64_t begin[kMaxHostPullPieces + 1];
  int n;
};

// Each thread moves up to kPerThread 16-byte units, all loads issued before any store.
// Triggers its programmatic dependents first (the attention launches, which wait for this grid
// to finish before their first load): they launch and set up while the PCIe reads are in flight.
__global__ void __launch_bounds__(kThreads) HostPullKernel(const Pieces pieces) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kPerThread + threadIdx.x;
  const int64_t total = pieces.begin[pieces.n];
  uint4 unit[kPerThread];
  int which[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + static_cast<int64_t>(j) * kThreads;
    which[j] = 0;
    while (which[j] + 1 < pieces.n && i >= pieces.begin[which[j] + 1]) ++which[j];
    if (i < total) unit[j] = pieces.src[which[j]][i - pieces.begin[which[j]]];
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + static_cast<int64_t>(j) * kThreads;
    if (i < total) pieces.dst[which[j]][i - pieces.begin[which[j]]] = unit[j];
  }
}

}  // namespace

absl::Status LaunchHostPull(const HostPullPiece* pieces, int count, cudaStream_t stream) {
  if (count < 0 || count > kMaxHostPullPieces) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchHostPull: ", count, " pieces, 0 to ", kMaxHostPullPieces));
  }
  Pieces launch{};
  int64_t units = 0;
  for (int i = 0; i < count; ++i) {
    const HostPullPiece& piece = pieces[i];
    if (reinterpret_cast<uintptr_t>(piece.dst) % 16 != 0 || reinterpret_cast<uintptr_t>(piece.src) % 16 != 0 ||
        piece.bytes % 16 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LaunchHostPull: dst, src and bytes must be multiples of 16 (bytes ", piece.bytes, ")"));
    }
    if (piece.bytes == 0) continue;
    launch.dst[launch.n] = static_cast<uint4*>(piece.dst);
    launch.src[launch.n] = static_cast<const uint4*>(piece.src);
    launch.begin[launch.n] = units;
    units += static_cast<int64_t>(piece.bytes / 16);
    ++launch.n;
  }
  launch.begin[launch.n] = units;
  if (units == 0) return absl::OkStatus();
  const int64_t per_cta = static_cast<int64_t>(kThreads) * kPerThread;
  const int64_t grid = (units + per_cta - 1) / per_cta;
  if (grid > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat("LaunchHostPull: ", units * 16, " bytes is too large"));
  HostPullKernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(launch);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("LaunchHostPull: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace pkv::kernels::cuda
