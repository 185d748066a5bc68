// kernels/cuda/host_pull.h — a small host-to-device copy done by a kernel, not a copy engine.
//
// The copy engines serve the copies queued on all streams without regard to stream priority. On
// an H200, a decode layer's q|k|v upload (about 100 KB) issued on the device's highest-priority
// stream waited about 1 ms whenever prompt KV was being copied up on another stream, however
// finely that copy was cut into pieces. A kernel instead reads mapped pinned host memory over
// PCIe itself: its CTAs are scheduled by its stream's priority like any kernel's, and no copy
// engine is involved.
// Launch never allocates, synchronises or logs.
// Thread-safety: may be called from any thread; calls on one stream are ordered by it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"

namespace pkv::kernels::cuda {

// One piece of a pull: `bytes` from `src`, the device address of pinned host memory (cudaHostAlloc
// with cudaHostAllocMapped, or host memory registered with cudaHostRegister, as
// cudaHostGetDevicePointer gives it), to `dst` in device memory.
struct HostPullPiece {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

// The most pieces one launch moves.
inline constexpr int kMaxHostPullPieces = 4;

// Enqueues on `stream` one launch that copies pieces[0 .. count) (at most kMaxHostPullPieces;
// pieces must not overlap). Every dst and src 16-byte aligned and every size a multiple of 16, else
// InvalidArgument; nothing to copy launches nothing. The host must have finished writing the
// sources before the call.
[[nodiscard]] absl::Status LaunchHostPull(const HostPullPiece* pieces, int count, cudaStream_t stream);

// One piece.
[[nodiscard]] inline absl::Status LaunchHostPull(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  const HostPullPiece piece{dst, src, bytes};
  return LaunchHostPull(&piece, 1, stream);
}

}  // namespace pkv::kernels::cuda
