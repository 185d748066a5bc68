// kernels/cuda/sequence_split.cu — kSequenceSplit: S page ranges per (row, KV head), then a merge.
#include "kernels/cuda/internal/route_kernels.cuh"

namespace pkv::kernels::cuda::internal {

template <typename T, int D>
cudaError_t LaunchSequenceSplit(const DecodeParams& p, const Workspace& ws, bool fused_merge, cudaStream_t stream) {
  constexpr int kSmem = TileConfig<D>::kSmemBytes;
  const int S = p.num_splits;
  const dim3 grid(S, p.num_kv_heads, p.batch);
  if (fused_merge && S > 1) {
    if (const cudaError_t e = EnsureSmem<SequenceSplitKernel<T, D, true>>(kSmem); e != cudaSuccess) return e;
    return LaunchDependent(SequenceSplitKernel<T, D, true>, grid, kSmem, stream, p, ws);
  }
  if (const cudaError_t e = EnsureSmem<SequenceSplitKernel<T, D, false>>(kSmem); e != cudaSuccess) return e;
  if (const cudaError_t e = LaunchDependent(SequenceSplitKernel<T, D, false>, grid, kSmem, stream, p, ws);
      e != cudaSuccess) {
    return e;
  }
  if (S > 1) MergeKernel<T, D, true><<<MergeGrid(p), kThreads, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

cudaError_t ClearSequenceSplitTimeline() { return ClearTimelineTable(); }

cudaError_t ReadSequenceSplitTimeline(unsigned long long* out, int values) { return ReadTimelineTable(out, values); }

#define PKV_INSTANTIATE(T, D) \
  template cudaError_t LaunchSequenceSplit<T, D>(const DecodeParams&, const Workspace&, bool, cudaStream_t);
PKV_INSTANTIATE(__half, 64)
PKV_INSTANTIATE(__half, 128)
PKV_INSTANTIATE(__half, 256)
PKV_INSTANTIATE(__nv_bfloat16, 64)
PKV_INSTANTIATE(__nv_bfloat16, 128)
PKV_INSTANTIATE(__nv_bfloat16, 256)
#undef PKV_INSTANTIATE

}  // namespace pkv::kernels::cuda::internal
