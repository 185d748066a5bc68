// kvpool/kv_arena.h — where KV pages physically live (host memory now, device memory later).
//
// An arena holds every layer's pages for one model shape, laid out
//   [num_layers][num_pages][2 (K, V)][num_kv_heads][page_size][head_dim]  (model dtype)
// so one layer's pages are one contiguous array that kernels index with a page table. Page ids
// are shared by all layers. The arena only stores bytes; which page belongs to whom is the
// BlockPager's business. Thread-safety: not synchronised; the engine serialises access (except StageTokens/FlushStaged, below).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>
#include <string_view>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "common/model_shape.h"
#include "common/piece_bytes.h"

namespace pkv::kvpool {

using PageId = int32_t;

// A token slot: `slot` in [0, page_size) of physical page `page`.
struct SlotAddr {
  PageId page;
  int32_t slot;
};

// StageTokens' scan for NaN and infinity in the rows it is given (element indices into the K
// and V tensors, [tokens, num_kv_heads, head_dim]; -1: all finite).
struct StageScan {
  int64_t first_k = -1;
  int64_t first_v = -1;
  bool clean() const { return first_k < 0 && first_v < 0; }
};

class KvArena {
 public:
  virtual ~KvArena() = default;

  virtual const ModelShape& shape() const = 0;
  virtual int64_t num_pages() const = 0;
  // "host" or "cuda".
  virtual const char* kind() const = 0;

  // Copies K and V of `slots.size()` tokens of one layer into their slots. `k` and `v` are host
  // buffers [slots.size(), num_kv_heads, head_dim] of the model dtype.
  [[nodiscard]] virtual absl::Status WriteTokens(int32_t layer, std::span<const SlotAddr> slots,
                                                 const void* k, const void* v) = 0;
  // Prompt ingest (WriteKV): queues K,V of tokens like WriteTokens, but the arena may hold them
  // in a staging buffer and apply them at a later StageTokens or at FlushStaged (the device arena
  // packs chunks of every sequence into one buffer and flushes it with one copy and one scatter
  // launch, kvpool/ingest_staging.h). Until FlushStaged returns OK nothing may rely on the
  // bytes being in the pages. After a failed flush the arena refuses staging (the error is
  // sticky), so no prompt whose bytes may be missing can complete. The host arena copies at once.
  // With `scan` (may be null), the rows are scanned for NaN and infinity (the device arena
  // spreads the scan over its copy helpers, kvpool/parallel_copy.h, and scans a chunk that fits
  // its buffer while copying it): when one is found, nothing of the chunk reaches the pool (a
  // copied placement is voided), and the call returns OK with scan->first_k / first_v set — the
  // caller words the refusal.
  // Unlike the rest of the arena, StageTokens and FlushStaged may be called without the engine
  // lock and from several threads at once (each implementation serialises them itself), as long
  // as the slots belong to prompts being written, which nothing else reads or writes: so prompt
  // ingest never holds the engine lock while decode steps wait for it.
  // `k` and `v` hold [slots.size(), num_kv_heads, head_dim] bytes each, possibly in pieces
  // (common/piece_bytes.h); this default puts pieces together first.
  [[nodiscard]] virtual absl::Status StageTokens(int32_t layer, std::span<const SlotAddr> slots, const PieceBytes& k,
                                                 const PieceBytes& v, StageScan* scan) {
    const size_t bytes = slots.size() * static_cast<size_t>(shape().kv_bytes_per_token_layer() / 2);
    thread_local std::vector<uint8_t> k_whole, v_whole;
    const uint8_t* kp = Whole(k, bytes, &k_whole);
    const uint8_t* vp = Whole(v, bytes, &v_whole);
    if (scan != nullptr) {
      scan->first_k = FirstNonFinite(shape().dtype, kp, bytes);
      scan->first_v = FirstNonFinite(shape().dtype, vp, bytes);
      if (!scan->clean()) return absl::OkStatus();
    }
    return WriteTokens(layer, slots, kp, vp);
  }
  // StageTokens of contiguous host buffers.
  [[nodiscard]] absl::Status StageTokens(int32_t layer, std::span<const SlotAddr> slots, const void* k, const void* v,
                                         StageScan* scan) {
    const size_t bytes = slots.size() * static_cast<size_t>(shape().kv_bytes_per_token_layer() / 2);
    return StageTokens(layer, slots, PieceBytes(static_cast<const uint8_t*>(k), bytes),
                       PieceBytes(static_cast<const uint8_t*>(v), bytes), scan);
  }
  // Applies everything staged and returns when it is in the arena's memory (on the device:
  // copied, scattered and the ingest stream synchronised). Also the point where a page that had
  // staged bytes may be freed: callers flush before releasing a prompt being written.
  [[nodiscard]] virtual absl::Status FlushStaged() { return absl::OkStatus(); }

