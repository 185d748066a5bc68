// The CPU backend: a host KV arena and kernels/reference, the executable specification.
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "kernels/reference/paged_decode.h"

namespace pkv::engine {
namespace {

class CpuBackend final : public ExecutionBackend {
 public:
  CpuBackend(std::unique_ptr<kvpool::HostKvArena> arena, int num_threads)
      : arena_(std::move(arena)), num_threads_(num_threads) {}

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

  absl::Status Attend(const scheduler::StepPlan& plan, int32_t layer, const PageTableCsr& table,
                      const void* q, void* out, float* lse) override {
    if (plan.kernel != KernelId::kReference) {
      return absl::InvalidArgumentError(
          absl::StrCat("the cpu backend cannot run kernel ", KernelName(plan.kernel)));
    }
    const ModelShape& s = arena_->shape();
    kernels::DecodeParams p;
    p.dtype = s.dtype;
    p.batch = static_cast<int32_t>(table.last_page_len.size());
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = s.page_size;
    p.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    p.q = q;
    p.kv = arena_->layer_data(layer);
    p.num_pages = arena_->num_pages();
    p.page_indptr = table.indptr.data();
    p.page_indices = table.indices.data();
    p.last_page_len = table.last_page_len.data();
    p.out = out;
    p.lse = lse;
    return kernels::reference::Launch(p, nullptr, nullptr, num_threads_);
  }

 private:
  std::unique_ptr<kvpool::HostKvArena> arena_;
  int num_threads_;
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
