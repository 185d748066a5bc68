// kernels/cuda/internal/paged_attention.cuh — the device machinery shared by every route.
//
// One CTA of kWarps warps attends one (row, KV head, page range). Each warp owns every kWarps-th
// 16-token chunk of the range and runs its own kStages-deep cp.async pipeline (no CTA barrier in
// the main loop): the 16 K rows and 16 V rows of a chunk are gathered through the page table into
// a swizzled shared tile with 16-byte copies (zero-filled past the end of the range). QK^T and PV
// run as mma.sync m16n8k16 with the G <= 8 query heads of the group as the M rows (rows G..15 are
// zero): Q lives in registers as A fragments, K and V come from shared memory by ldmatrix (V
// transposed), the score C fragment is reused in registers as the A fragment of PV
// (FlashAttention-2 style), and each warp keeps an fp32 online-softmax state (m, l, o) in the log2
// domain. At the end the warps' states are merged through shared memory; the caller's epilogue
// writes the final output or a partial (o normalised, natural-log lse).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda::internal {

inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kChunk = 16;     // tokens per warp tile (the M/K extent of one mma)
inline constexpr int kMaxGroup = 8;   // query heads per KV head held in the 16 mma rows
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct TileConfig {
  static_assert(D == 64 || D == 128 || D == 256);
#ifndef PKV_KV_STAGES
#define PKV_KV_STAGES 3  // cp.async stages per warp for head_dim <= 128 (build-time experiment knob)
#endif
  static constexpr int kStages = D >= 256 ? 2 : PKV_KV_STAGES;
  static constexpr int kRowChunks = D / 8;  // 16-byte pieces per token row
  static constexpr int kTileElems = kChunk * D;
  static constexpr int kStageElems = 2 * kTileElems;  // K tile then V tile
  static constexpr int kPipeBytes = kWarps * kStages * kStageElems * 2;
  static constexpr int kMergeBytes = kWarps * kMaxGroup * (D + 2) * 4;
  // The merge area follows the pipeline (no aliasing: a persistent CTA refills the pipeline with
  // the next task while the current task's states are being merged).
  static constexpr int kSmemBytes = kPipeBytes + kMergeBytes;
};

// Element type traits: conversions and the mma opcode. (The mma's rows 8..15 land in registers
// nobody reads: silence "set but never used" for them.)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 550
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half FromFloat(float f) { return __float2half_rn(f); }
  // d = a * b + c; A rows 8..15 are zero (a1 = a3 = 0); only rows 0..7 of D are kept.
  static __device__ __forceinline__ void Mma(float& d0, float& d1, uint32_t a0, uint32_t a2,
                                             uint32_t b0, uint32_t b1, float c0, float c1) {
    float j2, j3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d0), "=f"(d1), "=f"(j2), "=f"(j3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(0.f),
          "f"(0.f));
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 FromFloat(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ void Mma(float& d0, float& d1, uint32_t a0, uint32_t a2,
                                             uint32_t b0, uint32_t b1, float c0, float c1) {
    float j2, j3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d0), "=f"(d1), "=f"(j2), "=f"(j3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(0.f),
          "f"(0.f));
  }
};

#pragma nv_diagnostic pop

__device__ __forceinline__ void CpAsync16(uint32_t smem_addr, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: no global read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void Ldmatrix4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                          uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                               uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// Result of one CTA's pass over a range, per query head g < G and dim: o normalised by l and
// the natural-log lse (-inf and o = 0 for an empty range).
struct HeadResult {
  float o;
  float lse;
};

// The CTA-merged state in shared memory after AttendRange: m (log2 domain), l, o (unnormalised)
// per warp and head.
template <int D>
struct MergeView {
  float* m;  // [kWarps][8]
  float* l;  // [kWarps][8]
  float* o;  // [kWarps][8][D]
  __device__ __forceinline__ HeadResult Combine(int g, int dim) const {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m[w * 8 + g]);
    if (mx == -INFINITY) return {0.f, -INFINITY};
    float sum_l = 0.f, sum_o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float sc = exp2f(m[w * 8 + g] - mx);
      sum_l += l[w * 8 + g] * sc;
      sum_o += o[(w * 8 + g) * D + dim] * sc;
    }
    return {sum_o / sum_l, (mx + __log2f(sum_l)) * kLn2};
  }
};

