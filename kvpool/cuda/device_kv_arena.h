// kvpool/cuda/device_kv_arena.h — the KV pool in device memory (kvpool::KvArena on the GPU).
//
// One cudaMalloc at creation holds every layer's pages, [layers][pages][2][Hkv][P][d], sized by a
// page count or by a fraction of the device's free memory; nothing is allocated afterwards except
// the pinned staging buffers (also at creation). The per-step path is LaunchAppendKv (append_kv.h)
// on the engine's stream; WriteTokens/ReadTokens/CopyPage are synchronous helpers on the arena's
// own stream (tests, copy-on-write). IngestPages writes prompt KV that arrives page-formatted
// through double-buffered pinned staging, one cudaMemcpyAsync per run of consecutive physical
// pages per layer, and reports its bandwidth. StageTokens/FlushStaged are the merged WriteKV path:
// chunks of any sequences are packed (kvpool/ingest_staging.h) into one of two pinned ingest
// buffers; a full buffer is flushed as one host->device copy of [K,V rows | run table] (a copy
// engine serves it without regard to stream priority, so the engine's decode path does not use
// the copy engines for its uploads) plus one scatter launch on the arena's stream while the other buffer fills; FlushStaged flushes and
// synchronises that stream. Packing is the host's share of the bandwidth (one core's memcpy is a
// fraction of what the copy engine takes), so concurrent StageTokens calls copy their rows in
// parallel: each reserves its room under the mutex and copies without it, spread over the
// arena's copy helpers (Options::ingest_copy_threads), and a flush waits for the copies into its
// buffer to land. The NaN/inf scan a caller asks for runs on the same helpers, before anything is
// reserved.
// Thread-safety: StageTokens, FlushStaged and staged_stats may be called from several threads at
// once, without the engine lock (their own mutex orders them); everything else is serialised
// by the engine, like every KvArena. The stream is the arena's own, at the device's lowest
// priority (the scatter's CTAs yield to decode kernels): decode layers on the backend's streams
// only touch pages of steppable sequences, whose ingest FlushStaged completed before they became
// steppable.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <condition_variable>
#include <mutex>

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvpool/cuda/append_kv.h"
#include "kvpool/ingest_staging.h"
#include "kvpool/kv_arena.h"
#include "kvpool/parallel_copy.h"

namespace pkv::kvpool {

struct IngestStats {
  int64_t bytes = 0;        // bytes written to the device
  int64_t copies = 0;       // host-to-device copies issued (after coalescing page runs)
  double seconds = 0;       // wall time of the call, staging included
  double gbps() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
};

class DeviceKvArena final : public KvArena {
 public:
  struct Options {
    int64_t num_pages = 0;            // > 0: exactly this many pages
    double free_memory_fraction = 0;  // else: this share of the free device memory (0, 1]
    int64_t staging_bytes = 64 << 20; // each of the two pinned staging buffers
    int64_t ingest_bytes = 64 << 20;  // each of the two pinned (and device) merged-ingest buffers
    // Helper threads that copy merged-ingest rows into the pinned buffers next to the threads
    // calling StageTokens (kvpool/parallel_copy.h); 0: each caller copies its rows alone.
    int32_t ingest_copy_threads = 0;
    // > 0: the copy helpers run at this Linux nice value (common/thread_priority.h).
    int32_t ingest_nice = 0;
  };

  // RESOURCE_EXHAUSTED when the memory is not there, INVALID_ARGUMENT for a bad shape/option,
  // FAILED_PRECONDITION without a usable GPU.
  static absl::StatusOr<std::unique_ptr<DeviceKvArena>> Create(const ModelShape& shape, const Options& options);
  ~DeviceKvArena() override;
  DeviceKvArena(const DeviceKvArena&) = delete;
  DeviceKvArena& operator=(const DeviceKvArena&) = delete;

