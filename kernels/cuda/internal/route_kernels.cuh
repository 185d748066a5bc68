// kernels/cuda/internal/route_kernels.cuh — the route kernels (work assignment variants around
// AttendRange) and the separate LSE-merge kernel. Included only by the route .cu files.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "kernels/cuda/internal/launchers.h"
#include "kernels/cuda/internal/paged_attention.cuh"

namespace pkv::kernels::cuda::internal {

// The attention launches are programmatic dependents of the work before them on the stream (the
// layer's q|k|v pull, kernels/cuda/host_pull.h, which lets them launch as soon as it has started):
// their CTAs become resident and set up while the pull runs, and wait here, before their first
// load, until it has finished and its writes are visible. Launched without the attribute, this
// returns at once (ordinary stream order holds); after a kernel that does not trigger, the launch
// itself starts only as that kernel's blocks finish.
__device__ __forceinline__ void WaitForPriorGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}

// Launches `kernel` (kThreads per CTA) as a programmatic dependent of the stream's previous work
// (see WaitForPriorGrid, which every kernel launched this way calls before its first load).
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, int smem_bytes, cudaStream_t stream,
                            Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

#ifndef PKV_CTA_TIMELINE
// Diagnostic build knob: 1 = each work-queue / sequence-split CTA records %globaltimer (ns) at its
// start and end into a per-route table (ReadCtaTimeline). Off in every shipped build.
#define PKV_CTA_TIMELINE 0
#endif
#if PKV_CTA_TIMELINE
// Per translation unit (one route per .cu): [start, end] per CTA of the route's last launch.
static __device__ unsigned long long g_cta_timeline[2 * kTimelineCtas];
__device__ __forceinline__ unsigned long long GlobalNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define PKV_TIMELINE_BEGIN()                        \
  __shared__ unsigned long long pkv_timeline_start; \
  if (threadIdx.x == 0) pkv_timeline_start = GlobalNs();
#define PKV_TIMELINE_END(cta)                                          \
  if (threadIdx.x == 0 && (cta) < kTimelineCtas) {                     \
    g_cta_timeline[2 * (cta)] = pkv_timeline_start;                    \
    g_cta_timeline[2 * (cta) + 1] = GlobalNs();                        \
  }
#else
#define PKV_TIMELINE_BEGIN()
#define PKV_TIMELINE_END(cta)
#endif

// This translation unit's timeline table (each route file has its own, see above): zeroed, or its
// first `values` values copied to `out` (at most the table). cudaErrorNotSupported without the knob.
static inline cudaError_t ClearTimelineTable() {
#if PKV_CTA_TIMELINE
  static const unsigned long long zeros[2 * kTimelineCtas] = {};
  return cudaMemcpyToSymbol(g_cta_timeline, zeros, sizeof(zeros));
#else
  return cudaErrorNotSupported;
#endif
}
static inline cudaError_t ReadTimelineTable(unsigned long long* out, int values) {
#if PKV_CTA_TIMELINE
  if (values > 2 * kTimelineCtas) values = 2 * kTimelineCtas;
  return cudaMemcpyFromSymbol(out, g_cta_timeline, static_cast<size_t>(values) * sizeof(unsigned long long));
#else
  (void)out;
  (void)values;
  return cudaErrorNotSupported;
#endif
}

// After this CTA wrote partial `first_slot + split` of (row, kvh): publish it and count; the last
// of the `splits` CTAs of the group merges them into out/lse and re-zeroes the counter (classic
// threadfence reduction). All threads of the CTA call it.
template <typename T, int D>
__device__ __forceinline__ void CountAndMerge(const DecodeParams& p, const Workspace& ws, int row, int kvh,
                                              int64_t first_slot, int splits) {
  __shared__ int is_last;
  const int G = p.num_q_heads / p.num_kv_heads;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = &ws.counters[row * p.num_kv_heads + kvh];
    const int done = atomicAdd(counter, 1);
    is_last = done == splits - 1;
    if (is_last) atomicExch(counter, 0);  // leave the workspace zeroed for the next launch
  }
  __syncthreads();
  if (is_last) {
    __threadfence();
    for (int g = threadIdx.x >> 5; g < G; g += kWarps) {
      MergeWarp<T, D, true>(p, row, kvh * G + g, first_slot, splits, ws.lse, ws.o);
    }
  }
}

// Per-request: grid (Hkv, B); the whole row, output written directly.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PerRequestKernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) char smem[];
  WaitForPriorGrid();
  const int kvh = blockIdx.x, b = blockIdx.y;
  const int pages = p.page_indptr[b + 1] - p.page_indptr[b];
  const MergeView<D> v = AttendRange<T, D>(p, b, kvh, 0, pages, smem);
  WriteFinal<T, D>(p, b, kvh, v);
}

