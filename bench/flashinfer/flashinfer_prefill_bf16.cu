// bench/flashinfer_prefill_bf16.cu — FlashInfer's tensor-core decode path (the batch prefill kernel), bf16 (one instantiation set per TU so that
// the four compile in parallel). See bench/flashinfer/internal/flashinfer_paths.cuh.
#include "bench/flashinfer/internal/flashinfer_paths.cuh"

namespace pkv::bench::fi_internal {

std::string PrefillPlanBF16(const Workspace& ws, const PlanInput& in, PlanInfo* plan, void* stream) {
  return PrefillPlan<__nv_bfloat16>(ws, in, plan, stream);
}

std::string PrefillRunBF16(const Workspace& ws, const PlanInfo& plan, const Problem& p, bool enable_pdl, void* stream) {
  return PrefillRun<__nv_bfloat16>(ws, plan, p, enable_pdl, stream);
}

}  // namespace pkv::bench::fi_internal
