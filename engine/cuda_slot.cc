// engine/cuda_slot.cc — a descriptor slot's resources, descriptor packing and layer launch
// sequence (engine/cuda_slot.h).
#include "engine/cuda_slot.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/log.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/cuda/host_pull.h"

namespace pkv::engine {
namespace {

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

// Creates `*event` with `flags` (cudaEventDefault times; cudaEventDisableTiming only orders).
absl::Status CreateEvent(internal::CudaEvent* event, unsigned flags) {
  cudaEvent_t e = nullptr;
  PKV_CUDA_RETURN(cudaEventCreateWithFlags(&e, flags), "event");
  event->reset(e);
  return absl::OkStatus();
}

// Pinned host memory kernels read or write directly: `*device` is its address in kernels.
absl::Status AllocMapped(internal::PinnedBuffer* buffer, void** device, size_t bytes, const char* what) {
  void* p = nullptr;
  PKV_CUDA_RETURN(cudaHostAlloc(&p, bytes, cudaHostAllocMapped), what);
  buffer->reset(p);
  PKV_CUDA_RETURN(cudaHostGetDevicePointer(device, p, 0), what);
  return absl::OkStatus();
}

absl::Status AllocDevice(internal::DeviceBuffer* buffer, size_t bytes, const char* what) {
  void* p = nullptr;
  PKV_CUDA_RETURN(cudaMalloc(&p, bytes), what);
  buffer->reset(p);
  return absl::OkStatus();
}

}  // namespace

kernels::DecodeParams ArenaDecodeParams(const kvpool::DeviceKvArena& arena, int32_t layer) {
  const ModelShape& s = arena.shape();
  kernels::DecodeParams p;
  p.dtype = s.dtype;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.page_size = s.page_size;
  p.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  p.kv = arena.layer_data(layer);
  p.num_pages = arena.num_pages();
  return p;
}

absl::StatusOr<CudaSlotPtr> CudaSlot::Create(const Options& options) {
  PKV_CHECK(options.arena != nullptr) << "a CUDA slot needs the arena";
  // CudaBackend::Init refused intervals below 1 (EnqueueLayer takes them as moduli).
  PKV_CHECK(options.stage_timing_interval >= 1) << "stage_timing_interval must be >= 1";
  PKV_CHECK(options.attention_timing_interval >= 1) << "attention_timing_interval must be >= 1";
  const ModelShape& s = options.arena->shape();
  const int64_t b = options.max_batch;
  const size_t el = DTypeSize(s.dtype);
  const size_t q_bytes = static_cast<size_t>(b) * s.num_q_heads * s.head_dim * el;
  const size_t kv_bytes = static_cast<size_t>(b) * s.num_kv_heads * s.head_dim * el;
  const size_t io_bytes = Align16(q_bytes) + 2 * Align16(kv_bytes);
  const size_t out_bytes = Align16(q_bytes) + static_cast<size_t>(b) * s.num_q_heads * sizeof(float);

  CudaSlotPtr slot(new CudaSlot(options));
  // [indptr: B + 1 | last, row_splits, partial_offset: B each | indices | tasks |
  //  CTA ranges: one more than the tasks at most (every CTA of a balanced list runs a task)].
  slot->descriptor_bytes_ = Align16((b + 1) * 4) + 3 * Align16(b * 4) + Align16(options.indices_capacity * 4) +
                            Align16(options.tasks_capacity * sizeof(DecodeTask)) +
                            Align16((options.tasks_capacity + 1) * 4);
  cudaStream_t stream = nullptr;
  PKV_CUDA_RETURN(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, options.stream_priority), "stream");
  slot->stream_.reset(stream);
  if (absl::Status st = CreateEvent(&slot->start_, cudaEventDefault); !st.ok()) return st;
  if (absl::Status st = CreateEvent(&slot->stop_, cudaEventDefault); !st.ok()) return st;
  if (absl::Status st = CreateEvent(&slot->uploaded_, cudaEventDisableTiming); !st.ok()) return st;
  if (absl::Status st = CreateEvent(&slot->h2d_start_, cudaEventDefault); !st.ok()) return st;
  if (absl::Status st = CreateEvent(&slot->h2d_done_, cudaEventDefault); !st.ok()) return st;
  if (absl::Status st = AllocMapped(&slot->host_descriptor_, &slot->descriptor_mapped_, slot->descriptor_bytes_,
                                    "mapped pinned descriptor");
      !st.ok()) {
    return st;
  }
  if (absl::Status st = AllocDevice(&slot->device_descriptor_, slot->descriptor_bytes_, "device descriptor");
      !st.ok()) {
    return st;
  }
  if (absl::Status st = AllocMapped(&slot->io_host_, &slot->io_mapped_, io_bytes, "mapped pinned io"); !st.ok()) {
    return st;
  }
  if (absl::Status st = AllocDevice(&slot->io_device_, io_bytes, "device io"); !st.ok()) return st;
  if (absl::Status st = AllocMapped(&slot->out_host_, &slot->out_mapped_, out_bytes, "mapped pinned out"); !st.ok()) {
    return st;
  }
  if (absl::Status st = AllocDevice(&slot->workspace_, options.workspace_bytes, "workspace"); !st.ok()) return st;
  // The fused-merge counters must start at zero; every launch leaves them at zero.
  PKV_CUDA_RETURN(cudaMemset(slot->workspace_.get(), 0, options.workspace_bytes), "workspace memset");
  return slot;
}

