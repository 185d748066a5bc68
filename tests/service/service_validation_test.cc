// Tests of the service's conversion and validation: each kind of bad request gets its gRPC code
// and a message naming the field, and leaves the engine exactly as it was (state fingerprint,
// pager counts, consistency). Drives service/handlers.h directly: no sockets.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "client/kv_data.h"
#include "engine/engine_factory.h"
#include "gtest/gtest.h"
#include "tests/support/small_model.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/proto_convert.h"
#include "service/shared_memory.h"

namespace pkv::service {
namespace {

constexpr uint64_t kSeed = 424242;

ModelShape SmallShape() { return testing_support::SmallTestShape(); }

void SetTensor(v1::Tensor* t, v1::DType dtype, std::vector<int64_t> shape, std::string data) {
  t->set_dtype(dtype);
  for (int64_t d : shape) t->add_shape(d);
  t->set_data(std::move(data));
}

// Snapshot of everything a rejected request must leave alone.
struct Snapshot {
  uint64_t fingerprint;
  kvpool::PagerStats pager;
  int64_t active, writing, open_steps;
};

class ServiceValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    engine::EngineConfig config;
    config.shape = SmallShape();
    config.num_pages = 12;
    config.backend = "cpu";
    config.cpu_threads = 1;
    config.max_batch = 4;
    config.scatter_seed = 99;
    auto engine = engine::BuildEngine(config);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
    gen_ = std::make_unique<client::KvDataGen>(engine_->shape(), kSeed);
    ASSERT_TRUE(WritePrompt(1, 20).ok());
    ASSERT_TRUE(WritePrompt(2, 16).ok());
  }

  absl::Status WritePrompt(uint64_t seq, int64_t tokens) {
    PromptSession session(*engine_);
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(seq);
    header.mutable_header()->set_num_tokens(tokens);
    absl::Status s = session.OnMessage(header);
    if (!s.ok()) return s;
    for (int32_t layer = 0; layer < engine_->shape().num_layers; ++layer) {
      s = session.OnMessage(Chunk(seq, layer, 0, tokens));
      if (!s.ok()) return s;
    }
    v1::WriteKVResponse response;
    return session.Commit(&response);
  }

  v1::WriteKVRequest Chunk(uint64_t seq, int32_t layer, int64_t offset, int64_t n) const {
    const ModelShape& s = engine_->shape();
    std::string k, v;
    gen_->AppendKv(seq, layer, offset, n, &k, &v);
    v1::WriteKVRequest r;
    v1::KVChunk* c = r.mutable_chunk();
    c->set_layer(layer);
    c->set_token_offset(offset);
    c->set_num_tokens(n);
    SetTensor(c->mutable_k(), v1::DTYPE_FP16, {n, s.num_kv_heads, s.head_dim}, std::move(k));
    SetTensor(c->mutable_v(), v1::DTYPE_FP16, {n, s.num_kv_heads, s.head_dim}, std::move(v));
    return r;
  }

  // A well-formed request of one layer for `rows` (token position 1000 for the data).
  v1::StepRequest Step(uint64_t id, int32_t layer, std::vector<uint64_t> rows) const {
    const ModelShape& s = engine_->shape();
    v1::StepRequest r;
    r.set_token_step_id(id);
    r.set_layer(layer);
    std::string q, k, v;
    for (uint64_t row : rows) {
      r.add_rows(row);
      gen_->AppendQ(row, layer, 1000, &q);
      gen_->AppendKv(row, layer, 1000, 1, &k, &v);
    }
    const int64_t b = static_cast<int64_t>(rows.size());
    SetTensor(r.mutable_q(), v1::DTYPE_FP16, {b, s.num_q_heads, s.head_dim}, std::move(q));
    SetTensor(r.mutable_k(), v1::DTYPE_FP16, {b, s.num_kv_heads, s.head_dim}, std::move(k));
    SetTensor(r.mutable_v(), v1::DTYPE_FP16, {b, s.num_kv_heads, s.head_dim}, std::move(v));
    return r;
  }

