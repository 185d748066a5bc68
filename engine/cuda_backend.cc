// engine/cuda_backend.cc — the CUDA ExecutionBackend (engine/cuda_backend.h): sizes and creates the
// descriptor slots (engine/cuda_slot.h) and reports their capacity as the scheduler's PlanLimits;
// hands token steps to free slots with the scheduler's plan as it stands (refusing one that
// exceeds the capacity); runs a layer on its slot and reports its stage times.
// Thread-safety: as engine/backend.h; RunLayer touches only its own slot.
#include "engine/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "engine/cuda_slot.h"
#include "engine/internal/cuda_handles.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kvpool/cuda/device_kv_arena.h"

namespace pkv::engine {
namespace {

// Mapped pinned host memory for layer-step outputs, allocated and populated once (Create) in
// slabs and handed out in blocks that are never given back (OutputPool keeps them): the kernels
// write a layer's outputs straight into the buffer the engine answers with, and no output buffer
// page-faults or is allocated while serving. A block larger than a slab, or one past the total,
// is refused (the pool then uses the heap and the slot copies the outputs out of its own
// buffer). Thread-safety: Allocate locks.
class PinnedOutputMemory final : public OutputMemory {
 public:
  static constexpr size_t kSlabBytes = size_t{32} << 20;

  // `bytes` (> 0) rounded up to whole slabs. INTERNAL on a CUDA failure.
  static absl::StatusOr<std::unique_ptr<PinnedOutputMemory>> Create(size_t bytes) {
    auto memory = std::unique_ptr<PinnedOutputMemory>(new PinnedOutputMemory());
    for (size_t done = 0; done < bytes; done += kSlabBytes) {
      void* p = nullptr;
      PKV_CUDA_RETURN(cudaHostAlloc(&p, kSlabBytes, cudaHostAllocMapped), "pinned output memory");
      // The slab lives until the memory and every block carved from it are gone.
      std::shared_ptr<void> slab(p, [](void* q) { cudaFreeHost(q); });
      void* device = nullptr;
      PKV_CUDA_RETURN(cudaHostGetDevicePointer(&device, p, 0), "pinned output memory");
      memory->slabs_.push_back(Slab{std::move(slab), static_cast<char*>(p), static_cast<char*>(device), 0});
    }
    return memory;
  }

  Block Allocate(size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (; next_ < slabs_.size(); ++next_) {
      Slab& s = slabs_[next_];
      if (s.used + bytes > kSlabBytes) continue;  // the rest of this slab stays unused
      Block b{s.host + s.used, s.device + s.used, s.mem};
      s.used += bytes;
      return b;
    }
    return Block{};
  }

  size_t total_bytes() const { return slabs_.size() * kSlabBytes; }

 private:
  struct Slab {
    std::shared_ptr<void> mem;
    char* host;
    char* device;
    size_t used;
  };
  PinnedOutputMemory() = default;
  std::mutex mu_;
  std::vector<Slab> slabs_;
  size_t next_ = 0;  // slabs before it are full
};

class CudaBackend final : public ExecutionBackend {
 public:
  CudaBackend(std::unique_ptr<kvpool::DeviceKvArena> arena, const CudaBackendOptions& options)
      : arena_(std::move(arena)), options_(options) {}