// One CTA's current page range: the row, KV head and token count, the page list, the Q fragments
// and the page id prefetched for the next issue. BeginRange fills it and starts the pipeline;
// RunRange consumes it. Splitting the two lets a persistent CTA start the next task's loads
// before it finishes the current task's epilogue.
template <int D>
struct RangeState {
  int b, kvh, n, my_chunks, pg_next;
  const int32_t* pages;
  uint32_t qf[D / 16][2];
};

template <int D>
__device__ __forceinline__ uint32_t WarpPipeAddr(char* smem) {
  using Cfg = TileConfig<D>;
  const int warp = threadIdx.x >> 5;
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + warp * Cfg::kStages * Cfg::kStageElems * 2;
}

// Page id of token row `lane` (< 16) of chunk c, or -1 past the range.
template <int D>
__device__ __forceinline__ int LoadPage(const DecodeParams& p, const RangeState<D>& r, int c) {
  const int lane = threadIdx.x & 31;
  const int t = c * kChunk + lane;
  return (lane < kChunk && t < r.n) ? r.pages[t >> (__ffs(p.page_size) - 1)] : -1;
}

// Gathers chunk c (tokens [16c, 16c+16) of the range) into pipeline stage st of this warp;
// `page` from LoadPage(c). 16-byte cp.async, zero-filled past the end of the range, into a tile
// swizzled by 16-byte piece (piece ^ (row & 7)) so that ldmatrix reads are conflict-free.
template <typename T, int D>
__device__ __forceinline__ void IssueChunk(const DecodeParams& p, const RangeState<D>& r, char* smem, int c, int st,
                                           int page) {
  using Cfg = TileConfig<D>;
  const int lane = threadIdx.x & 31;
  const int P = p.page_size;
  const int64_t head_stride = static_cast<int64_t>(P) * D;                    // one (page, K|V, head) tile
  const int64_t v_stride = static_cast<int64_t>(p.num_kv_heads) * head_stride;  // K -> V
  int64_t row_off = 0;
  if (page >= 0) {
    const int t = c * kChunk + lane;
    row_off = (static_cast<int64_t>(page) * 2 * p.num_kv_heads + r.kvh) * head_stride +
              static_cast<int64_t>(t & (P - 1)) * D;
  }
  const T* kv = static_cast<const T*>(p.kv);
  const uint32_t k_base = WarpPipeAddr<D>(smem) + st * Cfg::kStageElems * 2;
  const uint32_t v_base = k_base + Cfg::kTileElems * 2;
#pragma unroll
  for (int it = 0; it < kChunk * Cfg::kRowChunks / 32; ++it) {
    const int idx = it * 32 + lane;
    const int row = idx / Cfg::kRowChunks;
    const int c16 = idx % Cfg::kRowChunks;
    const int64_t off = __shfl_sync(0xffffffffu, row_off, row);
    const int valid = __shfl_sync(0xffffffffu, page, row) >= 0;
    const T* src = kv + (valid ? off + c16 * 8 : 0);
    const uint32_t dst = (row * D + ((c16 ^ (row & 7)) * 8)) * 2;
    CpAsync16(k_base + dst, src, valid);
    CpAsync16(v_base + dst, src + (valid ? v_stride : 0), valid);
  }
}