  const ModelShape& shape() const override { return shape_; }
  int64_t num_pages() const override { return num_pages_; }
  const char* kind() const override { return "cuda"; }
  absl::Status WriteTokens(int32_t layer, std::span<const SlotAddr> slots, const void* k, const void* v) override;
  absl::Status ReadTokens(int32_t layer, std::span<const SlotAddr> slots, void* k, void* v) const override;
  absl::Status CopyPage(PageId src, PageId dst) override;
  using KvArena::StageTokens;
  // Scans and copies `k` and `v` piece by piece (a received message's slices are never put
  // together first).
  absl::Status StageTokens(int32_t layer, std::span<const SlotAddr> slots, const PieceBytes& k, const PieceBytes& v,
                           StageScan* scan) override;
  absl::Status FlushStaged() override;
  void* layer_data(int32_t layer) override { return static_cast<char*>(data_) + layer * layer_bytes(); }
  const void* layer_data(int32_t layer) const override {
    return static_cast<const char*>(data_) + layer * layer_bytes();
  }

  // Copies prompt KV that is already page-formatted, `host_pages` = [num_layers][pages.size()]
  // [page elems] (model dtype), into physical pages `pages` of every layer. Synchronous. Pageable
  // sources go through the two pinned staging buffers (bounded by the host memcpy); pinned
  // sources are copied directly (bounded by PCIe).
  [[nodiscard]] absl::StatusOr<IngestStats> IngestPages(std::span<const PageId> pages, const void* host_pages);

  // Totals of the merged ingest since creation: bytes of K,V staged, copies (= scatter launches)
  // issued, and seconds spent inside StageTokens/FlushStaged (packing, flushing, waiting).
  IngestStats staged_stats() const {
    std::lock_guard<std::mutex> lock(ingest_mu_);
    return staged_stats_;
  }

  int64_t layer_bytes() const { return num_pages_ * page_elems() * 2; }
  cudaStream_t stream() const { return stream_; }
  // Whether no merged-ingest flush (its copy of a whole buffer and its scatter) is queued or
  // running now. A decode upload may then use a copy engine without queuing behind prompt KV
  // (engine/cuda_slot.cc). A flush issued right after the answer does not delay a copy already
  // queued. Lock-free: counted when a flush is issued and uncounted by a host callback after it.
  bool IngestCopiesIdle() const { return ingest_flushes_in_flight_.load(std::memory_order_acquire) == 0; }

 private:
  DeviceKvArena(const ModelShape& shape, int64_t num_pages) : shape_(shape), num_pages_(num_pages) {}
  absl::Status CheckAccess(int32_t layer, std::span<const SlotAddr> slots) const;
  cuda::AppendKvParams ScratchParams(int32_t layer, int64_t n, int64_t slot_bytes, int64_t row) const;
  // Switches packing to the other ingest buffer once its previous flush finished, then issues the
  // current one (copy + scatter, async) once the copies into it landed. Sets the sticky
  // ingest_error_ on failure. `lock` holds ingest_mu_ (released while waiting).
  absl::Status FlushIngestBuffer(std::unique_lock<std::mutex>& lock);

  ModelShape shape_;
  int64_t num_pages_;
  void* data_ = nullptr;                   // device, [layers][pages][2][Hkv][P][d]
  cudaStream_t stream_ = nullptr;
  void* staging_[2] = {nullptr, nullptr};  // pinned host
  cudaEvent_t staged_[2] = {nullptr, nullptr};
  int64_t staging_bytes_ = 0;
  void* scratch_ = nullptr;                // device: slots + K + V of WriteTokens/ReadTokens
  int64_t scratch_bytes_ = 0;
  // Merged ingest: two pinned buffers, their device twins, "flush done" events, a packer each.
  void* ingest_host_[2] = {nullptr, nullptr};
  void* ingest_device_[2] = {nullptr, nullptr};
  cudaEvent_t ingest_done_[2] = {nullptr, nullptr};
  mutable std::mutex ingest_mu_;  // guards the merged-ingest members below and staged_stats_
  std::condition_variable ingest_cv_;  // a buffer's copies landed, or its flush was issued
  int ingest_cur_ = 0;                 // the buffer being packed
  std::unique_ptr<IngestPacker> packers_[2];
  int copying_[2] = {0, 0};            // StageTokens calls copying rows into each buffer now
  bool sealing_[2] = {false, false};   // a flush waits for the copies into it, then issues it
  absl::Status ingest_error_;
  IngestStats staged_stats_;
  std::atomic<int> ingest_flushes_in_flight_{0};  // IngestCopiesIdle
  std::unique_ptr<ParallelCopier> copier_;  // StageTokens' row copies (thread-safe on its own)
};

}  // namespace pkv::kvpool