// Sequence split: grid (S, Hkv, B); split s takes pages [s*n/S, (s+1)*n/S) of the row and writes
// partial slot b*S + s (S == 1: the output directly). kFused: the last split of each (row, KV
// head) merges (one launch); else the merge kernel runs next.
template <typename T, int D, bool kFused>
__global__ void __launch_bounds__(kThreads)
    SequenceSplitKernel(const __grid_constant__ DecodeParams p, Workspace ws) {
  extern __shared__ __align__(128) char smem[];
  WaitForPriorGrid();
  PKV_TIMELINE_BEGIN()
  const int s = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int S = gridDim.x;
  const int pages = p.page_indptr[b + 1] - p.page_indptr[b];
  const int begin = static_cast<int>(static_cast<int64_t>(pages) * s / S);
  const int end = static_cast<int>(static_cast<int64_t>(pages) * (s + 1) / S);
  const MergeView<D> v = AttendRange<T, D>(p, b, kvh, begin, end, smem);
  if (S == 1) {
    WriteFinal<T, D>(p, b, kvh, v);
  } else {
    const int64_t first = static_cast<int64_t>(b) * S;
    WritePartial<D>(p, first + s, kvh, v, ws.lse, ws.o);
    if constexpr (kFused) CountAndMerge<T, D>(p, ws, b, kvh, first, S);
  }
  PKV_TIMELINE_END(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z))
}

// Work queue: each CTA runs its tasks of the compact task list in order: the contiguous range
// [cta_task_begin[c], cta_task_begin[c + 1]) when the plan assigns ranges, else every gridDim.x-th
// task from blockIdx.x (a persistent grid striding over the list). A task of a row with one split
// writes the output; otherwise it writes partial slot partial_offset[row] + split and, with
// kFused, the last task of its (row, KV head) to finish merges the group's partials. The next
// task's Q, page ids and first chunks are issued before the current task's epilogue, so its load
// latency hides behind the merge, the partial write and the completion counter.
template <typename T, int D, bool kFused>
__global__ void __launch_bounds__(kThreads) WorkQueueKernel(const __grid_constant__ DecodeParams p, Workspace ws) {
  extern __shared__ __align__(128) char smem[];
  // The end of this CTA's range lives in shared memory (read once per task; registers are tight).
  __shared__ int task_end;
  WaitForPriorGrid();
  PKV_TIMELINE_BEGIN()
  int t = blockIdx.x;
  if (p.cta_task_begin != nullptr) {
    t = p.cta_task_begin[blockIdx.x];
    if (threadIdx.x == 0) task_end = p.cta_task_begin[blockIdx.x + 1];
  } else if (threadIdx.x == 0) {
    task_end = p.num_tasks;
  }
  __syncthreads();
  if (t >= task_end) {
    PKV_TIMELINE_END(blockIdx.x)
    return;
  }
  DecodeTask cur = p.tasks[t];
  RangeState<D> r;
  BeginRange<T, D>(p, cur.row, cur.kv_head, cur.page_begin, cur.page_end, smem, r);
  for (;;) {
    float m_run, l_run, o[D / 8][2];
    RunRange<T, D>(p, smem, r, m_run, l_run, o);
    const MergeView<D> v = StashWarpState<D>(smem, m_run, l_run, o);
    const int nt = t + (p.cta_task_begin != nullptr ? 1 : static_cast<int>(gridDim.x));
    DecodeTask next = cur;
    if (nt < task_end) {
      next = p.tasks[nt];
      BeginRange<T, D>(p, next.row, next.kv_head, next.page_begin, next.page_end, smem, r);
    }
    __syncthreads();  // all warps' states of `cur` are stashed
    if (cur.num_splits == 1) {
      WriteFinal<T, D>(p, cur.row, cur.kv_head, v);
    } else {
      const int64_t first = p.partial_offset[cur.row];
      WritePartial<D>(p, first + cur.split, cur.kv_head, v, ws.lse, ws.o);
      if constexpr (kFused) CountAndMerge<T, D>(p, ws, cur.row, cur.kv_head, first, cur.num_splits);
    }
    __syncthreads();  // the merge area is read; the next stash may overwrite it
    if (nt >= task_end) break;
    cur = next;
    t = nt;
  }
  PKV_TIMELINE_END(blockIdx.x)
}

// Separate merge: one warp per (row, query head); rows with fewer than 2 splits are skipped
// (their output was written directly). kUniform: S = p.num_splits, slots b*S..; else per-row
// row_splits / partial_offset.
template <typename T, int D, bool kUniform>
__global__ void __launch_bounds__(kThreads) MergeKernel(const __grid_constant__ DecodeParams p, Workspace ws) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (item >= static_cast<int64_t>(p.batch) * p.num_q_heads) return;
  const int b = static_cast<int>(item / p.num_q_heads), h = static_cast<int>(item % p.num_q_heads);
  const int splits = kUniform ? p.num_splits : p.row_splits[b];
  if (splits < 2) return;
  const int64_t first = kUniform ? static_cast<int64_t>(b) * p.num_splits : p.partial_offset[b];
  MergeWarp<T, D, false>(p, b, h, first, splits, ws.lse, ws.o);
}

// Raises the dynamic shared-memory limit of `Kernel` once per process (keyed by the kernel itself,
// not its type: every instantiation needs its own attribute).
template <auto Kernel>
cudaError_t EnsureSmem(int bytes) {
  static const cudaError_t once = [bytes] {
    const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
    // Two CTAs of the largest tiles need the whole 228 KB carve-out on Hopper.
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                static_cast<int>(cudaSharedmemCarveoutMaxShared));
  }();
  return once;
}

inline int MergeGrid(const DecodeParams& p) {
  return static_cast<int>((static_cast<int64_t>(p.batch) * p.num_q_heads + kWarps - 1) / kWarps);
}

}  // namespace pkv::kernels::cuda::internal
