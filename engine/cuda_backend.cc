#include "engine/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/cuda/work_plan.h"
#include "kvpool/cuda/append_kv.h"
#include "kvpool/cuda/device_kv_arena.h"

namespace pkv::engine {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorString(e)));
}

#define PKV_CUDA_RETURN(expr, what)                            \
  do {                                                         \
    if (absl::Status s_ = CudaStatus((expr), what); !s_.ok()) return s_; \
  } while (0)

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

class CudaBackend final : public ExecutionBackend {
 public:
  CudaBackend(std::unique_ptr<kvpool::DeviceKvArena> arena, const CudaBackendOptions& options)
      : arena_(std::move(arena)), options_(options) {}

  ~CudaBackend() override {
    for (Slot& s : slots_) {
      if (s.stream != nullptr) cudaStreamSynchronize(s.stream);
      cudaFreeHost(s.host);
      cudaFree(s.device);
      cudaFreeHost(s.io_host);
      cudaFree(s.io_device);
      cudaFreeHost(s.out_host);
      cudaFree(s.out_device);
      cudaFree(s.workspace);
      if (s.start != nullptr) cudaEventDestroy(s.start);
      if (s.stop != nullptr) cudaEventDestroy(s.stop);
      if (s.uploaded != nullptr) cudaEventDestroy(s.uploaded);
      if (s.stream != nullptr) cudaStreamDestroy(s.stream);
    }
  }