CudaSlot::~CudaSlot() {
  // The stream's last work may still read the buffers; the members free them after this.
  if (stream_ != nullptr) cudaStreamSynchronize(stream_.get());
}

absl::Status CudaSlot::BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                      std::span<const kvpool::SlotAddr> /*new_slots*/) {
  // The attention launch appends each row's new token at the end of its last page (its slot), so
  // the slots themselves are not uploaded.
  const int32_t b = static_cast<int32_t>(table.last_page_len.size());
  // Only the work queue reads a work list; the other routes leave it empty.
  const bool work_queue = plan.kernel == KernelId::kWorkQueue;
  using Ints = std::span<const int32_t>;
  using Tasks = std::span<const DecodeTask>;
  const Ints row_splits = work_queue ? Ints(plan.row_splits) : Ints();
  const Ints partial_offset = work_queue ? Ints(plan.partial_offset) : Ints();
  const Tasks tasks = work_queue ? Tasks(plan.tasks) : Tasks();
  const Ints cta_task_begin = work_queue ? Ints(plan.cta_task_begin) : Ints();
  // The backend refused larger steps and plans (CudaBackend::BeginTokenStep), so the descriptor
  // holds them.
  PKV_CHECK(b <= options_.max_batch && static_cast<int64_t>(table.indices.size()) <= options_.indices_capacity &&
            static_cast<int64_t>(tasks.size()) <= options_.tasks_capacity)
      << "token step larger than the descriptor";
  step_.kernel = plan.kernel;
  step_.num_splits = plan.kernel == KernelId::kSequenceSplit ? plan.num_splits : 1;
  step_.num_partials = work_queue ? plan.num_partials : 0;
  step_.num_tasks = static_cast<int32_t>(tasks.size());
  step_.num_ctas = cta_task_begin.empty() ? 0 : static_cast<int32_t>(cta_task_begin.size()) - 1;
  step_.separate_merge =
      (work_queue || (plan.kernel == KernelId::kSequenceSplit && step_.num_splits > 1)) && plan.separate_merge;

  // The previous upload read host_descriptor_; it finished unless that token step ran no layer
  // (then this returns at once, as after every layer, which waits for the stream).
  PKV_CUDA_RETURN(cudaEventSynchronize(uploaded_.get()), "descriptor reuse");
  char* h = static_cast<char*>(host_descriptor_.get());
  size_t off = 0;
  auto put = [&](const void* src, size_t bytes) {
    const size_t at = off;
    if (bytes > 0) std::memcpy(h + at, src, bytes);
    off += Align16(bytes);
    return at;
  };
  step_.off_indptr = put(table.indptr.data(), table.indptr.size() * 4);
  step_.off_last = put(table.last_page_len.data(), table.last_page_len.size() * 4);
  step_.off_row_splits = put(row_splits.data(), row_splits.size() * 4);
  step_.off_partial_offset = put(partial_offset.data(), partial_offset.size() * 4);
  step_.off_indices = put(table.indices.data(), table.indices.size() * 4);
  step_.off_tasks = put(tasks.data(), tasks.size() * sizeof(DecodeTask));
  step_.off_cta_task_begin = put(cta_task_begin.data(), cta_task_begin.size() * 4);
  step_.batch = b;
  // A kernel pulls it up while prompt ingest's bulk copies may hold the copy engines
  // (kernels/cuda/host_pull.h); a copy engine takes it when none is queued.
  if (UploadByCopy()) {
    PKV_CUDA_RETURN(cudaMemcpyAsync(device_descriptor_.get(), host_descriptor_.get(), off, cudaMemcpyHostToDevice,
                                    stream_.get()),
                    "descriptor H2D");
  } else if (absl::Status st =
                 kernels::cuda::LaunchHostPull(device_descriptor_.get(), descriptor_mapped_, off, stream_.get());
             !st.ok()) {
    return st;
  }
  PKV_CUDA_RETURN(cudaEventRecord(uploaded_.get(), stream_.get()), "event");
  ++token_steps_begun_;
  if (b > 0) return kernels::cuda::CanImplement(plan.kernel, StepParams(0));
  return absl::OkStatus();
}

