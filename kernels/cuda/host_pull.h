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

// Enqueues on `stream` a copy of `bytes` from `src` to `dst`. `src` is the device address of
// mapped pinned host memory (cudaHostAlloc with cudaHostAllocMapped, cudaHostGetDevicePointer);
// `dst` is device memory. Both 16-byte aligned and `bytes` a multiple of 16, else
// InvalidArgument; bytes == 0 launches nothing. The host must have finished writing `src` before
// the call.
[[nodiscard]] absl::Status LaunchHostPull(void* dst, const void* src, size_t bytes, cudaStream_t stream);

}  // namespace pkv::kernels::cuda
