// kernels/decode_attention.h — the paged decode-attention contract every backend implements.
//
// One call computes, for every row b of a batch and every query head h,
//   out[b, h, :] = softmax(sm_scale * q[b, h, :] · K[b, g(h), t, :] over t < len_b) · V[b, g(h), t, :]
// where g(h) = h / G (G = num_q_heads / num_kv_heads, grouped-query attention) and the row's K,V
// history lives in pages listed by a CSR page table (page_indptr / page_indices /
// last_page_len, the layout vLLM and FlashInfer use). KV is read in place: no repacking.
// Optionally the natural-log log-sum-exp of the scaled scores, lse[b, h] = log Σ_t exp(s_t), is
// written so that partial results over page subsets can be merged exactly.
//
// Each implementation (kernels/reference on the CPU, kernels/cuda on the GPU) provides, CUTLASS
// style: CanImplement(params) -> Status, WorkspaceBytes(params) -> bytes, and
// Launch(params, workspace, stream) -> Status, which never allocates, synchronises or logs.
// DecodeParams is trivially copyable and passed by value.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/decode_types.h"
#include "common/dtype.h"

namespace pkv::kernels {

struct DecodeParams {
  DType dtype = DType::kF16;
  int32_t batch = 0;         // B rows
  int32_t num_q_heads = 0;   // Hq
  int32_t num_kv_heads = 0;  // Hkv
  int32_t head_dim = 0;      // d
  int32_t page_size = 0;     // P tokens per page
  float sm_scale = 0.f;      // usually 1/sqrt(d)

  const void* q = nullptr;   // [B, Hq, d] dtype
  // One layer's pages: [num_pages, 2 (K then V), Hkv, P, d] dtype.
  const void* kv = nullptr;
  int64_t num_pages = 0;               // pages in `kv` (bounds for page_indices)
  const int32_t* page_indptr = nullptr;    // [B + 1]; row b owns page_indices[indptr[b], indptr[b+1])
  const int32_t* page_indices = nullptr;   // [indptr[B]] physical page ids, any order
  const int32_t* last_page_len = nullptr;  // [B] tokens used in each row's last page, in [1, P]
  void* out = nullptr;                     // [B, Hq, d] dtype
  float* lse = nullptr;                    // [B, Hq] or null

  // Planned work for split routes (kernels/cuda). Ignored by the reference and per-request.
  const DecodeTask* tasks = nullptr;  // [num_tasks] compact work list (device memory on the GPU)
  int32_t num_tasks = 0;
  int32_t num_splits = 1;             // uniform split count for kSequenceSplit
  const int32_t* row_splits = nullptr;  // [B] per-row split count, or null for uniform
  const int32_t* partial_offset = nullptr;  // [B] first partial slot of each row, or null
  int32_t num_partials = 0;  // partial slots the plan uses (kWorkQueue: sum of row_splits > 1)
  // kWorkQueue's CTA ranges, or null: CTA c of a grid of num_ctas runs tasks
  // [cta_task_begin[c], cta_task_begin[c + 1]) in order ([num_ctas + 1], cta_task_begin[0] == 0,
  // cta_task_begin[num_ctas] == num_tasks). Null: a persistent grid strides over the list.
  const int32_t* cta_task_begin = nullptr;
  int32_t num_ctas = 0;

  // Fused append (kernels/cuda only): when set, each row's new token — append_k / append_v,
  // [B, Hkv, d] dtype, device memory — is written into the row's last slot (slot
  // last_page_len[b] - 1 of its last page) of `kv` by the warp that reads that token, before it
  // reads it, so no separate append launch precedes the attention. `kv` is then written at those
  // slots.
  const void* append_k = nullptr;
  const void* append_v = nullptr;
  // Second output (kernels/cuda only): when set, [B, Hq, d] dtype, the final outputs are written
  // there too, as they are to `out` (e.g. a router's registered shared memory next to the
  // engine's own buffer, which its retry cache keeps).
  void* out_copy = nullptr;
};
static_assert(std::is_trivially_copyable_v<DecodeParams>);

// Tokens in row b (host pointers only): (pages - 1) * P + last_page_len, 0 for a row with no pages.
inline int64_t RowLength(const DecodeParams& p, int32_t b) {
  const int32_t pages = p.page_indptr[b + 1] - p.page_indptr[b];
  if (pages == 0) return 0;
  return static_cast<int64_t>(pages - 1) * p.page_size + p.last_page_len[b];
}

// Element offset of (page, k_or_v, kv_head, slot, 0) in a layer's page array.
inline int64_t KvOffset(const DecodeParams& p, int64_t page, int32_t k_or_v, int32_t kv_head,
                        int32_t slot) {
  return (((page * 2 + k_or_v) * p.num_kv_heads + kv_head) * static_cast<int64_t>(p.page_size) + slot) *
         p.head_dim;
}

}  // namespace pkv::kernels
