// Robustness of the real gRPC server (service::WorkerServer on 127.0.0.1:0, CPU backend) against
// routers that are buggy, hung or hostile, driven by a client written from the proto alone: the
// generated stubs, and raw byte buffers where a message must be malformed. Each test names the
// guarantee it checks: unparsable messages, ownership, incarnation, the leases (a stalled WriteKV
// stream, abandoned token steps) and drain.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "common/dtype.h"
#include "common/metrics.h"
#include "common/shared_memory_ring.h"
#include "engine/engine_factory.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/rpc_method.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "gtest/gtest.h"
#include "pkv/v1/worker.grpc.pb.h"
#include "service/worker_server.h"
#include "tests/support/small_model.h"

namespace pkv {
namespace {

using grpc::ByteBuffer;

constexpr char kMethodPrefix[] = "/pkv.v1.PersistentKV/";

ModelShape Shape() { return testing_support::SmallTestShape(); }

ByteBuffer Raw(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return ByteBuffer(&slice, 1);
}

template <typename Message>
ByteBuffer Serialized(const Message& m) {
  return Raw(m.SerializeAsString());
}

template <typename Message>
Message Parsed(ByteBuffer& buffer) {
  Message m;
  EXPECT_TRUE(grpc::SerializationTraits<Message>::Deserialize(&buffer, &m).ok());
  return m;
}

// Not a valid protobuf: field 1 as a length-delimited value of 16 bytes, then only 3.
const std::string kGarbage("\x0a\x10" "abc", 5);

void SetTensor(v1::Tensor* t, std::vector<int64_t> shape, std::mt19937_64& rng) {
  t->set_dtype(v1::DTYPE_FP16);
  int64_t n = 1;
  for (int64_t d : shape) {
    t->add_shape(d);
    n *= d;
  }
  std::normal_distribution<float> normal(0.f, 1.f);
  std::string data(n * 2, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = FloatToHalf(normal(rng));
    std::memcpy(&data[2 * i], &h, 2);
  }
  t->set_data(std::move(data));
}

class WorkerRobustnessTest : public ::testing::Test {
 protected:
  void StartWorker(double token_step_idle_seconds = 30, double prompt_idle_seconds = 60,
                   int64_t shared_memory_max_bytes = 1 << 20) {
    engine::EngineConfig config;
    config.shape = Shape();
    config.num_pages = 32;
    config.backend = "cpu";
    config.cpu_threads = 1;
    config.max_batch = 8;
    config.scatter_seed = 77;
    config.token_step_idle_seconds = token_step_idle_seconds;
    auto engine = engine::BuildEngine(config);
    ASSERT_TRUE(engine.ok()) << engine.status();
    metrics_ = std::make_unique<WorkerMetrics>(BuildInfo{"test", "test", "cpu", "none", "fp16", "default"});
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.metrics = metrics_.get();
    options.prompt_idle_seconds = prompt_idle_seconds;
    options.shared_memory_max_bytes = shared_memory_max_bytes;
    auto server = service::WorkerServer::Start(options, *std::move(engine));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::PersistentKV::NewStub(channel_);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
  }

  // A context for `router` (empty: anonymous) with a deadline.
  static std::unique_ptr<grpc::ClientContext> Context(const std::string& router = "") {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!router.empty()) ctx->AddMetadata("x-pkv-router-id", router);
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return ctx;
  }

  v1::DescribeResponse Describe(const std::string& router = "") {
    v1::DescribeResponse d;
    auto ctx = Context(router);
    EXPECT_TRUE(stub_->Describe(ctx.get(), v1::DescribeRequest(), &d).ok());
    return d;
  }

  // Writes a complete prompt of `tokens` tokens for `seq` as `router`.
  grpc::Status WritePrompt(const std::string& router, uint64_t seq, int64_t tokens) {
    auto ctx = Context(router);
    v1::WriteKVResponse response;
    auto writer = stub_->WriteKV(ctx.get(), &response);
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(seq);
    header.mutable_header()->set_num_tokens(tokens);
    writer->Write(header);
    for (int32_t layer = 0; layer < Shape().num_layers; ++layer) {
      v1::WriteKVRequest chunk;
      v1::KVChunk* c = chunk.mutable_chunk();
      c->set_layer(layer);
      c->set_num_tokens(tokens);
      SetTensor(c->mutable_k(), {tokens, Shape().num_kv_heads, Shape().head_dim}, rng_);
      SetTensor(c->mutable_v(), {tokens, Shape().num_kv_heads, Shape().head_dim}, rng_);
      writer->Write(chunk);
    }
    writer->WritesDone();
    return writer->Finish();
  }

