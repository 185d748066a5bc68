// kernels/cuda/internal/launchers.h — typed launchers, one per route, instantiated in the route's
// .cu file for fp16/bf16 x head_dim 64/128/256; decode_attention_cuda.cu maps runtime shapes to
// them (the single dispatch table). Not a public interface.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda::internal {

// Workspace carve-up shared by the split routes: [counters | lse | o].
struct Workspace {
  int* counters;  // [kCounterBytes / 4], zero between launches
  float* lse;     // [slots, Hq]
  float* o;       // [slots, Hq, d]
};
Workspace CarveWorkspace(void* workspace, const DecodeParams& p, int64_t slots);
size_t WorkspaceBytesForSlots(const DecodeParams& p, int64_t slots);
// Partial slots the route carves its workspace for: B*S (kSequenceSplit, S > 1), num_partials
// (kWorkQueue), else 0.
int64_t PartialSlots(KernelId kernel, const DecodeParams& p);

// Attention-kernel resources of one instantiation (cached after the first call).
struct KernelShape {
  int smem_bytes = 0;
  int ctas_per_sm = 0;
  int num_sms = 0;
};

template <typename T, int D>
cudaError_t LaunchPerRequest(const DecodeParams& p, cudaStream_t stream);
template <typename T, int D>
cudaError_t LaunchSequenceSplit(const DecodeParams& p, const Workspace& ws, bool fused_merge, cudaStream_t stream);
template <typename T, int D>
cudaError_t LaunchWorkQueue(const DecodeParams& p, const Workspace& ws, bool fused_merge, int grid,
                            cudaStream_t stream);
template <typename T, int D>
KernelShape WorkQueueShape();

// Diagnostic builds (PKV_CTA_TIMELINE): clear / read a route's CTA timeline (2 values per CTA,
// for up to kTimelineCtas CTAs).
inline constexpr int kTimelineCtas = 8192;
cudaError_t ClearWorkQueueTimeline();
cudaError_t ReadWorkQueueTimeline(unsigned long long* out, int values);
cudaError_t ClearSequenceSplitTimeline();
cudaError_t ReadSequenceSplitTimeline(unsigned long long* out, int values);

}  // namespace pkv::kernels::cuda::internal
