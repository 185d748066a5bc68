// kvpool/cuda/append_kv.h — the device append: writes one decode step's new K,V of every row (and
// optionally every layer) into their page slots with one kernel launch; the merged prompt-ingest
// scatter.
// Thread-safety: stateless launchers, ordered by the stream they are given.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pkv::kvpool::cuda {

struct AppendKvParams {
  void* arena = nullptr;          // layer 0 of the arena: [layers][num_pages][2][Hkv][P][d]
  int64_t layer_stride = 0;       // elements between consecutive layers (num_pages * page elems)
  int32_t num_layers = 1;         // layers written by this launch (first_layer ..)
  int32_t first_layer = 0;
  int32_t num_kv_heads = 0;
  int32_t page_size = 0;
  int32_t head_dim = 0;           // multiple of 8 (16-byte rows)
  int32_t num_tokens = 0;
  const int32_t* slots = nullptr; // [num_tokens][2] device: (page, slot) per token (kvpool::SlotAddr)
  const void* k = nullptr;        // [num_layers][num_tokens][Hkv][d] device, model dtype
  const void* v = nullptr;        // same shape
};

// One launch: grid (tokens, layers), 16-byte copies. Never allocates or synchronises.
cudaError_t LaunchAppendKv(const AppendKvParams& params, cudaStream_t stream);

// Merged prompt ingest: one launch applies `num_runs` ScatterRuns (kvpool/ingest_staging.h) whose
// K,V rows lie in the device copy of a staging buffer.
struct ScatterRunsParams {
  void* arena = nullptr;          // layer 0 of the arena: [layers][num_pages][2][Hkv][P][d]
  int64_t layer_stride = 0;       // elements between consecutive layers
  int32_t num_kv_heads = 0;
  int32_t page_size = 0;
  int32_t head_dim = 0;           // multiple of 8
  int32_t num_runs = 0;
  const void* runs = nullptr;     // [num_runs] kvpool::ScatterRun (32 bytes each), device
  const void* data = nullptr;     // staged K,V rows (byte offsets in the runs), device, 16-aligned
};

// One block per run, 16-byte copies, writes coalesced along (slot, d). Never allocates or
// synchronises.
cudaError_t LaunchScatterRuns(const ScatterRunsParams& params, cudaStream_t stream);

// The inverse (reads back): copies the slots' K,V into `k`, `v` (written through const_cast).
cudaError_t LaunchGatherKv(const AppendKvParams& params, cudaStream_t stream);

}  // namespace pkv::kvpool::cuda
