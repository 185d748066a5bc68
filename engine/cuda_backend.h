// engine/cuda_backend.h — the GPU ExecutionBackend: device KV pool + kernels/cuda, a stream per
// descriptor slot.
//
// Per token step (BeginTokenStep) the page table, every row's new-token slot and the plan's task
// list are packed into one descriptor in mapped pinned host memory, which a small kernel pulls
// into that descriptor slot's device twin; every layer of the step then reads only that
// descriptor. Per layer (RunLayer): q|k|v staged into the slot's mapped pinned buffer (or, when
// they lie in host memory registered with RegisterHostMemory, read where they are) and pulled up
// by a kernel, one attention launch that also appends the rows' new K,V, bracketed by CUDA events
// and writing out (and lse) straight into mapped pinned host memory (and into LayerBuffers::out_copy
// when that is registered memory too; no download), one synchronisation of that slot's stream.
// Every slot owns its stream, pinned and device io buffers, mapped output buffer, descriptor,
// partial-state workspace (with its fused-merge counters) and the events that time a layer's
// stages (the attention on every layer; upload and append + attention on one layer-step in
// stage_timing_interval); only the arena's pages are shared. Nothing is allocated after Create
// (RegisterHostMemory pins the caller's memory, it allocates none).
// Slot streams have the device's highest priority, so decode layers go ahead of prompt ingest on
// the arena's stream.
// Files: cuda_slot.{h,cc} (one slot: resources, descriptor, layer launches), cuda_backend.cc
// (the glue).
// Thread-safety: RunLayer of different slots may run concurrently (each touches only its slot and
// its rows' new-token slots); everything else is serialised by the engine (engine/backend.h).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace pkv::engine {

// How a slot uploads a layer's staged q|k|v and a token step's descriptor: kAuto by a copy
// engine while the arena has no prompt-ingest flush in flight (DeviceKvArena::IngestCopiesIdle),
// else by a pull kernel (kernels/cuda/host_pull.h), which never queues behind ingest's bulk
// copies; kPull and kCopy always one way (tests run every path with them). Inputs in the caller's
// registered memory are always pulled.
enum class DecodeUpload : uint8_t { kAuto = 0, kPull, kCopy };

struct CudaBackendOptions {
  int64_t num_pages = 0;               // > 0: exactly this many pages
  double free_memory_fraction = 0.85;  // else: this share of free device memory for the KV pool
  int32_t max_batch = 256;             // rows per step
  int32_t max_open_token_steps = 4;    // descriptor slots (each has its stream and workspace)
  int32_t max_partial_slots = 4096;    // (row, split) partial states the workspace holds
  // >= 1: each slot times the upload and the append + attention (LayerRunInfo h2d_seconds,
  // kernel_seconds) on one layer-step in this many, the first included; 0 on the others.
  int32_t stage_timing_interval = 16;
  // >= 1: each slot brackets the attention with two events (LayerRunInfo attend_seconds) on one
  // layer-step in this many, the first included (and on every stage-timed one); 0 and
  // attention_timed false on the others. The events cost a layer-step about 3 us on an H200.
  int32_t attention_timing_interval = 8;
  // Mapped pinned host memory (allocated and populated at start, in 32 MiB slabs) that the kernels
  // write layer-step outputs into directly, for the engine's output buffers (engine/output_pool.h);
  // once used up, outputs go through a per-slot buffer and a copy. 0: none.
  int64_t pinned_output_bytes = int64_t{256} << 20;
  // Threads that help copy prompt KV (WriteKV) into the pinned ingest buffers, next to the
  // threads writing it (kvpool::DeviceKvArena::Options::ingest_copy_threads); 0: none.
  int32_t ingest_copy_threads = 4;
  // > 0: those helpers run at this Linux nice value (kvpool::DeviceKvArena::Options::ingest_nice).
  int32_t ingest_nice = 0;
  // How q|k|v and the descriptor go up (DecodeUpload above); the service runs kAuto.
  DecodeUpload decode_upload = DecodeUpload::kAuto;
};

// True when the CUDA runtime sees at least one device (false without a driver).
bool CudaDeviceAvailable();

// FAILED_PRECONDITION without a usable GPU; RESOURCE_EXHAUSTED when memory is short;
// INVALID_ARGUMENT for max_open_token_steps or stage_timing_interval below 1.
absl::StatusOr<ExecutionBackendPtr> CreateCudaBackend(const ModelShape& shape, const CudaBackendOptions& options);

}  // namespace pkv::engine