  Snapshot Take() const {
    const engine::EngineInfo info = engine_->Info();
    return {engine_->StateFingerprint(), info.pager, info.active_sequences, info.writing_sequences,
            info.open_token_steps};
  }

  // `check_bytes` false: the freed pages of an aborted prompt keep the bytes written to them,
  // so only the accounting and tables must match.
  void ExpectUnchanged(const Snapshot& before, bool check_bytes = true) const {
    const Snapshot after = Take();
    if (check_bytes) EXPECT_EQ(after.fingerprint, before.fingerprint) << "engine state changed";
    EXPECT_EQ(after.pager.free_pages, before.pager.free_pages);
    EXPECT_EQ(after.pager.used_pages, before.pager.used_pages);
    EXPECT_EQ(after.pager.num_sequences, before.pager.num_sequences);
    EXPECT_EQ(after.pager.used_tokens, before.pager.used_tokens);
    EXPECT_EQ(after.active, before.active);
    EXPECT_EQ(after.writing, before.writing);
    EXPECT_EQ(after.open_steps, before.open_steps);
    EXPECT_TRUE(engine_->CheckConsistency().ok());
  }

  // Runs `request` and expects `code` (as the gRPC status the client would see) with `field`
  // in the message, and no state change.
  void ExpectStepRejected(const v1::StepRequest& request, grpc::StatusCode code,
                          const std::string& field) {
    const Snapshot before = Take();
    v1::StepResponse response;
    const grpc::Status status = ToGrpcStatus(RunStep(*engine_, request, &response));
    EXPECT_EQ(status.error_code(), code) << status.error_message();
    EXPECT_NE(status.error_message().find(field), std::string::npos)
        << "message '" << status.error_message() << "' should name " << field;
    EXPECT_FALSE(response.has_out());
    ExpectUnchanged(before);
  }

  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<client::KvDataGen> gen_;
};

