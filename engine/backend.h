// engine/backend.h — the seam between the engine and the hardware that runs attention.
//
// An ExecutionBackend owns the KV arena of one model shape and runs decode steps. Per token step
// the engine calls BeginTokenStep once (layer 0): the backend takes the step's page table, the new
// token slot of every row and the scheduler's plan, and commits them to one of its descriptor
// slots (on the GPU: one descriptor in pinned memory, pulled up once). Every layer then calls RunLayer
// with that slot: append the layer's new K,V into the slots, run attention with the plan. Several
// token steps may be open at once (micro-batches interleaving their layers), up to
// max_open_token_steps(). The CPU backend runs kernels/reference; the CUDA backend
// (PKV_WITH_CUDA, engine/cuda_backend.h) runs kernels/cuda, one stream per descriptor slot.
// Thread-safety: the engine serialises BeginTokenStep, EndTokenStep, arena() mutations and every
// other call under its lock (but (Un)RegisterHostMemory, which lock for themselves). RunLayer is called WITHOUT that lock and may run concurrently with
// RunLayer of *different* slots and with BeginTokenStep/EndTokenStep of other slots and arena
// writes (prompt ingest, copy-on-write) into pages no open token step reads; never twice at once
// for the same slot, and never concurrently with EndTokenStep of its own slot. The rows of
// different open token steps are disjoint and their new-token slots lie in pages owned by them
// alone (copy-on-write ran at BeginTokenStep), so concurrent RunLayers write disjoint memory.
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
#include "engine/output_pool.h"
#include "scheduler/step_plan.h"

namespace pkv::engine {

// What a backend reports about one layer it ran. The stage times (seconds) split the layer:
// host_seconds is the backend's own work on the calling thread (staging inputs, launches,
// copying outputs out), not its waits for the device; h2d/kernel/d2h are device time of the
// input copies, of the kernels (KV append and attention) and of the output copies.
// host_seconds is measured on every layer. attend_seconds is measured where attention_timed is set:
// the CUDA backend brackets the attention with two events on one layer-step in
// CudaBackendOptions::attention_timing_interval per descriptor slot (the events cost the layer
// about 3 us of wall time on an H200) and leaves it 0 on the others; the CPU backend measures
// every layer. h2d/kernel/d2h are sampled more sparsely still: the CUDA backend times them on one
// layer-step in CudaBackendOptions::stage_timing_interval per descriptor slot (attention timed on
// those too) and leaves them 0 on the others, so consumers must treat all three 0 (with
// attention_skipped false) as "not measured", not as free. d2h_seconds is always 0 on the CUDA
// backend: the kernels write out and lse to host memory, no download is issued. The CPU backend
// measures every layer and has no copies: its kernel time is the KV write plus the reference
// kernel.
struct LayerRunInfo {
  double attend_seconds = 0;  // the attention's device time (part of kernel_seconds) when attention_timed
  double host_seconds = 0;
  double h2d_seconds = 0;
  double kernel_seconds = 0;
  double d2h_seconds = 0;
  bool attention_skipped = false;  // SkipAttention: no KV written, no attention, zero outputs
  bool attention_timed = true;     // attend_seconds was measured on this layer (else it is 0)
  // The device read q, k and v from, and wrote LayerBuffers::out_copy into, registered host
  // memory itself (RegisterHostMemory). False: the caller copies the outputs to out_copy.
  bool in_place = false;
};

// One layer's tensors for RunLayer: host addresses, model dtype.
struct LayerBuffers {
  const void* q = nullptr;  // [B, Hq, d]
  const void* k = nullptr;  // [B, Hkv, d] the rows' new tokens
  const void* v = nullptr;  // [B, Hkv, d]
  void* out = nullptr;      // [B, Hq, d]
  // The device address of `out` when it is a block of output_memory() (the kernels then write it
  // directly), else null.
  void* out_device = nullptr;
  // [B, Hq, d] host memory the outputs also go to, or null: written by the device when it lies in
  // registered host memory (LayerRunInfo::in_place), else left to the caller.
  void* out_copy = nullptr;
  float* lse = nullptr;  // [B, Hq] or null
};

// One token step's page table in CSR form (host memory), shared by all of its layers.
struct PageTableCsr {
  std::vector<int32_t> indptr;         // [B + 1]
  std::vector<int32_t> indices;        // [indptr[B]]
  std::vector<int32_t> last_page_len;  // [B]
};

class ExecutionBackend {
 public:
  virtual ~ExecutionBackend() = default;

