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

// The paged-read ceiling: reads the K and V of every (page, KV head) listed in `pages` (`count`
// page ids of a [pages][2][heads][piece] layout, `piece_bytes` a multiple of 2048), one warp per
// piece with 16-byte streaming loads, two pieces in flight per warp; folds them into `sink`. The
// access pattern of the attention routes without their arithmetic.
cudaError_t PagedRead(const void* kv, const int32_t* pages, int64_t count, int heads, int piece_bytes,
                      uint32_t* sink, int grid, int block, cudaStream_t stream);

// The same reads by bulk copies (sm_90+, else cudaErrorNotSupported): one thread per warp keeps
// four whole pieces in flight with cp.async.bulk into shared memory (4 warps per CTA, so
// 16 * piece_bytes of shared memory, at most 200 KB; piece_bytes a multiple of 16).
cudaError_t PagedReadBulk(const void* kv, const int32_t* pages, int64_t count, int heads, int piece_bytes,
                          uint32_t* sink, int grid, cudaStream_t stream);

// Keeps the GPU busy for about `ns` nanoseconds (one tiny CTA).
cudaError_t Spin(int64_t ns, cudaStream_t stream);

}  // namespace pkv::bench