// Fused append (DecodeParams::append_k): row b's new token of KV head kvh, K then V (D elements
// each), in 16-byte pieces spread over the lanes of one warp: piece i of the 2 * D / 8 is lane
// i % 32's tok[i / 32]. LoadToken issues the loads; StoreToken writes the pieces into slot `slot` of
// physical page `page` and syncs the warp, so the warp's later copies of that chunk read the token.
template <int D>
struct TokenPieces {
  static constexpr int kPieces = 2 * D / 8;
  static constexpr int kPerLane = (kPieces + 31) / 32;
  uint4 v[kPerLane];
};

// Lane's piece j of the token: whether it has one, and which (kv: 0 = K, 1 = V; c: its 16 bytes).
template <int D>
__device__ __forceinline__ bool TokenPiece(int j, int& kv, int& c) {
  constexpr int kHalf = D / 8;  // pieces of K (then as many of V)
  const int i = j * 32 + (threadIdx.x & 31);
  kv = i / kHalf;
  c = i % kHalf;
  return i < TokenPieces<D>::kPieces;
}

template <int D>
__device__ __forceinline__ void LoadToken(const DecodeParams& p, int b, int kvh, TokenPieces<D>& tok) {
#pragma unroll
  for (int j = 0; j < TokenPieces<D>::kPerLane; ++j) {
    int kv, c;
    if (TokenPiece<D>(j, kv, c)) {
      tok.v[j] = static_cast<const uint4*>(kv == 0 ? p.append_k : p.append_v)[(static_cast<int64_t>(b) * p.num_kv_heads + kvh) * (D / 8) + c];
    }
  }
}

template <int D>
__device__ __forceinline__ void StoreToken(const DecodeParams& p, int kvh, int32_t page, int slot, const TokenPieces<D>& tok) {
#pragma unroll
  for (int j = 0; j < TokenPieces<D>::kPerLane; ++j) {
    int kv, c;
    if (TokenPiece<D>(j, kv, c)) {
      static_cast<uint4*>(const_cast<void*>(p.kv))[(((static_cast<int64_t>(page) * 2 + kv) * p.num_kv_heads + kvh) * p.page_size + slot) * (D / 8) + c] = tok.v[j];
    }
  }
  __syncwarp();
}

// Sets up pages [page_begin, page_end) of row b for KV head kvh (offsets into the row's page list):
// loads Q and the page ids of the first stages and issues the first kStages - 1 chunks of every
// warp. Precondition: this warp's pipeline buffers are free (no chunk of an earlier range pending).
template <typename T, int D>
__device__ __forceinline__ void BeginRange(const DecodeParams& p, int b, int kvh, int page_begin, int page_end,
                                           char* smem, RangeState<D>& r) {
  constexpr int kStages = TileConfig<D>::kStages;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int row_first = p.page_indptr[b];
  const int row_pages = p.page_indptr[b + 1] - row_first;
  int n = (page_end - page_begin) * p.page_size;
  // With a fused append, the warp whose chunk holds the row's new token (the range's last) loads
  // it here, with Q's loads in flight, and writes it before it issues any copy.
  bool append = false;
  TokenPieces<D> tok;
  int32_t tok_page = 0;
  if (page_end > page_begin && page_end == row_pages) {
    n -= p.page_size - p.last_page_len[b];
    append = p.append_k != nullptr && warp == ((n - 1) / kChunk) % kWarps;
    if (append) {
      LoadToken<D>(p, b, kvh, tok);
      tok_page = p.page_indices[row_first + row_pages - 1];
    }
  }
  r.b = b;
  r.kvh = kvh;
  r.n = n;
  r.pages = p.page_indices + row_first + page_begin;
  const int num_chunks = (n + kChunk - 1) / kChunk;
  r.my_chunks = num_chunks > warp ? (num_chunks - warp + kWarps - 1) / kWarps : 0;
  // Q as A fragments: rows = query heads (rows >= G are zero), k = head dims.
  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.num_q_heads + kvh * G + gid) * D;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    r.qf[ks][0] = gid < G ? *reinterpret_cast<const uint32_t*>(q + ks * 16 + tig * 2) : 0u;
    r.qf[ks][1] = gid < G ? *reinterpret_cast<const uint32_t*>(q + ks * 16 + 8 + tig * 2) : 0u;
  }
  if (append) StoreToken<D>(p, kvh, tok_page, p.last_page_len[b] - 1, tok);
  int pg[kStages];  // the prologue's page ids, all loads in flight together
