// kernels/cuda/work_queue.cu — kWorkQueue: a persistent grid over the compact task list, merge
// fused (last finisher) or as one more launch.
#include "kernels/cuda/internal/route_kernels.cuh"

namespace pkv::kernels::cuda::internal {

template <typename T, int D>
KernelShape WorkQueueShape() {
  static const KernelShape shape = [] {
    KernelShape s;
    s.smem_bytes = TileConfig<D>::kSmemBytes;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&s.num_sms, cudaDevAttrMultiProcessorCount, dev);
    // Both variants use the same tile machinery; the fused one is the larger.
    EnsureSmem<WorkQueueKernel<T, D, true>>(s.smem_bytes);
    EnsureSmem<WorkQueueKernel<T, D, false>>(s.smem_bytes);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&s.ctas_per_sm, WorkQueueKernel<T, D, true>, kThreads,
                                                  s.smem_bytes);
    if (s.ctas_per_sm < 1) s.ctas_per_sm = 1;
    if (s.num_sms < 1) s.num_sms = 1;
    return s;
  }();
  return shape;
}

template <typename T, int D>
cudaError_t LaunchWorkQueue(const DecodeParams& p, const Workspace& ws, bool fused_merge, int grid,
                            cudaStream_t stream) {
  const KernelShape shape = WorkQueueShape<T, D>();
  if (p.num_tasks == 0) return cudaSuccess;
  if (fused_merge) return LaunchDependent(WorkQueueKernel<T, D, true>, dim3(grid), shape.smem_bytes, stream, p, ws);
  if (const cudaError_t e = LaunchDependent(WorkQueueKernel<T, D, false>, dim3(grid), shape.smem_bytes, stream, p, ws);
      e != cudaSuccess) {
    return e;
  }
  MergeKernel<T, D, false><<<MergeGrid(p), kThreads, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

cudaError_t ClearWorkQueueTimeline() { return ClearTimelineTable(); }

cudaError_t ReadWorkQueueTimeline(unsigned long long* out, int values) { return ReadTimelineTable(out, values); }

#define PKV_INSTANTIATE(T, D)                                                                      \
  template cudaError_t LaunchWorkQueue<T, D>(const DecodeParams&, const Workspace&, bool, int, \
                                             cudaStream_t);                                     \
  template KernelShape WorkQueueShape<T, D>();
PKV_INSTANTIATE(__half, 64)
PKV_INSTANTIATE(__half, 128)
PKV_INSTANTIATE(__half, 256)
PKV_INSTANTIATE(__nv_bfloat16, 64)
PKV_INSTANTIATE(__nv_bfloat16, 128)
PKV_INSTANTIATE(__nv_bfloat16, 256)
#undef PKV_INSTANTIATE

}  // namespace pkv::kernels::cuda::internal
