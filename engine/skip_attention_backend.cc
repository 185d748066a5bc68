// SkipAttention: a backend wrapper that keeps every host step of the wrapped backend and drops
// the layer's device work, so that a worker can measure its transport and host floor.
// Concurrency is the wrapped backend's: RunLayer reads its slot's batch size (written by
// BeginTokenStep under the engine lock before the slot is handed out) and writes only its
// caller's out/lse buffers.
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/log.h"

#include "engine/backend.h"

namespace pkv::engine {
namespace {

class SkipAttentionBackend final : public ExecutionBackend {
 public:
  explicit SkipAttentionBackend(ExecutionBackendPtr inner)
      : inner_(std::move(inner)),
        name_(std::string(inner_->name()) + "+skip"),
        batch_(inner_->max_open_token_steps(), 0) {}

  const char* name() const override { return name_.c_str(); }
  kvpool::KvArena& arena() override { return inner_->arena(); }
  scheduler::DeviceInfo device_info() const override { return inner_->device_info(); }
  std::vector<KernelId> kernels() const override { return inner_->kernels(); }
  int32_t max_open_token_steps() const override { return inner_->max_open_token_steps(); }

  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    absl::StatusOr<int32_t> slot = inner_->BeginTokenStep(plan, table, new_slots);
    if (slot.ok()) {
      // Invariant: a backend hands out slots in [0, max_open_token_steps()).
      PKV_CHECK(*slot >= 0 && *slot < static_cast<int32_t>(batch_.size())) << "bad descriptor slot " << *slot;
      batch_[*slot] = static_cast<int64_t>(table.last_page_len.size());
    }
    return slot;
  }

  absl::Status RunLayer(int32_t slot, int32_t layer, const LayerBuffers& io, LayerRunInfo* info) override {
    (void)layer;  // `out` is host memory either way; the engine copies to out_copy
    const auto t0 = std::chrono::steady_clock::now();
    const ModelShape& s = inner_->arena().shape();
    const int64_t rows = batch_[slot] * s.num_q_heads;
    std::memset(io.out, 0, static_cast<size_t>(rows) * s.head_dim * DTypeSize(s.dtype));  // [B, Hq, d]
    if (io.lse != nullptr) std::memset(io.lse, 0, static_cast<size_t>(rows) * sizeof(float));  // [B, Hq]
    *info = LayerRunInfo{};
    info->attention_skipped = true;
    info->host_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return absl::OkStatus();
  }

  void EndTokenStep(int32_t slot) override { inner_->EndTokenStep(slot); }
  // No device work here: the engine copies the outputs to out_copy.
  absl::Status RegisterHostMemory(void* base, size_t bytes) override {
    (void)base, (void)bytes;
    return absl::UnimplementedError("attention is skipped: no device reads or writes host memory");
  }
  OutputMemory* output_memory() override { return inner_->output_memory(); }

 private:
  ExecutionBackendPtr inner_;
  std::string name_;
  std::vector<int64_t> batch_;  // [slot] rows of the token step open in it
};

}  // namespace

ExecutionBackendPtr SkipAttention(ExecutionBackendPtr inner) {
  return std::make_unique<SkipAttentionBackend>(std::move(inner));
}

}  // namespace pkv::engine
