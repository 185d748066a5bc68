// bench/flashinfer_decode_f16.cu — FlashInfer's CUDA-core decode path, f16 (one instantiation set per TU so that
// the four compile in parallel). See bench/flashinfer/internal/flashinfer_paths.cuh.
#include "bench/flashinfer/internal/flashinfer_paths.cuh"

namespace pkv::bench::fi_internal {

std::string DecodePlanF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream) {
  return DecodePlan<__half>(ws, in, plan, stream);
}

std::string DecodeRunF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl, void* stream) {
  return DecodeRun<__half>(ws, plan, p, enable_pdl, stream);
}

}  // namespace pkv::bench::fi_internal
