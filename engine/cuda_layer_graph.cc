// engine/cuda_layer_graph.cc — capture, update/instantiate, per-layer patching and replay of a
// slot's layer graph (engine/cuda_layer_graph.h).
#include "engine/cuda_layer_graph.h"

#include <utility>

#include "common/log.h"
#include "kernels/cuda/launch_args.h"
#include "kvpool/cuda/append_kv.h"

namespace pkv::engine {
namespace {

int32_t BatchBucket(int32_t b) {
  int32_t bucket = 1;
  while (bucket < b) bucket *= 2;
  return bucket;
}

}  // namespace

CudaLayerGraph::CudaLayerGraph(CudaSlot* slot, int32_t slot_id) : slot_(slot), slot_id_(slot_id) {
  // One executable per (batch bucket, route, lse) at most; reserved so the step path never grows
  // the vector.
  graphs_.reserve(kMaxGraphs);
}

bool CudaLayerGraph::Launch(int32_t layer, bool has_lse, bool* replayed) {
  *replayed = false;
  if (off_) return false;
  if (absl::Status st = Run(layer, has_lse, replayed); !st.ok()) {
    // Once per slot: this slot runs eagerly from now on.
    PKV_LOG(WARNING) << "cuda backend slot " << slot_id_ << ": CUDA graph replay failed (" << st
                     << "); falling back to eager launches";
    off_ = true;
    *replayed = false;
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

absl::Status CudaLayerGraph::Run(int32_t layer, bool has_lse, bool* replayed) {
  if (step_graph_ >= 0 && graphs_[step_graph_].lse != has_lse) step_graph_ = -1;
  if (step_graph_ < 0) {
    if (absl::Status st = CaptureStep(layer, has_lse); !st.ok()) return st;
  } else {
    *replayed = true;
    if (absl::Status st = PatchLayer(layer, has_lse); !st.ok()) return st;
  }
  PKV_CUDA_RETURN(cudaGraphLaunch(graphs_[step_graph_].exec.get(), slot_->stream()), "graph launch");
  ++launches_;
  return absl::OkStatus();
}

absl::Status CudaLayerGraph::WalkChain(cudaGraph_t graph, Chain& chain, int32_t* len) {
  size_t n = 1;
  cudaGraphNode_t node = nullptr;
  PKV_CUDA_RETURN(cudaGraphGetRootNodes(graph, &node, &n), "graph roots");
  if (n != 1) return absl::InternalError("cuda backend: captured layer is not one chain");
  *len = 0;
  while (node != nullptr) {
    if (*len >= kMaxChain) return absl::InternalError("cuda backend: captured layer has too many nodes");
    chain[(*len)++] = node;
    size_t deps = 1;
    cudaGraphNode_t next = nullptr;
    PKV_CUDA_RETURN(cudaGraphNodeGetDependentNodes(node, &next, nullptr, &deps), "graph dependents");
    if (deps > 1) return absl::InternalError("cuda backend: captured layer branches");
    node = deps == 1 ? next : nullptr;
  }
  return absl::OkStatus();
}

absl::Status CudaLayerGraph::CaptureStep(int32_t layer, bool has_lse) {
  cudaStream_t stream = slot_->stream();
  PKV_CUDA_RETURN(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  const absl::Status enq = slot_->EnqueueLayer(layer, has_lse, /*capturing=*/true);
  cudaGraph_t raw = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &raw);
  internal::CudaGraph captured(raw);  // freed on return unless an entry takes it over
  if (!enq.ok() || end != cudaSuccess) return enq.ok() ? internal::CudaStatus(end, "end capture") : enq;
  Chain chain{};
  int32_t len = 0;
  if (absl::Status st = WalkChain(captured.get(), chain, &len); !st.ok()) return st;
  int32_t entry = -1;
  if (absl::Status st = UpdateOrInstantiate(captured, chain, len, has_lse, &entry); !st.ok()) return st;

  // The kernel nodes whose arguments depend on the layer: the append (the first kernel the slot
  // enqueues) and the attention launch(es). Their launch configuration comes from this capture
  // (alive here either way); their arguments are rebuilt per layer (PatchLayer).
  num_step_kernels_ = 0;
  for (int32_t i = 0; i < len; ++i) {
    cudaGraphNodeType type;
    PKV_CUDA_RETURN(cudaGraphNodeGetType(chain[i], &type), "node type");
    if (type != cudaGraphNodeTypeKernel) continue;
    if (num_step_kernels_ >= kMaxKernelNodes) return absl::InternalError("cuda backend: too many kernels");
    StepKernel& k = step_kernels_[num_step_kernels_];
    k.chain_index = i;
    PKV_CUDA_RETURN(cudaGraphKernelNodeGetParams(chain[i], &k.node), "kernel node params");
    k.node.kernelParams = nullptr;  // points into the capture; PatchNode supplies the arguments
    k.node.extra = nullptr;
    ++num_step_kernels_;
  }
  if (num_step_kernels_ < 2) return absl::InternalError("cuda backend: captured layer lacks its kernels");
  step_graph_ = entry;
  return absl::OkStatus();
}

absl::Status CudaLayerGraph::UpdateOrInstantiate(internal::CudaGraph& captured, const Chain& chain, int32_t len,
                                                 bool has_lse, int32_t* entry) {
  const int32_t bucket = BatchBucket(slot_->batch());
  const KernelId kernel = slot_->kernel();
  *entry = -1;
  for (int32_t i = 0; i < static_cast<int32_t>(graphs_.size()); ++i) {
    const GraphEntry& g = graphs_[i];
    if (g.bucket == bucket && g.kernel == kernel && g.chain_len == len && g.lse == has_lse) *entry = i;
  }
  if (*entry < 0) {
    if (graphs_.size() >= kMaxGraphs) return absl::ResourceExhaustedError("cuda backend: graph cache of the slot is full");
    GraphEntry g;
    g.bucket = bucket;
    g.kernel = kernel;
    g.chain_len = len;
    g.lse = has_lse;
    g.chain = chain;
    cudaGraphExec_t exec = nullptr;
    PKV_CUDA_RETURN(cudaGraphInstantiate(&exec, captured.get(), 0), "graph instantiate");
    g.exec.reset(exec);
    g.graph = std::move(captured);
    graphs_.push_back(std::move(g));
    ++instantiations_;
    *entry = static_cast<int32_t>(graphs_.size()) - 1;
    PKV_LOG(INFO) << "cuda backend slot " << slot_id_ << ": captured a CUDA graph for " << KernelName(kernel)
                  << " batch bucket " << bucket << " (" << len << " nodes)";
    return absl::OkStatus();
  }
  GraphEntry& g = graphs_[*entry];
  cudaGraphExecUpdateResultInfo info{};
  if (cudaGraphExecUpdate(g.exec.get(), captured.get(), &info) == cudaSuccess) return absl::OkStatus();
  // Not updatable (e.g. the route switched kernel template between steps): instantiate this
  // step's capture in its place.
  (void)cudaGetLastError();
  g.exec.reset();
  g.graph = std::move(captured);
  g.chain = chain;
  cudaGraphExec_t exec = nullptr;
  if (cudaError_t e = cudaGraphInstantiate(&exec, g.graph.get(), 0); e != cudaSuccess) {
    g.graph.reset();
    g.bucket = -1;  // unusable entry
    return internal::CudaStatus(e, "graph instantiate");
  }
  g.exec.reset(exec);
  ++instantiations_;
  return absl::OkStatus();
}

absl::Status CudaLayerGraph::PatchLayer(int32_t layer, bool has_lse) {
  const GraphEntry& g = graphs_[step_graph_];
  kvpool::cuda::AppendKvArgs append(slot_->AppendParams(layer));
  kernels::cuda::LaunchArgs attention(slot_->kernel(), slot_->LayerParams(layer, has_lse), slot_->workspace());
  for (int32_t k = 0; k < num_step_kernels_; ++k) {
    const StepKernel& sk = step_kernels_[k];
    const cudaKernelNodeParams node = k == 0 ? append.PatchNode(sk.node) : attention.PatchNode(sk.node);
    PKV_CUDA_RETURN(cudaGraphExecKernelNodeSetParams(g.exec.get(), g.chain[sk.chain_index], &node),
                    "kernel node update");
  }
  return absl::OkStatus();
}

}  // namespace pkv::engine
