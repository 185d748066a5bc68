// kernels/cuda/sequence_split.cu — kSequenceSplit: S page ranges per (row, KV head), then a merge:
// through a thread-block cluster (S <= 16 on sm_90+), a completion counter (fused) or one more
// launch.
#include <atomic>

#include "kernels/cuda/internal/route_kernels.cuh"

namespace pkv::kernels::cuda::internal {

// Whether clusters of S CTAs of the cluster kernel can run on the current device: sm_90+, S <= 16
// (above 8 a non-portable size, allowed explicitly) and at least one such cluster fits (shared
// memory of S CTAs within a GPC). Cached per S.
template <typename T, int D>
bool SequenceSplitClusterUsable(int S) {
  static std::atomic<int> usable[17] = {};  // 0: not asked yet, 1: no, 2: yes
  if (S < 2 || S > 16) return false;
  int known = usable[S].load(std::memory_order_relaxed);
  if (known != 0) return known == 2;
  bool ok = false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9) {
    constexpr int kSmem = TileConfig<D>::kSmemBytes;
    auto* kernel = SequenceSplitClusterKernel<T, D>;
    ok = EnsureSmem<SequenceSplitClusterKernel<T, D>>(kSmem) == cudaSuccess &&
         cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (ok) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(S, 1, 1);
      cfg.blockDim = dim3(kThreads, 1, 1);
      cfg.dynamicSmemBytes = kSmem;
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = S;
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      int clusters = 0;
      ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
    }
    (void)cudaGetLastError();  // a refused query leaves no sticky error for the next launch
  }
  usable[S].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

template <typename T, int D>
cudaError_t LaunchSequenceSplit(const DecodeParams& p, const Workspace& ws, SplitMerge merge, cudaStream_t stream) {
  constexpr int kSmem = TileConfig<D>::kSmemBytes;
  const int S = p.num_splits;
  const dim3 grid(S, p.num_kv_heads, p.batch);
  if (merge == SplitMerge::kClusterOrCounter && SequenceSplitClusterUsable<T, D>(S)) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = kSmem;
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = S;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, SequenceSplitClusterKernel<T, D>, p);
  }
  if (merge != SplitMerge::kSeparate && S > 1) {
    if (const cudaError_t e = EnsureSmem<SequenceSplitKernel<T, D, true>>(kSmem); e != cudaSuccess) return e;
    SequenceSplitKernel<T, D, true><<<grid, kThreads, kSmem, stream>>>(p, ws);
    return cudaGetLastError();
  }
  if (const cudaError_t e = EnsureSmem<SequenceSplitKernel<T, D, false>>(kSmem); e != cudaSuccess) return e;
  SequenceSplitKernel<T, D, false><<<grid, kThreads, kSmem, stream>>>(p, ws);
  if (S > 1) MergeKernel<T, D, true><<<MergeGrid(p), kThreads, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

#define PKV_INSTANTIATE(T, D)                                                                          \
  template cudaError_t LaunchSequenceSplit<T, D>(const DecodeParams&, const Workspace&, SplitMerge, cudaStream_t); \
  template bool SequenceSplitClusterUsable<T, D>(int);
PKV_INSTANTIATE(__half, 64)
PKV_INSTANTIATE(__half, 128)
PKV_INSTANTIATE(__half, 256)
PKV_INSTANTIATE(__nv_bfloat16, 64)
PKV_INSTANTIATE(__nv_bfloat16, 128)
PKV_INSTANTIATE(__nv_bfloat16, 256)
#undef PKV_INSTANTIATE

}  // namespace pkv::kernels::cuda::internal
