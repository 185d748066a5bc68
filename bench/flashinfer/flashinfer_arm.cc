// bench/flashinfer/flashinfer_arm.cc — FlashInferArm: workspace, checks and dispatch to the instantiations.
#include "bench/flashinfer/flashinfer_arm.h"

#include <cuda_runtime_api.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "bench/flashinfer/internal/flashinfer_paths.h"

namespace pkv::bench {

namespace fi = fi_internal;

const char* FlashInferPathName(FlashInferPath path) {
  return path == FlashInferPath::kDecode ? "fi_decode" : "fi_prefill";
}

struct FlashInferArm::State {
  fi::Workspace ws;
  fi::PlanInfo plan;
  int32_t planned_batch = -1;
  int32_t* qo_indptr_device = nullptr;  // [max_batch + 1] = 0..max_batch
  std::vector<int32_t> qo_indptr_host;  // the same on the host (the planner reads it)
  cudaEvent_t plan_uploaded = nullptr;  // recorded after each plan's upload from the pinned buffer
};

namespace {

absl::Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

absl::Status FromFlashInfer(const std::string& error) {
  return error.empty() ? absl::OkStatus() : absl::InternalError(error);
}

bool SupportedGroup(int32_t g) { return g == 1 || g == 2 || g == 3 || g == 4 || g == 6 || g == 8 || g == 16; }

}  // namespace

absl::Status FlashInferArm::CanImplement(const Options& o) {
  if (o.dtype != DType::kF16 && o.dtype != DType::kBF16) {
    return absl::UnimplementedError(absl::StrCat("dtype: ", DTypeName(o.dtype), " is not instantiated (fp16, bf16)"));
  }
  if (o.head_dim != fi::kHeadDim) {
    return absl::UnimplementedError(absl::StrCat("head_dim: ", o.head_dim, " is not instantiated (128)"));
  }
  if (o.num_q_heads <= 0 || o.num_kv_heads <= 0 || o.num_q_heads % o.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads: ", o.num_q_heads, " is not a multiple of num_kv_heads ",
                                                   o.num_kv_heads));
  }
  if (!SupportedGroup(o.num_q_heads / o.num_kv_heads)) {
    return absl::UnimplementedError(absl::StrCat("num_q_heads / num_kv_heads: G = ", o.num_q_heads / o.num_kv_heads,
                                                 " is not in FlashInfer's dispatch set {1,2,3,4,6,8,16}"));
  }
  if (o.page_size <= 0) return absl::InvalidArgumentError(absl::StrCat("page_size: ", o.page_size));
  // paged_kv_t keeps strides in uint32: one page's K+V must stay below 2^32 elements.
  if (2LL * o.num_kv_heads * o.page_size * o.head_dim >= (1LL << 32)) {
    return absl::UnimplementedError("page_size: a page of 2*Hkv*P*d elements overflows FlashInfer's 32-bit stride");
  }
  if (o.max_batch <= 0) return absl::InvalidArgumentError(absl::StrCat("max_batch: ", o.max_batch));
  return absl::OkStatus();
}

FlashInferArm::FlashInferArm(const Options& options) : options_(options), state_(std::make_unique<State>()) {}

FlashInferArm::~FlashInferArm() {
  if (state_->plan_uploaded != nullptr) {
    cudaEventSynchronize(state_->plan_uploaded);
    cudaEventDestroy(state_->plan_uploaded);
  }
  cudaFree(state_->ws.float_buf);
  cudaFree(state_->ws.int_buf);
  cudaFreeHost(state_->ws.pinned_int);
  cudaFree(state_->qo_indptr_device);
}

absl::StatusOr<std::unique_ptr<FlashInferArm>> FlashInferArm::Create(const Options& options) {
  if (auto s = CanImplement(options); !s.ok()) return s;
  std::unique_ptr<FlashInferArm> arm(new FlashInferArm(options));
  State& st = *arm->state_;
  int dev = 0, major = 0;
  if (auto s = Cuda(cudaGetDevice(&dev), "cudaGetDevice"); !s.ok()) return absl::FailedPreconditionError(s.message());
  if (auto s = Cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
      !s.ok()) {
    return s;
  }
  arm->pdl_ = options.enable_pdl < 0 ? major >= 9 : options.enable_pdl > 0;
  st.ws.float_bytes = options.float_workspace_bytes;
  st.ws.int_bytes = options.int_workspace_bytes;
  if (auto s = Cuda(cudaMalloc(&st.ws.float_buf, st.ws.float_bytes), "float workspace"); !s.ok()) return s;
  if (auto s = Cuda(cudaMalloc(&st.ws.int_buf, st.ws.int_bytes), "int workspace"); !s.ok()) return s;
  if (auto s = Cuda(cudaMallocHost(&st.ws.pinned_int, st.ws.int_bytes), "pinned int workspace"); !s.ok()) return s;
  st.qo_indptr_host.resize(options.max_batch + 1);
  for (int32_t i = 0; i <= options.max_batch; ++i) st.qo_indptr_host[i] = i;
  const size_t qo_bytes = st.qo_indptr_host.size() * sizeof(int32_t);
  if (auto s = Cuda(cudaMalloc(reinterpret_cast<void**>(&st.qo_indptr_device), qo_bytes), "qo_indptr"); !s.ok()) return s;
  if (auto s = Cuda(cudaMemcpy(st.qo_indptr_device, st.qo_indptr_host.data(), qo_bytes, cudaMemcpyHostToDevice),
                    "qo_indptr upload");
      !s.ok()) {
    return s;
  }
  if (auto s = Cuda(cudaEventCreateWithFlags(&st.plan_uploaded, cudaEventDisableTiming), "event"); !s.ok()) return s;
  return arm;
}

