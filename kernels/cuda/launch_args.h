// kernels/cuda/launch_args.h — the kernel arguments of Launch(), for re-pointing a captured CUDA
// graph at other DecodeParams without recapturing it.
//
// A CUDA graph that stream-captured Launch(kernel, params, workspace, stream, merge) holds one kernel
// node per launch of the route (the attention kernel, and the merge kernel with
// MergeMode::kSeparate). To replay that graph for the next layer only those nodes' arguments
// change. LaunchArgs builds the argument list Launch gives every kernel of the route and writes it
// into a captured node's params, ready for cudaGraphExecKernelNodeSetParams; which arguments a
// route's kernels take, and in which order, stays private to kernels/cuda.
//
// Valid only while the new params keep what the captured node baked in: the same route, dtype,
// head_dim, Hq/Hkv, page size, batch, num_splits, num_tasks and num_partials (grid and workspace
// carve-up), and the same workspace. Device pointers (q, kv, out, lse, the page table, the task
// list) and sm_scale may change; so may lse between null and set (the same kernel handles both).
// Thread-safety: a LaunchArgs is a plain value owned by one thread; it holds no CUDA resource.
#pragma once

#include <cuda_runtime_api.h>

#include "common/decode_types.h"
#include "kernels/cuda/internal/launchers.h"
#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda {

class LaunchArgs {
 public:
  // The arguments Launch(kernel, params, workspace, ...) passes to each kernel it launches.
  LaunchArgs(KernelId kernel, const DecodeParams& params, void* workspace);
  // Not copyable or movable: PatchNode's result points into this object.
  LaunchArgs(const LaunchArgs&) = delete;
  LaunchArgs& operator=(const LaunchArgs&) = delete;

  // `captured` (cudaGraphKernelNodeGetParams of a node captured from a Launch of the same route and
  // shape, see the file comment) with its arguments replaced by these: same function, grid, block
  // and shared memory. The result's kernelParams point into *this, which must outlive the
  // cudaGraphExecKernelNodeSetParams (or cudaGraphKernelNodeSetParams) call that consumes them;
  // that call copies the arguments.
  cudaKernelNodeParams PatchNode(const cudaKernelNodeParams& captured);

 private:
  DecodeParams params_;
  internal::Workspace workspace_;
  int num_args_;  // 1: (DecodeParams); 2: (DecodeParams, Workspace)
  void* args_[2] = {nullptr, nullptr};
};

}  // namespace pkv::kernels::cuda
