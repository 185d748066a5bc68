// kernels/cuda/decode_attention_cuda.h — the GPU paged decode-attention routes (CUTLASS style).
//
// Three routes implement the contract of kernels/decode_attention.h on device memory, all reading
// the native CSR page table (no KV repacking):
//   kPerRequest    one CTA per (row, KV head) over the whole row; writes out/lse directly.
//   kSequenceSplit grid (S, Hkv, B): split s of a row takes a balanced 1/S of its pages and
//                  writes a partial (o, lse); the S partials are merged exactly, fused (last
//                  finisher, one launch) or by a second launch (MergeMode::kSeparate).
//                  S = params.num_splits (S = 1 writes out directly, one launch).
//   kWorkQueue     runs the compact task list params.tasks: either a persistent grid (sized to
//                  the resident-CTA capacity of the device) strides over it, or, when the plan
//                  gives params.cta_task_begin, a grid of params.num_ctas CTAs runs one contiguous
//                  range of tasks each (a balanced plan: every CTA the same pages). A task with
//                  num_splits == 1 writes out directly, others write partial slot
//                  (partial_offset[row] + split). The merge is fused (the last task of a
//                  (row, KV head) to finish merges, via a counter) or one more launch
//                  (MergeMode::kSeparate).
// Every route: the G = Hq/Hkv query heads of a group share each K,V tile; K,V tiles of 16 tokens
// go global -> shared memory with 16-byte cp.async in a per-warp multi-stage pipeline; QK^T and PV
// run on tensor cores (mma.sync m16n8k16, the G heads padded to 16 rows) with fp32 accumulation
// and an fp32 online softmax. Supported: fp16/bf16, head_dim 64/128/256, G in 1..8, page size a
// power of two in [1, 256].
//
// Launch never allocates, synchronises or logs. Workspace (WorkspaceBytes) is caller-provided and
// MUST be zero-filled once when allocated: its first kCounterBytes hold the fused-merge counters,
// which every launch leaves at zero again; the rest holds partial states. One workspace allocated
// at its largest size serves every route and batch size.
// Thread-safety: Launch may be called from any thread; calls on one stream are ordered by it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/decode_types.h"
#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda {

// How the split routes (kSequenceSplit, kWorkQueue) merge split rows.
enum class MergeMode : uint8_t {
  kFused = 0,     // one launch: the last finishing task of each (row, KV head) merges
  kSeparate = 1,  // the task kernel, then a merge kernel over (row, head)
};

// Bytes at the start of the workspace reserved for fused-merge counters (B * Hkv <= this / 4).
inline constexpr size_t kCounterBytes = 256 * 1024;

// Largest G = Hq / Hkv the routes support (the group rides in the 16 rows of one mma tile).
inline constexpr int kMaxGroupSize = 8;

// OK when the route supports the shapes (dtype, head_dim, G, page size) and the plan fields it
// needs are set. Reads no device memory.
[[nodiscard]] absl::Status CanImplement(KernelId kernel, const DecodeParams& params);

// Workspace bytes the route needs: 0 for kPerRequest (and kSequenceSplit with S = 1), else
// kCounterBytes + partial states for B*S (kSequenceSplit) or params.num_partials (kWorkQueue).
size_t WorkspaceBytes(KernelId kernel, const DecodeParams& params);

// Enqueues the route on `stream`. Precondition: CanImplement(kernel, params).ok().
[[nodiscard]] absl::Status Launch(KernelId kernel, const DecodeParams& params, void* workspace,
                                  cudaStream_t stream, MergeMode merge = MergeMode::kFused);

// Launches of the route per call (1 or 2), for cost models and benchmarks.
int LaunchesPerCall(KernelId kernel, const DecodeParams& params, MergeMode merge);

// CTAs of the attention kernel that fit on one SM at once for this dtype/head_dim (occupancy
// query, cached), and the persistent grid kWorkQueue uses (SMs x that).
int ResidentCtasPerSm(const DecodeParams& params);
int PersistentGridSize(const DecodeParams& params);

// Diagnostic builds only (-DCMAKE_CUDA_FLAGS=-DPKV_CTA_TIMELINE=1): %globaltimer (ns) at the
// start and end of each CTA of the route's next launch (kWorkQueue or kSequenceSplit; up to 8192
// CTAs). Clear before the launch; Read after it returns (start, end) per CTA that ran. Both return
// UNIMPLEMENTED in other builds and for other routes.
absl::Status ClearCtaTimeline(KernelId kernel);
absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> ReadCtaTimeline(KernelId kernel);

}  // namespace pkv::kernels::cuda
