#include <algorithm>
#include <cstring>
#include <new>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kvpool/kv_arena.h"
#include "kvpool/parallel_copy.h"

namespace pkv::kvpool {

absl::StatusOr<std::unique_ptr<HostKvArena>> HostKvArena::Create(const ModelShape& shape,
                                                                 int64_t num_pages) {
  if (auto s = shape.Validate(); !s.ok()) return s;
  if (num_pages < 1) return absl::InvalidArgumentError("num_pages must be >= 1");
  const int64_t elems = num_pages * 2LL * shape.num_kv_heads * shape.page_size * shape.head_dim *
                        shape.num_layers;
  // Zeroed so the pool is committed at start and never holds stale bytes.
  std::unique_ptr<uint16_t[]> data(new (std::nothrow) uint16_t[elems]());
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", elems * 2, " bytes of host KV arena"));
  }
  return std::unique_ptr<HostKvArena>(new HostKvArena(shape, num_pages, std::move(data)));
}

absl::Status HostKvArena::CheckAccess(int32_t layer, std::span<const SlotAddr> slots) const {
  if (layer < 0 || layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  for (const SlotAddr& s : slots) {
    if (s.page < 0 || s.page >= num_pages_ || s.slot < 0 || s.slot >= shape_.page_size) {
      return absl::InvalidArgumentError(absl::StrCat("slot (", s.page, ", ", s.slot, ") out of range"));
    }
  }
  return absl::OkStatus();
}

absl::Status HostKvArena::WriteTokens(int32_t layer, std::span<const SlotAddr> slots, const void* k,
                                      const void* v) {
  if (auto s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t d = shape_.head_dim, hkv = shape_.num_kv_heads, ps = shape_.page_size;
  auto* base = static_cast<uint16_t*>(layer_data(layer));
  const auto* kin = static_cast<const uint16_t*>(k);
  const auto* vin = static_cast<const uint16_t*>(v);
  for (size_t t = 0; t < slots.size(); ++t) {
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t page_off = slots[t].page * page_elems();
      const int64_t k_dst = page_off + (h * ps + slots[t].slot) * d;
      const int64_t v_dst = page_off + ((hkv + h) * ps + slots[t].slot) * d;
      std::memcpy(base + k_dst, kin + (t * hkv + h) * d, d * sizeof(uint16_t));
      std::memcpy(base + v_dst, vin + (t * hkv + h) * d, d * sizeof(uint16_t));
    }
  }
  return absl::OkStatus();
}

absl::Status HostKvArena::StageTokens(int32_t layer, std::span<const SlotAddr> slots, const PieceBytes& k,
                                      const PieceBytes& v, StageScan* scan) {
  if (auto s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t d = shape_.head_dim, hkv = shape_.num_kv_heads, ps = shape_.page_size;
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(uint16_t);
  const size_t bytes = slots.size() * static_cast<size_t>(hkv) * row_bytes;
  if (k.size() != bytes || v.size() != bytes) {
    return absl::InvalidArgumentError("StageTokens: k and v must hold [tokens, num_kv_heads, head_dim] each");
  }
  if (scan != nullptr) {
    // Scanned where the pieces lie (an element cut between two pieces is put together), on this
    // thread: ParallelCopier without helpers runs every call on its caller.
    static ParallelCopier* const inline_scanner = new ParallelCopier(0);
    const PieceBytes* tensors[2] = {&k, &v};
    int64_t first[2] = {-1, -1};
    inline_scanner->FirstNonFinite(tensors, shape_.dtype, first);
    scan->first_k = first[0];
    scan->first_v = first[1];
    if (!scan->clean()) return absl::OkStatus();
  }
  // Row r = t * Hkv + h of K (or V) goes to head h of slot t; a row may straddle two pieces.
  auto* base = reinterpret_cast<uint8_t*>(layer_data(layer));
  const size_t page_bytes = static_cast<size_t>(page_elems()) * sizeof(uint16_t);
  auto copy_rows = [&](const PieceBytes& src, int64_t head_base) {
    src.ForEachPart(0, bytes, [&](size_t at, const uint8_t* from, size_t len) {
      while (len > 0) {
        const size_t row = at / row_bytes, in_row = at % row_bytes;
        const size_t n = std::min(len, row_bytes - in_row);
        const SlotAddr& slot = slots[row / static_cast<size_t>(hkv)];
        const int64_t h = static_cast<int64_t>(row % static_cast<size_t>(hkv));
        uint8_t* dst = base + static_cast<size_t>(slot.page) * page_bytes +
                       static_cast<size_t>((head_base + h) * ps + slot.slot) * row_bytes + in_row;
        std::memcpy(dst, from, n);
        at += n;
        from += n;
        len -= n;
      }
    });
  };
  copy_rows(k, 0);
  copy_rows(v, hkv);
  return absl::OkStatus();
}

absl::Status HostKvArena::ReadTokens(int32_t layer, std::span<const SlotAddr> slots, void* k,
                                     void* v) const {
  if (auto s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t d = shape_.head_dim, hkv = shape_.num_kv_heads, ps = shape_.page_size;
  const auto* base = static_cast<const uint16_t*>(layer_data(layer));
  auto* kout = static_cast<uint16_t*>(k);
  auto* vout = static_cast<uint16_t*>(v);
  for (size_t t = 0; t < slots.size(); ++t) {
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t page_off = slots[t].page * page_elems();
      std::memcpy(kout + (t * hkv + h) * d, base + page_off + (h * ps + slots[t].slot) * d, d * 2);
      std::memcpy(vout + (t * hkv + h) * d, base + page_off + ((hkv + h) * ps + slots[t].slot) * d, d * 2);
    }
  }
  return absl::OkStatus();
}

absl::Status HostKvArena::CopyPage(PageId src, PageId dst) {
  if (src < 0 || src >= num_pages_ || dst < 0 || dst >= num_pages_) {
    return absl::InvalidArgumentError("CopyPage: page out of range");
  }
  for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
    auto* base = static_cast<uint16_t*>(layer_data(layer));
    std::memcpy(base + dst * page_elems(), base + src * page_elems(), page_elems() * sizeof(uint16_t));
  }
  return absl::OkStatus();
}

}  // namespace pkv::kvpool
