// bench/flashinfer/internal/flashinfer_paths.cuh — FlashInfer's two paged-decode paths on our pool layout.
//
// Templates over the 16-bit dtype T, instantiated once per (path, dtype) by the
// bench/flashinfer/flashinfer_{decode,prefill}_{f16,bf16}.cu files and reached through the plain entry
// points of flashinfer_paths.h. What FlashInfer's own bindings do, written for our layout:
//   - the pool layer [num_pages][2 (K, V)][Hkv][P][d] is FlashInfer's HND paged KV with explicit
//     strides: k_data = layer base, v_data = base + Hkv*P*d, stride_page = 2*Hkv*P*d,
//     stride_h = P*d, stride_n = d; our CSR (indptr / indices / last_page_len) is FlashInfer's;
//   - CUDA-core decode (BatchDecodeWithPagedKVCache): DecodePlan with the work estimation of
//     the group size, then BatchDecodeWithPagedKVCacheDispatched (split-KV as planned);
//   - tensor-core decode (the Python API's use_tensor_cores=True): PrefillPlan with one query
//     row per request (qo_indptr = 0..B, uniform_q_len 1), then
//     BatchPrefillWithPagedKVCacheDispatched, non-causal, CTA_TILE_Q 16 (what the planner picks
//     for G*1 <= 16 packed rows).
// Variant: DefaultAttention without mask, window, soft cap or ALiBi; no RoPE; no CUDA graph.
// Only FlashInfer, CUDA and std headers: bench/flashinfer/fetch_headers.sh computes its CCCL include
// closure from this file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include <flashinfer/attention/decode.cuh>
#include <flashinfer/attention/default_decode_params.cuh>
#include <flashinfer/attention/default_prefill_params.cuh>
#include <flashinfer/attention/prefill.cuh>
#include <flashinfer/attention/scheduler.cuh>
#include <flashinfer/attention/variants.cuh>

#include "bench/flashinfer/internal/flashinfer_paths.h"

namespace pkv::bench::fi_internal {

using Variant = flashinfer::DefaultAttention</*custom_mask=*/false, /*sliding_window=*/false,
                                             /*logits_soft_cap=*/false, /*alibi=*/false>;
inline constexpr auto kPosEncoding = flashinfer::PosEncodingMode::kNone;
inline constexpr uint32_t kCtaTileQ = 16;
template <typename T>
using DecodeParamsT = flashinfer::BatchDecodeParams<T, T, T, int32_t>;
template <typename T>
using PrefillParamsT = flashinfer::BatchPrefillPagedParams<T, T, T, int32_t>;

inline std::string CudaError(const char* what, cudaError_t e) {
  return e == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(e);
}

inline void StorePlan(const std::vector<int64_t>& v, bool split_kv, PlanInfo* plan) {
  plan->n = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size() && i < 16; ++i) plan->v[i] = v[i];
  plan->split_kv = split_kv;
}

inline std::vector<int64_t> LoadPlan(const PlanInfo& plan) {
  return std::vector<int64_t>(plan.v, plan.v + plan.n);
}

// Our layer [pages][2][Hkv][P][d] as FlashInfer's HND paged KV (K and V share the strides).
template <typename T>
flashinfer::paged_kv_t<T, int32_t> PagedKv(const Problem& p) {
  const int64_t tile = static_cast<int64_t>(p.num_kv_heads) * p.page_size * kHeadDim;  // K (or V) of a page
  const int64_t strides[3] = {2 * tile, static_cast<int64_t>(p.page_size) * kHeadDim, kHeadDim};  // page, head, token
  T* k = static_cast<T*>(const_cast<void*>(p.kv));
  return flashinfer::paged_kv_t<T, int32_t>(
      p.num_kv_heads, p.page_size, kHeadDim, p.batch, flashinfer::QKVLayout::kHND, k, k + tile, strides,
      const_cast<int32_t*>(p.page_indices), const_cast<int32_t*>(p.page_indptr), const_cast<int32_t*>(p.last_page_len));
}

// The fields both paths' params structs share: tensors, strides, the default variant's scalars
// and the plan's work arrays in the int workspace.
template <typename T, typename Info, typename Params>
void SetSharedParams(const Problem& p, const Workspace& ws, const Info& info, Params* params) {
  params->q = static_cast<T*>(const_cast<void*>(p.q));
  params->paged_kv = PagedKv<T>(p);
  params->o = static_cast<T*>(p.out);
  params->lse = p.lse;
  params->num_qo_heads = p.num_q_heads;
  params->q_stride_n = p.num_q_heads * kHeadDim;
  params->q_stride_h = kHeadDim;
  params->window_left = -1;
  params->logits_soft_cap = 0.f;
  params->sm_scale = p.sm_scale;
  params->rope_rcp_scale = 1.f;
  params->rope_rcp_theta = 1e-4f;
  params->request_indices = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.request_indices_offset);
  params->kv_tile_indices = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.kv_tile_indices_offset);
  params->o_indptr = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.o_indptr_offset);
  params->kv_chunk_size_ptr = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.kv_chunk_size_ptr_offset);
  params->padded_batch_size = static_cast<uint32_t>(info.padded_batch_size);
}