bool CudaSlot::UploadByCopy() const {
  switch (options_.upload) {
    case DecodeUpload::kPull:
      return false;
    case DecodeUpload::kCopy:
      return true;
    case DecodeUpload::kAuto:
      break;
  }
  return options_.arena->IngestCopiesIdle();
}

size_t CudaSlot::QBytes() const {
  const ModelShape& s = options_.arena->shape();
  return static_cast<size_t>(step_.batch) * s.num_q_heads * s.head_dim * DTypeSize(s.dtype);
}

size_t CudaSlot::KvBytes() const {
  const ModelShape& s = options_.arena->shape();
  return static_cast<size_t>(step_.batch) * s.num_kv_heads * s.head_dim * DTypeSize(s.dtype);
}

void CudaSlot::StageInputs(const void* q, const void* k, const void* v) {
  const size_t qb = QBytes(), kvb = KvBytes();
  char* io = static_cast<char*>(io_host_.get());
  const size_t k_at = Align16(qb), v_at = k_at + Align16(kvb);
  std::memcpy(io, q, qb);
  std::memcpy(io + k_at, k, kvb);
  std::memcpy(io + v_at, v, kvb);
}

kernels::DecodeParams CudaSlot::StepParams(int32_t layer) const {
  kernels::DecodeParams p = ArenaDecodeParams(*options_.arena, layer);
  char* d = static_cast<char*>(device_descriptor_.get());
  p.batch = step_.batch;
  p.q = io_device_.get();
  p.out = out_mapped_;
  p.page_indptr = reinterpret_cast<const int32_t*>(d + step_.off_indptr);
  p.page_indices = reinterpret_cast<const int32_t*>(d + step_.off_indices);
  p.last_page_len = reinterpret_cast<const int32_t*>(d + step_.off_last);
  p.num_splits = step_.num_splits;
  if (step_.kernel == KernelId::kWorkQueue) {
    p.tasks = reinterpret_cast<const DecodeTask*>(d + step_.off_tasks);
    p.num_tasks = step_.num_tasks;
    p.row_splits = reinterpret_cast<const int32_t*>(d + step_.off_row_splits);
    p.partial_offset = reinterpret_cast<const int32_t*>(d + step_.off_partial_offset);
    p.num_partials = step_.num_partials;
    if (step_.num_ctas > 0) {
      p.cta_task_begin = reinterpret_cast<const int32_t*>(d + step_.off_cta_task_begin);
      p.num_ctas = step_.num_ctas;
    }
  }
  return p;
}

kernels::DecodeParams CudaSlot::LayerParams(int32_t layer, bool has_lse, void* out_device) const {
  kernels::DecodeParams p = StepParams(layer);
  if (out_device != nullptr) p.out = out_device;
  // Every route's last writes (the attention, or the merge of partial states from the workspace)
  // go to out and lse: mapped host memory, read after the stream synchronisation.
  p.lse = has_lse ? reinterpret_cast<float*>(static_cast<char*>(out_mapped_) + Align16(QBytes())) : nullptr;
  return p;
}

