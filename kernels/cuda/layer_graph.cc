// kernels/cuda/layer_graph.cc — see layer_graph.h.
#include "kernels/cuda/layer_graph.h"

#include <cuda_runtime.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/cuda/internal/launchers.h"

namespace pkv::kernels::cuda {

struct LayerGraph::State {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaGraphNode_t attention = nullptr;  // the kernel node, in `graph` (and its twin in `exec`)
  cudaKernelNodeParams node{};          // function, grid, block and shared memory of that node
  DecodeParams params;                  // the arguments Launch writes into the node
  internal::Workspace ws{};
  void* args[2] = {nullptr, nullptr};
  bool captured = false;
};

namespace {

absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat("layer graph: ", what, ": ", cudaGetErrorString(e)));
}

}  // namespace

LayerGraph::LayerGraph() : s_(std::make_unique<State>()) {}

LayerGraph::~LayerGraph() {
  if (s_->exec != nullptr) cudaGraphExecDestroy(s_->exec);
  if (s_->graph != nullptr) cudaGraphDestroy(s_->graph);
}

bool LayerGraph::captured() const { return s_->captured; }

void LayerGraph::Reset() {
  s_->captured = false;
  if (s_->exec != nullptr) cudaGraphExecDestroy(s_->exec);
  s_->exec = nullptr;
  if (s_->graph != nullptr) cudaGraphDestroy(s_->graph);
  s_->graph = nullptr;
  s_->attention = nullptr;
}

absl::Status LayerGraph::Capture(KernelId kernel, const DecodeParams& params, void* workspace, void* dst,
                                 const void* src, size_t bytes, cudaStream_t stream) {
  Reset();
  if (LaunchesPerCall(kernel, params, MergeMode::kFused) != 1) {
    return absl::FailedPreconditionError("layer graph: the plan needs more than one launch");
  }
  if (cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal); e != cudaSuccess) {
    return CudaError(e, "begin capture");
  }
  cudaError_t copied = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream);
  absl::Status launched = absl::OkStatus();
  if (copied == cudaSuccess) {
    // A programmatic dependent cannot follow a copy node: the captured launch is a plain one.
    internal::g_plain_launch = true;
    launched = cuda::Launch(kernel, params, workspace, stream, MergeMode::kFused);
    internal::g_plain_launch = false;
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);  // always ends the capture
  if (copied != cudaSuccess || !launched.ok() || ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (copied != cudaSuccess) return CudaError(copied, "capture the upload");
    if (!launched.ok()) return launched;
    return CudaError(ended, "end capture");
  }
  s_->graph = graph;
  // The one kernel node: the attention.
  size_t num_nodes = 0;
  cudaGraphGetNodes(graph, nullptr, &num_nodes);
  cudaGraphNode_t nodes[4];
  if (num_nodes != 2 || cudaGraphGetNodes(graph, nodes, &num_nodes) != cudaSuccess) {
    Reset();
    return absl::InternalError(absl::StrCat("layer graph: captured ", num_nodes, " nodes, expected a copy and a kernel"));
  }
  for (size_t i = 0; i < num_nodes; ++i) {
    cudaGraphNodeType type;
    if (cudaGraphNodeGetType(nodes[i], &type) == cudaSuccess && type == cudaGraphNodeTypeKernel) s_->attention = nodes[i];
  }
  if (s_->attention == nullptr) {
    Reset();
    return absl::InternalError("layer graph: no kernel node captured");
  }
  if (cudaError_t e = cudaGraphKernelNodeGetParams(s_->attention, &s_->node); e != cudaSuccess) {
    Reset();
    return CudaError(e, "read the kernel node");
  }
  // The route kernels take (DecodeParams) for per-request, (DecodeParams, Workspace) otherwise
  // (kernels/cuda/internal/route_kernels.cuh); the workspace is carved as Launch carves it.
  s_->ws = internal::CarveWorkspace(workspace, params, internal::PartialSlots(kernel, params));
  s_->params = params;
  s_->args[0] = &s_->params;
  s_->args[1] = &s_->ws;
  s_->node.kernelParams = s_->args;
  s_->node.extra = nullptr;
  // A new executable per token step (a few microseconds, once per token step): the node handles
  // Launch writes through are those of the graph it was instantiated from.
  if (s_->exec != nullptr) cudaGraphExecDestroy(s_->exec);
  s_->exec = nullptr;
  if (cudaError_t e = cudaGraphInstantiate(&s_->exec, graph, 0); e != cudaSuccess) {
    s_->exec = nullptr;
    Reset();
    return CudaError(e, "instantiate");
  }
  s_->captured = true;
  return absl::OkStatus();
}

absl::Status LayerGraph::Launch(const DecodeParams& params, cudaStream_t stream) {
  if (!s_->captured) return absl::FailedPreconditionError("layer graph: nothing captured");
  s_->params = params;
  // The node's arguments are copied by this call: s_->params may change after it.
  if (cudaError_t e = cudaGraphExecKernelNodeSetParams(s_->exec, s_->attention, &s_->node); e != cudaSuccess) {
    return CudaError(e, "set the layer's arguments");
  }
  if (cudaError_t e = cudaGraphLaunch(s_->exec, stream); e != cudaSuccess) return CudaError(e, "launch");
  return absl::OkStatus();
}

}  // namespace pkv::kernels::cuda
