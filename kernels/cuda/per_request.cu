// kernels/cuda/per_request.cu — kPerRequest: one CTA per (row, KV head).
#include "kernels/cuda/internal/route_kernels.cuh"

namespace pkv::kernels::cuda::internal {

template <typename T, int D>
cudaError_t LaunchPerRequest(const DecodeParams& p, cudaStream_t stream) {
  constexpr int kSmem = TileConfig<D>::kSmemBytes;
  if (const cudaError_t e = EnsureSmem<PerRequestKernel<T, D>>(kSmem); e != cudaSuccess) return e;
  return LaunchDependent(PerRequestKernel<T, D>, dim3(p.num_kv_heads, p.batch), kSmem, stream, p);
}

#define PKV_INSTANTIATE(T, D) template cudaError_t LaunchPerRequest<T, D>(const DecodeParams&, cudaStream_t);
PKV_INSTANTIATE(__half, 64)
PKV_INSTANTIATE(__half, 128)
PKV_INSTANTIATE(__half, 256)
PKV_INSTANTIATE(__nv_bfloat16, 64)
PKV_INSTANTIATE(__nv_bfloat16, 128)
PKV_INSTANTIATE(__nv_bfloat16, 256)
#undef PKV_INSTANTIATE

}  // namespace pkv::kernels::cuda::internal
