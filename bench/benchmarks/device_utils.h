// bench/benchmarks/device_utils.h — small device helpers for the kernel benchmark: random fill, the
// streaming-read ceiling kernel and a spin kernel that lets a timed batch queue up behind it.
// Host-callable wrappers; each enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pkv::bench {

// Fills `count` 16-bit elements with N(0, 1) values of the dtype (bf16 if `bf16`, else fp16).
cudaError_t FillNormal(void* data, size_t count, bool bf16, uint64_t seed, cudaStream_t stream);

// Reads `bytes` (a multiple of 16) with 16-byte streaming loads, `unroll` (4 or 8) in flight per
// thread; folds them into `sink` so the loads stay.
cudaError_t StreamRead(const void* data, size_t bytes, uint32_t* sink, int grid, int block, int unroll,
                       cudaStream_t stream);

// Keeps the GPU busy for about `ns` nanoseconds (one tiny CTA).
cudaError_t Spin(int64_t ns, cudaStream_t stream);

}  // namespace pkv::bench
