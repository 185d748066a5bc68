// kernels/cuda/decode_attention_cuda.cu — CanImplement / WorkspaceBytes / Launch and the single
// dispatch table mapping (dtype, head_dim) to the typed launchers. G and page size are runtime
// values inside the kernels (G <= 8 rides in the 16 mma rows; page size is a power of two).
#include "kernels/cuda/decode_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/internal/launchers.h"

namespace pkv::kernels::cuda {
namespace internal {

// Layout: [counters: kCounterBytes][lse: slots*Hq floats][pad to 256 B][o: slots*Hq*d floats].
size_t LseBytesAligned(const DecodeParams& p, int64_t slots) {
  const size_t lse = static_cast<size_t>(slots) * p.num_q_heads * sizeof(float);
  return (lse + 255) / 256 * 256;
}

size_t WorkspaceBytesForSlots(const DecodeParams& p, int64_t slots) {
  return kCounterBytes + LseBytesAligned(p, slots) +
         static_cast<size_t>(slots) * p.num_q_heads * p.head_dim * sizeof(float);
}

Workspace CarveWorkspace(void* workspace, const DecodeParams& p, int64_t slots) {
  char* base = static_cast<char*>(workspace);
  Workspace ws;
  ws.counters = reinterpret_cast<int*>(base);
  ws.lse = reinterpret_cast<float*>(base + kCounterBytes);
  ws.o = reinterpret_cast<float*>(base + kCounterBytes + LseBytesAligned(p, slots));  // 16-byte loads
  return ws;
}

int64_t PartialSlots(KernelId kernel, const DecodeParams& p) {
  if (kernel == KernelId::kSequenceSplit) return p.num_splits > 1 ? static_cast<int64_t>(p.batch) * p.num_splits : 0;
  if (kernel == KernelId::kWorkQueue) return p.num_partials;
  return 0;
}

}  // namespace internal

namespace {

using internal::PartialSlots;
using internal::Workspace;

// The one dispatch table: calls fn.template operator()<T, D>() for the runtime dtype/head_dim.
template <typename Fn>
cudaError_t Dispatch(const DecodeParams& p, Fn&& fn) {
  const bool f16 = p.dtype == DType::kF16;
  switch (p.head_dim) {
    case 64: return f16 ? fn.template operator()<__half, 64>() : fn.template operator()<__nv_bfloat16, 64>();
    case 128: return f16 ? fn.template operator()<__half, 128>() : fn.template operator()<__nv_bfloat16, 128>();
    case 256: return f16 ? fn.template operator()<__half, 256>() : fn.template operator()<__nv_bfloat16, 256>();
    default: return cudaErrorInvalidValue;  // excluded by CanImplement
  }
}

absl::Status FromCuda(cudaError_t e, KernelId kernel) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("launch of ", std::string(KernelName(kernel)), " failed: ", cudaGetErrorString(e)));
}

struct ShapeOf {
  int* out;
  bool grid;
  template <typename T, int D>
  cudaError_t operator()() const {
    const internal::KernelShape s = internal::WorkQueueShape<T, D>();
    *out = grid ? s.num_sms * s.ctas_per_sm : s.ctas_per_sm;
    return cudaSuccess;
  }
};
struct PerRequestL {
  const DecodeParams& p;
  cudaStream_t s;
  template <typename T, int D>
  cudaError_t operator()() const { return internal::LaunchPerRequest<T, D>(p, s); }
};
struct SequenceSplitL {
  const DecodeParams& p;
  const Workspace& ws;
  bool fused;
  cudaStream_t s;
  template <typename T, int D>
  cudaError_t operator()() const { return internal::LaunchSequenceSplit<T, D>(p, ws, fused, s); }
};
struct WorkQueueL {
  const DecodeParams& p;
  const Workspace& ws;
  bool fused;
  cudaStream_t s;
  template <typename T, int D>
  cudaError_t operator()() const {
    const internal::KernelShape shape = internal::WorkQueueShape<T, D>();
    const int grid =
        p.cta_task_begin != nullptr ? p.num_ctas : std::min(p.num_tasks, shape.num_sms * shape.ctas_per_sm);
    return internal::LaunchWorkQueue<T, D>(p, ws, fused, grid, s);
  }
};

}  // namespace

