// bench/flashinfer_decode_bf16.cu — FlashInfer's CUDA-core decode path, bf16 (one instantiation set per TU so that
// the four compile in parallel). See bench/flashinfer/internal/flashinfer_paths.cuh.
#include "bench/flashinfer/internal/flashinfer_paths.cuh"

namespace pkv::bench::fi_internal {

std::string DecodePlanBF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream) {
  return DecodePlan<__nv_bfloat16>(ws, in, plan, stream);
}

std::string DecodeRunBF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl, void* stream) {
  return DecodeRun<__nv_bfloat16>(ws, plan, p, enable_pdl, stream);
}

}  // namespace pkv::bench::fi_internal