TEST(GrpcStatusTest, MapsEveryCodeOneToOneAndKeepsTheMessage) {
  for (int c = 1; c <= 16; ++c) {
    const absl::Status s(static_cast<absl::StatusCode>(c), "field x: bad");
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(g.error_message(), "field x: bad");
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  v1::RequestStatus rs;
  ToRequestStatus(absl::NotFoundError("rows[0]"), &rs);
  EXPECT_EQ(rs.code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_EQ(rs.message(), "rows[0]");
}

TEST(ProtoConvertTest, DTypes) {
  EXPECT_EQ(ToProtoDType(DType::kF16), v1::DTYPE_FP16);
  EXPECT_EQ(ToProtoDType(DType::kBF16), v1::DTYPE_BF16);
  EXPECT_EQ(*FromProtoDType(v1::DTYPE_BF16, "x"), DType::kBF16);
  EXPECT_EQ(FromProtoDType(v1::DTYPE_FP32, "q.dtype").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromProtoDType(77, "q.dtype").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceValidationTest, DescribeReportsShapeAndPool) {
  v1::DescribeResponse d;
  RunDescribe(*engine_, ServiceLimits{.max_message_bytes = 1 << 22}, true, &d);
  EXPECT_EQ(d.model().num_layers(), 3);
  EXPECT_EQ(d.model().num_q_heads(), 8);
  EXPECT_EQ(d.model().num_kv_heads(), 2);
  EXPECT_EQ(d.model().head_dim(), 64);
  EXPECT_EQ(d.model().page_size(), 16);
  EXPECT_EQ(d.model().dtype(), v1::DTYPE_FP16);
  EXPECT_EQ(d.pool().total_pages(), 12);
  EXPECT_EQ(d.pool().free_pages(), 12 - 2 - 1);  // 20 tokens: 2 pages, 16 tokens: 1 page
  EXPECT_EQ(d.pool().page_bytes(), SmallShape().page_bytes_all_layers());
  EXPECT_EQ(d.limits().max_batch(), 4);
  EXPECT_EQ(d.limits().max_message_bytes(), 1 << 22);
  EXPECT_EQ(d.active_sequences(), 2);
  EXPECT_TRUE(d.serving());
  EXPECT_EQ(d.backend(), "cpu");
}

TEST_F(ServiceValidationTest, GoodStepThenEachMalformedStepIsRejectedWithoutChange) {
  {
    v1::StepResponse r;
    ASSERT_TRUE(RunStep(*engine_, Step(10, 0, {1, 2}), &r).ok());
    EXPECT_EQ(r.token_step_id(), 10u);
    EXPECT_EQ(r.layer(), 0);
    EXPECT_EQ(r.out().shape_size(), 3);
    EXPECT_EQ(r.out().data().size(), 2u * 8 * 64 * 2);
    EXPECT_FALSE(r.replayed());
    EXPECT_FALSE(r.kernel().empty());
  }
  using C = grpc::StatusCode;
  v1::StepRequest r;

  r = Step(0, 1, {1, 2});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "token_step_id");
  r = Step(10, 3, {1, 2});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "layer");
  r = Step(10, -1, {1, 2});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "layer");

  r = Step(10, 1, {1, 2});
  r.mutable_q()->set_dtype(v1::DTYPE_BF16);
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "q.dtype");
  r = Step(10, 1, {1, 2});
  r.mutable_q()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "q.dtype");
  r = Step(10, 1, {1, 2});
  r.mutable_k()->set_dtype(v1::DTYPE_FP32);
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "k.dtype");
  r = Step(10, 1, {1, 2});
  r.mutable_q()->set_shape(1, 4);  // [2, 4, 64] instead of [2, 8, 64]
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "q.shape");
  r = Step(10, 1, {1, 2});
  r.mutable_v()->clear_shape();
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "v.shape");
  r = Step(10, 1, {1, 2});
  r.mutable_k()->mutable_data()->resize(r.k().data().size() - 2);
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "k: ");  // the engine checks byte sizes
  r = Step(10, 1, {1, 2});
  r.mutable_v()->mutable_data()->append("xx");
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "v: ");
  r = Step(10, 1, {1, 2, 3});
  r.mutable_q()->set_shape(0, 2);  // tensors for 2 rows but 3 rows listed
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "q.shape");

  // Semantics the engine checks, through the same path.
  r = Step(10, 1, {2, 1});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "rows");
  r = Step(10, 1, {1, 2});
  r.add_free(2);
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "free");
  r = Step(11, 0, {1});
  ExpectStepRejected(r, C::FAILED_PRECONDITION, "rows[0]");  // row 1 is in open token step 10
  r = Step(12, 1, {1, 2});
  ExpectStepRejected(r, C::FAILED_PRECONDITION, "token_step_id");  // layer 0 never ran

  // Finish token step 10, then the layer-0 checks of a new one.
  for (int32_t layer = 1; layer < 3; ++layer) {
    v1::StepResponse resp;
    ASSERT_TRUE(RunStep(*engine_, Step(10, layer, {1, 2}), &resp).ok());
  }
  r = Step(20, 0, {1, 777});
  ExpectStepRejected(r, C::NOT_FOUND, "rows[1]");
  r = Step(20, 0, {1, 1});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "rows[1]");
  r = Step(20, 0, {1, 2, 3, 4, 5});
  ExpectStepRejected(r, C::INVALID_ARGUMENT, "max_batch");
  r = Step(20, 0, {1});
  r.add_open(2);
  ExpectStepRejected(r, C::ALREADY_EXISTS, "open[0]");
  r = Step(20, 0, {1});
  r.add_free(778);
  ExpectStepRejected(r, C::NOT_FOUND, "free[0]");
}

