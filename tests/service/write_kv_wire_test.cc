// ReadChunkInPlace (service/write_kv_wire.h) against protobuf: the same chunk read from its
// serialized bytes cut into pieces at every kind of boundary (one piece, fields crossing pieces,
// one byte per piece) gives protobuf's fields and bytes; what it does not take on (a header,
// truncated or malformed bytes, a tensor given twice) is left to protobuf; and a chunk read in
// place goes through the same checks as a parsed one (errors naming the field, the finite check).
#include "service/write_kv_wire.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "engine/engine_factory.h"
#include "gtest/gtest.h"
#include "pkv/v1/worker.pb.h"
#include "service/handlers.h"
#include "service/proto_convert.h"
#include "tests/support/small_model.h"

namespace pkv::service {
namespace {

// Random finite fp16 bits in [-2, -1] U [1, 2].
std::string FiniteBytes(int64_t elems, std::mt19937_64& rng) {
  std::string out(static_cast<size_t>(elems) * 2, '\0');
  for (int64_t i = 0; i < elems; ++i) {
    const uint64_t r = rng();
    const uint16_t bits = static_cast<uint16_t>(0x3C00 | (r & 0x03FF) | ((r >> 15) & 0x8000));
    std::memcpy(out.data() + 2 * i, &bits, 2);
  }
  return out;
}

v1::WriteKVRequest ChunkMessage(const ModelShape& s, int32_t layer, int64_t offset, int64_t n, std::mt19937_64& rng) {
  v1::WriteKVRequest r;
  v1::KVChunk* c = r.mutable_chunk();
  c->set_layer(layer);
  c->set_token_offset(offset);
  c->set_num_tokens(n);
  for (v1::Tensor* t : {c->mutable_k(), c->mutable_v()}) {
    t->set_dtype(v1::DTYPE_FP16);
    t->add_shape(n);
    t->add_shape(s.num_kv_heads);
    t->add_shape(s.head_dim);
    t->set_data(FiniteBytes(n * s.num_kv_heads * s.head_dim, rng));
  }
  return r;
}

// `bytes` cut at the given offsets (ascending, inside the message).
std::vector<std::span<const uint8_t>> Cut(const std::string& bytes, const std::vector<size_t>& cuts) {
  std::vector<std::span<const uint8_t>> pieces;
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  size_t at = 0;
  for (size_t cut : cuts) {
    pieces.emplace_back(data + at, cut - at);
    at = cut;
  }
  pieces.emplace_back(data + at, bytes.size() - at);
  return pieces;
}

// The bytes of a tensor seen in place, wherever they lie.
std::string AsString(const PieceBytes& b) {
  std::string out(b.size(), '\0');
  b.CopyTo(0, b.size(), out.data());
  return out;
}

void ExpectSame(const ChunkRef& got, const v1::KVChunk& want) {
  EXPECT_EQ(got.layer, want.layer());
  EXPECT_EQ(got.token_offset, want.token_offset());
  EXPECT_EQ(got.num_tokens, want.num_tokens());
  for (const auto& [ref, tensor] : {std::pair(&got.k, &want.k()), std::pair(&got.v, &want.v())}) {
    EXPECT_EQ(ref->dtype, tensor->dtype());
    EXPECT_EQ(std::vector<int64_t>(ref->shape.begin(), ref->shape.end()),
              std::vector<int64_t>(tensor->shape().begin(), tensor->shape().end()));
    EXPECT_EQ(AsString(ref->bytes()), tensor->data());
    EXPECT_TRUE(ref->data.empty() || ref->data_pieces.empty());
  }
}

TEST(WriteKvWireTest, ReadsChunksInPlaceAcrossAnyPieceBoundaries) {
  const ModelShape s = testing_support::SmallTestShape();
  std::mt19937_64 rng(20261202);
  const v1::WriteKVRequest message = ChunkMessage(s, 2, 48, 37, rng);
  const std::string bytes = message.SerializeAsString();
  ChunkRef chunk;

  // One piece: both tensors in place, nothing gathered.
  const auto whole = Cut(bytes, {});
  ASSERT_TRUE(ReadChunkInPlace(whole, &chunk));
  ExpectSame(chunk, message.chunk());
  const auto* begin = reinterpret_cast<const uint8_t*>(bytes.data());
  EXPECT_TRUE(chunk.k.data.data() >= begin && chunk.k.data.data() < begin + bytes.size());
  EXPECT_TRUE(chunk.v.data.data() >= begin && chunk.v.data.data() < begin + bytes.size());

  // gRPC-like 4 KiB pieces (K and V each cross several), empty pieces among them, random cuts
  // (through tags, varints and lengths too) and one byte per piece.
  std::vector<std::vector<size_t>> cuttings;
  {
    std::vector<size_t> c;
    for (size_t at = 4096; at < bytes.size(); at += 4096) c.push_back(at);
    cuttings.push_back(c);
    cuttings.push_back({0, 1, 1, 2, 7, 7, bytes.size() / 2, bytes.size() - 1});
    for (int round = 0; round < 20; ++round) {
      std::vector<size_t> r;
      for (int i = 0; i < 6; ++i) r.push_back(rng() % bytes.size());
      std::sort(r.begin(), r.end());
      cuttings.push_back(r);
    }
    std::vector<size_t> bytewise;
    for (size_t at = 1; at < bytes.size(); ++at) bytewise.push_back(at);
    cuttings.push_back(bytewise);
  }
  for (const auto& cuts : cuttings) {
    const auto pieces = Cut(bytes, cuts);
    ASSERT_TRUE(ReadChunkInPlace(pieces, &chunk)) << pieces.size() << " pieces";
    ExpectSame(chunk, message.chunk());
    // Nothing gathered: every part of K and V lies in the message's own bytes.
    for (const TensorRef* t : {&chunk.k, &chunk.v}) {
      const PieceBytes tensor_bytes = t->bytes();
      for (const std::span<const uint8_t> part : tensor_bytes.pieces()) {
        EXPECT_TRUE(part.empty() || (part.data() >= begin && part.data() + part.size() <= begin + bytes.size()));
      }
    }
  }
}

TEST(WriteKvWireTest, TakesWhatProtobufAcceptsInOtherEncodings) {
  const ModelShape s = testing_support::SmallTestShape();
  std::mt19937_64 rng(7);
  v1::WriteKVRequest message = ChunkMessage(s, 1, 0, 3, rng);
  std::string bytes = message.SerializeAsString();
  // Unknown fields (varint 9, fixed64 10, bytes 11, fixed32 12) appended inside the chunk and a
  // repeated scalar (layer again: the last value wins), then the shape of V unpacked.
  v1::KVChunk chunk = message.chunk();
  std::string extra;
  extra += '\x48';  // field 9, varint
  extra += '\x05';
  extra += '\x51';  // field 10, fixed64
  extra += std::string(8, '\x01');
  extra += '\x5A';  // field 11, bytes
  extra += '\x02';
  extra += "ab";
  extra += '\x65';  // field 12, fixed32
  extra += std::string(4, '\x02');
  extra += '\x08';  // field 1 (layer) again
  extra += '\x02';
  std::string chunk_bytes = chunk.SerializeAsString() + extra;
  std::string request_bytes;
  request_bytes += '\x12';  // WriteKVRequest.chunk
  {
    uint64_t n = chunk_bytes.size();
    while (n >= 0x80) {
      request_bytes += static_cast<char>((n & 0x7F) | 0x80);
      n >>= 7;
    }
    request_bytes += static_cast<char>(n);
  }
  request_bytes += chunk_bytes;
  v1::WriteKVRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(request_bytes));
  EXPECT_EQ(parsed.chunk().layer(), 2);
  ChunkRef ref;
  const auto pieces = Cut(request_bytes, {request_bytes.size() / 3});
  ASSERT_TRUE(ReadChunkInPlace(pieces, &ref));
  ExpectSame(ref, parsed.chunk());
}

TEST(WriteKvWireTest, LeavesHeadersMalformedBytesAndMergesToProtobuf) {
  const ModelShape s = testing_support::SmallTestShape();
  std::mt19937_64 rng(11);
  ChunkRef ref;
  auto read = [&](const std::string& bytes) { return ReadChunkInPlace(Cut(bytes, {}), &ref); };

  v1::WriteKVRequest header;
  header.mutable_header()->set_sequence_id(5);
  header.mutable_header()->set_num_tokens(10);
  EXPECT_FALSE(read(header.SerializeAsString()));
  EXPECT_FALSE(read(""));

  const std::string good = ChunkMessage(s, 0, 0, 4, rng).SerializeAsString();
  v1::WriteKVRequest probe;
  for (size_t len : {size_t{1}, size_t{2}, size_t{5}, good.size() / 2, good.size() - 1}) {
    const std::string truncated = good.substr(0, len);
    EXPECT_FALSE(read(truncated)) << len;
    EXPECT_FALSE(probe.ParseFromString(truncated)) << len;  // protobuf refuses it too: INVALID_ARGUMENT
  }
  // A second chunk after the first: protobuf merges the two, so it is left to protobuf.
  EXPECT_FALSE(read(good + ChunkMessage(s, 0, 4, 4, rng).SerializeAsString()));
  // A group (wire types 3 and 4) in the chunk: protobuf skips it as an unknown field.
  const std::string grouped = std::string("\x12\x04\x08\x01\x3B\x3C", 6);
  EXPECT_TRUE(probe.ParseFromString(grouped));
  EXPECT_FALSE(read(grouped));
}

class WriteKvWireSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    engine::EngineConfig config;
    config.shape = testing_support::SmallTestShape();
    config.num_pages = 8;
    config.backend = "cpu";
    config.cpu_threads = 1;
    config.max_batch = 4;
    auto engine = engine::BuildEngine(config);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  // A chunk read in place from `message` cut into 100-byte pieces, handed to a session whose
  // header announced 16 tokens.
  absl::Status WriteInPlace(const v1::WriteKVRequest& message) {
    PromptSession session(*engine_);
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(1);
    header.mutable_header()->set_num_tokens(16);
    if (absl::Status s = session.OnMessage(header); !s.ok()) return s;
    const std::string bytes = message.SerializeAsString();
    std::vector<size_t> cuts;
    for (size_t at = 100; at < bytes.size(); at += 100) cuts.push_back(at);
      ChunkRef ref;
    if (!ReadChunkInPlace(Cut(bytes, cuts), &ref)) return absl::UnknownError("not read");
    return session.OnChunk(ref);
  }

