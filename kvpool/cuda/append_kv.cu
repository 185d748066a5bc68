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

// Mirrors kvpool::ScatterRun (static_assert'ed to 32 bytes there).
struct Run {
  int32_t layer, page, slot, count;
  int64_t k_offset, v_offset;
};

// Block = one run: pieces ordered (kv, head, token, 16-byte column) so consecutive threads write
// consecutive bytes of a page's [P, d] tile.
__global__ void ScatterRunsKernel(const __grid_constant__ ScatterRunsParams p) {
  const Run r = static_cast<const Run*>(p.runs)[blockIdx.x];
  const int pieces = p.head_dim / 8;
  const int per_head = r.count * pieces;
  const int total = 2 * p.num_kv_heads * per_head;
  auto* layer = static_cast<uint4*>(p.arena) + (static_cast<int64_t>(r.layer) * p.layer_stride) / 8;
  const char* data = static_cast<const char*>(p.data);
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int kvh = i / per_head, rem = i % per_head, t = rem / pieces, c = rem % pieces;
    const int kv = kvh / p.num_kv_heads, h = kvh % p.num_kv_heads;
    const uint4* src = reinterpret_cast<const uint4*>(data + (kv == 0 ? r.k_offset : r.v_offset)) +
                       (static_cast<int64_t>(t) * p.num_kv_heads + h) * pieces + c;
    const int64_t dst = ((((static_cast<int64_t>(r.page) * 2 + kv) * p.num_kv_heads + h) * p.page_size + r.slot + t) *
                         p.head_dim) / 8 + c;
    layer[dst] = *src;
  }
}

}  // namespace

cudaError_t LaunchScatterRuns(const ScatterRunsParams& p, cudaStream_t stream) {
  if (p.num_runs == 0) return cudaSuccess;
  ScatterRunsKernel<<<p.num_runs, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

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