  // The inverse of WriteTokens (tests and debugging).
  [[nodiscard]] virtual absl::Status ReadTokens(int32_t layer, std::span<const SlotAddr> slots,
                                                void* k, void* v) const = 0;
  // Copies page `src` to page `dst` in every layer (copy-on-write of a shared partial page).
  [[nodiscard]] virtual absl::Status CopyPage(PageId src, PageId dst) = 0;

  // Start of one layer's pages, [num_pages, 2, Hkv, P, d], in the arena's memory space.
  virtual void* layer_data(int32_t layer) = 0;
  virtual const void* layer_data(int32_t layer) const = 0;

  // Elements per page of one layer.
  int64_t page_elems() const {
    return 2LL * shape().num_kv_heads * shape().page_size * shape().head_dim;
  }

 protected:
  // `bytes` bytes of `src` in one buffer: in place when contiguous, else gathered into *scratch.
  static const uint8_t* Whole(const PieceBytes& src, size_t bytes, std::vector<uint8_t>* scratch) {
    if (const uint8_t* p = src.contiguous(); p != nullptr || bytes == 0) return p;
    scratch->resize(bytes);
    src.CopyTo(0, bytes, scratch->data());
    return scratch->data();
  }
};
using KvArenaPtr = std::unique_ptr<KvArena>;

// Host-memory arena (the CPU backend's pool and the staging model for the device one).
class HostKvArena final : public KvArena {
 public:
  // Allocates num_pages pages for every layer of `shape`; fails with RESOURCE_EXHAUSTED when
  // the allocation fails.
  static absl::StatusOr<std::unique_ptr<HostKvArena>> Create(const ModelShape& shape, int64_t num_pages);

  const ModelShape& shape() const override { return shape_; }
  int64_t num_pages() const override { return num_pages_; }
  const char* kind() const override { return "host"; }
  absl::Status WriteTokens(int32_t layer, std::span<const SlotAddr> slots, const void* k,
                           const void* v) override;
  // Copies at once, from the pieces where they lie (no gathered copy first): the scan reads
  // them in place, then each row goes straight to its slot. Concurrent calls for different
  // slots are safe (each writes only its own slots).
  using KvArena::StageTokens;
  absl::Status StageTokens(int32_t layer, std::span<const SlotAddr> slots, const PieceBytes& k, const PieceBytes& v,
                           StageScan* scan) override;
  absl::Status ReadTokens(int32_t layer, std::span<const SlotAddr> slots, void* k,
                          void* v) const override;
  absl::Status CopyPage(PageId src, PageId dst) override;
  void* layer_data(int32_t layer) override { return data_.get() + layer * layer_elems(); }
  const void* layer_data(int32_t layer) const override { return data_.get() + layer * layer_elems(); }

 private:
  HostKvArena(const ModelShape& shape, int64_t num_pages, std::unique_ptr<uint16_t[]> data)
      : shape_(shape), num_pages_(num_pages), data_(std::move(data)) {}
  int64_t layer_elems() const { return num_pages_ * page_elems(); }
  absl::Status CheckAccess(int32_t layer, std::span<const SlotAddr> slots) const;

  ModelShape shape_;
  int64_t num_pages_;
  std::unique_ptr<uint16_t[]> data_;  // [layers][pages][2][Hkv][P][d]
};

}  // namespace pkv::kvpool