template <typename T>
std::string DecodePlan(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream) {
  try {
    flashinfer::DecodePlanInfo info;
    cudaError_t st = cudaSuccess;
    DISPATCH_GQA_GROUP_SIZE(in.num_q_heads / in.num_kv_heads, GROUP_SIZE, {
      auto work_estimation =
          flashinfer::BatchDecodeWithPagedKVCacheWorkEstimationDispatched<GROUP_SIZE, kHeadDim, kPosEncoding, Variant,
                                                                           DecodeParamsT<T>>;
      st = flashinfer::DecodePlan<kHeadDim, kPosEncoding, Variant, DecodeParamsT<T>>(
          ws.float_buf, ws.float_bytes, ws.int_buf, ws.pinned_int, ws.int_bytes, info,
          const_cast<int32_t*>(in.page_indptr_host), in.batch, in.num_q_heads, in.page_size,
          /*enable_cuda_graph=*/false, static_cast<cudaStream_t>(stream), work_estimation);
    });
    if (st != cudaSuccess) return CudaError("FlashInfer DecodePlan", st);
    StorePlan(info.ToVector(), info.split_kv, plan);
    return {};
  } catch (const std::exception& e) {
    return std::string("FlashInfer DecodePlan: ") + e.what();
  }
}

template <typename T>
std::string DecodeRun(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl, void* stream) {
  try {
    flashinfer::DecodePlanInfo info;
    info.FromVector(LoadPlan(plan));
    DecodeParamsT<T> params;
    SetSharedParams<T>(p, ws, info, &params);
    T* tmp_v = nullptr;
    float* tmp_s = nullptr;
    if (info.split_kv) {
      tmp_v = flashinfer::GetPtrFromBaseOffset<T>(ws.float_buf, info.v_offset);
      tmp_s = flashinfer::GetPtrFromBaseOffset<float>(ws.float_buf, info.s_offset);
    }
    const cudaError_t st = flashinfer::BatchDecodeWithPagedKVCacheDispatched<kHeadDim, kPosEncoding, Variant>(
        params, tmp_v, tmp_s, enable_pdl, static_cast<cudaStream_t>(stream));
    return CudaError("FlashInfer BatchDecodeWithPagedKVCache", st);
  } catch (const std::exception& e) {
    return std::string("FlashInfer BatchDecodeWithPagedKVCache: ") + e.what();
  }
}

template <typename T>
std::string PrefillPlan(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream) {
  try {
    flashinfer::PrefillPlanInfo info;
    const cudaError_t st = flashinfer::PrefillPlan<int32_t>(
        ws.float_buf, ws.float_bytes, ws.int_buf, ws.pinned_int, ws.int_bytes, info,
        const_cast<int32_t*>(in.qo_indptr_host), const_cast<int32_t*>(in.page_indptr_host),
        /*total_num_rows=*/in.batch, in.batch, in.num_q_heads, in.num_kv_heads, kHeadDim, kHeadDim, in.page_size,
        /*enable_cuda_graph=*/false, /*sizeof_dtype_o=*/sizeof(T), /*window_left=*/-1, /*fixed_split_size=*/-1,
        /*disable_split_kv=*/false, /*num_colocated_ctas=*/0, /*uniform_q_len=*/1, /*fixed_uniform_q_len=*/true,
        static_cast<cudaStream_t>(stream), /*kv_dtype_bytes=*/sizeof(T));
    if (st != cudaSuccess) return CudaError("FlashInfer PrefillPlan", st);
    if (info.cta_tile_q != kCtaTileQ) {
      return "FlashInfer PrefillPlan chose cta_tile_q " + std::to_string(info.cta_tile_q) +
             ": only 16 is instantiated (G <= 16)";
    }
    StorePlan(info.ToVector(), info.split_kv, plan);
    return {};
  } catch (const std::exception& e) {
    return std::string("FlashInfer PrefillPlan: ") + e.what();
  }
}

template <typename T>
std::string PrefillRun(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl, void* stream) {
  try {
    flashinfer::PrefillPlanInfo info;
    info.FromVector(LoadPlan(plan));
    PrefillParamsT<T> params;
    SetSharedParams<T>(p, ws, info, &params);
    params.q_indptr = const_cast<int32_t*>(p.qo_indptr);
    params.group_size = flashinfer::uint_fastdiv(p.num_q_heads / p.num_kv_heads);
    params.qo_tile_indices = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.qo_tile_indices_offset);
    params.max_total_num_rows = static_cast<uint32_t>(info.total_num_rows);
    params.total_num_rows = nullptr;    // no CUDA graph
    params.block_valid_mask = nullptr;  // no CUDA graph
    T* tmp_v = nullptr;
    float* tmp_s = nullptr;
    if (info.split_kv) {
      params.merge_indptr = flashinfer::GetPtrFromBaseOffset<int32_t>(ws.int_buf, info.merge_indptr_offset);
      tmp_v = flashinfer::GetPtrFromBaseOffset<T>(ws.float_buf, info.v_offset);
      tmp_s = flashinfer::GetPtrFromBaseOffset<float>(ws.float_buf, info.s_offset);
    }
    const cudaError_t st = flashinfer::BatchPrefillWithPagedKVCacheDispatched<
        /*SAME_KV_STRIDES=*/true, kCtaTileQ, kHeadDim, kHeadDim, kPosEncoding, /*USE_FP16_QK_REDUCTION=*/false,
        flashinfer::MaskMode::kNone, /*USE_TOKEN_HEAD_SF=*/false, Variant, PrefillParamsT<T>>(
        params, tmp_v, tmp_s, enable_pdl, static_cast<cudaStream_t>(stream));
    return CudaError("FlashInfer BatchPrefillWithPagedKVCache", st);
  } catch (const std::exception& e) {
    return std::string("FlashInfer BatchPrefillWithPagedKVCache: ") + e.what();
  }
}

}  // namespace pkv::bench::fi_internal
