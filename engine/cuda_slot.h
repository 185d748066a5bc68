// engine/cuda_slot.h — one descriptor slot of the CUDA backend: the stream, buffers, events and
// workspace a layer-step touches besides the arena's pages, and the launch sequence of a layer on
// them.
//
// A slot holds at most one open token step. BeginTokenStep packs the step's page table and the
// scheduler's work list into the pinned descriptor and uploads it on the slot's stream (a small
// kernel pulls it from mapped pinned memory; the q|k|v upload likewise, so decode never waits
// behind prompt ingest on a copy engine, kernels/cuda/host_pull.h); every layer then stages q|k|v
// into pinned memory (StageInputs; not when they lie in host memory registered with CUDA, where
// the upload reads them in place), enqueues the q|k|v upload and the attention launch, which also
// appends the new tokens' K,V (EnqueueLayer), waits for the slot's stream only (Synchronize), and
// hands out the outputs (CopyOutputs) and the device time of its stages (ReadStageTimes). The
// attention writes out|lse straight into mapped pinned host memory, so no download is issued: the
// stream synchronisation makes those writes visible to CopyOutputs. Per layer that is one upload,
// one attention launch (two when the plan merges a work queue's split rows separately) and one
// synchronisation; one layer-step in
// Options::attention_timing_interval also brackets the attention with two events (an elapsed-time
// query after the synchronisation), and one in Options::stage_timing_interval times the upload and
// the kernel stage as well (two more records, two more queries). Everything is allocated by Create and freed by the destructor, which
// first drains the stream; nothing is allocated per step. The stream is created with the caller's
// priority (the backend gives slots the device's highest, so decode layers are scheduled ahead of
// prompt ingest on the arena's stream).
// Thread-safety: none inside; the backend calls a slot from one thread at a time (RunLayer of a
// slot never overlaps another call on that slot, engine/backend.h). Different slots share only
// the arena, whose pages their steps write disjointly, so they run concurrently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/decode_types.h"
#include "engine/backend.h"
#include "engine/cuda_backend.h"
#include "engine/internal/cuda_handles.h"
#include "kernels/decode_attention.h"
#include "kvpool/cuda/device_kv_arena.h"

namespace pkv::engine {

// The part of DecodeParams every step shares: the model's shape, 1/sqrt(d) and layer `layer`'s
// pages of `arena`.
kernels::DecodeParams ArenaDecodeParams(const kvpool::DeviceKvArena& arena, int32_t layer);

class CudaSlot;
using CudaSlotPtr = std::unique_ptr<CudaSlot>;

class CudaSlot {
 public:
  struct Options {
    kvpool::DeviceKvArena* arena = nullptr;  // not owned; outlives the slot
    int32_t max_batch = 0;                   // rows per token step
    int64_t indices_capacity = 0;            // page-table entries the descriptor holds
    int64_t tasks_capacity = 0;              // kWorkQueue tasks the descriptor holds
    size_t workspace_bytes = 0;              // partial states + fused-merge counters
    int stream_priority = 0;                 // of the slot's stream (lower number: higher priority)
    int32_t stage_timing_interval = 16;      // >= 1: time upload and kernel stage on one layer-step in N
    int32_t attention_timing_interval = 1;   // >= 1: time the attention on one layer-step in N
    DecodeUpload upload = DecodeUpload::kAuto;  // how q|k|v and the descriptor go up
  };

  // Creates the stream (non-blocking, options.stream_priority), the events and every buffer, and
  // zero-fills the workspace with cudaMemset on the legacy stream: the caller synchronises the
  // device before the slot's first use. INTERNAL "cuda backend: <what>: ..." on a CUDA failure.
  [[nodiscard]] static absl::StatusOr<CudaSlotPtr> Create(const Options& options);

  // Drains the stream, then frees everything.
  ~CudaSlot();
  CudaSlot(const CudaSlot&) = delete;
  CudaSlot& operator=(const CudaSlot&) = delete;

  // Commits a token step to the slot: waits until the previous step's descriptor upload read the
  // pinned descriptor, packs [indptr | last | row_splits | partial_offset | indices | tasks |
  // CTA ranges] into it and uploads it. `plan` as the scheduler made it: its kernel, kSequenceSplit's
  // num_splits, kWorkQueue's work list (row_splits, partial_offset, num_partials, tasks and, when
  // balanced, cta_task_begin).
  // Precondition (the backend checks it): the batch, page table and plan fit the capacities of
  // Options. An error of CanImplement when the route cannot run these params.
  [[nodiscard]] absl::Status BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                            std::span<const kvpool::SlotAddr> new_slots);

  // Rows of the open token step.
  int32_t batch() const { return step_.batch; }
  // Copies the layer's inputs (host, model dtype) into the pinned io buffer: `q` [B, Hq, d],
  // `k`, `v` [B, Hkv, d].
  void StageInputs(const void* q, const void* k, const void* v);

