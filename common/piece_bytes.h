// common/piece_bytes.h — a tensor's bytes, in order, in one or more pieces.
//
// gRPC hands a received message over as the slices it read it into (16-64 KiB each), so a
// prompt chunk's K or V field usually spans many of them. PieceBytes lets the service pass such a
// field to the engine where it lies, instead of gathering it into one buffer first; the arena
// then copies and scans the pieces themselves (kvpool/parallel_copy.h). Piece boundaries fall
// anywhere, even inside a 2-byte element. A contiguous buffer converts implicitly (one piece).
// Thread-safety: a non-owning view; the pieces must outlive it and stay unchanged.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

namespace pkv {

class PieceBytes {
 public:
  PieceBytes() = default;
  // One contiguous buffer (implicit, so spans and byte vectors pass as they are).
  PieceBytes(std::span<const uint8_t> bytes) : one_(bytes), size_(bytes.size()) {}  // NOLINT
  template <typename Range>
    requires(std::is_convertible_v<const Range&, std::span<const uint8_t>> &&
             !std::is_same_v<std::remove_cvref_t<Range>, std::span<const uint8_t>>)
  PieceBytes(const Range& bytes) : PieceBytes(std::span<const uint8_t>(bytes)) {}  // NOLINT
  PieceBytes(const uint8_t* data, size_t size) : PieceBytes(std::span<const uint8_t>(data, size)) {}
  // `pieces` in order (empty ones allowed); the span of spans must outlive this view.
  explicit PieceBytes(std::span<const std::span<const uint8_t>> pieces) : pieces_(pieces) {
    for (const auto& p : pieces_) size_ += p.size();
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // The bytes when they lie in one buffer (also for a single piece), else null.
  const uint8_t* contiguous() const {
    if (pieces_.empty()) return one_.data();
    const std::span<const uint8_t>* only = nullptr;
    for (const auto& p : pieces_) {
      if (p.empty()) continue;
      if (only != nullptr) return nullptr;
      only = &p;
    }
    return only != nullptr ? only->data() : one_.data();
  }
  // The pieces in order (a contiguous buffer is one, held in this object: keep it alive while
  // the result is used).
  std::span<const std::span<const uint8_t>> pieces() const {
    return pieces_.empty() ? std::span<const std::span<const uint8_t>>(&one_, 1) : pieces_;
  }

  // Calls fn(at, src, len) for each part of bytes [offset, offset + n) in piece order, where `at`
  // is the part's position counted from `offset`. The range must lie within size().
  template <typename Fn>
  void ForEachPart(size_t offset, size_t n, Fn&& fn) const {
    size_t start = 0;  // of the current piece
    size_t at = 0;
    for (const auto& p : pieces()) {
      if (at == n) return;
      const size_t end = start + p.size();
      if (end > offset + at) {
        const size_t from = offset + at - start;
        const size_t len = std::min(p.size() - from, n - at);
        fn(at, p.data() + from, len);
        at += len;
      }
      start = end;
    }
  }
  // Copies bytes [offset, offset + n) to `dst`.
  void CopyTo(size_t offset, size_t n, void* dst) const {
    ForEachPart(offset, n, [dst](size_t at, const uint8_t* src, size_t len) {
      std::memcpy(static_cast<uint8_t*>(dst) + at, src, len);
    });
  }

 private:
  std::span<const uint8_t> one_;                 // used when pieces_ is empty
  std::span<const std::span<const uint8_t>> pieces_;
  size_t size_ = 0;
};

}  // namespace pkv