absl::Status CudaSlot::EnqueueLayer(int32_t layer, bool has_lse, void* out_device, const InputAddresses* inputs,
                                    void* out_copy_device) {
  const size_t qb = QBytes(), kvb = KvBytes();
  const size_t k_at = Align16(qb), v_at = k_at + Align16(kvb);
  cudaStream_t stream = stream_.get();
  // Counted over the slot's layer-steps, shifted by one per token step: with a layer count that the
  // interval divides, the timed layers still move through every layer (not always layer 0, whose
  // host work is the token step's).
  const int64_t n = layers_enqueued_ + std::max<int64_t>(token_steps_begun_ - 1, 0);
  stages_timed_ = n % options_.stage_timing_interval == 0;
  attention_timed_ = stages_timed_ || n % options_.attention_timing_interval == 0;
  ++layers_enqueued_;
  if (stages_timed_) PKV_CUDA_RETURN(cudaEventRecord(h2d_start_.get(), stream), "event");
  // Pulled by a kernel on this high-priority stream, so it never waits behind prompt ingest's
  // copies on a copy engine (kernels/cuda/host_pull.h): from the staged io buffer in one piece,
  // or from the caller's registered memory in three. The staged buffer goes by a copy engine
  // while no ingest flush is in flight.
  char* dio = static_cast<char*>(io_device_.get());
  if (inputs == nullptr && UploadByCopy()) {
    // No prompt ingest copy is queued: a copy engine takes the staged buffer sooner than a pull
    // kernel's PCIe reads (about 5 against 8 us for a B1 layer's 12 KiB on an H200).
    PKV_CUDA_RETURN(cudaMemcpyAsync(dio, io_host_.get(), v_at + kvb, cudaMemcpyHostToDevice, stream), "H2D");
  } else if (inputs == nullptr) {
    if (absl::Status st = kernels::cuda::LaunchHostPull(dio, io_mapped_, v_at + kvb, stream); !st.ok()) return st;
  } else {
    const kernels::cuda::HostPullPiece pieces[3] = {
        {dio, inputs->q, qb}, {dio + k_at, inputs->k, kvb}, {dio + v_at, inputs->v, kvb}};
    if (absl::Status st = kernels::cuda::LaunchHostPull(pieces, 3, stream); !st.ok()) return st;
  }
  if (stages_timed_) PKV_CUDA_RETURN(cudaEventRecord(h2d_done_.get(), stream), "event");
  // The new tokens' K,V are appended by the attention launch itself (DecodeParams::append_k):
  // the warp that reads a row's new token writes it there first.
  kernels::DecodeParams p = LayerParams(layer, has_lse, out_device);
  p.append_k = dio + k_at;
  p.append_v = dio + v_at;
  p.out_copy = out_copy_device;
  if (attention_timed_) PKV_CUDA_RETURN(cudaEventRecord(start_.get(), stream), "event");
  const kernels::cuda::MergeMode merge =
      step_.separate_merge ? kernels::cuda::MergeMode::kSeparate : kernels::cuda::MergeMode::kFused;
  if (absl::Status st = kernels::cuda::Launch(step_.kernel, p, workspace_.get(), stream, merge); !st.ok()) return st;
  if (attention_timed_) PKV_CUDA_RETURN(cudaEventRecord(stop_.get(), stream), "event");
  return absl::OkStatus();
}

absl::Status CudaSlot::Synchronize() {
  PKV_CUDA_RETURN(cudaStreamSynchronize(stream_.get()), "layer");
  return absl::OkStatus();
}

void CudaSlot::CopyOutputs(void* out, float* lse) const {
  // The kernels wrote out_host_ through its mapping; Synchronize made those writes visible.
  const ModelShape& s = options_.arena->shape();
  const size_t qb = QBytes();
  if (out != nullptr) std::memcpy(out, out_host_.get(), qb);
  if (lse != nullptr) {
    std::memcpy(lse, static_cast<const char*>(out_host_.get()) + Align16(qb),
                static_cast<size_t>(step_.batch) * s.num_q_heads * 4);
  }
}

absl::Status CudaSlot::ReadStageTimes(LayerRunInfo* info) const {
  auto elapsed = [](const internal::CudaEvent& from, const internal::CudaEvent& to, double* seconds) {
    float ms = 0;
    PKV_CUDA_RETURN(cudaEventElapsedTime(&ms, from.get(), to.get()), "elapsed");
    *seconds = ms * 1e-3;
    return absl::OkStatus();
  };
  info->attention_timed = attention_timed_;
  info->attend_seconds = 0;
  if (attention_timed_) {
    if (absl::Status st = elapsed(start_, stop_, &info->attend_seconds); !st.ok()) return st;
  }
  info->h2d_seconds = 0;
  info->kernel_seconds = 0;
  info->d2h_seconds = 0;  // no download: the kernels write the outputs to host memory
  if (!stages_timed_) return absl::OkStatus();  // stage times not measured on this layer
  // [h2d_start, h2d_done) the q|k|v upload, [h2d_done, stop) append and attention.
  if (absl::Status st = elapsed(h2d_start_, h2d_done_, &info->h2d_seconds); !st.ok()) return st;
  if (absl::Status st = elapsed(h2d_done_, stop_, &info->kernel_seconds); !st.ok()) return st;
  return absl::OkStatus();
}

}  // namespace pkv::engine
