// bench/flashinfer/internal/flashinfer_paths.h — plain-C++ entry points of the FlashInfer instantiations.
//
// Private to bench/flashinfer/flashinfer_arm.cc: each bench/flashinfer/flashinfer_{decode,prefill}_{f16,bf16}.cu
// instantiates one FlashInfer path for one dtype (head_dim 128, page size any, G in FlashInfer's
// dispatch set {1,2,3,4,6,8,16}) through bench/flashinfer/internal/flashinfer_paths.cuh and exposes it here
// with no FlashInfer or CUDA types. Every function returns "" on success, else the error text
// (FlashInfer's exceptions and CUDA errors are caught in the .cu). Not thread-safe per workspace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pkv::bench::fi_internal {

inline constexpr int kHeadDim = 128;  // the one head_dim instantiated

// FlashInfer's plan buffers (allocated once by the arm).
struct Workspace {
  void* float_buf = nullptr;  // device
  size_t float_bytes = 0;
  void* int_buf = nullptr;    // device
  size_t int_bytes = 0;
  void* pinned_int = nullptr; // page-locked host, int_bytes
};

// FlashInfer's DecodePlanInfo / PrefillPlanInfo as their ToVector() integers.
struct PlanInfo {
  int64_t v[16] = {};
  int32_t n = 0;
  bool split_kv = false;
};

// One layer of one token step on our pool layout.
struct Problem {
  int32_t batch = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t page_size = 0;
  float sm_scale = 0.f;
  const void* q = nullptr;                 // [B, Hq, d]
  const void* kv = nullptr;                // [num_pages][2 (K, V)][Hkv][P][d]
  const int32_t* page_indptr = nullptr;    // device [B + 1]
  const int32_t* page_indices = nullptr;   // device
  const int32_t* last_page_len = nullptr;  // device [B]
  const int32_t* qo_indptr = nullptr;      // device [B + 1] = 0..B (prefill path only)
  void* out = nullptr;                     // [B, Hq, d]
  float* lse = nullptr;                    // [B, Hq] base-2 (FlashInfer's convention) or null
};

// Plan inputs: the token step's host page-table indptr [B + 1] (and 0..B for the prefill path).
struct PlanInput {
  int32_t batch = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t page_size = 0;
  const int32_t* page_indptr_host = nullptr;
  const int32_t* qo_indptr_host = nullptr;  // prefill path only
};

std::string DecodePlanF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream);
std::string DecodeRunF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl,
                          void* stream);
std::string DecodePlanBF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream);
std::string DecodeRunBF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl,
                          void* stream);
std::string PrefillPlanF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream);
std::string PrefillRunF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl,
                          void* stream);
std::string PrefillPlanBF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream);
std::string PrefillRunBF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl,
                          void* stream);

}  // namespace pkv::bench::fi_internal