  // "cpu" or "cuda" ("cpu+skip", "cuda+skip" behind SkipAttention).
  virtual const char* name() const = 0;
  virtual kvpool::KvArena& arena() = 0;
  virtual scheduler::DeviceInfo device_info() const = 0;
  // Routes this backend can run.
  virtual std::vector<KernelId> kernels() const = 0;

  // Descriptor slots: token steps that may be open at once.
  virtual int32_t max_open_token_steps() const = 0;

  // Commits a token step (page table, each row's new-token slot, plan) to a free descriptor slot
  // and returns the slot. The engine guarantees a slot is free (it counts open token steps). The
  // plan runs as it stands (the scheduler fitted it to device_info().limits); a backend refuses a
  // plan that exceeds its capacity and never changes one.
  [[nodiscard]] virtual absl::StatusOr<int32_t> BeginTokenStep(
      const scheduler::StepPlan& plan, const PageTableCsr& table,
      std::span<const kvpool::SlotAddr> new_slots) = 0;

  // One layer of an open token step (concurrency: see the file comment): writes `io.k`, `io.v`
  // into the rows' new-token slots, then runs attention of `io.q` into `io.out` (and `io.out_copy`
  // where the device can write it, see LayerBuffers) and `io.lse` when not null. `info` (not null)
  // receives the attention's device time and the layer's stage times.
  [[nodiscard]] virtual absl::Status RunLayer(int32_t slot, int32_t layer, const LayerBuffers& io,
                                              LayerRunInfo* info) = 0;

  // Lets the device read a layer's q, k, v from, and write its out_copy into, host memory
  // [base, base + bytes) in place, with no host copy (a router's shared-memory region): OK when
  // registered; UNIMPLEMENTED for a backend without a device of its own; another error when the
  // memory cannot be registered. Layers whose tensors lie elsewhere are copied as before. Undone
  // by UnregisterHostMemory(base), before the memory is unmapped and while no RunLayer reads or
  // writes it. Both may be called from any thread, concurrently with RunLayer.
  [[nodiscard]] virtual absl::Status RegisterHostMemory(void* base, size_t bytes) {
    (void)base, (void)bytes;
    return absl::UnimplementedError("this backend reads and writes host memory directly");
  }
  virtual void UnregisterHostMemory(void* base) { (void)base; }

  // Memory the engine's output buffers come from while it has room (see engine/output_pool.h),
  // or null (heap only). Owned by the backend.
  virtual OutputMemory* output_memory() { return nullptr; }

  // Frees the descriptor slot of a completed or aborted token step.
  virtual void EndTokenStep(int32_t slot) = 0;
};
using ExecutionBackendPtr = std::unique_ptr<ExecutionBackend>;

// The CPU backend: a host arena of `num_pages` pages and the reference kernel on `num_threads`
// threads (0: hardware concurrency).
absl::StatusOr<ExecutionBackendPtr> CreateCpuBackend(const ModelShape& shape, int64_t num_pages,
                                                     int num_threads);

// Wraps `inner` so that RunLayer does no device work: no q/k/v upload, no KV append, no
// attention; `out` and `lse` are zero-filled and LayerRunInfo::attention_skipped is set.
// Everything else (arena, BeginTokenStep's descriptor packing and upload, EndTokenStep) is
// `inner`'s, so the engine's host work per step is that of a real run. The name gains "+skip".
// For measuring the transport and host floor of a step (pkv-worker --attention=skip); the KV
// pool's bytes stop matching what clients sent. Thread-safety: as `inner`.
ExecutionBackendPtr SkipAttention(ExecutionBackendPtr inner);

}  // namespace pkv::engine