  absl::Status Init() {
    const ModelShape& s = arena_->shape();
    cudaDeviceProp prop;
    PKV_CUDA_RETURN(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    info_.name = prop.name;
    info_.is_gpu = true;
    info_.num_sms = prop.multiProcessorCount;
    if (options_.max_open_token_steps < 1) return absl::InvalidArgumentError("max_open_token_steps must be >= 1");
    if (options_.stage_timing_interval < 1) return absl::InvalidArgumentError("stage_timing_interval must be >= 1");
    if (options_.attention_timing_interval < 1) {
      return absl::InvalidArgumentError("attention_timing_interval must be >= 1");
    }
    // Slot streams get the device's highest priority: decode layers are scheduled ahead of prompt
    // ingest on the arena's stream.
    int least_priority = 0, greatest_priority = 0;
    PKV_CUDA_RETURN(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority), "stream priority range");

    const int64_t b = options_.max_batch;
    indices_capacity_ = 2 * arena_->num_pages() + b;
    tasks_capacity_ = std::min<int64_t>(static_cast<int64_t>(s.num_kv_heads) * indices_capacity_, 1 << 20);
    kernels::DecodeParams ws = ArenaDecodeParams(*arena_, 0);
    ws.batch = 1;
    ws.num_splits = options_.max_partial_slots;
    CudaSlot::Options so;
    so.arena = arena_.get();
    so.max_batch = options_.max_batch;
    so.indices_capacity = indices_capacity_;
    so.tasks_capacity = tasks_capacity_;
    so.workspace_bytes = kernels::cuda::WorkspaceBytes(KernelId::kSequenceSplit, ws);
    so.stream_priority = greatest_priority;
    so.stage_timing_interval = options_.stage_timing_interval;
    so.upload = options_.decode_upload;
    so.attention_timing_interval = options_.attention_timing_interval;
    // The scheduler fits every plan to these (scheduler/work_list.h); BeginTokenStep refuses the rest.
    info_.limits.max_partial_slots = options_.max_partial_slots;
    info_.limits.max_tasks = tasks_capacity_;
    grid_ = kernels::cuda::PersistentGridSize(ws);
    // Everything a layer touches is per slot, so slots run concurrently on their own streams;
    // only the arena's pages are shared (disjoint writes, see engine/backend.h).
    slots_.resize(options_.max_open_token_steps);
    for (int32_t i = 0; i < static_cast<int32_t>(slots_.size()); ++i) {
      absl::StatusOr<CudaSlotPtr> slot = CudaSlot::Create(so);
      if (!slot.ok()) return slot.status();
      slots_[i].slot = std::move(*slot);
    }
    if (options_.pinned_output_bytes > 0) {
      auto memory = PinnedOutputMemory::Create(static_cast<size_t>(options_.pinned_output_bytes));
      if (!memory.ok()) return memory.status();
      output_memory_ = std::move(*memory);
    }
    PKV_CUDA_RETURN(cudaDeviceSynchronize(), "init");
    PKV_LOG(INFO) << "cuda backend on " << info_.name << " (" << info_.num_sms << " SMs): "
                  << arena_->num_pages() << " pages (" << arena_->layer_bytes() * s.num_layers / (1 << 20)
                  << " MiB KV), " << slots_.size() << " descriptor slots with a stream (priority "
                  << greatest_priority << ", the highest; lowest " << least_priority << ") and "
                  << so.workspace_bytes / (1 << 20) << " MiB workspace each, persistent grid " << grid_
                  << ", attention timed on one layer-step in " << options_.attention_timing_interval
                  << " and its stages on one in " << options_.stage_timing_interval << " per slot, "
                  << (output_memory_ != nullptr ? output_memory_->total_bytes() >> 20 : 0)
                  << " MiB of pinned host memory for outputs written in place";
    return absl::OkStatus();
  }

  const char* name() const override { return "cuda"; }
  kvpool::KvArena& arena() override { return *arena_; }
  scheduler::DeviceInfo device_info() const override { return info_; }
  std::vector<KernelId> kernels() const override {
    return {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  }
  int32_t max_open_token_steps() const override { return options_.max_open_token_steps; }
  OutputMemory* output_memory() override { return output_memory_.get(); }

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
    const int32_t b = static_cast<int32_t>(table.last_page_len.size());
    if (b > options_.max_batch) return absl::InvalidArgumentError("batch larger than max_batch");
    if (static_cast<int64_t>(table.indices.size()) > indices_capacity_) {
      return absl::ResourceExhaustedError("page table larger than the descriptor holds");
    }
    // The plan runs as the scheduler made it: splits or the compact task list are packed, never changed.
    PKV_RETURN_IF_ERROR(CheckPlan(plan, b));
    if (absl::Status st = slots_[id].slot->BeginTokenStep(plan, table, new_slots); !st.ok()) return st;
    slots_[id].used = true;
    return id;
  }

