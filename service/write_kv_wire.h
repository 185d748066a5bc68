// service/write_kv_wire.h — a WriteKV chunk read in place from the received message bytes.
//
// A KVChunk carries a prompt's K and V as two large `bytes` fields. Parsing it with protobuf
// copies both into strings before the engine copies them again into the pool (or its staging
// buffer); ReadChunkInPlace instead walks the wire encoding over the message's pieces (the slices
// gRPC received) and returns the K and V bytes where they lie: one span when a field lies in one
// piece, else its parts in each piece, which the engine stages as they are (common/piece_bytes.h).
//
// It reads exactly what protobuf would: fields in any order, repeated scalars (the last wins),
// packed or unpacked shapes, unknown fields skipped. Anything it does not take on — a header or
// any other top-level field, a chunk or tensor field given twice (protobuf would merge them),
// groups, malformed bytes — returns false, and the caller parses the message with protobuf, which
// answers as before (including "cannot parse" for malformed bytes). So both paths accept and
// refuse the same messages with the same errors.
// Thread-safety: pure functions; a ChunkRef points into the pieces it was read from.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "common/piece_bytes.h"

namespace pkv::service {

// A Tensor message seen in place: its dtype enum value as sent, its shape and its data bytes.
struct TensorRef {
  int32_t dtype = 0;
  absl::InlinedVector<int64_t, 4> shape;
  std::span<const uint8_t> data;  // the data, when it lies in one piece
  // The data's parts, in order, when it crosses pieces of the message (then `data` is empty).
  std::vector<std::span<const uint8_t>> data_pieces;
  bool in_shared_memory = false;  // Tensor.shm is set (only StepStream takes it)

  // The data bytes, wherever they lie.
  PieceBytes bytes() const { return data_pieces.empty() ? PieceBytes(data) : PieceBytes(data_pieces); }
};

// A KVChunk message seen in place.
struct ChunkRef {
  int32_t layer = 0;
  int64_t token_offset = 0;
  int64_t num_tokens = 0;
  TensorRef k, v;
};

// Reads `pieces` (together, one serialized pkv.v1.WriteKVRequest) as a chunk into `out`. True
// when the message is a chunk in an encoding it takes on (see above); false otherwise, with
// `out` unspecified. The tensors' data point into the pieces (`out`'s vectors keep their capacity
// from call to call).
bool ReadChunkInPlace(std::span<const std::span<const uint8_t>> pieces, ChunkRef* out);

}  // namespace pkv::service
