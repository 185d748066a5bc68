// kvpool/ingest_staging.h — packing prompt KV chunks for a merged host->device ingest.
//
// WriteKV delivers prompt K,V in chunks ([n, Hkv, d] per layer, of one or many sequences). The
// device arena does not copy each chunk on its own: IngestPacker appends every chunk to one
// staging buffer as [K rows | V rows] and describes where the tokens go as ScatterRuns — one
// run per maximal stretch of consecutive slots of one page of one layer — so a flush is one
// host->device copy of [data | run table] and one scatter launch (kvpool/cuda/append_kv.h). The
// packer is plain host code (tested on the CPU against KvArena::WriteTokens with
// ScatterRunsOnHost, the host model of the scatter kernel).
// Thread-safety: not synchronised; its owner (the arena, under the engine lock) serialises calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/model_shape.h"
#include "kvpool/kv_arena.h"

namespace pkv::kvpool {

// `count` tokens of one layer going to slots [slot, slot + count) of page `page`; their K rows
// ([count, Hkv, d] model dtype) start at byte `k_offset` of the staged data, their V rows at
// `v_offset`.
struct ScatterRun {
  int32_t layer = 0;
  int32_t page = 0;
  int32_t slot = 0;
  int32_t count = 0;
  int64_t k_offset = 0;
  int64_t v_offset = 0;
};
static_assert(sizeof(ScatterRun) == 32, "the scatter kernel reads 32-byte runs");

class IngestPacker {
 public:
  // `capacity_bytes`: the staging buffer (data and run table together); must hold one token.
  IngestPacker(const ModelShape& shape, int64_t capacity_bytes);

  // Bytes of one token's K (or V) row: Hkv * d * dtype size.
  int64_t row_bytes() const { return row_bytes_; }
  // Smallest capacity that holds one token.
  static int64_t MinCapacity(const ModelShape& shape);

  // Appends as many leading tokens of the chunk as fit to `buffer` (the staging buffer of
  // capacity_bytes) and returns how many (0 when the buffer is full). `k`, `v`: [n, Hkv, d].
  // Reserve, then CopyRows of the K and V rows.
  int64_t Pack(void* buffer, int32_t layer, std::span<const SlotAddr> slots, const void* k, const void* v);

  // Where Reserve put a chunk's leading `tokens` tokens: their K rows go to byte `k_offset` of the
  // buffer, their V rows to `v_offset` (both 16-byte aligned).
  struct Placement {
    int64_t tokens = 0;
    int64_t k_offset = 0;
    int64_t v_offset = 0;
    size_t first_run = 0;  // its runs: [first_run, end_run) of runs()
    size_t end_run = 0;
  };
  // Pack without the copy: takes room for as many leading tokens of the chunk as fit and records
  // their runs (0 tokens when the buffer is full). The caller copies the rows (CopyRows) before
  // the buffer is finished; several callers may copy into their placements at once.
  Placement Reserve(int32_t layer, std::span<const SlotAddr> slots);
  // True when Reserve would take all `tokens` tokens of a chunk now.
  bool Fits(int64_t tokens) const;
  // Takes back a placement whose rows must not land (their bytes stay in the buffer, unused): its
  // runs scatter nothing and its tokens no longer count. Before the buffer is finished.
  void Void(const Placement& placement);
  // Writes the run table after the data (16-byte aligned) and returns the bytes to copy
  // ([data | runs]); `runs_offset` receives where the table starts.
  size_t Finish(void* buffer, size_t* runs_offset);
  void Reset();

  bool empty() const { return runs_.empty(); }
  int64_t num_runs() const { return static_cast<int64_t>(runs_.size()); }
  int64_t num_tokens() const { return tokens_; }
  int64_t data_bytes() const { return data_bytes_; }
  std::span<const ScatterRun> runs() const { return runs_; }

 private:
  size_t Need(int64_t data_bytes, int64_t runs) const;

  ModelShape shape_;
  int64_t capacity_;
  int64_t row_bytes_;
  std::vector<ScatterRun> runs_;  // capacity reserved once
  int64_t data_bytes_ = 0;
  int64_t tokens_ = 0;
};

// Copies `bytes` of K or V rows into a staging buffer at `dst`. The buffer is read by the
// device's copy engine, never by this CPU: streaming (non-temporal) stores skip the cache and the
// read-for-ownership of every destination line that a plain memcpy of a chunk smaller than the C
// library's streaming threshold pays. Bytes before dst's first 16-byte boundary are stored plainly.
void CopyRows(void* dst, const void* src, size_t bytes);
// CopyRows that also checks the copied 2-byte elements of `dtype` for NaN and infinity in the same
// pass (the loaded registers are tested before they are stored), so the source is read once.
// `src` starts on a whole element. True when every whole element is finite; on false, find the
// element with FirstNonFinite (the bytes are copied either way).
bool CopyRowsFinite(void* dst, const void* src, size_t bytes, DType dtype);

// Host model of the scatter kernel: applies `runs` with data from `staged` to the arena memory
// `layer0` ([layers][pages][2][Hkv][P][d], `layer_stride_bytes` between layers).
void ScatterRunsOnHost(const ModelShape& shape, void* layer0, int64_t layer_stride_bytes, const void* staged,
                       std::span<const ScatterRun> runs);

}  // namespace pkv::kvpool
