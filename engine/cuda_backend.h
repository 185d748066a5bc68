// engine/cuda_backend.h — the GPU ExecutionBackend: device KV pool + kernels/cuda, a stream per
// descriptor slot.
//
// Per token step (BeginTokenStep) the page table, every row's new-token slot and the plan's task
// list are packed into one descriptor in pinned host memory and uploaded with a single
// cudaMemcpyAsync into that descriptor slot's device twin; every layer of the step then reads only
// that descriptor. Per layer (RunLayer): one upload of q|k|v, one append launch, the route's
// attention launch(es) bracketed by CUDA events, one download of out (and lse), one
// synchronisation of that slot's stream. Every slot owns its stream, pinned and device
// io/out buffers, descriptor, partial-state workspace (with its fused-merge counters) and the
// events that time a layer's stages (upload, append + attention, download); only the
// arena's pages are shared. Nothing is allocated after Create. Slot streams have the device's
// highest priority, so decode layers go ahead of prompt ingest on the arena's stream.
// Files: cuda_slot.{h,cc} (one slot: resources, descriptor, eager layer launches),
// cuda_layer_graph.{h,cc} (LaunchMode::kGraph per slot), cuda_backend.cc (the glue).
// Thread-safety: RunLayer of different slots may run concurrently (each touches only its slot and
// its rows' new-token slots); everything else is serialised by the engine (engine/backend.h).
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace pkv::engine {

// How RunLayer submits a layer's work. kGraph: per descriptor slot, the layer's launch sequence
// (q|k|v upload, append, attention launch(es), out download) is captured into a CUDA graph once
// per (batch-size bucket, kernel arm) and instantiated once; a token step's first layer updates
// the executable graph to that step (cudaGraphExecUpdate from a fresh capture) and every later
// layer only patches the layer-dependent kernel arguments (cudaGraphExecKernelNodeSetParams)
// and replays it. Any capture or update failure logs one warning and turns that slot to kEager.
enum class LaunchMode { kEager, kGraph };

// "eager" or "graph"; INVALID_ARGUMENT naming `launch_mode` otherwise.
absl::StatusOr<LaunchMode> ParseLaunchMode(std::string_view name);

struct CudaBackendOptions {
  int64_t num_pages = 0;               // > 0: exactly this many pages
  double free_memory_fraction = 0.85;  // else: this share of free device memory for the KV pool
  int32_t max_batch = 256;             // rows per step
  int32_t max_open_token_steps = 4;    // descriptor slots (each has its stream and workspace)
  int32_t max_partial_slots = 4096;    // (row, split) partial states the workspace holds
  LaunchMode launch_mode = LaunchMode::kEager;
};

// True when the CUDA runtime sees at least one device (false without a driver).
bool CudaDeviceAvailable();

// FAILED_PRECONDITION without a usable GPU; RESOURCE_EXHAUSTED when memory is short.
absl::StatusOr<ExecutionBackendPtr> CreateCudaBackend(const ModelShape& shape, const CudaBackendOptions& options);

}  // namespace pkv::engine