  absl::Status RunLayer(int32_t id, int32_t layer, const LayerBuffers& io, LayerRunInfo* info) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    CudaSlot& slot = *slots_[id].slot;
    const auto t0 = std::chrono::steady_clock::now();
    // In place when q, k, v and out_copy all lie in registered host memory: the upload reads the
    // caller's bytes and the kernels write out_copy too, with no host copy either way.
    const ModelShape& s = arena_->shape();
    const size_t rows = slot.batch();
    const size_t q_bytes = rows * s.num_q_heads * s.head_dim * DTypeSize(s.dtype);
    const size_t kv_bytes = rows * s.num_kv_heads * s.head_dim * DTypeSize(s.dtype);
    CudaSlot::InputAddresses in_place;
    void* out_copy_device = nullptr;
    {
      std::shared_lock<std::shared_mutex> lock(registered_mu_);
      if (io.out_copy != nullptr && !registered_.empty()) {
        in_place.q = RegisteredDeviceAddress(io.q, q_bytes);
        in_place.k = RegisteredDeviceAddress(io.k, kv_bytes);
        in_place.v = RegisteredDeviceAddress(io.v, kv_bytes);
        out_copy_device = const_cast<void*>(RegisteredDeviceAddress(io.out_copy, q_bytes));
      }
    }
    info->in_place = in_place.q != nullptr && in_place.k != nullptr && in_place.v != nullptr && out_copy_device != nullptr;
    if (!info->in_place) {
      out_copy_device = nullptr;
      slot.StageInputs(io.q, io.k, io.v);
    }
    // Outputs in a block of output_memory() are written there by the kernels; others are copied
    // out of the slot's buffer.
    if (absl::Status st = slot.EnqueueLayer(layer, io.lse != nullptr, io.out_device, info->in_place ? &in_place : nullptr,
                                            out_copy_device);
        !st.ok()) {
      return st;
    }
    const auto enqueued = std::chrono::steady_clock::now();
    if (absl::Status st = slot.Synchronize(); !st.ok()) return st;
    const auto synced = std::chrono::steady_clock::now();
    slot.CopyOutputs(io.out_device != nullptr ? nullptr : io.out, io.lse);
    if (absl::Status st = slot.ReadStageTimes(info); !st.ok()) return st;  // leaves in_place
    // Host work: staging and launching before the wait, copying the outputs out after it.
    info->host_seconds = std::chrono::duration<double>(enqueued - t0).count() +
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - synced).count();
    return absl::OkStatus();
  }

  absl::Status RegisterHostMemory(void* base, size_t bytes) override {
    if (base == nullptr || bytes == 0) return absl::InvalidArgumentError("RegisterHostMemory: empty range");
    std::unique_lock<std::shared_mutex> lock(registered_mu_);
    for (const Registered& r : registered_) {
      if (r.begin == base) return absl::AlreadyExistsError("RegisterHostMemory: already registered");
    }
    // Mapped (a device address of its own) and portable; pinning takes time in proportion to the
    // bytes, once per region.
    PKV_CUDA_RETURN(cudaHostRegister(base, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable),
                    "registering host memory");
    void* device = nullptr;
    if (const cudaError_t e = cudaHostGetDevicePointer(&device, base, 0); e != cudaSuccess) {
      cudaHostUnregister(base);
      return absl::InternalError(absl::StrCat("cuda backend: registered host memory: ", cudaGetErrorString(e)));
    }
    registered_.push_back(Registered{static_cast<char*>(base), bytes, static_cast<char*>(device)});
    return absl::OkStatus();
  }

