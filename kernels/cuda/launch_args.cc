// kernels/cuda/launch_args.cc — the argument lists of the route kernels
// (kernels/cuda/internal/route_kernels.cuh): PerRequestKernel(DecodeParams); SequenceSplitKernel,
// WorkQueueKernel and MergeKernel(DecodeParams, Workspace), the workspace carved as Launch carves it.
#include "kernels/cuda/launch_args.h"

namespace pkv::kernels::cuda {

LaunchArgs::LaunchArgs(KernelId kernel, const DecodeParams& params, void* workspace)
    : params_(params),
      workspace_(internal::CarveWorkspace(workspace, params, internal::PartialSlots(kernel, params))),
      num_args_(kernel == KernelId::kPerRequest ? 1 : 2) {}

cudaKernelNodeParams LaunchArgs::PatchNode(const cudaKernelNodeParams& captured) {
  args_[0] = &params_;
  args_[1] = num_args_ == 2 ? static_cast<void*>(&workspace_) : nullptr;
  cudaKernelNodeParams node = captured;
  node.kernelParams = args_;
  node.extra = nullptr;
  return node;
}

}  // namespace pkv::kernels::cuda