// The service checks only the wire (dtype and shape fields); the engine checks layers, token
// ranges and byte sizes, so Step and WriteKV word the same mistake the same way.
TEST_F(ServiceValidationTest, RangeAndSizeErrorsAreWordedOnceForStepAndWriteKv) {
  v1::StepResponse response;
  const absl::Status step_layer = RunStep(*engine_, Step(40, 3, {1}), &response);
  v1::StepRequest short_k = Step(40, 0, {1});
  short_k.mutable_k()->mutable_data()->resize(short_k.k().data().size() - 2);
  const absl::Status step_bytes = RunStep(*engine_, short_k, &response);

  PromptSession s(*engine_);
  v1::WriteKVRequest h;
  h.mutable_header()->set_sequence_id(8);
  h.mutable_header()->set_num_tokens(10);
  ASSERT_TRUE(s.OnMessage(h).ok());
  const absl::Status chunk_layer = s.OnMessage(Chunk(8, 3, 0, 1));
  v1::WriteKVRequest chunk_short_k = Chunk(8, 0, 0, 1);
  chunk_short_k.mutable_chunk()->mutable_k()->mutable_data()->resize(chunk_short_k.chunk().k().data().size() - 2);
  const absl::Status chunk_bytes = s.OnMessage(chunk_short_k);

  EXPECT_EQ(step_layer.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(step_layer.message(), "layer: 3 out of range [0, 3)");
  EXPECT_EQ(chunk_layer, step_layer);
  EXPECT_EQ(step_bytes.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(step_bytes.message(), "k: 254 bytes, want 256 ([1, 2, 64] fp16)");
  EXPECT_EQ(chunk_bytes, step_bytes);

  // A token range past the end of int64 is refused, not overflowed.
  v1::WriteKVRequest far = Chunk(8, 0, 0, 4);
  far.mutable_chunk()->set_token_offset(INT64_MAX - 1);
  const absl::Status range = s.OnMessage(far);
  EXPECT_EQ(range.code(), absl::StatusCode::kInvalidArgument) << range;
  EXPECT_NE(range.message().find("token_offset: "), std::string::npos) << range;
}

TEST_F(ServiceValidationTest, PoolFullStepIsResourceExhaustedNamingFreePages) {
  // 9 pages free; a prompt of 9 * 16 tokens takes them all.
  ASSERT_TRUE(WritePrompt(3, 9 * 16).ok());
  ASSERT_EQ(engine_->Info().pager.free_pages, 0);
  // Row 2 holds exactly 16 tokens: its next token needs a new page.
  const Snapshot before = Take();
  v1::StepResponse response;
  const grpc::Status status = ToGrpcStatus(RunStep(*engine_, Step(30, 0, {2}), &response));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(status.error_message().find("free"), std::string::npos) << status.error_message();
  ExpectUnchanged(before);
  // Freeing row 3 in the same step makes room: the step is then fine.
  v1::StepRequest ok = Step(31, 0, {2});
  ok.add_free(3);
  ASSERT_TRUE(RunStep(*engine_, ok, &response).ok());
}

TEST_F(ServiceValidationTest, WriteKvErrorsAndAbortLeaveNothingBehind) {
  const Snapshot before = Take();
  using SC = absl::StatusCode;
  {
    PromptSession s(*engine_);
    EXPECT_EQ(s.OnMessage(Chunk(5, 0, 0, 4)).code(), SC::kInvalidArgument);  // chunk before header
    v1::WriteKVRequest empty;
    EXPECT_EQ(s.OnMessage(empty).code(), SC::kInvalidArgument);
    v1::WriteKVResponse r;
    EXPECT_EQ(s.Commit(&r).code(), SC::kInvalidArgument);  // no header at all
  }
  ExpectUnchanged(before);
  {
    PromptSession s(*engine_);
    v1::WriteKVRequest h;
    h.mutable_header()->set_sequence_id(1);  // exists
    h.mutable_header()->set_num_tokens(4);
    EXPECT_EQ(s.OnMessage(h).code(), SC::kAlreadyExists);
    h.mutable_header()->set_sequence_id(6);
    h.mutable_header()->set_num_tokens(0);
    EXPECT_EQ(s.OnMessage(h).code(), SC::kInvalidArgument);
    h.mutable_header()->set_num_tokens(16 * 100);
    absl::Status full = s.OnMessage(h);
    EXPECT_EQ(full.code(), SC::kResourceExhausted);
    EXPECT_NE(full.message().find("free"), std::string::npos) << full;
  }
  ExpectUnchanged(before);
  {
    PromptSession s(*engine_);
    v1::WriteKVRequest h;
    h.mutable_header()->set_sequence_id(7);
    h.mutable_header()->set_num_tokens(10);
    ASSERT_TRUE(s.OnMessage(h).ok());
    EXPECT_EQ(s.OnMessage(h).code(), SC::kInvalidArgument);  // second header
    v1::WriteKVRequest c = Chunk(7, 3, 0, 4);
    absl::Status st = s.OnMessage(c);
    EXPECT_EQ(st.code(), SC::kInvalidArgument);
    EXPECT_NE(st.message().find("layer: "), std::string::npos) << st;
    c = Chunk(7, 0, 8, 4);  // tokens [8, 12) of 10
    EXPECT_EQ(s.OnMessage(c).code(), SC::kInvalidArgument);
    c = Chunk(7, 0, 0, 4);
    c.mutable_chunk()->mutable_k()->set_shape(0, 3);
    st = s.OnMessage(c);
    EXPECT_NE(st.message().find("chunk.k.shape"), std::string::npos) << st;
    c = Chunk(7, 0, 0, 4);
    c.mutable_chunk()->mutable_v()->set_dtype(v1::DTYPE_BF16);
    st = s.OnMessage(c);
    EXPECT_NE(st.message().find("chunk.v.dtype"), std::string::npos) << st;
    ASSERT_TRUE(s.OnMessage(Chunk(7, 0, 0, 10)).ok());
    v1::WriteKVResponse r;
    st = s.Commit(&r);  // layers 1, 2 missing
    EXPECT_EQ(st.code(), SC::kFailedPrecondition) << st;
    EXPECT_TRUE(s.pending());
    EXPECT_EQ(engine_->Info().writing_sequences, 1);
    // Stepping a sequence whose prompt is being written.
    v1::StepResponse resp;
    EXPECT_EQ(RunStep(*engine_, Step(40, 0, {7}), &resp).code(), SC::kFailedPrecondition);
    // Releasing it is refused while it is being written.
    v1::ReleaseRequest rel;
    rel.add_sequence_ids(7);
    v1::ReleaseResponse rel_resp;
    EXPECT_EQ(RunRelease(*engine_, rel, &rel_resp).code(), SC::kFailedPrecondition);
  }  // the session is destroyed uncommitted: the prompt is released
  ExpectUnchanged(before, /*check_bytes=*/false);
}

TEST_F(ServiceValidationTest, ReleaseIsAllOrNothing) {
  const Snapshot before = Take();
  v1::ReleaseRequest r;
  r.add_sequence_ids(1);
  r.add_sequence_ids(999);
  v1::ReleaseResponse resp;
  const grpc::Status status = ToGrpcStatus(RunRelease(*engine_, r, &resp));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(status.error_message().find("sequence_ids[1]"), std::string::npos) << status.error_message();
  ExpectUnchanged(before);
  r.clear_sequence_ids();
  r.add_sequence_ids(1);
  r.add_sequence_ids(2);
  ASSERT_TRUE(RunRelease(*engine_, r, &resp).ok());
  EXPECT_EQ(resp.released(), 2);
  EXPECT_EQ(resp.free_pages(), 12);
}

// What a region holds until it is unmapped (the engine's registration of it with the GPU) is
// released while the mapping is still there: the release may read or unpin those pages.
TEST(SharedMemoryRegionTest, HoldersAreReleasedWhileTheRegionIsStillMapped) {
  const std::string name = "/pkv-service-test-" + std::to_string(getpid());
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 8192), 0);
  close(fd);
  auto region = SharedMemoryRegion::Open(name, int64_t{1} << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  (*region)->base()[100] = 42;
  int seen = -1;
  const uint8_t* base = (*region)->base();
  (*region)->HoldUntilUnmapped(std::shared_ptr<void>(nullptr, [&seen, base](void*) { seen = base[100]; }));
  region->reset();  // unmaps; reading the bytes after that would fault
  EXPECT_EQ(seen, 42);
}

}  // namespace
}  // namespace pkv::service