#pragma unroll
  for (int s = 0; s < kStages; ++s) pg[s] = s < r.my_chunks ? LoadPage<D>(p, r, warp + s * kWarps) : -1;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < r.my_chunks) IssueChunk<T, D>(p, r, smem, warp + s * kWarps, s, pg[s]);
    CpAsyncCommit();
  }
  r.pg_next = pg[kStages - 1];
}

// Runs this warp's chunks of the range begun by BeginRange: online softmax state (m in the log2
// domain, quad-uniform; l quad-reduced at the end; o unnormalised) for query head `gid`. Ends with
// every copy of the range complete, so the pipeline buffers are free again.
template <typename T, int D>
__device__ __forceinline__ void RunRange(const DecodeParams& p, char* smem, RangeState<D>& r, float& m_run,
                                         float& l_run, float (&o)[D / 8][2]) {
  using Cfg = TileConfig<D>;
  constexpr int kStages = Cfg::kStages;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int tig = lane & 3;
  const float scale_log2 = p.sm_scale * kLog2e;
  m_run = -INFINITY;
  l_run = 0.f;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = 0.f;
  const uint32_t pipe = WarpPipeAddr<D>(smem);

  for (int i = 0; i < r.my_chunks; ++i) {
    CpAsyncWait<kStages - 2>();
    __syncwarp();
    {
      const int nx = i + kStages - 1;
      if (nx < r.my_chunks) IssueChunk<T, D>(p, r, smem, warp + nx * kWarps, nx % kStages, r.pg_next);
      CpAsyncCommit();
      r.pg_next = nx + 1 < r.my_chunks ? LoadPage<D>(p, r, warp + (nx + 1) * kWarps) : -1;
    }
    const int st = i % kStages;
    const uint32_t k_base = pipe + st * Cfg::kStageElems * 2;
    const uint32_t v_base = k_base + Cfg::kTileElems * 2;
    const int tok0 = (warp + i * kWarps) * kChunk;

    // S = Q K^T for 16 tokens: two n-tiles of 8 tokens.
    float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int row = ((lane >> 4) << 3) + (lane & 7);
      const int cc = ks * 2 + ((lane >> 3) & 1);
      uint32_t b00, b01, b10, b11;
      Ldmatrix4(b00, b01, b10, b11, k_base + (row * D + ((cc ^ (row & 7)) * 8)) * 2);
      Elem<T>::Mma(s0[0], s0[1], r.qf[ks][0], r.qf[ks][1], b00, b01, s0[0], s0[1]);
      Elem<T>::Mma(s1[0], s1[1], r.qf[ks][0], r.qf[ks][1], b10, b11, s1[0], s1[1]);
    }
    float sc[4] = {s0[0] * scale_log2, s0[1] * scale_log2, s1[0] * scale_log2, s1[1] * scale_log2};
    const int lim = r.n - tok0;  // tokens valid in this chunk (>= 1)
    if (lim < kChunk) {
      if (tig * 2 >= lim) sc[0] = -INFINITY;
      if (tig * 2 + 1 >= lim) sc[1] = -INFINITY;
      if (8 + tig * 2 >= lim) sc[2] = -INFINITY;
      if (8 + tig * 2 + 1 >= lim) sc[3] = -INFINITY;
    }
    float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run, mx);  // finite: token 0 of the chunk is valid
    const float alpha = exp2f(m_run - m_new);
    float pr[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) pr[j] = exp2f(sc[j] - m_new);
    l_run = l_run * alpha + (pr[0] + pr[1]) + (pr[2] + pr[3]);
    m_run = m_new;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      o[nt][0] *= alpha;
      o[nt][1] *= alpha;
    }
    const uint32_t pa0 = Elem<T>::Pack(pr[0], pr[1]);
    const uint32_t pa2 = Elem<T>::Pack(pr[2], pr[3]);
    // O += P V: V^T fragments by transposed ldmatrix, two 8-dim n-tiles per load.
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      const int j = lane >> 3;
      const int row = ((j & 1) << 3) + (lane & 7);
      const int cc = np * 2 + (j >> 1);
      uint32_t v0, v1, v2, v3;
      Ldmatrix4Trans(v0, v1, v2, v3, v_base + (row * D + ((cc ^ (row & 7)) * 8)) * 2);
      Elem<T>::Mma(o[2 * np][0], o[2 * np][1], pa0, pa2, v0, v1, o[2 * np][0], o[2 * np][1]);
      Elem<T>::Mma(o[2 * np + 1][0], o[2 * np + 1][1], pa0, pa2, v2, v3, o[2 * np + 1][0],
                   o[2 * np + 1][1]);
    }
  }
  CpAsyncWait<0>();
  __syncwarp();  // every lane's reads of the stages are done before anyone refills them
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
}