absl::Status FlashInferArm::Plan(std::span<const int32_t> page_indptr_host, void* stream) {
  State& st = *state_;
  const int32_t batch = static_cast<int32_t>(page_indptr_host.size()) - 1;
  if (batch < 1 || batch > options_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat("page_indptr: batch ", batch, " not in [1, max_batch ",
                                                   options_.max_batch, "]"));
  }
  // The planner rewrites the pinned buffer: the previous plan's upload must have read it.
  if (auto s = Cuda(cudaEventSynchronize(st.plan_uploaded), "plan upload wait"); !s.ok()) return s;
  fi::PlanInput in;
  in.batch = batch;
  in.num_q_heads = options_.num_q_heads;
  in.num_kv_heads = options_.num_kv_heads;
  in.page_size = options_.page_size;
  in.page_indptr_host = page_indptr_host.data();
  in.qo_indptr_host = st.qo_indptr_host.data();
  const bool f16 = options_.dtype == DType::kF16;
  std::string error;
  if (options_.path == FlashInferPath::kDecode) {
    error = f16 ? fi::DecodePlanF16(st.ws, in, &st.plan, stream) : fi::DecodePlanBF16(st.ws, in, &st.plan, stream);
  } else {
    error = f16 ? fi::PrefillPlanF16(st.ws, in, &st.plan, stream) : fi::PrefillPlanBF16(st.ws, in, &st.plan, stream);
  }
  st.planned_batch = error.empty() ? batch : -1;
  if (auto s = FromFlashInfer(error); !s.ok()) return s;
  return Cuda(cudaEventRecord(st.plan_uploaded, static_cast<cudaStream_t>(stream)), "plan upload event");
}

absl::Status FlashInferArm::Run(const kernels::DecodeParams& p, void* stream) {
  const State& st = *state_;
  if (st.planned_batch < 0) return absl::FailedPreconditionError("Run before a successful Plan");
  if (p.batch != st.planned_batch) {
    return absl::InvalidArgumentError(absl::StrCat("batch: ", p.batch, " but the plan is for ", st.planned_batch));
  }
  if (p.dtype != options_.dtype || p.num_q_heads != options_.num_q_heads || p.num_kv_heads != options_.num_kv_heads ||
      p.head_dim != options_.head_dim || p.page_size != options_.page_size) {
    return absl::InvalidArgumentError("params: shape differs from the arm's Options");
  }
  if (p.q == nullptr || p.kv == nullptr || p.out == nullptr || p.page_indptr == nullptr || p.page_indices == nullptr ||
      p.last_page_len == nullptr) {
    return absl::InvalidArgumentError("params: q, kv, out and the page table must be set");
  }
  fi::Problem pr;
  pr.batch = p.batch;
  pr.num_q_heads = p.num_q_heads;
  pr.num_kv_heads = p.num_kv_heads;
  pr.page_size = p.page_size;
  pr.sm_scale = p.sm_scale;
  pr.q = p.q;
  pr.kv = p.kv;
  pr.page_indptr = p.page_indptr;
  pr.page_indices = p.page_indices;
  pr.last_page_len = p.last_page_len;
  pr.qo_indptr = st.qo_indptr_device;
  pr.out = p.out;
  pr.lse = p.lse;
  const bool f16 = options_.dtype == DType::kF16;
  std::string error;
  if (options_.path == FlashInferPath::kDecode) {
    error = f16 ? fi::DecodeRunF16(st.ws, st.plan, pr, pdl_, stream) : fi::DecodeRunBF16(st.ws, st.plan, pr, pdl_, stream);
  } else {
    error = f16 ? fi::PrefillRunF16(st.ws, st.plan, pr, pdl_, stream)
                : fi::PrefillRunBF16(st.ws, st.plan, pr, pdl_, stream);
  }
  return FromFlashInfer(error);
}

bool FlashInferArm::planned_split_kv() const { return state_->plan.split_kv; }

}  // namespace pkv::bench