  // Device addresses of a layer's q, k, v in host memory registered with CUDA (each 16-byte
  // aligned), for EnqueueLayer to pull from where the caller wrote them.
  struct InputAddresses {
    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;
  };
  // Enqueues one layer on the stream: q|k|v upload (from `inputs`, or when it is null from what
  // StageInputs staged), append, the route's attention between the timing events, writing out to
  // `out_device` (mapped pinned host memory of the caller's, [B, Hq, d]) or, when it is null,
  // into the slot's mapped host buffer, and also to `out_copy_device` when not null (registered
  // host memory, [B, Hq, d]), and lse (when `has_lse`) into the slot's. Every
  // attention_timing_interval-th call of the slot (the first included) brackets the attention with
  // events, and every stage_timing_interval-th also the upload and the append + attention.
  [[nodiscard]] absl::Status EnqueueLayer(int32_t layer, bool has_lse, void* out_device, const InputAddresses* inputs,
                                          void* out_copy_device);

  // Waits for this slot's stream only; other slots' layers keep running.
  [[nodiscard]] absl::Status Synchronize();

  // After Synchronize: the layer's `out` [B, Hq, d] (unless `out` is null: EnqueueLayer wrote it
  // in place) and, when `lse` is not null, `lse` [B, Hq].
  void CopyOutputs(void* out, float* lse) const;

  // After Synchronize: the device time of the layer's stages into `info`: attend_seconds (the
  // attention launches) and attention_timed when EnqueueLayer timed the attention, else 0 and
  // false; h2d_seconds (q|k|v upload) and kernel_seconds (append +
  // attention) when EnqueueLayer timed this layer's stages, else 0 (not measured); d2h_seconds
  // always 0 (the kernels write the outputs to host memory, there is no download).
  [[nodiscard]] absl::Status ReadStageTimes(LayerRunInfo* info) const;

 private:
  // The open token step: its route's work and where BeginTokenStep put each array in the
  // descriptor (byte offsets).
  struct Step {
    KernelId kernel = KernelId::kPerRequest;
    int32_t batch = 0;
    int32_t num_splits = 1;
    int32_t num_partials = 0;
    int32_t num_tasks = 0;
    int32_t num_ctas = 0;  // CTA ranges of a balanced work list (0: strided)
    bool separate_merge = false;  // kWorkQueue, kSequenceSplit: split rows merged by a launch of their own
    size_t off_indptr = 0, off_last = 0, off_row_splits = 0, off_partial_offset = 0, off_indices = 0, off_tasks = 0, off_cta_task_begin = 0;
  };

  explicit CudaSlot(const Options& options) : options_(options) {}
  kernels::DecodeParams StepParams(int32_t layer) const;
  // The attention launch's arguments for the open token step's layer `layer` (lse written when
  // `has_lse`).
  kernels::DecodeParams LayerParams(int32_t layer, bool has_lse, void* out_device) const;
  bool UploadByCopy() const;  // options_.upload, and kAuto's answer now
  size_t QBytes() const;   // q or out of the open step: [B, Hq, d]
  size_t KvBytes() const;  // k or v of the open step: [B, Hkv, d]

  Options options_;
  size_t descriptor_bytes_ = 0;
  // Declared first: destroyed last, after the destructor drained it and the buffers are freed.
  internal::CudaStream stream_;
  internal::CudaEvent start_, stop_;  // bracket the attention launch(es), every layer
  // On sampled layers, with stop_: [h2d_start_, h2d_done_) the upload, [h2d_done_, stop_) append
  // and attention.
  internal::CudaEvent h2d_start_, h2d_done_;
  internal::CudaEvent uploaded_;       // the descriptor upload read `host_descriptor_`
  // The descriptor and q|k|v are written by the host into mapped pinned memory and pulled into
  // their device twins by a kernel on the slot's stream (kernels/cuda/host_pull.h).
  internal::PinnedBuffer host_descriptor_;
  void* descriptor_mapped_ = nullptr;  // its device address
  internal::DeviceBuffer device_descriptor_;  // its device twin
  internal::PinnedBuffer io_host_;      // q | k | v  [B, Hq, d] | [B, Hkv, d] | [B, Hkv, d]
  void* io_mapped_ = nullptr;           // its device address
  internal::DeviceBuffer io_device_;    // its device twin
  // out | lse  [B, Hq, d] | [B, Hq] fp32: mapped pinned memory the kernels write through
  // `out_mapped_` (its device address); no device twin, no download.
  internal::PinnedBuffer out_host_;
  void* out_mapped_ = nullptr;
  internal::DeviceBuffer workspace_;    // partial states + fused-merge counters (zeroed once)
  Step step_;
  int64_t layers_enqueued_ = 0;  // EnqueueLayer calls so far (picks the layers whose stages are timed)
  int64_t token_steps_begun_ = 0;  // BeginTokenStep calls so far (rotates which layers those are)
  bool stages_timed_ = false;    // the last EnqueueLayer recorded h2d_start_ and h2d_done_
  bool attention_timed_ = false;  // the last EnqueueLayer recorded start_ and stop_
};

}  // namespace pkv::engine