// Writes this warp's state into the CTA merge area (its own rows; it does not alias the pipeline)
// and returns the view. The caller's __syncthreads makes all warps' states visible.
template <int D>
__device__ __forceinline__ MergeView<D> StashWarpState(char* smem, float m_run, float l_run,
                                                        const float (&o)[D / 8][2]) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  float* fsmem = reinterpret_cast<float*>(smem + TileConfig<D>::kPipeBytes);
  MergeView<D> view{fsmem, fsmem + kWarps * 8, fsmem + kWarps * 16};
  if (tig == 0) {
    view.m[warp * 8 + gid] = m_run;
    view.l[warp * 8 + gid] = l_run;
  }
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    *reinterpret_cast<float2*>(&view.o[(warp * 8 + gid) * D + nt * 8 + tig * 2]) = make_float2(o[nt][0], o[nt][1]);
  }
  return view;
}

// Single-range convenience: begin, run, stash, barrier.
template <typename T, int D>
__device__ __forceinline__ MergeView<D> AttendRange(const DecodeParams& p, int b, int kvh, int page_begin,
                                                    int page_end, char* smem) {
  RangeState<D> r;
  BeginRange<T, D>(p, b, kvh, page_begin, page_end, smem, r);
  float m_run, l_run, o[D / 8][2];
  RunRange<T, D>(p, smem, r, m_run, l_run, o);
  const MergeView<D> v = StashWarpState<D>(smem, m_run, l_run, o);
  __syncthreads();
  return v;
}

// Writes the final output (and lse) of heads kvh*G .. kvh*G+G-1 of row b from the merged view.
template <typename T, int D>
__device__ __forceinline__ void WriteFinal(const DecodeParams& p, int b, int kvh, const MergeView<D>& v) {
  const int G = p.num_q_heads / p.num_kv_heads;
  T* out = static_cast<T*>(p.out);
  T* out_copy = static_cast<T*>(p.out_copy);
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, dim = idx % D;
    const HeadResult r = v.Combine(g, dim);
    const int64_t h = static_cast<int64_t>(b) * p.num_q_heads + kvh * G + g;
    const T o = Elem<T>::FromFloat(r.o);
    out[h * D + dim] = o;
    if (out_copy != nullptr) out_copy[h * D + dim] = o;
    if (p.lse != nullptr && dim == 0) p.lse[h] = r.lse;
  }
}

// Writes a partial state of heads of group kvh into partial slot `slot` of the workspace.
template <int D>
__device__ __forceinline__ void WritePartial(const DecodeParams& p, int64_t slot, int kvh,
                                             const MergeView<D>& v, float* ws_lse, float* ws_o) {
  const int G = p.num_q_heads / p.num_kv_heads;
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, dim = idx % D;
    const HeadResult r = v.Combine(g, dim);
    const int64_t h = slot * p.num_q_heads + kvh * G + g;
    ws_o[h * D + dim] = r.o;
    if (dim == 0) ws_lse[h] = r.lse;
  }
}

