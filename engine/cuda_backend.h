// engine/cuda_backend.h — the GPU ExecutionBackend: device KV pool + kernels/cuda, a stream per
// descriptor slot.
//
// Per token step (BeginTokenStep) the page table, every row's new-token slot and the plan's task
// list are packed into one descriptor in pinned host memory and uploaded with a single
// cudaMemcpyAsync into that descriptor slot's device twin; every layer of the step then reads only
// that descriptor. Per layer (RunLayer): one upload of q|k|v, one append launch, the route's
// attention launch(es) bracketed by CUDA events, one download of out (and lse), one
// synchronisation of that slot's stream. Every slot owns its stream, events, pinned and device
// io/out buffers, descriptor and partial-state workspace (with its fused-merge counters); only the
// arena's pages are shared. Nothing is allocated after Create.
// Thread-safety: RunLayer of different slots may run concurrently (each touches only its slot and
// its rows' new-token slots); everything else is serialised by the engine (engine/backend.h).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace pkv::engine {

struct CudaBackendOptions {
  int64_t num_pages = 0;               // > 0: exactly this many pages
  double free_memory_fraction = 0.85;  // else: this share of free device memory for the KV pool
  int32_t max_batch = 256;             // rows per step
  int32_t max_open_token_steps = 4;    // descriptor slots (each has its stream and workspace)
  int32_t max_partial_slots = 4096;    // (row, split) partial states the workspace holds
};

// True when the CUDA runtime sees at least one device (false without a driver).
bool CudaDeviceAvailable();

// FAILED_PRECONDITION without a usable GPU; RESOURCE_EXHAUSTED when memory is short.
absl::StatusOr<ExecutionBackendPtr> CreateCudaBackend(const ModelShape& shape, const CudaBackendOptions& options);

}  // namespace pkv::engine
