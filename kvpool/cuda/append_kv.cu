#include "kvpool/cuda/append_kv.h"

#include <algorithm>

namespace pkv::kvpool::cuda {
namespace {

// Block (token, layer): threads stride over the 2 * Hkv * d/8 16-byte pieces of the token.
// kGather reverses the direction (pages -> k, v), for reads back.
template <bool kGather>
__global__ void AppendKvKernel(const __grid_constant__ AppendKvParams p) {
  const int t = blockIdx.x, l = blockIdx.y;
  const int page = p.slots[2 * t], slot = p.slots[2 * t + 1];
  const int pieces = p.head_dim / 8;
  const int per_kv = p.num_kv_heads * pieces;
  auto* dst_layer = static_cast<uint4*>(p.arena) + (static_cast<int64_t>(p.first_layer + l) * p.layer_stride) / 8;
  const int64_t src_row = (static_cast<int64_t>(l) * p.num_tokens + t) * per_kv;  // in 16-byte units
  for (int i = threadIdx.x; i < 2 * per_kv; i += blockDim.x) {
    const int kv = i / per_kv, rem = i % per_kv, h = rem / pieces, c = rem % pieces;
    const uint4* src = static_cast<const uint4*>(kv == 0 ? p.k : p.v) + src_row + rem;
    const int64_t dst = ((((static_cast<int64_t>(page) * 2 + kv) * p.num_kv_heads + h) * p.page_size + slot) *
                         p.head_dim) / 8 + c;
    if constexpr (kGather) {
      const_cast<uint4*>(src)[0] = dst_layer[dst];
    } else {
      dst_layer[dst] = *src;
    }
  }
}

}  // namespace

cudaError_t LaunchAppendKv(const AppendKvParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_layers == 0) return cudaSuccess;
  const int threads = std::min(256, std::max(32, 2 * p.num_kv_heads * p.head_dim / 8));
  AppendKvKernel<false><<<dim3(p.num_tokens, p.num_layers), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchGatherKv(const AppendKvParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_layers == 0) return cudaSuccess;
  const int threads = std::min(256, std::max(32, 2 * p.num_kv_heads * p.head_dim / 8));
  AppendKvKernel<true><<<dim3(p.num_tokens, p.num_layers), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pkv::kvpool::cuda
