// bench/flashinfer/flashinfer_arm.h — FlashInfer's paged decode on our KV pool, for side-by-side benchmarks.
//
// A FlashInferArm runs one of FlashInfer's two decode paths (built only with
// PKV_WITH_FLASHINFER, headers from bench/flashinfer/fetch_headers.sh) on the layout of
// kernels/decode_attention.h — one layer [num_pages][2 (K, V)][Hkv][P][d], CSR page table — with
// no repacking (FlashInfer's HND paged KV with explicit strides):
//   kDecode   CUDA-core BatchDecodeWithPagedKVCache, split-KV as its planner decides;
//   kPrefill  tensor-core decode as FlashInfer's Python API runs it with use_tensor_cores=True
//             (the batch prefill kernel, one query row per request).
// As FlashInfer's users do: Plan once per token step on the host (FlashInfer's planner; it
// enqueues the plan upload on the stream), then Run every layer with that plan. The plan's
// workspace (float and int device buffers and the page-locked host buffer) is allocated once in
// Create; Plan and Run allocate nothing. Supported: fp16/bf16, head_dim 128, G = Hq/Hkv in
// {1, 2, 3, 4, 6, 8, 16}, any page size; CanImplement names the field otherwise (UNIMPLEMENTED).
// lse, when requested, is FlashInfer's base-2 log-sum-exp (multiply by ln 2 for ours).
// No FlashInfer or CUDA types here: streams are `void*` (a cudaStream_t).
// Thread-safety: one arm per thread; Plan and Run must use the same stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "kernels/decode_attention.h"

namespace pkv::bench {

enum class FlashInferPath : uint8_t {
  kDecode = 0,   // CUDA cores: BatchDecodeWithPagedKVCache
  kPrefill = 1,  // tensor cores: BatchPrefillWithPagedKVCache with qo_len 1 per row
};

// "fi_decode" / "fi_prefill": the benchmark labels.
const char* FlashInferPathName(FlashInferPath path);

class FlashInferArm {
 public:
  struct Options {
    FlashInferPath path = FlashInferPath::kDecode;
    DType dtype = DType::kF16;
    int32_t num_q_heads = 0;
    int32_t num_kv_heads = 0;
    int32_t head_dim = 0;
    int32_t page_size = 0;
    int32_t max_batch = 1024;                        // qo_indptr 0..B is built once for this many rows
    size_t float_workspace_bytes = size_t{128} << 20;  // FlashInfer's Python default
    size_t int_workspace_bytes = size_t{8} << 20;      // FlashInfer's Python default (and the pinned buffer)
    // Programmatic dependent launch, as FlashInfer's Python API enables by default on sm_90+;
    // -1: that default (on when the device's compute capability >= 9), 0 off, 1 on.
    int enable_pdl = -1;
  };

  // OK when the instantiated kernels cover the shape; UNIMPLEMENTED naming the field otherwise.
  static absl::Status CanImplement(const Options& options);
  // Allocates the workspace (device float + int buffers, pinned host buffer, qo_indptr).
  static absl::StatusOr<std::unique_ptr<FlashInferArm>> Create(const Options& options);
  ~FlashInferArm();
  FlashInferArm(const FlashInferArm&) = delete;
  FlashInferArm& operator=(const FlashInferArm&) = delete;

  // FlashInfer's planner for one token step: `page_indptr_host` is the step's CSR indptr [B + 1]
  // (host). Runs on the host and enqueues the plan's upload on `stream`. Waits first for the
  // previous plan's upload to have left the pinned buffer.
  [[nodiscard]] absl::Status Plan(std::span<const int32_t> page_indptr_host, void* stream);

  // Enqueues one layer with the last plan. `params`: device pointers, the planned batch, the
  // shape of Options; num_splits / tasks are ignored (FlashInfer plans its own split-KV).
  [[nodiscard]] absl::Status Run(const kernels::DecodeParams& params, void* stream);

  const Options& options() const { return options_; }
  bool planned_split_kv() const;  // the last plan split rows' KV (and merges)
  bool pdl() const { return pdl_; }

 private:
  struct State;
  explicit FlashInferArm(const Options& options);

  Options options_;
  bool pdl_ = false;
  std::unique_ptr<State> state_;
};

}  // namespace pkv::bench