// One warp merges `splits` partial slots (first_slot, first_slot + 1, ...) of query head h of row
// b exactly (log-sum-exp weights) and writes out (and lse). Lanes split the lse passes over the
// splits and then own D/32 dims each; the split loop is unrolled so its loads overlap.
// kL2Only: the partials were written by other CTAs of this launch (bypass L1).
template <typename T, int D, bool kL2Only>
__device__ __forceinline__ void MergeWarp(const DecodeParams& p, int b, int h, int64_t first_slot,
                                          int splits, const float* ws_lse, const float* ws_o) {
  constexpr int kPer = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t hq = p.num_q_heads;
  const float* lse = ws_lse + first_slot * hq + h;
  auto ld = [](const float* a) { return kL2Only ? __ldcg(a) : __ldg(a); };
  // Pass 1: online (max, sum of exp) over the splits, lanes strided, then a warp reduction.
  float mx = -INFINITY, sum = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float v = ld(lse + s * hq);
    if (v == -INFINITY) continue;
    const float nm = fmaxf(mx, v);
    sum = sum * __expf(mx - nm) + __expf(v - nm);
    mx = nm;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, mx, o);
    const float os = __shfl_xor_sync(0xffffffffu, sum, o);
    const float nm = fmaxf(mx, om);
    if (nm != -INFINITY) sum = sum * __expf(mx - nm) + os * __expf(om - nm);
    mx = nm;
  }
  // Pass 2: lanes own kPer dims; 32 splits at a time, each lane holding one split's weight, the
  // loads of 8 splits in flight together.
  float acc[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) acc[j] = 0.f;
  if (sum > 0.f) {
    const float inv = 1.f / sum;
    const float* o = ws_o + (first_slot * hq + h) * D + lane * kPer;
    for (int c0 = 0; c0 < splits; c0 += 32) {
      const int mine = c0 + lane;
      const float w_mine = mine < splits ? __expf(ld(lse + mine * hq) - mx) * inv : 0.f;
      const int cnt = min(32, splits - c0);
#pragma unroll 8
      for (int j = 0; j < cnt; ++j) {
        const float w = __shfl_sync(0xffffffffu, w_mine, j);
        const float* os = o + static_cast<int64_t>(c0 + j) * hq * D;
        if constexpr (kPer == 2) {
          const float2 v = kL2Only ? __ldcg(reinterpret_cast<const float2*>(os)) : __ldg(reinterpret_cast<const float2*>(os));
          acc[0] += w * v.x;
          acc[1] += w * v.y;
        } else {
#pragma unroll
          for (int q = 0; q < kPer; q += 4) {
            const float4 v = kL2Only ? __ldcg(reinterpret_cast<const float4*>(os + q))
                                     : __ldg(reinterpret_cast<const float4*>(os + q));
            acc[q] += w * v.x;
            acc[q + 1] += w * v.y;
            acc[q + 2] += w * v.z;
            acc[q + 3] += w * v.w;
          }
        }
      }
    }
  }
  const int64_t oh = static_cast<int64_t>(b) * hq + h;
  T* out = static_cast<T*>(p.out) + oh * D + lane * kPer;
#pragma unroll
  for (int j = 0; j < kPer; ++j) out[j] = Elem<T>::FromFloat(acc[j]);
  if (p.out_copy != nullptr) {
    T* out_copy = static_cast<T*>(p.out_copy) + oh * D + lane * kPer;
#pragma unroll
    for (int j = 0; j < kPer; ++j) out_copy[j] = Elem<T>::FromFloat(acc[j]);
  }
  if (p.lse != nullptr && lane == 0) p.lse[oh] = sum > 0.f ? mx + __logf(sum) : -INFINITY;
}

}  // namespace pkv::kernels::cuda::internal
