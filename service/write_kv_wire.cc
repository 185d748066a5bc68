#include "service/write_kv_wire.h"

#include <algorithm>
#include <cstring>

namespace pkv::service {
namespace {

// Protobuf wire types and the field numbers of WriteKVRequest, KVChunk and Tensor (worker.proto).
constexpr uint32_t kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5;
constexpr uint32_t kRequestChunk = 2;
constexpr uint32_t kChunkLayer = 1, kChunkTokenOffset = 2, kChunkNumTokens = 3, kChunkK = 4, kChunkV = 5;
constexpr uint32_t kTensorDtype = 1, kTensorShape = 2, kTensorData = 3, kTensorShm = 4;

// A cursor over the message's pieces. Every read fails (false) rather than run past the end.
class PieceReader {
 public:
  explicit PieceReader(std::span<const std::span<const uint8_t>> pieces) : pieces_(pieces) {
    for (const auto& p : pieces_) size_ += static_cast<int64_t>(p.size());
    SkipEmptyPieces();
  }

  int64_t pos() const { return pos_; }
  int64_t size() const { return size_; }

  bool ReadVarint(uint64_t* value) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= size_) return false;
      const uint8_t byte = pieces_[piece_][offset_];
      Advance(1);
      v |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) {
        *value = v;
        return true;
      }
    }
    return false;  // more than ten bytes
  }

  // A length prefix that stays within `end`.
  bool ReadLength(int64_t end, int64_t* length) {
    uint64_t n = 0;
    if (!ReadVarint(&n) || n > static_cast<uint64_t>(end - pos_)) return false;
    *length = static_cast<int64_t>(n);
    return true;
  }

  bool Skip(int64_t n) {
    if (n > size_ - pos_) return false;
    while (n > 0) {
      const int64_t here = std::min<int64_t>(n, static_cast<int64_t>(pieces_[piece_].size()) - offset_);
      Advance(here);
      n -= here;
    }
    return true;
  }

  // The next `n` bytes where they lie: *out when they are in one piece, else their parts in
  // *parts (and *out empty).
  bool ReadBytes(int64_t n, std::span<const uint8_t>* out, std::vector<std::span<const uint8_t>>* parts) {
    parts->clear();
    *out = {};
    if (n > size_ - pos_) return false;
    if (n == 0) return true;
    const std::span<const uint8_t> piece = pieces_[piece_];
    if (n <= static_cast<int64_t>(piece.size()) - offset_) {
      *out = piece.subspan(static_cast<size_t>(offset_), static_cast<size_t>(n));
      Advance(n);
      return true;
    }
    for (int64_t at = 0; at < n;) {
      const int64_t here = std::min<int64_t>(n - at, static_cast<int64_t>(pieces_[piece_].size()) - offset_);
      parts->push_back(pieces_[piece_].subspan(static_cast<size_t>(offset_), static_cast<size_t>(here)));
      Advance(here);
      at += here;
    }
    return true;
  }

  // Skips a field of wire type `wire` whose tag was read. Groups (3, 4) are not taken on.
  bool SkipField(uint32_t wire, int64_t end) {
    switch (wire) {
      case kVarint: {
        uint64_t ignored = 0;
        return ReadVarint(&ignored);
      }
      case kFixed64:
        return end - pos_ >= 8 && Skip(8);
      case kLengthDelimited: {
        int64_t n = 0;
        return ReadLength(end, &n) && Skip(n);
      }
      case kFixed32:
        return end - pos_ >= 4 && Skip(4);
      default:
        return false;
    }
  }

 private:
  // Moves by `n` bytes, all within the current piece.
  void Advance(int64_t n) {
    offset_ += n;
    pos_ += n;
    SkipEmptyPieces();
  }
  void SkipEmptyPieces() {
    while (piece_ < pieces_.size() && offset_ == static_cast<int64_t>(pieces_[piece_].size())) {
      ++piece_;
      offset_ = 0;
    }
  }

  const std::span<const std::span<const uint8_t>> pieces_;
  size_t piece_ = 0;
  int64_t offset_ = 0;  // within pieces_[piece_]
  int64_t pos_ = 0;     // within the whole message
  int64_t size_ = 0;
};

