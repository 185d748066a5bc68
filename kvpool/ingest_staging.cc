#include "kvpool/ingest_staging.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/dtype.h"
#include "common/log.h"

namespace pkv::kvpool {
namespace {

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace

int64_t IngestPacker::MinCapacity(const ModelShape& shape) {
  const int64_t row = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim * DTypeSize(shape.dtype);
  return static_cast<int64_t>(Align16(2 * row) + sizeof(ScatterRun));
}

IngestPacker::IngestPacker(const ModelShape& shape, int64_t capacity_bytes)
    : shape_(shape),
      capacity_(capacity_bytes),
      row_bytes_(static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim * DTypeSize(shape.dtype)) {
  PKV_CHECK(capacity_bytes >= MinCapacity(shape)) << "staging buffer holds no token";
  // At most one run per token: reserve once so Pack never allocates.
  runs_.reserve(static_cast<size_t>(capacity_bytes / (2 * row_bytes_) + 1));
}

size_t IngestPacker::Need(int64_t data_bytes, int64_t runs) const {
  return Align16(static_cast<size_t>(data_bytes)) + static_cast<size_t>(runs) * sizeof(ScatterRun);
}

int64_t IngestPacker::Pack(void* buffer, int32_t layer, std::span<const SlotAddr> slots, const void* k,
                           const void* v) {
  const Placement at = Reserve(layer, slots);
  char* base = static_cast<char*>(buffer);
  CopyRows(base + at.k_offset, k, static_cast<size_t>(at.tokens * row_bytes_));
  CopyRows(base + at.v_offset, v, static_cast<size_t>(at.tokens * row_bytes_));
  return at.tokens;
}

bool IngestPacker::Fits(int64_t tokens) const {
  return Need(Align16(data_bytes_) + 2 * Align16(tokens * row_bytes_), num_runs() + tokens) <=
         static_cast<size_t>(capacity_);
}

void IngestPacker::Void(const Placement& placement) {
  for (size_t r = placement.first_run; r < placement.end_run && r < runs_.size(); ++r) runs_[r].count = 0;
  tokens_ -= placement.tokens;
}

IngestPacker::Placement IngestPacker::Reserve(int32_t layer, std::span<const SlotAddr> slots) {
  const int64_t n_all = static_cast<int64_t>(slots.size());
  // Most tokens that fit, counting one run per token at worst, then the real run count.
  int64_t n = 0;
  {
    int64_t lo = 0, hi = n_all;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (Fits(mid)) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    n = lo;
  }
  if (n == 0) return {};
  const int64_t k_at = static_cast<int64_t>(Align16(data_bytes_));
  const int64_t v_at = k_at + static_cast<int64_t>(Align16(n * row_bytes_));
  const size_t first_run = runs_.size();
  for (int64_t t = 0; t < n;) {
    int64_t e = t + 1;
    while (e < n && slots[e].page == slots[t].page && slots[e].slot == slots[t].slot + (e - t)) ++e;
    runs_.push_back(ScatterRun{layer, slots[t].page, slots[t].slot, static_cast<int32_t>(e - t),
                               k_at + t * row_bytes_, v_at + t * row_bytes_});
    t = e;
  }
  data_bytes_ = v_at + static_cast<int64_t>(Align16(n * row_bytes_));
  tokens_ += n;
  return {n, k_at, v_at, first_run, runs_.size()};
}

#if defined(__SSE2__)
namespace {

// Bytes before the destination's next 16-byte boundary (at most `bytes`), stored plainly: a span
// may start inside a row (a piece of a received message).
size_t HeadBytes(const char* d, size_t bytes) {
  return std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
}

// CopyRows' loop: 64 bytes per step from s + i to d + i (d + i on a 16-byte boundary) with
// streaming stores, while at least 64 are left; returns where it stopped. With kCheck, each
// 2-byte lane (elements start at even i) whose bits include all of `mask`'s is ORed into *hits.
template <bool kCheck>
size_t StreamBlocks(char* d, const char* s, size_t i, size_t bytes, __m128i mask, __m128i* hits) {
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    if constexpr (kCheck) {
      auto hit = [mask](__m128i x) { return _mm_cmpeq_epi16(_mm_and_si128(x, mask), mask); };
      *hits = _mm_or_si128(*hits, _mm_or_si128(_mm_or_si128(hit(a), hit(b)), _mm_or_si128(hit(c), hit(e))));
    }
  }
  return i;
}

}  // namespace
#endif

void CopyRows(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  size_t i = HeadBytes(d, bytes);
  if (i > 0) std::memcpy(d, s, i);
  i = StreamBlocks<false>(d, s, i, bytes, _mm_setzero_si128(), nullptr);
  if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
  // Streaming stores are weakly ordered: fence them before anyone (the flush) reads the buffer.
  _mm_sfence();
#else
  std::memcpy(dst, src, bytes);
#endif
}

bool CopyRowsFinite(void* dst, const void* src, size_t bytes, DType dtype) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  size_t i = HeadBytes(d, bytes);
  if (i % 2 != 0) {  // the stores' alignment would cut elements in the registers: two passes
    CopyRows(dst, src, bytes);
    return FirstNonFinite(dtype, static_cast<const uint8_t*>(src), bytes) < 0;
  }
  bool finite = FirstNonFinite(dtype, reinterpret_cast<const uint8_t*>(s), i) < 0;
  if (i > 0) std::memcpy(d, s, i);
  const __m128i mask = _mm_set1_epi16(static_cast<short>(dtype == DType::kF16 ? 0x7C00u : 0x7F80u));
  __m128i hits = _mm_setzero_si128();
  i = StreamBlocks<true>(d, s, i, bytes, mask, &hits);
  if (_mm_movemask_epi8(hits) != 0) finite = false;
  if (i < bytes) {
    finite = finite && FirstNonFinite(dtype, reinterpret_cast<const uint8_t*>(s + i), bytes - i) < 0;
    std::memcpy(d + i, s + i, bytes - i);
  }
  _mm_sfence();
  return finite;
#else
  std::memcpy(dst, src, bytes);
  return FirstNonFinite(dtype, static_cast<const uint8_t*>(src), bytes) < 0;
#endif
}