  void UnregisterHostMemory(void* base) override {
    std::unique_lock<std::shared_mutex> lock(registered_mu_);
    for (size_t i = 0; i < registered_.size(); ++i) {
      if (registered_[i].begin != base) continue;
      if (const cudaError_t e = cudaHostUnregister(base); e != cudaSuccess) {
        PKV_LOG(WARNING) << "cuda backend: unregistering host memory: " << cudaGetErrorString(e);
      }
      registered_.erase(registered_.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
  }

  void EndTokenStep(int32_t id) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    slots_[id].used = false;
  }

 private:
  struct SlotEntry {
    CudaSlotPtr slot;
    bool used = false;
  };

  // OK when the slots can run `plan` for `b` rows as it stands: INVALID_ARGUMENT for a malformed
  // plan (no splits, a work list that is not for this batch), RESOURCE_EXHAUSTED for one that
  // exceeds the workspace's partial slots or the descriptor's tasks (device_info().limits).
  absl::Status CheckPlan(const scheduler::StepPlan& plan, int32_t b) const {
    if (plan.kernel == KernelId::kSequenceSplit) {
      if (plan.num_splits < 1) return absl::InvalidArgumentError("plan has fewer than 1 split");
      if (plan.num_splits > 1 && static_cast<int64_t>(plan.num_splits) * b > options_.max_partial_slots) {
        return absl::ResourceExhaustedError(absl::StrCat("plan's ", plan.num_splits, " splits of ", b,
                                                         " rows exceed the workspace's ", options_.max_partial_slots,
                                                         " partial slots"));
      }
    } else if (plan.kernel == KernelId::kWorkQueue) {
      if (static_cast<int32_t>(plan.row_splits.size()) != b || static_cast<int32_t>(plan.partial_offset.size()) != b ||
          plan.tasks.empty()) {
        return absl::InvalidArgumentError("plan has no work list for this batch");
      }
      if (!plan.cta_task_begin.empty() &&
          (plan.balanced_ctas < 1 || plan.balanced_ctas > static_cast<int32_t>(plan.tasks.size()) ||
           static_cast<int32_t>(plan.cta_task_begin.size()) != plan.balanced_ctas + 1 ||
           plan.cta_task_begin.front() != 0 ||
           plan.cta_task_begin.back() != static_cast<int32_t>(plan.tasks.size()) ||
           !std::is_sorted(plan.cta_task_begin.begin(), plan.cta_task_begin.end()))) {
        return absl::InvalidArgumentError("plan's CTA ranges do not cover its work list");
      }
      if (plan.num_partials > options_.max_partial_slots ||
          static_cast<int64_t>(plan.tasks.size()) > tasks_capacity_) {
        return absl::ResourceExhaustedError(absl::StrCat("plan's work list (", plan.tasks.size(), " tasks, ",
                                                         plan.num_partials, " partial slots) exceeds the descriptor's ",
                                                         tasks_capacity_, " tasks or the workspace's ",
                                                         options_.max_partial_slots, " partial slots"));
      }
    }
    return absl::OkStatus();
  }

  // A block of host memory registered with CUDA: [begin, begin + bytes), `device` its address in
  // kernels.
  struct Registered {
    char* begin;
    size_t bytes;
    char* device;
  };

  // The device address of host bytes [p, p + bytes) when they lie in one registered block and are
  // 16-byte aligned, else null. Caller holds registered_mu_.
  const void* RegisteredDeviceAddress(const void* p, size_t bytes) const {
    const char* c = static_cast<const char*>(p);
    if (c == nullptr || reinterpret_cast<uintptr_t>(c) % 16 != 0) return nullptr;
    for (const Registered& r : registered_) {
      if (c >= r.begin && bytes <= r.bytes && static_cast<size_t>(c - r.begin) <= r.bytes - bytes) {
        return r.device + (c - r.begin);
      }
    }
    return nullptr;
  }

  // Declared first: destroyed after the slots, whose streams' last work may touch its pages.
  std::unique_ptr<kvpool::DeviceKvArena> arena_;
  std::shared_mutex registered_mu_;  // registered_: written by (Un)RegisterHostMemory, read by RunLayer
  std::vector<Registered> registered_;
  // Before the slots: destroyed after them (their streams drain first); blocks still in use keep
  // their slabs alive.
  std::unique_ptr<PinnedOutputMemory> output_memory_;
  CudaBackendOptions options_;
  scheduler::DeviceInfo info_;
  std::vector<SlotEntry> slots_;
  int64_t indices_capacity_ = 0, tasks_capacity_ = 0;
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
  ao.ingest_copy_threads = options.ingest_copy_threads;
  ao.ingest_nice = options.ingest_nice;
  auto arena = kvpool::DeviceKvArena::Create(shape, ao);
  if (!arena.ok()) return arena.status();
  auto backend = std::make_unique<CudaBackend>(std::move(*arena), options);
  if (absl::Status s = backend->Init(); !s.ok()) return s;
  return ExecutionBackendPtr(std::move(backend));
}

}  // namespace pkv::engine
