// kernels/cuda/layer_graph.h — one decode layer-step as a CUDA graph: the upload of the layer's
// staged q|k|v (a copy from pinned host memory into device memory), then the attention launch of
// a single-launch plan. Captured once per token step (Capture) and launched once per layer
// (Launch), with that layer's DecodeParams (its KV layer, outputs, appended token) written into
// the attention node. The eager path issues two runtime calls per layer-step (cudaMemcpyAsync,
// then the launch), and the kernel cannot start before the second has returned; a graph is one
// call, and its kernel starts when its copy ends. On an H200 host this saved about 2 us of a
// 25 us layer-step round trip for uploads of 6-12 KiB and lost for 48 KiB and more (the graph's
// copy node is slower there), so callers use it for small uploads only (kMaxUploadBytes).
// Thread-safety: none; one LayerGraph belongs to one stream's owner.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>

#include "absl/status/status.h"
#include "common/decode_types.h"
#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda {

class LayerGraph {
 public:
  // Uploads larger than this stay eager (see the file comment).
  static constexpr size_t kMaxUploadBytes = 24 * 1024;

  LayerGraph();
  ~LayerGraph();
  LayerGraph(const LayerGraph&) = delete;
  LayerGraph& operator=(const LayerGraph&) = delete;

  // Captures on `stream` a copy of `bytes` from `src` (pinned host memory) to `dst` (device
  // memory) followed by `kernel`'s launch of `params` with `workspace` (kernels::cuda::Launch,
  // merge fused, not as a programmatic dependent), replacing what an earlier Capture held.
  // FAILED_PRECONDITION when the route needs more than one launch for `params`; on any error
  // nothing stays captured (captured() is false). `stream` must not be capturing already.
  [[nodiscard]] absl::Status Capture(KernelId kernel, const DecodeParams& params, void* workspace, void* dst,
                                     const void* src, size_t bytes, cudaStream_t stream);

  // Launches the captured graph on `stream` with `params` in the attention node. `params` must
  // describe the captured plan (the same route, batch, page table, splits and task list); what
  // may differ per layer: kv, q, out, out_copy, lse, append_k, append_v. The workspace is the
  // captured one. Precondition: captured().
  [[nodiscard]] absl::Status Launch(const DecodeParams& params, cudaStream_t stream);

  bool captured() const;
  // Drops the captured graph (captured() becomes false).
  void Reset();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace pkv::kernels::cuda