absl::Status CanImplement(KernelId kernel, const DecodeParams& p) {
  if (kernel != KernelId::kPerRequest && kernel != KernelId::kSequenceSplit && kernel != KernelId::kWorkQueue) {
    return absl::UnimplementedError(absl::StrCat("kernels/cuda has no route ", std::string(KernelName(kernel))));
  }
  if (p.dtype != DType::kF16 && p.dtype != DType::kBF16) return absl::InvalidArgumentError("dtype must be fp16 or bf16");
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) {
    return absl::UnimplementedError(absl::StrCat("head_dim ", p.head_dim, " not in {64, 128, 256}"));
  }
  if (p.num_kv_heads < 1 || p.num_q_heads < p.num_kv_heads || p.num_q_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError("num_q_heads must be a positive multiple of num_kv_heads");
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group > kMaxGroupSize) {
    return absl::UnimplementedError(absl::StrCat("group size ", group, " > ", kMaxGroupSize));
  }
  if (p.page_size < 1 || p.page_size > 256 || (p.page_size & (p.page_size - 1)) != 0) {
    return absl::UnimplementedError(absl::StrCat("page_size ", p.page_size, " is not a power of two in [1, 256]"));
  }
  if (p.batch < 0) return absl::InvalidArgumentError("batch must be >= 0");
  if (p.batch == 0) return absl::OkStatus();
  if (p.q == nullptr || p.kv == nullptr || p.out == nullptr || p.page_indptr == nullptr ||
      p.page_indices == nullptr || p.last_page_len == nullptr) {
    return absl::InvalidArgumentError("q, kv, out and the page table must be set");
  }
  if (kernel == KernelId::kSequenceSplit && (p.num_splits < 1 || p.num_splits > 65535)) {
    return absl::InvalidArgumentError("num_splits must be in [1, 65535]");
  }
  if (kernel != KernelId::kPerRequest &&
      static_cast<int64_t>(p.batch) * p.num_kv_heads * 4 > static_cast<int64_t>(kCounterBytes)) {
    return absl::InvalidArgumentError("batch * num_kv_heads exceeds the fused-merge counter space");
  }
  if (p.batch > 65535 && kernel != KernelId::kWorkQueue) {
    return absl::InvalidArgumentError("batch must be <= 65535 (grid dimension)");
  }
  if (kernel == KernelId::kWorkQueue) {
    if (p.num_tasks < 0 || (p.num_tasks > 0 && p.tasks == nullptr)) {
      return absl::InvalidArgumentError("kWorkQueue needs the task list");
    }
    if (p.num_partials > 0 && (p.partial_offset == nullptr || p.row_splits == nullptr)) {
      return absl::InvalidArgumentError("kWorkQueue with split rows needs row_splits and partial_offset");
    }
    if (p.cta_task_begin != nullptr && (p.num_ctas < 1 || p.num_ctas > p.num_tasks)) {
      return absl::InvalidArgumentError("kWorkQueue's CTA ranges need 1 <= num_ctas <= num_tasks");
    }
  }
  return absl::OkStatus();
}

size_t WorkspaceBytes(KernelId kernel, const DecodeParams& p) {
  const int64_t slots = PartialSlots(kernel, p);
  if (kernel == KernelId::kWorkQueue) return internal::WorkspaceBytesForSlots(p, slots);
  return slots == 0 ? 0 : internal::WorkspaceBytesForSlots(p, slots);
}

int LaunchesPerCall(KernelId kernel, const DecodeParams& p, MergeMode merge) {
  if (kernel == KernelId::kSequenceSplit) return (merge == MergeMode::kSeparate && p.num_splits > 1) ? 2 : 1;
  if (kernel == KernelId::kWorkQueue) return (merge == MergeMode::kSeparate && p.num_partials > 0) ? 2 : 1;
  return 1;
}

int ResidentCtasPerSm(const DecodeParams& p) {
  int ctas = 1;
  Dispatch(p, ShapeOf{&ctas, false});
  return ctas;
}

int PersistentGridSize(const DecodeParams& p) {
  int grid = 1;
  Dispatch(p, ShapeOf{&grid, true});
  return grid;
}

absl::Status Launch(KernelId kernel, const DecodeParams& p, void* workspace, cudaStream_t stream, MergeMode merge) {
  if (p.batch == 0) return absl::OkStatus();
  const int64_t slots = PartialSlots(kernel, p);
  const Workspace ws = internal::CarveWorkspace(workspace, p, slots);
  switch (kernel) {
    case KernelId::kPerRequest:
      return FromCuda(Dispatch(p, PerRequestL{p, stream}), kernel);
    case KernelId::kSequenceSplit:
      return FromCuda(Dispatch(p, SequenceSplitL{p, ws, merge == MergeMode::kFused, stream}), kernel);
    case KernelId::kWorkQueue:
      return FromCuda(Dispatch(p, WorkQueueL{p, ws, merge == MergeMode::kFused, stream}), kernel);
    default:
      return absl::UnimplementedError(absl::StrCat("kernels/cuda has no route ", std::string(KernelName(kernel))));
  }
}

absl::Status ClearCtaTimeline(KernelId kernel) {
  cudaError_t e = cudaErrorNotSupported;
  if (kernel == KernelId::kWorkQueue) e = internal::ClearWorkQueueTimeline();
  if (kernel == KernelId::kSequenceSplit) e = internal::ClearSequenceSplitTimeline();
  if (e == cudaErrorNotSupported) return absl::UnimplementedError("no CTA timeline in this build or route");
  if (e != cudaSuccess) return absl::InternalError(cudaGetErrorString(e));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> ReadCtaTimeline(KernelId kernel) {
  std::vector<unsigned long long> raw(2 * internal::kTimelineCtas);
  cudaError_t e = cudaErrorNotSupported;
  const int n = static_cast<int>(raw.size());
  if (kernel == KernelId::kWorkQueue) e = internal::ReadWorkQueueTimeline(raw.data(), n);
  if (kernel == KernelId::kSequenceSplit) e = internal::ReadSequenceSplitTimeline(raw.data(), n);
  if (e == cudaErrorNotSupported) return absl::UnimplementedError("no CTA timeline in this build or route");
  if (e != cudaSuccess) return absl::InternalError(cudaGetErrorString(e));
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (size_t i = 0; i + 1 < raw.size(); i += 2) {
    if (raw[i] != 0) out.emplace_back(raw[i], raw[i + 1]);
  }
  return out;
}

}  // namespace pkv::kernels::cuda
