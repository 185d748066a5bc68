// engine/backend.h — the seam between the engine and the hardware that runs attention.
//
// An ExecutionBackend owns the KV arena of one model shape and executes one layer's decode
// attention for a batch whose page table the engine built on the host. The CPU backend runs
// kernels/reference; the CUDA backend (PKV_WITH_CUDA) runs kernels/cuda on a stream.
// Thread-safety: the engine serialises calls into one backend.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/decode_types.h"
#include "kvpool/kv_arena.h"
#include "scheduler/step_plan.h"

namespace pkv::engine {

// One token step's page table in CSR form (host memory), shared by all of its layers.
struct PageTableCsr {
  std::vector<int32_t> indptr;         // [B + 1]
  std::vector<int32_t> indices;        // [indptr[B]]
  std::vector<int32_t> last_page_len;  // [B]
};

class ExecutionBackend {
 public:
  virtual ~ExecutionBackend() = default;

  // "cpu" or "cuda".
  virtual const char* name() const = 0;
  virtual kvpool::KvArena& arena() = 0;
  virtual scheduler::DeviceInfo device_info() const = 0;
  // Routes this backend can run.
  virtual std::vector<KernelId> kernels() const = 0;

  // Runs one layer's attention for the batch. `q` [B, Hq, d] and `out` [B, Hq, d] are host
  // buffers of the model dtype; `lse` [B, Hq] may be null.
  [[nodiscard]] virtual absl::Status Attend(const scheduler::StepPlan& plan, int32_t layer,
                                            const PageTableCsr& table, const void* q, void* out,
                                            float* lse) = 0;
};
using ExecutionBackendPtr = std::unique_ptr<ExecutionBackend>;

// The CPU backend: a host arena of `num_pages` pages and the reference kernel on `num_threads`
// threads (0: hardware concurrency).
absl::StatusOr<ExecutionBackendPtr> CreateCpuBackend(const ModelShape& shape, int64_t num_pages,
                                                     int num_threads);

}  // namespace pkv::engine