  std::unique_ptr<engine::Engine> engine_;
};

TEST_F(WriteKvWireSessionTest, InPlaceChunksGetTheChecksOfParsedOnes) {
  const ModelShape& s = engine_->shape();
  std::mt19937_64 rng(3);
  EXPECT_TRUE(WriteInPlace(ChunkMessage(s, 0, 0, 16, rng)).ok());

  v1::WriteKVRequest short_k = ChunkMessage(s, 0, 0, 4, rng);
  short_k.mutable_chunk()->mutable_k()->mutable_data()->resize(10);
  absl::Status st = WriteInPlace(short_k);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("k: "), std::string::npos) << st;

  v1::WriteKVRequest bad_shape = ChunkMessage(s, 1, 0, 4, rng);
  bad_shape.mutable_chunk()->mutable_v()->set_shape(1, s.num_kv_heads + 1);
  st = WriteInPlace(bad_shape);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("chunk.v.shape"), std::string::npos) << st;

  v1::WriteKVRequest past_end = ChunkMessage(s, 0, 14, 4, rng);
  st = WriteInPlace(past_end);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("token_offset: "), std::string::npos) << st;

  // A NaN in V (fp16 0x7E00), in a row that crosses a piece boundary: still refused.
  v1::WriteKVRequest nan = ChunkMessage(s, 2, 0, 8, rng);
  std::string* v = nan.mutable_chunk()->mutable_v()->mutable_data();
  (*v)[v->size() / 2] = '\x00';
  (*v)[v->size() / 2 + 1] = '\x7E';
  st = WriteInPlace(nan);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message().rfind("v: element [", 0), 0u) << st;
  EXPECT_EQ(engine_->Info().writing_sequences, 0);  // every session above was released
}

}  // namespace
}  // namespace pkv::service