// Reads a field's tag; false at a malformed or zero field number.
bool ReadTag(PieceReader& r, uint32_t* field, uint32_t* wire) {
  uint64_t tag = 0;
  if (!r.ReadVarint(&tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF) return false;
  *field = static_cast<uint32_t>(tag >> 3);
  *wire = static_cast<uint32_t>(tag & 7);
  return true;
}

bool ReadTensor(PieceReader& r, int64_t end, TensorRef* t) {
  while (r.pos() < end) {
    uint32_t field = 0, wire = 0;
    if (!ReadTag(r, &field, &wire)) return false;
    if (field == kTensorDtype) {
      uint64_t v = 0;
      if (wire != kVarint || !r.ReadVarint(&v)) return false;
      t->dtype = static_cast<int32_t>(v);
    } else if (field == kTensorShape && wire == kVarint) {
      uint64_t v = 0;
      if (!r.ReadVarint(&v)) return false;
      t->shape.push_back(static_cast<int64_t>(v));
    } else if (field == kTensorShape && wire == kLengthDelimited) {
      int64_t n = 0;
      if (!r.ReadLength(end, &n)) return false;
      const int64_t packed_end = r.pos() + n;
      while (r.pos() < packed_end) {
        uint64_t v = 0;
        if (!r.ReadVarint(&v) || r.pos() > packed_end) return false;
        t->shape.push_back(static_cast<int64_t>(v));
      }
    } else if (field == kTensorData) {
      int64_t n = 0;
      if (wire != kLengthDelimited || !r.ReadLength(end, &n) || !r.ReadBytes(n, &t->data, &t->data_pieces)) {
        return false;
      }
    } else if (field == kTensorShm || field == kTensorShape || !r.SkipField(wire, end)) {
      return false;  // a tensor in shared memory is the full parse's to refuse
    }
  }
  return r.pos() == end;
}

bool ReadChunk(PieceReader& r, int64_t end, ChunkRef* c) {
  bool have_k = false, have_v = false;
  while (r.pos() < end) {
    uint32_t field = 0, wire = 0;
    if (!ReadTag(r, &field, &wire)) return false;
    uint64_t v = 0;
    int64_t n = 0;
    switch (field) {
      case kChunkLayer:
        if (wire != kVarint || !r.ReadVarint(&v)) return false;
        c->layer = static_cast<int32_t>(v);
        break;
      case kChunkTokenOffset:
        if (wire != kVarint || !r.ReadVarint(&v)) return false;
        c->token_offset = static_cast<int64_t>(v);
        break;
      case kChunkNumTokens:
        if (wire != kVarint || !r.ReadVarint(&v)) return false;
        c->num_tokens = static_cast<int64_t>(v);
        break;
      case kChunkK:
      case kChunkV: {
        bool& have = field == kChunkK ? have_k : have_v;
        if (wire != kLengthDelimited || have || !r.ReadLength(end, &n)) return false;  // twice: protobuf merges
        have = true;
        if (!ReadTensor(r, r.pos() + n, field == kChunkK ? &c->k : &c->v)) return false;
        break;
      }
      default:
        if (!r.SkipField(wire, end)) return false;
    }
  }
  return r.pos() == end;
}

}  // namespace

bool ReadChunkInPlace(std::span<const std::span<const uint8_t>> pieces, ChunkRef* out) {
  out->layer = 0;
  out->token_offset = 0;
  out->num_tokens = 0;
  for (TensorRef* t : {&out->k, &out->v}) {
    t->dtype = 0;
    t->shape.clear();
    t->data = {};
    t->data_pieces.clear();
  }
  PieceReader r(pieces);
  uint32_t field = 0, wire = 0;
  int64_t n = 0;
  if (!ReadTag(r, &field, &wire) || field != kRequestChunk || wire != kLengthDelimited || !r.ReadLength(r.size(), &n)) {
    return false;
  }
  // The chunk must be the whole message: anything after it (another chunk, a header) is left to
  // protobuf.
  return ReadChunk(r, r.pos() + n, out) && r.pos() == r.size();
}

}  // namespace pkv::service
