// The CPU backend: a host KV arena and kernels/reference, the executable specification.
// Concurrent RunLayer of different slots is safe: each reads only its own Slot (written by
// BeginTokenStep before the slot is handed out, under the engine lock), writes only its rows'
// new-token slots (disjoint from other open token steps) and its caller's out/lse, and
// kernels::reference::Launch is reentrant (it touches only its params' buffers and joins the
// threads it starts).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "engine/backend.h"
#include "kernels/reference/paged_decode.h"

namespace pkv::engine {
namespace {

class CpuBackend final : public ExecutionBackend {
 public:
  static constexpr int32_t kSlots = 8;

  CpuBackend(std::unique_ptr<kvpool::HostKvArena> arena, int num_threads)
      : arena_(std::move(arena)), num_threads_(num_threads), slots_(kSlots) {}

  const char* name() const override { return "cpu"; }
  kvpool::KvArena& arena() override { return *arena_; }
  scheduler::DeviceInfo device_info() const override {
    scheduler::DeviceInfo info;
    info.name = "cpu";
    info.is_gpu = false;
    info.num_sms = num_threads_;
    return info;
  }
  std::vector<KernelId> kernels() const override { return {KernelId::kReference}; }
  int32_t max_open_token_steps() const override { return kSlots; }

  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    if (plan.kernel != KernelId::kReference) {
      return absl::InvalidArgumentError(absl::StrCat("the cpu backend cannot run kernel ", KernelName(plan.kernel)));
    }
    for (int32_t s = 0; s < kSlots; ++s) {
      if (!slots_[s].used) {
        slots_[s].used = true;
        slots_[s].table = table;
        slots_[s].new_slots.assign(new_slots.begin(), new_slots.end());
        return s;
      }
    }
    return absl::ResourceExhaustedError("no free descriptor slot");
  }

  absl::Status RunLayer(int32_t slot, int32_t layer, const LayerBuffers& io, LayerRunInfo* info) override {
    // No output memory of its own (`out` is always host memory) and no registered memory (the
    // engine copies to io.out_copy).
    PKV_CHECK(slot >= 0 && slot < kSlots && slots_[slot].used) << "bad descriptor slot " << slot;
    const Slot& d = slots_[slot];
    // No copies on the host: the kernel stage is the KV write plus the reference kernel.
    *info = LayerRunInfo{};
    const auto t_write = std::chrono::steady_clock::now();
    if (!d.new_slots.empty()) {
      if (auto s = arena_->WriteTokens(layer, d.new_slots, io.k, io.v); !s.ok()) return s;
    }
    const ModelShape& s = arena_->shape();
    kernels::DecodeParams p;
    p.dtype = s.dtype;
    p.batch = static_cast<int32_t>(d.table.last_page_len.size());
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = s.page_size;
    p.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    p.q = io.q;
    p.kv = arena_->layer_data(layer);
    p.num_pages = arena_->num_pages();
    p.page_indptr = d.table.indptr.data();
    p.page_indices = d.table.indices.data();
    p.last_page_len = d.table.last_page_len.data();
    p.out = io.out;
    p.lse = io.lse;
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status st = kernels::reference::Launch(p, nullptr, nullptr, num_threads_);
    const auto t1 = std::chrono::steady_clock::now();
    info->attend_seconds = std::chrono::duration<double>(t1 - t0).count();
    info->kernel_seconds = std::chrono::duration<double>(t1 - t_write).count();
    return st;
  }

  void EndTokenStep(int32_t slot) override {
    PKV_CHECK(slot >= 0 && slot < kSlots && slots_[slot].used) << "bad descriptor slot " << slot;
    slots_[slot] = Slot{};
  }

 private:
  struct Slot {
    bool used = false;
    PageTableCsr table;
    std::vector<kvpool::SlotAddr> new_slots;
  };
  std::unique_ptr<kvpool::HostKvArena> arena_;
  int num_threads_;
  std::vector<Slot> slots_;
};

}  // namespace

absl::StatusOr<ExecutionBackendPtr> CreateCpuBackend(const ModelShape& shape, int64_t num_pages,
                                                     int num_threads) {
  auto arena = kvpool::HostKvArena::Create(shape, num_pages);
  if (!arena.ok()) return arena.status();
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return ExecutionBackendPtr(new CpuBackend(std::move(*arena), num_threads));
}

}  // namespace pkv::engine