size_t IngestPacker::Finish(void* buffer, size_t* runs_offset) {
  const size_t at = Align16(static_cast<size_t>(data_bytes_));
  PKV_CHECK(Need(data_bytes_, num_runs()) <= static_cast<size_t>(capacity_)) << "packer overflow";
  std::memcpy(static_cast<char*>(buffer) + at, runs_.data(), runs_.size() * sizeof(ScatterRun));
  *runs_offset = at;
  return at + runs_.size() * sizeof(ScatterRun);
}

void IngestPacker::Reset() {
  runs_.clear();
  data_bytes_ = 0;
  tokens_ = 0;
}

void ScatterRunsOnHost(const ModelShape& s, void* layer0, int64_t layer_stride_bytes, const void* staged,
                       std::span<const ScatterRun> runs) {
  const int64_t el = DTypeSize(s.dtype);
  const int64_t row = static_cast<int64_t>(s.head_dim) * el;  // one head of one token
  const int64_t page_bytes = 2LL * s.num_kv_heads * s.page_size * row;
  const auto* src = static_cast<const char*>(staged);
  for (const ScatterRun& r : runs) {
    char* page = static_cast<char*>(layer0) + r.layer * layer_stride_bytes + r.page * page_bytes;
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t from = kv == 0 ? r.k_offset : r.v_offset;
      for (int h = 0; h < s.num_kv_heads; ++h) {
        for (int t = 0; t < r.count; ++t) {
          std::memcpy(page + ((kv * s.num_kv_heads + h) * s.page_size + r.slot + t) * row,
                      src + from + (static_cast<int64_t>(t) * s.num_kv_heads + h) * row, row);
        }
      }
    }
  }
}

}  // namespace pkv::kvpool
