#include "client/kv_chunk_wire.h"

#include <utility>

namespace pkv::client {
namespace {

// Protobuf wire format: a field's key is (number << 3) | wire type; integers are varints.
constexpr uint32_t kVarint = 0;
constexpr uint32_t kLengthDelimited = 2;

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void PutKey(uint32_t field, uint32_t wire_type, std::string* out) { PutVarint((field << 3) | wire_type, out); }

// An int32/int64 field as protobuf writes it: omitted when zero (proto3), negative values as
// 10-byte two's-complement varints.
void PutInt(uint32_t field, int64_t value, std::string* out) {
  if (value == 0) return;
  PutKey(field, kVarint, out);
  PutVarint(static_cast<uint64_t>(value), out);
}

size_t IntFieldSize(int64_t value) { return value == 0 ? 0 : 1 + VarintSize(static_cast<uint64_t>(value)); }

// pkv.v1.Tensor up to its data's bytes: dtype (1), shape (2, packed), data's key and length (3).
// Returns the encoded size of the whole tensor message.
size_t PutTensorHead(const ChunkFields& f, size_t data_bytes, std::string* out) {
  const int64_t shape[3] = {f.num_tokens, f.num_kv_heads, f.head_dim};
  size_t packed = 0;
  for (int64_t s : shape) packed += VarintSize(static_cast<uint64_t>(s));
  PutInt(1, f.wire_dtype, out);
  PutKey(2, kLengthDelimited, out);
  PutVarint(packed, out);
  for (int64_t s : shape) PutVarint(static_cast<uint64_t>(s), out);
  if (data_bytes > 0) {
    PutKey(3, kLengthDelimited, out);
    PutVarint(data_bytes, out);
  }
  return IntFieldSize(f.wire_dtype) + 1 + VarintSize(packed) + packed +
         (data_bytes > 0 ? 1 + VarintSize(data_bytes) + data_bytes : 0);
}

size_t TensorSize(const ChunkFields& f, size_t data_bytes) {
  std::string scratch;
  return PutTensorHead(f, data_bytes, &scratch);
}

void ReleaseOwner(void* p) { delete static_cast<std::shared_ptr<const void>*>(p); }

// What a wrapped buffer's slice carries back to its pool.
struct PooledBuffer {
  std::shared_ptr<ChunkBufferPool> pool;
  std::unique_ptr<std::string> buffer;
};

}  // namespace

grpc::Slice BorrowedSlice(SharedBytes b) {
  if (b.bytes.empty()) return grpc::Slice();
  auto* owner = new std::shared_ptr<const void>(std::move(b.owner));
  return grpc::Slice(const_cast<char*>(b.bytes.data()), b.bytes.size(), &ReleaseOwner, owner);
}

std::shared_ptr<ChunkBufferPool> ChunkBufferPool::Create(size_t max_idle) {
  return std::shared_ptr<ChunkBufferPool>(new ChunkBufferPool(max_idle));
}

std::unique_ptr<std::string> ChunkBufferPool::Take() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_.empty()) {
      std::unique_ptr<std::string> b = std::move(idle_.back());
      idle_.pop_back();
      b->clear();
      return b;
    }
  }
  return std::make_unique<std::string>();
}

grpc::Slice ChunkBufferPool::Wrap(std::unique_ptr<std::string> buffer) {
  if (buffer->empty()) {
    Give(std::move(buffer));
    return grpc::Slice();
  }
  char* data = buffer->data();
  const size_t size = buffer->size();
  auto* held = new PooledBuffer{shared_from_this(), std::move(buffer)};
  return grpc::Slice(
      data, size,
      [](void* p) {
        std::unique_ptr<PooledBuffer> h(static_cast<PooledBuffer*>(p));
        h->pool->Give(std::move(h->buffer));
      },
      held);
}

size_t ChunkBufferPool::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_.size();
}

void ChunkBufferPool::Give(std::unique_ptr<std::string> buffer) {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.size() < max_idle_) idle_.push_back(std::move(buffer));
}

grpc::ByteBuffer ChunkMessage(const ChunkFields& f, grpc::Slice k, grpc::Slice v) {
  // KVChunk: layer (1), token_offset (2), num_tokens (3), k (4), v (5).
  const size_t k_size = TensorSize(f, k.size()), v_size = TensorSize(f, v.size());
  const size_t chunk_size = IntFieldSize(f.layer) + IntFieldSize(f.token_offset) + IntFieldSize(f.num_tokens) + 1 +
                            VarintSize(k_size) + k_size + 1 + VarintSize(v_size) + v_size;
  std::string head;
  head.reserve(64);
  PutKey(2, kLengthDelimited, &head);  // WriteKVRequest.chunk
  PutVarint(chunk_size, &head);
  PutInt(1, f.layer, &head);
  PutInt(2, f.token_offset, &head);
  PutInt(3, f.num_tokens, &head);
  PutKey(4, kLengthDelimited, &head);
  PutVarint(k_size, &head);
  PutTensorHead(f, k.size(), &head);
  std::string v_head;
  v_head.reserve(32);
  PutKey(5, kLengthDelimited, &v_head);
  PutVarint(v_size, &v_head);
  PutTensorHead(f, v.size(), &v_head);

  grpc::Slice slices[4];
  size_t n = 0;
  slices[n++] = grpc::Slice(head);
  if (k.size() > 0) slices[n++] = std::move(k);
  slices[n++] = grpc::Slice(v_head);
  if (v.size() > 0) slices[n++] = std::move(v);
  return grpc::ByteBuffer(slices, n);
}

}  // namespace pkv::client
