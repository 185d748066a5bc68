// client/kv_chunk_wire.h — a WriteKV chunk message made of slices, so that its K and V bytes
// reach gRPC without protobuf copying them first.
//
// Through the generated stub a chunk's K and V are copied twice on the router: into the
// message's `bytes` fields, then into the buffer protobuf serialises to. Here a chunk message is
// four slices: a few dozen bytes of wire encoding (the chunk's scalar fields, then K's dtype,
// shape and data length), the K bytes, V's head, the V bytes. The K and V slices either borrow
// the caller's bytes (the slice holds a reference on their owner, dropped when gRPC is done with
// them: no copy at all) or own a pooled buffer that the caller filled (one copy, or none when the
// data is produced into it). The bytes are exactly protobuf's encoding of the same
// WriteKVRequest (fields in number order, proto3 zeros omitted), so the worker cannot tell.
// Thread-safety: ChunkBufferPool may be used from any number of threads (gRPC hands buffers back
// from its own); the free functions are pure.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "client/shared_bytes.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"

namespace pkv::client {

// A slice over b.bytes that keeps b.owner alive until gRPC releases it (no copy).
grpc::Slice BorrowedSlice(SharedBytes b);

// Reusable buffers for chunk bytes made on the router. A buffer handed to gRPC by Wrap comes
// back to the pool when gRPC releases its slice, capacity kept, so a steady stream of chunks
// costs neither allocations nor fresh page faults. The pool lives as long as any of its slices.
class ChunkBufferPool final : public std::enable_shared_from_this<ChunkBufferPool> {
 public:
  // At most `max_idle` buffers are kept for reuse; more returning ones are freed.
  static std::shared_ptr<ChunkBufferPool> Create(size_t max_idle = 64);

  // An empty buffer (from the pool when one is idle).
  std::unique_ptr<std::string> Take();
  // A slice over *buffer's bytes; the buffer returns to the pool when gRPC releases the slice.
  grpc::Slice Wrap(std::unique_ptr<std::string> buffer);

  // Buffers waiting for reuse (tests).
  size_t idle() const;

 private:
  explicit ChunkBufferPool(size_t max_idle) : max_idle_(max_idle) {}
  void Give(std::unique_ptr<std::string> buffer);

  const size_t max_idle_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<std::string>> idle_;  // guarded by mu_
};

// What a chunk message says besides its bytes.
struct ChunkFields {
  int32_t wire_dtype = 0;  // pkv.v1.DType value of K and V
  int32_t layer = 0;
  int64_t token_offset = 0;
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;  // K and V are [num_tokens, num_kv_heads, head_dim]
  int64_t head_dim = 0;
};

// The serialised pkv.v1.WriteKVRequest{chunk} with `k` and `v` as the tensors' data.
grpc::ByteBuffer ChunkMessage(const ChunkFields& fields, grpc::Slice k, grpc::Slice v);

}  // namespace pkv::client
