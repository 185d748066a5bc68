// kernels/cuda/param_upload.h — a small host-to-device copy carried in a kernel launch's
// parameters.
//
// Since CUDA 12.1 a kernel's parameters may take up to 32,764 bytes (Volta and later). The launch
// copies them out of host memory when it is issued, and they reach the GPU with the launch itself:
// no copy engine is involved (the copy engines queue a decode upload behind prompt ingest's bulk
// copies, host_pull.h) and no SM waits on a PCIe round trip (as a pull kernel's reads do). The
// kernel stores the bytes to device memory; it lets its programmatic dependents (the attention
// launches) start at once, and they wait for it to finish before their first load.
// Launch never allocates, synchronises or logs; it keeps the parameters (up to 32 KiB) on the
// calling thread's stack.
// Thread-safety: may be called from any thread; calls on one stream are ordered by it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"

namespace pkv::kernels::cuda {

// The most bytes one launch carries (a multiple of 16, with room for the destination address
// within the 32,764 bytes of parameters).
inline constexpr size_t kMaxParamUploadBytes = 32640;

// One piece: `bytes` of ordinary host memory at `src` (need not be pinned or aligned).
struct ParamUploadPiece {
  const void* src = nullptr;
  size_t bytes = 0;
};

// Enqueues on `stream` one launch that writes pieces[0 .. count) back to back to `dst` (device
// memory, 16-byte aligned). Every size a multiple of 16 and the total at most
// kMaxParamUploadBytes, else InvalidArgument; nothing to copy launches nothing. The sources are
// read before the call returns: the caller may reuse them at once.
[[nodiscard]] absl::Status LaunchParamUpload(void* dst, const ParamUploadPiece* pieces, int count, cudaStream_t stream);

// One piece.
[[nodiscard]] inline absl::Status LaunchParamUpload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  const ParamUploadPiece piece{src, bytes};
  return LaunchParamUpload(dst, &piece, 1, stream);
}

}  // namespace pkv::kernels::cuda
