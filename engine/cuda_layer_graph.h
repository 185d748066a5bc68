// engine/cuda_layer_graph.h — LaunchMode::kGraph for one descriptor slot: a layer's launch
// sequence as a CUDA graph, captured, instantiated and replayed.
//
// A token step's first layer stream-captures the slot's launch sequence (CudaSlot::EnqueueLayer:
// q|k|v upload, append, attention launch(es), out download, timing events) and updates the slot's
// executable graph for the step's (batch-size bucket, route, lse) with cudaGraphExecUpdate, or
// instantiates one the first time (and when the executable is not updatable). Every later layer of
// the step only re-points the kernel nodes at its layer — the append through
// kvpool::cuda::AppendKvArgs, the attention through kernels::cuda::LaunchArgs, so this file knows
// no kernel's argument list — and launches the graph. A failure of any of that logs one warning
// and turns graph launches off for the slot for good; the backend then launches eagerly.
// Executables are cached per slot (at most kMaxGraphs, reserved up front) and destroyed with it.
// Thread-safety: none inside; called only with its slot (engine/cuda_slot.h), from one thread at a
// time.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/decode_types.h"
#include "engine/cuda_slot.h"
#include "engine/internal/cuda_handles.h"

namespace pkv::engine {

class CudaLayerGraph {
 public:
  // `slot` (not owned) outlives this object; `slot_id` names it in log lines.
  CudaLayerGraph(CudaSlot* slot, int32_t slot_id);
  CudaLayerGraph(const CudaLayerGraph&) = delete;
  CudaLayerGraph& operator=(const CudaLayerGraph&) = delete;

  // Enqueues layer `layer` of the slot's open token step (inputs staged with
  // CudaSlot::StageInputs; `has_lse`: download lse too) as one graph launch on the slot's stream.
  // True when launched; `*replayed` then says whether the layer only patched and launched (no
  // capture). False when graph launches are off for the slot, or this one failed (then it logged a
  // warning, cleared the CUDA error and turned them off): nothing of the layer runs and the caller
  // enqueues it eagerly (CudaSlot::EnqueueLayer).
  [[nodiscard]] bool Launch(int32_t layer, bool has_lse, bool* replayed);

  // The slot's token step ended: the next one captures and updates its graph first.
  void EndTokenStep() { step_graph_ = -1; }

  int64_t launches() const { return launches_; }              // graph launches so far
  int64_t instantiations() const { return instantiations_; }  // executables built so far

 private:
  // Most nodes of a layer's captured chain: h2d_start event, upload, h2d_done event, append,
  // start event, <= 2 attention launches, stop event, download, d2h_done event.
  static constexpr int kMaxChain = 10;
  static constexpr size_t kMaxGraphs = 64;  // executables per slot: (bucket, route, lse) at most
  static constexpr int kMaxKernelNodes = 3;  // append + <= 2 attention launches
  using Chain = std::array<cudaGraphNode_t, kMaxChain>;

  struct GraphEntry {
    int32_t bucket = -1;  // batch-size bucket (next power of two); -1: unusable
    KernelId kernel = KernelId::kPerRequest;
    int32_t chain_len = 0;
    bool lse = false;
    internal::CudaGraph graph;  // instantiated from; its nodes address the exec's nodes
    internal::CudaGraphExec exec;
    Chain chain{};
  };
  // A kernel node of the open token step's capture: where it sits in the chain and its launch
  // configuration (function, grid, block, shared memory); its arguments are rebuilt per layer.
  struct StepKernel {
    int32_t chain_index = 0;
    cudaKernelNodeParams node{};
  };

  // Walks a captured graph's single chain (stream capture of one stream is linear).
  static absl::Status WalkChain(cudaGraph_t graph, Chain& chain, int32_t* len);

  absl::Status Run(int32_t layer, bool has_lse, bool* replayed);
  // Captures layer `layer`, updates or instantiates the matching entry, records its kernel nodes.
  absl::Status CaptureStep(int32_t layer, bool has_lse);
  // Updates the entry matching this capture to it, or instantiates a new entry (or a not
  // updatable one) from it, taking `captured` over; `*entry` is its index. An updated entry leaves
  // `captured` with the caller, whose kernel nodes it then reads.
  absl::Status UpdateOrInstantiate(internal::CudaGraph& captured, const Chain& chain, int32_t len, bool has_lse,
                                   int32_t* entry);
  // Re-points the step's kernel nodes in its executable at layer `layer`.
  absl::Status PatchLayer(int32_t layer, bool has_lse);

  CudaSlot* slot_;
  int32_t slot_id_;
  std::vector<GraphEntry> graphs_;  // capacity kMaxGraphs, reserved at construction
  int32_t step_graph_ = -1;         // entry of the open token step; -1: not updated yet
  std::array<StepKernel, kMaxKernelNodes> step_kernels_{};  // [0] the append, then attention
  int32_t num_step_kernels_ = 0;
  bool off_ = false;  // a graph failed: eager from now on
  int64_t launches_ = 0, instantiations_ = 0;
};

}  // namespace pkv::engine