  v1::StepRequest StepRequest(uint64_t token_step_id, int32_t layer, std::vector<uint64_t> rows) {
    v1::StepRequest r;
    r.set_token_step_id(token_step_id);
    r.set_layer(layer);
    for (uint64_t row : rows) r.add_rows(row);
    const int64_t b = static_cast<int64_t>(rows.size());
    SetTensor(r.mutable_q(), {b, Shape().num_q_heads, Shape().head_dim}, rng_);
    SetTensor(r.mutable_k(), {b, Shape().num_kv_heads, Shape().head_dim}, rng_);
    SetTensor(r.mutable_v(), {b, Shape().num_kv_heads, Shape().head_dim}, rng_);
    return r;
  }

  grpc::Status Step(const std::string& router, const v1::StepRequest& request, v1::StepResponse* response) {
    auto ctx = Context(router);
    return stub_->Step(ctx.get(), request, response);
  }

  bool WaitFor(const std::function<bool()>& done, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (done()) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return done();
  }

  std::mt19937_64 rng_{20261202};
  std::unique_ptr<WorkerMetrics> metrics_;
  std::unique_ptr<service::WorkerServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PersistentKV::Stub> stub_;
};

TEST_F(WorkerRobustnessTest, UnparsableMessagesGetInvalidArgumentOneAnswerEachAndAreCounted) {
  StartWorker();
  const int64_t total = Describe().pool().total_pages();
  // Unary.
  for (const char* method : {"Step", "Release", "Describe"}) {
    grpc::internal::RpcMethod rpc((std::string(kMethodPrefix) + method).c_str(), grpc::internal::RpcMethod::NORMAL_RPC,
                                  channel_);
    auto ctx = Context();
    ByteBuffer response;
    const grpc::Status s =
        grpc::internal::BlockingUnaryCall<ByteBuffer, ByteBuffer>(channel_.get(), rpc, ctx.get(), Raw(kGarbage), &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_NE(s.error_message().find("cannot parse"), std::string::npos) << method << ": " << s.error_message();
  }
  // StepStream: the malformed message is answered in order and the stream goes on.
  {
    grpc::internal::RpcMethod rpc("/pkv.v1.PersistentKV/StepStream", grpc::internal::RpcMethod::BIDI_STREAMING,
                                  channel_);
    auto ctx = Context();
    std::unique_ptr<grpc::ClientReaderWriter<ByteBuffer, ByteBuffer>> stream(
        grpc::internal::ClientReaderWriterFactory<ByteBuffer, ByteBuffer>::Create(channel_.get(), rpc, ctx.get()));
    ASSERT_TRUE(stream->Write(Raw(kGarbage)));
    ByteBuffer raw;
    ASSERT_TRUE(stream->Read(&raw));
    v1::StepResponse first = Parsed<v1::StepResponse>(raw);
    EXPECT_EQ(first.status().code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(first.status().message().find("cannot parse"), std::string::npos) << first.status().message();
    EXPECT_EQ(first.incarnation(), server_->incarnation());
    // A valid request on the same stream: a delta-only token step.
    ASSERT_TRUE(stream->Write(Serialized(StepRequest(5, 0, {}))));
    ASSERT_TRUE(stream->Read(&raw));
    v1::StepResponse second = Parsed<v1::StepResponse>(raw);
    EXPECT_EQ(second.status().code(), 0) << second.status().message();
    EXPECT_EQ(second.token_step_id(), 5u);
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
  // WriteKV: a garbage chunk after a valid header fails the stream; nothing is committed or held.
  {
    grpc::internal::RpcMethod rpc("/pkv.v1.PersistentKV/WriteKV", grpc::internal::RpcMethod::CLIENT_STREAMING,
                                  channel_);
    auto ctx = Context();
    ByteBuffer response;
    std::unique_ptr<grpc::ClientWriter<ByteBuffer>> writer(
        grpc::internal::ClientWriterFactory<ByteBuffer>::Create(channel_.get(), rpc, ctx.get(), &response));
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(9);
    header.mutable_header()->set_num_tokens(4);
    writer->Write(Serialized(header));
    writer->Write(Raw(kGarbage));
    writer->WritesDone();
    const grpc::Status s = writer->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_NE(s.error_message().find("cannot parse"), std::string::npos) << s.error_message();
  }
  EXPECT_TRUE(WaitFor([&] { return Describe().pool().free_pages() == total && Describe().pool().num_sequences() == 0; },
                      absl::Seconds(5)));
  EXPECT_EQ(metrics_->malformed(RpcMethod::kStep).Value(), 1);
  EXPECT_EQ(metrics_->malformed(RpcMethod::kRelease).Value(), 1);
  EXPECT_EQ(metrics_->malformed(RpcMethod::kDescribe).Value(), 1);
  EXPECT_EQ(metrics_->malformed(RpcMethod::kStepStream).Value(), 1);
  EXPECT_EQ(metrics_->malformed(RpcMethod::kWriteKV).Value(), 1);
}

TEST_F(WorkerRobustnessTest, AnotherRouterCannotStepReleaseFreeOrReplay) {
  StartWorker();
  ASSERT_TRUE(WritePrompt("alice", 1, 5).ok());
  ASSERT_TRUE(WritePrompt("bob", 2, 5).ok());
  const v1::StepRequest alice0 = StepRequest(100, 0, {1});
  v1::StepResponse first;
  ASSERT_TRUE(Step("alice", alice0, &first).ok());
  const v1::DescribeResponse before = Describe("bob");
  EXPECT_EQ(before.router(), "bob");
  ASSERT_EQ(before.open_steps_size(), 1);
  EXPECT_EQ(before.open_steps(0).token_step_id(), 100u);
  EXPECT_EQ(before.open_steps(0).router(), "alice");

  v1::StepResponse r;
  // Bob resending alice's request names a token step of his own (token step ids are per router)
  // over her sequence: refused; nothing comes from her retry cache.
  EXPECT_EQ(Step("bob", alice0, &r).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Step("bob", StepRequest(100, 1, {1}), &r).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Step("bob", StepRequest(101, 0, {2, 1}), &r).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::StepRequest free_alice = StepRequest(102, 0, {2});
  free_alice.add_free(1);
  EXPECT_EQ(Step("bob", free_alice, &r).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::ReleaseRequest release;
  release.add_sequence_ids(1);
  v1::ReleaseResponse released;
  {
    auto ctx = Context("bob");
    const grpc::Status s = stub_->Release(ctx.get(), release, &released);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_NE(s.error_message().find("another router"), std::string::npos) << s.error_message();
  }
  // Anonymous callers are a router of their own.
  EXPECT_EQ(Step("", StepRequest(103, 0, {1}), &r).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  const v1::DescribeResponse after = Describe();
  EXPECT_EQ(after.pool().free_pages(), before.pool().free_pages());
  EXPECT_EQ(after.pool().used_tokens(), before.pool().used_tokens());

  // Alice replays her own answer and finishes.
  v1::StepResponse replay;
  ASSERT_TRUE(Step("alice", alice0, &replay).ok());
  EXPECT_TRUE(replay.replayed());
  EXPECT_EQ(replay.out().data(), first.out().data());
  for (int32_t layer = 1; layer < Shape().num_layers; ++layer) {
    ASSERT_TRUE(Step("alice", StepRequest(100, layer, {1}), &r).ok());
  }
  auto ctx = Context("alice");
  EXPECT_TRUE(stub_->Release(ctx.get(), release, &released).ok());
}

TEST_F(WorkerRobustnessTest, IncarnationIsInEveryResponseAndAStaleOneIsRefused) {
  StartWorker();
  const uint64_t incarnation = server_->incarnation();
  ASSERT_NE(incarnation, 0u);
  EXPECT_EQ(Describe().incarnation(), incarnation);
  ASSERT_TRUE(WritePrompt("r", 1, 3).ok());
  {
    auto ctx = Context("r");
    v1::WriteKVResponse response;
    auto writer = stub_->WriteKV(ctx.get(), &response);
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(2);
    header.mutable_header()->set_num_tokens(1);
    header.mutable_header()->set_expected_incarnation(incarnation + 1);
    writer->Write(header);
    writer->WritesDone();
    const grpc::Status s = writer->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("restarted"), std::string::npos) << s.error_message();
  }
  v1::StepRequest stale = StepRequest(7, 0, {1});
  stale.set_expected_incarnation(incarnation ^ 0x5555);
  v1::StepResponse r;
  EXPECT_EQ(Step("r", stale, &r).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Describe().pool().used_tokens(), 3);
  stale.set_expected_incarnation(incarnation);
  ASSERT_TRUE(Step("r", stale, &r).ok());
  EXPECT_EQ(r.incarnation(), incarnation);
  v1::ReleaseRequest release;
  release.add_sequence_ids(1);
  release.set_expected_incarnation(incarnation + 7);
  v1::ReleaseResponse released;
  auto ctx = Context("r");
  EXPECT_EQ(stub_->Release(ctx.get(), release, &released).error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  // A restarted worker (a new server) has another incarnation.
  std::unique_ptr<service::WorkerServer> first = std::move(server_);
  first->Shutdown(absl::Seconds(0));
  StartWorker();
  EXPECT_NE(server_->incarnation(), incarnation);
}

TEST_F(WorkerRobustnessTest, StalledWriteKvStreamIsCancelledByThePromptLease) {
  StartWorker(/*token_step_idle_seconds=*/30, /*prompt_idle_seconds=*/0.6);
  const int64_t total = Describe().pool().total_pages();
  auto ctx = Context("slow");
  v1::WriteKVResponse response;
  auto writer = stub_->WriteKV(ctx.get(), &response);
  v1::WriteKVRequest header;
  header.mutable_header()->set_sequence_id(11);
  header.mutable_header()->set_num_tokens(16 * 20);
  ASSERT_TRUE(writer->Write(header));
  ASSERT_TRUE(WaitFor([&] { return Describe().writing_sequences() == 1; }, absl::Seconds(5)));
  EXPECT_EQ(Describe().pool().free_pages(), total - 20);
  // The router stalls; the lease cancels its stream and the pages come back.
  ASSERT_TRUE(WaitFor([&] { return Describe().pool().free_pages() == total; }, absl::Seconds(5)));
  EXPECT_EQ(Describe().writing_sequences(), 0);
  const grpc::Status s = writer->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
  EXPECT_EQ(metrics_->reclaimed(WorkerMetrics::Reclaim::kPrompt).Value(), 1);
  // The sequence id is free again.
  EXPECT_TRUE(WritePrompt("slow", 11, 4).ok());
}

TEST_F(WorkerRobustnessTest, AbandonedTokenStepsNeverJamTheWorker) {
  StartWorker(/*token_step_idle_seconds=*/2.0);
  const int32_t slots = Describe().limits().max_open_token_steps();
  ASSERT_GT(slots, 0);
  for (int i = 0; i <= slots; ++i) ASSERT_TRUE(WritePrompt("dead", 10 + i, 3).ok());
  const int64_t used = Describe().pool().used_tokens();
  v1::StepResponse r;
  // A router opens every slot and dies after layer 0.
  for (int i = 0; i < slots; ++i) ASSERT_TRUE(Step("dead", StepRequest(500 + i, 0, {10u + i}), &r).ok());
  const grpc::Status refused = Step("dead", StepRequest(600, 0, {10u + slots}), &r);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("open token steps full"), std::string::npos) << refused.error_message();
  EXPECT_EQ(Describe().open_steps_size(), slots);
  // Readiness says the worker cannot start token steps, then the lease frees the slots.
  auto health = [&] {
    grpc::internal::RpcMethod rpc("/grpc.health.v1.Health/Check", grpc::internal::RpcMethod::NORMAL_RPC, channel_);
    auto ctx = Context();
    ByteBuffer response;
    const grpc::Status s =
        grpc::internal::BlockingUnaryCall<ByteBuffer, ByteBuffer>(channel_.get(), rpc, ctx.get(), Raw(""), &response);
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(s.ok() && response.Dump(&slices).ok());
    std::string bytes;
    for (const auto& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    return bytes == std::string("\x08\x01", 2);  // status: SERVING
  };
  EXPECT_TRUE(WaitFor([&] { return !health(); }, absl::Seconds(3))) << "readiness never showed the jam";
  ASSERT_TRUE(WaitFor([&] { return Describe().open_token_steps() == 0; }, absl::Seconds(6)));
  EXPECT_EQ(Describe().pool().used_tokens(), used);
  EXPECT_EQ(metrics_->reclaimed(WorkerMetrics::Reclaim::kTokenStep).Value(), slots);
  EXPECT_TRUE(WaitFor(health, absl::Seconds(3)));
  EXPECT_TRUE(Step("dead", StepRequest(600, 0, {10u + slots}), &r).ok());
}

TEST_F(WorkerRobustnessTest, DrainLetsAnOpenTokenStepFinishWithinTheGracePeriod) {
  StartWorker();
  ASSERT_TRUE(WritePrompt("r", 1, 3).ok());
  ASSERT_TRUE(WritePrompt("r", 2, 3).ok());
  v1::StepResponse r;
  ASSERT_TRUE(Step("r", StepRequest(40, 0, {1}), &r).ok());
  const absl::Time start = absl::Now();
  std::thread stopper([&] { server_->Shutdown(absl::Seconds(20)); });
  ASSERT_TRUE(WaitFor([&] { return server_->draining(); }, absl::Seconds(5)));
  // New token steps are refused; Describe and Release still answer; the open token step finishes
  // over new unary RPCs.
  EXPECT_EQ(Step("r", StepRequest(41, 0, {2}), &r).error_code(), grpc::StatusCode::UNAVAILABLE);
  const v1::DescribeResponse d = Describe();
  EXPECT_FALSE(d.serving());
  v1::ReleaseRequest release;
  release.add_sequence_ids(2);
  v1::ReleaseResponse released;
  {
    auto ctx = Context("r");
    EXPECT_TRUE(stub_->Release(ctx.get(), release, &released).ok());
  }
  for (int32_t layer = 1; layer < Shape().num_layers; ++layer) {
    ASSERT_TRUE(Step("r", StepRequest(40, layer, {1}), &r).ok()) << layer;
  }
  stopper.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "shutdown waited although nothing was open";
  EXPECT_EQ(server_->engine().Info().open_token_steps, 0);
}

// A POSIX shared-memory object of `bytes` bytes made by a test router, mapped; unlinked and
// unmapped on destruction.
class TestRegion {
 public:
  explicit TestRegion(int64_t bytes) : name_("/pkv-test-" + std::to_string(getpid()) + "-" + std::to_string(next_++)) {
    fd_ = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd_, 0) << name_;
    EXPECT_EQ(ftruncate(fd_, bytes), 0);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    EXPECT_NE(p, MAP_FAILED);
    base_ = static_cast<char*>(p);
    size_ = bytes;
  }
  ~TestRegion() {
    munmap(base_, size_);
    close(fd_);
    shm_unlink(name_.c_str());
  }
  // Moves `t`'s data into the region at `offset` and points the tensor there.
  void Place(v1::Tensor* t, uint64_t offset) {
    std::memcpy(base_ + offset, t->data().data(), t->data().size());
    t->clear_data();
    t->mutable_shm()->set_offset(offset);
  }
  // The router shrinks its object under the worker.
  void Shrink() { EXPECT_EQ(ftruncate(fd_, 0), 0); }
  const std::string& name() const { return name_; }
  char* base() const { return base_; }
  int64_t size() const { return size_; }

 private:
  static inline int next_ = 0;
  std::string name_;
  int fd_ = -1;
  char* base_ = nullptr;
  int64_t size_ = 0;
};

// One StepStream of `router` naming `region` (none: "") in its metadata.
struct RawStream {
  RawStream(v1::PersistentKV::Stub& stub, const std::string& router, const std::string& region, bool ring = false) {
    ctx.AddMetadata("x-pkv-router-id", router);
    if (!region.empty()) ctx.AddMetadata("x-pkv-shared-memory", region);
    if (ring) ctx.AddMetadata("x-pkv-shared-memory-ring", "1");
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    stream = stub.StepStream(&ctx);
  }
  // Sends `request` and returns its response (status in response.status()); false when the
  // stream ended instead.
  bool Step(const v1::StepRequest& request, v1::StepResponse* response) {
    return stream->Write(request) && stream->Read(response);
  }
  grpc::Status Finish() {
    stream->WritesDone();
    return stream->Finish();
  }
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream;
};

TEST_F(WorkerRobustnessTest, SharedMemoryTensorsAreReadAndWrittenInPlaceAndBadReferencesAreRefusedByName) {
  StartWorker();
  ASSERT_TRUE(WritePrompt("r", 1, 5).ok());
  ASSERT_TRUE(WritePrompt("r", 2, 9).ok());
  TestRegion region(64 << 10);
  RawStream stream(*stub_, "r", region.name());
  const int64_t out_bytes = 2LL * Shape().num_q_heads * Shape().head_dim * 2;

  // Layer 0 through shared memory: the response carries no output bytes; they are in the region.
  const v1::StepRequest in_message = StepRequest(300, 0, {1, 2});
  v1::StepRequest shared = in_message;
  region.Place(shared.mutable_q(), 0);
  region.Place(shared.mutable_k(), 8192);
  region.Place(shared.mutable_v(), 12288);
  shared.mutable_out_shm()->set_offset(32768);
  v1::StepResponse r;
  ASSERT_TRUE(stream.Step(shared, &r));
  ASSERT_EQ(r.status().code(), 0) << r.status().message();
  EXPECT_TRUE(r.out().data().empty());
  ASSERT_TRUE(r.out().has_shm());
  EXPECT_EQ(r.out().shm().offset(), 32768u);
  EXPECT_EQ(r.out().shape(0), 2);
  const std::string written(region.base() + 32768, out_bytes);
  // The worker unlinked the name once it had mapped the object.
  EXPECT_LT(shm_open(region.name().c_str(), O_RDWR, 0), 0);
  EXPECT_EQ(errno, ENOENT);
  // The retry cache holds what the layer computed: the same request in the message replays it.
  v1::StepResponse replay;
  ASSERT_TRUE(Step("r", in_message, &replay).ok());
  EXPECT_TRUE(replay.replayed());
  EXPECT_EQ(replay.out().data(), written);
  EXPECT_NE(written, std::string(out_bytes, '\0'));

  // Bad references: each refused naming its field; the stream goes on and nothing changed.
  const v1::DescribeResponse before = Describe("r");
  struct Case {
    const char* field;
    std::function<void(v1::StepRequest*)> spoil;
  };
  const std::vector<Case> cases = {
      {"q.shm.offset", [&](v1::StepRequest* q) { q->mutable_q()->mutable_shm()->set_offset(region.size() - 100); }},
      {"k.shm.offset", [&](v1::StepRequest* q) { q->mutable_k()->mutable_shm()->set_offset(~uint64_t{0} - 8); }},
      {"v.data", [&](v1::StepRequest* q) { q->mutable_v()->set_data("xx"); }},
      {"out_shm.offset", [&](v1::StepRequest* q) { q->mutable_out_shm()->set_offset(region.size() - 64); }},
  };
  for (const Case& c : cases) {
    v1::StepRequest bad = shared;
    bad.set_token_step_id(301);
    c.spoil(&bad);
    ASSERT_TRUE(stream.Step(bad, &r)) << c.field;
    EXPECT_EQ(r.status().code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_EQ(r.status().message().rfind(c.field, 0), 0u) << c.field << ": " << r.status().message();
  }
  // Unary Step and a stream without a region have no shared memory.
  EXPECT_EQ(Step("r", shared, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    RawStream plain(*stub_, "r", "");
    v1::StepRequest out_only = in_message;
    out_only.set_layer(1);
    out_only.mutable_out_shm()->set_offset(0);
    ASSERT_TRUE(plain.Step(out_only, &r));
    EXPECT_EQ(r.status().code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(r.status().message().find("out_shm: this call has no shared memory"), std::string::npos)
        << r.status().message();
    EXPECT_TRUE(plain.Finish().ok());
  }
  // WriteKV takes no shared memory.
  {
    auto ctx = Context("r");
    v1::WriteKVResponse response;
    auto writer = stub_->WriteKV(ctx.get(), &response);
    v1::WriteKVRequest header;
    header.mutable_header()->set_sequence_id(9);
    header.mutable_header()->set_num_tokens(1);
    writer->Write(header);
    v1::WriteKVRequest chunk;
    chunk.mutable_chunk()->set_num_tokens(1);
    SetTensor(chunk.mutable_chunk()->mutable_k(), {1, Shape().num_kv_heads, Shape().head_dim}, rng_);
    SetTensor(chunk.mutable_chunk()->mutable_v(), {1, Shape().num_kv_heads, Shape().head_dim}, rng_);
    region.Place(chunk.mutable_chunk()->mutable_k(), 0);
    writer->Write(chunk);
    writer->WritesDone();
    const grpc::Status s = writer->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(s.error_message().rfind("chunk.k.shm", 0), 0u) << s.error_message();
  }
  const v1::DescribeResponse after = Describe("r");
  EXPECT_EQ(after.pool().used_tokens(), before.pool().used_tokens());
  EXPECT_EQ(after.pool().free_pages(), before.pool().free_pages());
  EXPECT_EQ(after.pool().num_sequences(), before.pool().num_sequences());

  // The rest of the token step through shared memory.
  for (int32_t layer = 1; layer < Shape().num_layers; ++layer) {
    v1::StepRequest next = StepRequest(300, layer, {1, 2});
    region.Place(next.mutable_q(), 0);
    region.Place(next.mutable_k(), 8192);
    region.Place(next.mutable_v(), 12288);
    next.mutable_out_shm()->set_offset(32768);
    ASSERT_TRUE(stream.Step(next, &r));
    EXPECT_EQ(r.status().code(), 0) << r.status().message();
  }
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(server_->engine().Info().open_token_steps, 0);
}

TEST_F(WorkerRobustnessTest, SharedMemoryThatCannotBeMappedEndsTheStreamAndAShrunkRegionCannotCrashTheWorker) {
  StartWorker();
  ASSERT_TRUE(WritePrompt("r", 1, 5).ok());
  v1::StepResponse r;
  // Names that cannot be mapped: the stream ends before its first answer.
  const std::vector<std::pair<std::string, grpc::StatusCode>> refused = {
      {"/pkv-test-no-such-object", grpc::StatusCode::FAILED_PRECONDITION},
      {"no-slash", grpc::StatusCode::INVALID_ARGUMENT},
  };
  for (const auto& [name, code] : refused) {
    RawStream stream(*stub_, "r", name);
    EXPECT_FALSE(stream.Step(StepRequest(400, 0, {1}), &r)) << name;
    const grpc::Status s = stream.stream->Finish();
    EXPECT_EQ(s.error_code(), code) << name << ": " << s.error_message();
    EXPECT_NE(s.error_message().find("x-pkv-shared-memory"), std::string::npos) << s.error_message();
  }
  {
    TestRegion too_large(2 << 20);  // above the worker's 1 MiB
    RawStream stream(*stub_, "r", too_large.name());
    EXPECT_FALSE(stream.Step(StepRequest(400, 0, {1}), &r));
    EXPECT_EQ(stream.stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(server_->engine().Info().open_token_steps, 0);

  // The router shrinks its object while the stream uses it: the worker survives; that request
  // and every later one of the stream are refused.
  TestRegion region(64 << 10);
  RawStream stream(*stub_, "r", region.name());
  auto place = [&](v1::StepRequest* q) {
    region.Place(q->mutable_q(), 0);
    region.Place(q->mutable_k(), 8192);
    region.Place(q->mutable_v(), 12288);
    q->mutable_out_shm()->set_offset(32768);
  };
  v1::StepRequest layer0 = StepRequest(401, 0, {1});
  place(&layer0);
  ASSERT_TRUE(stream.Step(layer0, &r));
  ASSERT_EQ(r.status().code(), 0) << r.status().message();
  v1::StepRequest layer1 = StepRequest(401, 1, {1});
  place(&layer1);
  region.Shrink();
  ASSERT_TRUE(stream.Step(layer1, &r));
  EXPECT_EQ(r.status().code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(r.status().message().find("shrank"), std::string::npos) << r.status().message();
  ASSERT_TRUE(stream.Step(layer1, &r));
  EXPECT_EQ(r.status().code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(stream.Finish().ok());

  // The worker serves on; the token step is finished in the messages and the pool is exact.
  v1::StepRequest retry = StepRequest(401, 1, {1});
  ASSERT_TRUE(Step("r", retry, &r).ok());
  EXPECT_TRUE(r.replayed());  // layer 1 had run (on zeros) before the refusal
  ASSERT_TRUE(Step("r", StepRequest(401, 2, {1}), &r).ok());
  EXPECT_EQ(Describe("r").pool().used_tokens(), 6);
  v1::ReleaseRequest release;
  release.add_sequence_ids(1);
  v1::ReleaseResponse released;
  auto ctx = Context("r");
  ASSERT_TRUE(stub_->Release(ctx.get(), release, &released).ok());
  EXPECT_EQ(released.free_pages(), Describe().pool().total_pages());
}

// A ring in a test router's region (common/shared_memory_ring.h), written by hand.
class TestRing {
 public:
  static constexpr uint32_t kSlots = 2, kMessageBytes = 8192;
  explicit TestRing(TestRegion& region) : region_(region), h_(reinterpret_cast<RingHeader*>(region.base())) {
    h_->magic = kRingMagic;
    h_->version = kRingVersion;
    h_->slots = kSlots;
    h_->message_bytes = kMessageBytes;
  }
  // Writes `bytes` as request n (the next one) and waits for its response; false when none came
  // within 10 s.
  bool Call(const std::string& bytes, v1::StepResponse* response) {
    char* slot = region_.base() + kRingHeaderBytes + (n_ % kSlots) * kMessageBytes;
    const uint32_t size = static_cast<uint32_t>(bytes.size());
    std::memcpy(slot, &size, 4);
    std::memcpy(slot + sizeof(RingMessage), bytes.data(), std::min<size_t>(bytes.size(), kMessageBytes - 8));
    ++n_;
    RingPublish(&h_->request_seq, &h_->worker_waiting, n_);
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (h_->response_seq.load() != n_) {
      if (absl::Now() > deadline) return false;
      std::this_thread::yield();
    }
    uint32_t got = 0;
    std::memcpy(&got, slot + 4, 4);
    return response->ParseFromArray(slot + kMessageBytes / 2, static_cast<int>(got));
  }
  bool closed() const { return h_->closed.load() != 0; }

 private:
  TestRegion& region_;
  RingHeader* h_;
  uint32_t n_ = 0;
};

TEST_F(WorkerRobustnessTest, SharedMemoryRingAnswersEveryRequestByNameAndEndsWithItsStream) {
  StartWorker();
  ASSERT_TRUE(WritePrompt("r", 1, 5).ok());
  v1::StepResponse r;
  // A region that does not start with a ring header, and a ring without shared memory: refused.
  {
    TestRegion blank(64 << 10);
    RawStream stream(*stub_, "r", blank.name(), /*ring=*/true);
    EXPECT_FALSE(stream.Step(StepRequest(1, 0, {1}), &r));
    const grpc::Status s = stream.stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("x-pkv-shared-memory-ring"), std::string::npos) << s.error_message();
  }
  {
    RawStream stream(*stub_, "r", "", /*ring=*/true);
    EXPECT_FALSE(stream.Step(StepRequest(1, 0, {1}), &r));
    EXPECT_EQ(stream.stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  TestRegion region(64 << 10);
  TestRing ring(region);
  RawStream stream(*stub_, "r", region.name(), /*ring=*/true);
  const uint64_t tensors = kRingHeaderBytes + TestRing::kSlots * TestRing::kMessageBytes;
  auto place = [&](v1::StepRequest* q) {
    region.Place(q->mutable_q(), tensors);
    region.Place(q->mutable_k(), tensors + 4096);
    region.Place(q->mutable_v(), tensors + 8192);
    q->mutable_out_shm()->set_offset(tensors + 12288);
  };
  // Bad requests through the ring: each answered with its status, nothing runs.
  ASSERT_TRUE(ring.Call(kGarbage, &r));
  EXPECT_EQ(r.status().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status().message().rfind("request: cannot parse", 0), 0u) << r.status().message();
  v1::StepRequest no_out = StepRequest(500, 0, {1});
  place(&no_out);
  no_out.clear_out_shm();
  ASSERT_TRUE(ring.Call(no_out.SerializeAsString(), &r));
  EXPECT_EQ(r.status().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status().message().rfind("out_shm", 0), 0u) << r.status().message();
  v1::StepRequest out_of_range = StepRequest(500, 0, {1});
  place(&out_of_range);
  out_of_range.mutable_q()->mutable_shm()->set_offset(region.size());
  ASSERT_TRUE(ring.Call(out_of_range.SerializeAsString(), &r));
  EXPECT_EQ(r.status().message().rfind("q.shm.offset", 0), 0u) << r.status().message();
  EXPECT_EQ(Describe("r").pool().used_tokens(), 5);
  EXPECT_EQ(server_->engine().Info().open_token_steps, 0);

  // A whole token step through the ring; its layer 0 replayed in a message matches.
  for (int32_t layer = 0; layer < Shape().num_layers; ++layer) {
    v1::StepRequest q = StepRequest(500, layer, {1});
    place(&q);
    ASSERT_TRUE(ring.Call(q.SerializeAsString(), &r)) << layer;
    ASSERT_EQ(r.status().code(), 0) << r.status().message();
    EXPECT_EQ(r.token_step_id(), 500u);
    EXPECT_EQ(r.layer(), layer);
    EXPECT_GT(r.server_seconds(), 0);
    EXPECT_TRUE(r.out().has_shm());
    if (layer == Shape().num_layers - 1) {
      const std::string out(region.base() + tensors + 12288, 2 * Shape().num_q_heads * Shape().head_dim);
      v1::StepResponse replay;
      ASSERT_TRUE(Step("r", StepRequest(500, layer, {1}), &replay).ok());
      EXPECT_TRUE(replay.replayed());
      EXPECT_EQ(replay.out().data(), out);
    }
  }
  EXPECT_EQ(Describe("r").pool().used_tokens(), 6);
  // A message on the ring's stream ends it; the worker closes the ring.
  EXPECT_FALSE(stream.Step(StepRequest(501, 0, {1}), &r));
  const grpc::Status s = stream.stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_TRUE(ring.closed());
  EXPECT_EQ(server_->engine().Info().open_token_steps, 0);

  // The router shrinks its ring's region: the worker survives and the stream ends with why.
  TestRegion doomed(64 << 10);
  TestRing doomed_ring(doomed);
  RawStream doomed_stream(*stub_, "r", doomed.name(), /*ring=*/true);
  v1::StepRequest q = StepRequest(502, 0, {1});
  region.Place(q.mutable_q(), tensors);  // any bytes: the region is gone before they are read
  q.mutable_out_shm()->set_offset(tensors);
  ASSERT_TRUE(doomed_ring.Call(q.SerializeAsString(), &r));  // an answer (out_shm then is fine)
  doomed.Shrink();
  absl::SleepFor(absl::Milliseconds(200));  // the ring's thread touches the region within its 50 ms futex slice
  EXPECT_FALSE(doomed_stream.Step(StepRequest(503, 0, {1}), &r));
  const grpc::Status ended = doomed_stream.stream->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << ended.error_message();
  EXPECT_NE(ended.error_message().find("shrank"), std::string::npos) << ended.error_message();
  EXPECT_TRUE(Describe("r").serving());
}

TEST_F(WorkerRobustnessTest, SharedMemoryOffIsAClearRefusal) {
  StartWorker(30, 60, /*shared_memory_max_bytes=*/0);
  EXPECT_EQ(Describe().limits().shared_memory_max_bytes(), 0);
  TestRegion region(4096);
  RawStream stream(*stub_, "r", region.name());
  v1::StepResponse r;
  EXPECT_FALSE(stream.Step(StepRequest(1, 0, {1}), &r));
  const grpc::Status s = stream.stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("shared memory is off"), std::string::npos) << s.error_message();
}

}  // namespace
}  // namespace pkv