  absl::Status Init() {
    const ModelShape& s = arena_->shape();
    cudaDeviceProp prop;
    PKV_CUDA_RETURN(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    info_.name = prop.name;
    info_.is_gpu = true;
    info_.num_sms = prop.multiProcessorCount;
    if (options_.max_open_token_steps < 1) return absl::InvalidArgumentError("max_open_token_steps must be >= 1");

    const int64_t b = options_.max_batch;
    indices_capacity_ = 2 * arena_->num_pages() + b;
    tasks_capacity_ = std::min<int64_t>(static_cast<int64_t>(s.num_kv_heads) * indices_capacity_, 1 << 20);
    descriptor_bytes_ = Align16((b + 1) * 4) + 4 * Align16(2 * b * 4) + Align16(indices_capacity_ * 4) +
                        Align16(tasks_capacity_ * sizeof(DecodeTask));
    const size_t el = DTypeSize(s.dtype);
    q_bytes_ = static_cast<size_t>(b) * s.num_q_heads * s.head_dim * el;
    kv_bytes_ = static_cast<size_t>(b) * s.num_kv_heads * s.head_dim * el;
    const size_t io = Align16(q_bytes_) + 2 * Align16(kv_bytes_);
    out_bytes_ = Align16(q_bytes_) + static_cast<size_t>(b) * s.num_q_heads * sizeof(float);
    kernels::DecodeParams ws = BaseParams(0);
    ws.batch = 1;
    ws.num_splits = options_.max_partial_slots;
    workspace_bytes_ = kernels::cuda::WorkspaceBytes(KernelId::kSequenceSplit, ws);
    grid_ = kernels::cuda::PersistentGridSize(ws);
    // Everything a layer touches is per slot, so slots run concurrently on their own streams;
    // only the arena's pages are shared (disjoint writes, see engine/backend.h).
    slots_.resize(options_.max_open_token_steps);
    for (Slot& slot : slots_) {
      PKV_CUDA_RETURN(cudaStreamCreateWithFlags(&slot.stream, cudaStreamNonBlocking), "stream");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.start), "event");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.stop), "event");
      PKV_CUDA_RETURN(cudaEventCreateWithFlags(&slot.uploaded, cudaEventDisableTiming), "event");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.host, descriptor_bytes_), "pinned descriptor");
      PKV_CUDA_RETURN(cudaMalloc(&slot.device, descriptor_bytes_), "device descriptor");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.io_host, io), "pinned io");
      PKV_CUDA_RETURN(cudaMalloc(&slot.io_device, io), "device io");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.out_host, out_bytes_), "pinned out");
      PKV_CUDA_RETURN(cudaMalloc(&slot.out_device, out_bytes_), "device out");
      PKV_CUDA_RETURN(cudaMalloc(&slot.workspace, workspace_bytes_), "workspace");
      // The fused-merge counters must start at zero; every launch leaves them at zero.
      PKV_CUDA_RETURN(cudaMemset(slot.workspace, 0, workspace_bytes_), "workspace memset");
    }
    PKV_CUDA_RETURN(cudaDeviceSynchronize(), "init");
    PKV_LOG(INFO) << "cuda backend on " << info_.name << " (" << info_.num_sms << " SMs): "
                  << arena_->num_pages() << " pages (" << arena_->layer_bytes() * s.num_layers / (1 << 20)
                  << " MiB KV), " << slots_.size() << " descriptor slots with a stream and "
                  << workspace_bytes_ / (1 << 20) << " MiB workspace each, persistent grid " << grid_;
    return absl::OkStatus();
  }

  const char* name() const override { return "cuda"; }
  kvpool::KvArena& arena() override { return *arena_; }
  scheduler::DeviceInfo device_info() const override { return info_; }
  std::vector<KernelId> kernels() const override {
    return {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  }
  int32_t max_open_token_steps() const override { return options_.max_open_token_steps; }

  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    int32_t id = -1;
    for (int32_t i = 0; i < static_cast<int32_t>(slots_.size()); ++i) {
      if (!slots_[i].used) {
        id = i;
        break;
      }
    }
    if (id < 0) return absl::ResourceExhaustedError("no free descriptor slot");
    Slot& slot = slots_[id];
    const int32_t b = static_cast<int32_t>(table.last_page_len.size());
    if (b > options_.max_batch) return absl::InvalidArgumentError("batch larger than max_batch");
    if (static_cast<int64_t>(table.indices.size()) > indices_capacity_) {
      return absl::ResourceExhaustedError("page table larger than the descriptor holds");
    }

    // The route's work: splits or the compact task list (policy came from the scheduler).
    slot.kernel = plan.kernel;
    slot.num_splits = 1;
    slot.num_partials = 0;
    kernels::cuda::WorkPlan work;
    if (plan.kernel == KernelId::kSequenceSplit) {
      slot.num_splits = std::clamp(plan.num_splits, 1, std::max(1, options_.max_partial_slots / std::max(1, b)));
    } else if (plan.kernel == KernelId::kWorkQueue) {
      std::vector<int32_t> row_pages(b);
      for (int32_t r = 0; r < b; ++r) row_pages[r] = table.indptr[r + 1] - table.indptr[r];
      int32_t per_task = plan.pages_per_task > 0
                             ? plan.pages_per_task
                             : kernels::cuda::PagesPerTaskFor(row_pages, arena_->shape().num_kv_heads, grid_);
      for (;;) {
        work = kernels::cuda::BuildWorkPlan(row_pages, arena_->shape().num_kv_heads, per_task);
        if (work.num_partials <= options_.max_partial_slots &&
            static_cast<int64_t>(work.tasks.size()) <= tasks_capacity_) {
          break;
        }
        per_task *= 2;  // the workspace bounds how finely rows may be cut
      }
      slot.num_partials = work.num_partials;
      slot.num_tasks = static_cast<int32_t>(work.tasks.size());
    }

    // The slot's previous upload read slot.host; it finished unless that token step ran no layer
    // (then this returns at once, as after every RunLayer, which waits for its stream).
    PKV_CUDA_RETURN(cudaEventSynchronize(slot.uploaded), "descriptor reuse");
    // Pack the descriptor: [indptr | last | row_splits | partial_offset | slots | indices | tasks].
    char* h = static_cast<char*>(slot.host);
    size_t off = 0;
    auto put = [&](const void* src, size_t bytes) {
      const size_t at = off;
      if (bytes > 0) std::memcpy(h + at, src, bytes);
      off += Align16(bytes);
      return at;
    };
    slot.off_indptr = put(table.indptr.data(), table.indptr.size() * 4);
    slot.off_last = put(table.last_page_len.data(), table.last_page_len.size() * 4);
    slot.off_row_splits = put(work.row_splits.data(), work.row_splits.size() * 4);
    slot.off_partial_offset = put(work.partial_offset.data(), work.partial_offset.size() * 4);
    static_assert(sizeof(kvpool::SlotAddr) == 8);
    slot.off_slots = put(new_slots.data(), new_slots.size() * sizeof(kvpool::SlotAddr));
    slot.off_indices = put(table.indices.data(), table.indices.size() * 4);
    slot.off_tasks = put(work.tasks.data(), work.tasks.size() * sizeof(DecodeTask));
    slot.batch = b;
    PKV_CUDA_RETURN(cudaMemcpyAsync(slot.device, slot.host, off, cudaMemcpyHostToDevice, slot.stream),
                    "descriptor upload");
    PKV_CUDA_RETURN(cudaEventRecord(slot.uploaded, slot.stream), "event");
    kernels::DecodeParams p = SlotParams(slot, 0);
    if (b > 0) {
      if (absl::Status st = kernels::cuda::CanImplement(slot.kernel, p); !st.ok()) return st;
    }
    slot.used = true;
    return id;
  }

  absl::Status RunLayer(int32_t id, int32_t layer, const void* q, const void* k, const void* v, void* out,
                        float* lse, double* attend_seconds) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    Slot& slot = slots_[id];
    const ModelShape& s = arena_->shape();
    const size_t el = DTypeSize(s.dtype);
    const size_t qb = static_cast<size_t>(slot.batch) * s.num_q_heads * s.head_dim * el;
    const size_t kvb = static_cast<size_t>(slot.batch) * s.num_kv_heads * s.head_dim * el;
    char* io = static_cast<char*>(slot.io_host);
    char* dio = static_cast<char*>(slot.io_device);
    const size_t k_at = Align16(qb), v_at = k_at + Align16(kvb);
    std::memcpy(io, q, qb);
    std::memcpy(io + k_at, k, kvb);
    std::memcpy(io + v_at, v, kvb);
    PKV_CUDA_RETURN(cudaMemcpyAsync(dio, io, v_at + kvb, cudaMemcpyHostToDevice, slot.stream), "q|k|v upload");

    kvpool::cuda::AppendKvParams ap;
    ap.arena = arena_->layer_data(0);
    ap.layer_stride = arena_->num_pages() * arena_->page_elems();
    ap.num_layers = 1;
    ap.first_layer = layer;
    ap.num_kv_heads = s.num_kv_heads;
    ap.page_size = s.page_size;
    ap.head_dim = s.head_dim;
    ap.num_tokens = slot.batch;
    ap.slots = reinterpret_cast<const int32_t*>(static_cast<char*>(slot.device) + slot.off_slots);
    ap.k = dio + k_at;
    ap.v = dio + v_at;
    PKV_CUDA_RETURN(kvpool::cuda::LaunchAppendKv(ap, slot.stream), "append");

    kernels::DecodeParams p = SlotParams(slot, layer);
    p.q = dio;
    char* dout = static_cast<char*>(slot.out_device);
    p.out = dout;
    p.lse = lse != nullptr ? reinterpret_cast<float*>(dout + Align16(qb)) : nullptr;
    PKV_CUDA_RETURN(cudaEventRecord(slot.start, slot.stream), "event");
    if (absl::Status st = kernels::cuda::Launch(slot.kernel, p, slot.workspace, slot.stream); !st.ok()) return st;
    PKV_CUDA_RETURN(cudaEventRecord(slot.stop, slot.stream), "event");
    const size_t down = lse != nullptr ? Align16(qb) + static_cast<size_t>(slot.batch) * s.num_q_heads * 4 : qb;
    PKV_CUDA_RETURN(cudaMemcpyAsync(slot.out_host, dout, down, cudaMemcpyDeviceToHost, slot.stream), "out download");
    // Waits for this slot's stream only; other slots' layers keep running.
    PKV_CUDA_RETURN(cudaStreamSynchronize(slot.stream), "layer");
    std::memcpy(out, slot.out_host, qb);
    if (lse != nullptr) {
      std::memcpy(lse, static_cast<char*>(slot.out_host) + Align16(qb), slot.batch * s.num_q_heads * 4);
    }
    float ms = 0;
    PKV_CUDA_RETURN(cudaEventElapsedTime(&ms, slot.start, slot.stop), "elapsed");
    if (attend_seconds != nullptr) *attend_seconds = ms * 1e-3;
    return absl::OkStatus();
  }

  void EndTokenStep(int32_t id) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    slots_[id].used = false;
  }

 private:
  // One descriptor slot: everything a layer-step touches besides the arena's pages, so layers
  // of different slots run concurrently (the engine calls RunLayer of one slot at a time).
  struct Slot {
    bool used = false;
    cudaStream_t stream = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;  // bracket the attention launch(es)
    cudaEvent_t uploaded = nullptr;               // the descriptor upload read `host`
    void* host = nullptr;        // pinned descriptor
    void* device = nullptr;      // its device twin
    void* io_host = nullptr;     // pinned q | k | v  [B, Hq, d] | [B, Hkv, d] | [B, Hkv, d]
    void* io_device = nullptr;   // its device twin
    void* out_host = nullptr;    // pinned out | lse  [B, Hq, d] | [B, Hq] fp32
    void* out_device = nullptr;  // its device twin
    void* workspace = nullptr;   // partial states + fused-merge counters (zeroed once)
    KernelId kernel = KernelId::kPerRequest;
    int32_t batch = 0;
    int32_t num_splits = 1;
    int32_t num_partials = 0;
    int32_t num_tasks = 0;
    size_t off_indptr = 0, off_last = 0, off_row_splits = 0, off_partial_offset = 0, off_slots = 0,
           off_indices = 0, off_tasks = 0;
  };

  kernels::DecodeParams BaseParams(int32_t layer) const {
    const ModelShape& s = arena_->shape();
    kernels::DecodeParams p;
    p.dtype = s.dtype;
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = s.page_size;
    p.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    p.kv = arena_->layer_data(layer);
    p.num_pages = arena_->num_pages();
    return p;
  }

  kernels::DecodeParams SlotParams(const Slot& slot, int32_t layer) const {
    kernels::DecodeParams p = BaseParams(layer);
    char* d = static_cast<char*>(slot.device);
    p.batch = slot.batch;
    p.q = slot.io_device;
    p.out = slot.out_device;
    p.page_indptr = reinterpret_cast<const int32_t*>(d + slot.off_indptr);
    p.page_indices = reinterpret_cast<const int32_t*>(d + slot.off_indices);
    p.last_page_len = reinterpret_cast<const int32_t*>(d + slot.off_last);
    p.num_splits = slot.num_splits;
    if (slot.kernel == KernelId::kWorkQueue) {
      p.tasks = reinterpret_cast<const DecodeTask*>(d + slot.off_tasks);
      p.num_tasks = slot.num_tasks;
      p.row_splits = reinterpret_cast<const int32_t*>(d + slot.off_row_splits);
      p.partial_offset = reinterpret_cast<const int32_t*>(d + slot.off_partial_offset);
      p.num_partials = slot.num_partials;
    }
    return p;
  }

  std::unique_ptr<kvpool::DeviceKvArena> arena_;
  CudaBackendOptions options_;
  scheduler::DeviceInfo info_;
  std::vector<Slot> slots_;
  int64_t indices_capacity_ = 0, tasks_capacity_ = 0;
  size_t descriptor_bytes_ = 0;
  size_t q_bytes_ = 0, kv_bytes_ = 0, out_bytes_ = 0;
  size_t workspace_bytes_ = 0;
  int grid_ = 0;
};

}  // namespace

bool CudaDeviceAvailable() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear: no driver (35) or no device (100) means "no GPU"
    return false;
  }
  return n > 0;
}

absl::StatusOr<ExecutionBackendPtr> CreateCudaBackend(const ModelShape& shape, const CudaBackendOptions& options) {
  if (!CudaDeviceAvailable()) return absl::FailedPreconditionError("no CUDA device is available");
  kvpool::DeviceKvArena::Options ao;
  ao.num_pages = options.num_pages;
  ao.free_memory_fraction = options.num_pages > 0 ? 0 : options.free_memory_fraction;
  auto arena = kvpool::DeviceKvArena::Create(shape, ao);
  if (!arena.ok()) return arena.status();
  auto backend = std::make_unique<CudaBackend>(std::move(*arena), options);
  if (absl::Status s = backend->Init(); !s.ok()) return s;
  return ExecutionBackendPtr(std::move(backend));
}

}  // namespace pkv::engine
