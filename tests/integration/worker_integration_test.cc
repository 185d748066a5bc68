// Integration tests: the real gRPC server (service::WorkerServer, as pkv-worker builds it) on
// 127.0.0.1:0 with a small CPU model and scattered pages, driven through the client library.
// Outputs are checked against the client's independent double-precision reference.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/kv_data.h"
#include "client/payload_pool.h"
#include "client/replay.h"
#include "client/worker_client.h"
#include "common/metrics.h"
#include "common/workload.h"
#include "engine/engine_factory.h"
#include "engine/step_observer.h"
#include "gtest/gtest.h"
#include "tests/support/small_model.h"
#include "service/worker_server.h"

namespace pkv {
namespace {

using client::DataKind;
using client::StepArgs;
using client::StepResult;

constexpr uint64_t kDataSeed = 20260622;

ModelShape TestShape() { return testing_support::SmallTestShape(); }

// Expected history of one sequence: K and V per layer as doubles, [len, Hkv, d].
struct History {
  int64_t len = 0;
  std::vector<std::vector<double>> k, v;  // [layer]
};

// TCP connections in state ESTABLISHED whose remote end is `port` (this process is the client of
// every connection to the worker's port in these tests), from /proc/net/tcp and tcp6 (gRPC opens
// IPv6 sockets with v4-mapped addresses); -1 if neither is readable.
int EstablishedConnectionsTo(int port) {
  int n = 0;
  bool readable = false;
  for (const char* path : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream f(path);
    if (!f) continue;
    readable = true;
    std::string line;
    std::getline(f, line);  // header
    while (std::getline(f, line)) {
      // "sl local_address rem_address st ...": addresses are HEXIP:HEXPORT, st 01 = ESTABLISHED.
      std::istringstream fields(line);
      std::string sl, local, remote, state;
      fields >> sl >> local >> remote >> state;
      const size_t colon = remote.find(':');
      if (colon == std::string::npos || state != "01") continue;
      if (std::stoi(remote.substr(colon + 1), nullptr, 16) == port) ++n;
    }
  }
  return readable ? n : -1;
}

// Polls EstablishedConnectionsTo(port) until it is `want` (connections close asynchronously);
// returns the last count.
int WaitForConnections(int port, int want, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  int n = EstablishedConnectionsTo(port);
  while (n != want && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    n = EstablishedConnectionsTo(port);
  }
  return n;
}

// Occupies an executor's only thread (and, with fill_queue, its one queue slot) until Release.
class ExecutorBlocker {
 public:
  explicit ExecutorBlocker(service::BoundedExecutor& executor) : executor_(executor) {}
  ~ExecutorBlocker() { Release(); }
  // Returns false when the executor refused the tasks.
  bool Block(bool fill_queue) {
    const bool submitted = executor_.TrySubmit([this] {
      std::unique_lock<std::mutex> lock(mu_);
      started_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return released_; });
    });
    if (!submitted) return false;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return started_; });
    lock.unlock();
    return !fill_queue || executor_.TrySubmit([] {});
  }
  // Lets the blocked task finish and waits until the executor is idle.
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (released_) return;
      released_ = true;
      cv_.notify_all();
    }
    while (executor_.queued() > 0 || executor_.running() > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

 private:
  service::BoundedExecutor& executor_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false, released_ = false;
};

// Holds the engine lock: an observer called under it that blocks its first layer-step until
// Release (a stand-in for an engine call that never returns).
class LayerStepBlocker final : public engine::StepObserver {
 public:
  void OnLayerStep(const engine::LayerStepEvent&) override {
    std::unique_lock<std::mutex> lock(mu_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return released_; });
  }
  void WaitEntered() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return entered_; });
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, released_ = false;
};

// Sample count and sum of a histogram.
std::pair<uint64_t, double> HistogramOf(prometheus::Histogram& h) {
  const prometheus::ClientMetric m = h.Collect();
  return {m.histogram.sample_count, m.histogram.sample_sum};
}

class WorkerIntegrationTest : public ::testing::Test {
 protected:
  void StartWorker(int64_t num_pages, int executor_threads = 2, int executor_queue = 64,
                   int ingest_threads = 2, int ingest_queue = 64, const std::string& attention = "run") {
    engine::EngineConfig config;
    config.attention = attention;
    config.shape = TestShape();
    config.num_pages = num_pages;
    config.backend = "cpu";
    config.cpu_threads = 1;
    config.max_batch = 16;
    config.scatter_seed = 0xC0FFEE;
    auto engine = engine::BuildEngine(config);
    ASSERT_TRUE(engine.ok()) << engine.status();
    service::ServerOptions options;
    options.listen_address = listen_address_;
    options.max_message_bytes = 8 << 20;
    options.executor_threads = executor_threads;
    options.executor_queue = executor_queue;
    options.ingest_threads = ingest_threads;
    options.ingest_queue = ingest_queue;
    options.metrics = &metrics_;
    options.channel_args = server_channel_args_;
    if (liveness_stall_seconds_ > 0) {
      options.liveness_stall_seconds = liveness_stall_seconds_;
      options.heartbeat_period_seconds = 0.02;
    }
    auto server = service::WorkerServer::Start(options, *std::move(engine));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_GT(server_->port(), 0);
    client::ClientOptions copts;
    copts.target = server_->address();
    copts.rpc_timeout = absl::Seconds(30);
    auto c = client::WorkerClient::Connect(copts);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    gen_ = std::make_unique<client::KvDataGen>(TestShape(), kDataSeed);
  }

  void TearDown() override {
    client_.reset();
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(2));
  }

  client::WorkerInfo Describe() {
    auto info = client_->Describe();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : client::WorkerInfo{};
  }

  // Polls until the pool is all free and no prompt is being written (cleanups are async).
  bool WaitAllFree(absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      const client::WorkerInfo info = Describe();
      if (info.free_pages == info.total_pages && info.num_sequences == 0 &&
          info.writing_sequences == 0) {
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  void Track(uint64_t seq, int64_t len) {
    History& h = expected_[seq];
    h.len = len;
    h.k.clear();
    h.v.clear();
    for (int32_t l = 0; l < TestShape().num_layers; ++l) {
      h.k.push_back(gen_->History(DataKind::kK, seq, l, len));
      h.v.push_back(gen_->History(DataKind::kV, seq, l, len));
    }
  }

  // Writes a prompt with chunks of `chunk` tokens, layers in the given order, and (when
  // `rewrite`) the first chunk of each layer twice.
  absl::Status WritePrompt(uint64_t seq, int64_t len, int64_t chunk, std::vector<int32_t> layers,
                           bool rewrite = false) {
    auto writer = client_->BeginWriteKV(seq, len);
    if (!writer.ok()) return writer.status();
    for (int32_t layer : layers) {
      for (int64_t off = 0; off < len; off += chunk) {
        const int64_t n = std::min(chunk, len - off);
        std::string k, v;
        gen_->AppendKv(seq, layer, off, n, &k, &v);
        absl::Status s = (*writer)->WriteChunk(layer, off, n, k, v);
        if (!s.ok()) return s;
        if (rewrite && off == 0) {
          s = (*writer)->WriteChunk(layer, off, n, k, v);
          if (!s.ok()) return s;
        }
      }
    }
    absl::Status s = (*writer)->Finish();
    if (s.ok()) Track(seq, len);
    return s;
  }

  // The request of one layer for `rows`, whose new token sits at each row's current length.
  StepArgs MakeStep(uint64_t id, int32_t layer, const std::vector<uint64_t>& rows) {
    StepArgs a;
    a.token_step_id = id;
    a.layer = layer;
    a.rows = rows;
    a.want_lse = true;
    for (uint64_t seq : rows) {
      const int64_t pos = expected_[seq].len;
      gen_->AppendQ(seq, layer, pos, &a.q);
      gen_->AppendKv(seq, layer, pos, 1, &a.k, &a.v);
    }
    return a;
  }

  // Checks every row of a layer's result against the double reference (history + new token).
  void CheckOutputs(const StepArgs& a, const StepResult& r, double* max_err) {
    const ModelShape s = TestShape();
    const size_t row_bytes = static_cast<size_t>(s.num_q_heads) * s.head_dim * 2;
    ASSERT_EQ(r.out.size(), row_bytes * a.rows.size());
    ASSERT_EQ(r.lse.size(), a.rows.size() * s.num_q_heads);
    for (size_t i = 0; i < a.rows.size(); ++i) {
      const History& h = expected_[a.rows[i]];
      const int64_t pos = h.len;
      std::vector<double> k = h.k[a.layer], v = h.v[a.layer];
      for (int32_t kh = 0; kh < s.num_kv_heads; ++kh) {
        for (int32_t d = 0; d < s.head_dim; ++d) {
          k.push_back(gen_->Value(DataKind::kK, a.rows[i], a.layer, pos, kh, d));
          v.push_back(gen_->Value(DataKind::kV, a.rows[i], a.layer, pos, kh, d));
        }
      }
      std::vector<double> out, lse;
      client::ReferenceDecode(s, gen_->Query(a.rows[i], a.layer, pos), k, v, pos + 1, &out, &lse);
      const double err = client::MaxRelativeError(s, r.out.data() + i * row_bytes, out);
      *max_err = std::max(*max_err, err);
      EXPECT_LE(err, client::Tolerance(s))
          << "row " << i << " (seq " << a.rows[i] << ") layer " << a.layer << " len " << pos + 1;
      for (int32_t hq = 0; hq < s.num_q_heads; ++hq) {
        EXPECT_NEAR(r.lse[i * s.num_q_heads + hq], lse[hq], 1e-3 * std::max(1.0, std::abs(lse[hq])));
      }
    }
  }

  // After every layer of a token step ran: each row's history gains its new token.
  void Advance(const std::vector<uint64_t>& rows) {
    const ModelShape s = TestShape();
    for (uint64_t seq : rows) {
      History& h = expected_[seq];
      for (int32_t l = 0; l < s.num_layers; ++l) {
        for (int32_t kh = 0; kh < s.num_kv_heads; ++kh) {
          for (int32_t d = 0; d < s.head_dim; ++d) {
            h.k[l].push_back(gen_->Value(DataKind::kK, seq, l, h.len, kh, d));
            h.v[l].push_back(gen_->Value(DataKind::kV, seq, l, h.len, kh, d));
          }
        }
      }
      ++h.len;
    }
  }

  // Polls grpc.health.v1 `service` until it reports `serving` (true when it did in time).
  bool WaitHealth(const std::string& service, bool serving, absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      auto healthy = client_->CheckHealth(service);
      if (healthy.ok() && *healthy == serving) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  // Declared before server_: the server reports into it until it is destroyed.
  WorkerMetrics metrics_{BuildInfo{"test", "test", "cpu", "none", "fp16", "default"}};
  double liveness_stall_seconds_ = 0;  // > 0: StartWorker sets it, with a 20 ms heartbeat
  std::vector<ChannelArg> server_channel_args_;  // ServerOptions::channel_args of StartWorker
  std::string listen_address_ = "127.0.0.1:0";     // ServerOptions::listen_address of StartWorker
  std::unique_ptr<service::WorkerServer> server_;
  std::unique_ptr<client::WorkerClient> client_;
  std::unique_ptr<client::KvDataGen> gen_;
  std::map<uint64_t, History> expected_;
};

TEST_F(WorkerIntegrationTest, WriteKvThenHundredTokenStepsMatchTheReference) {
  StartWorker(/*num_pages=*/96);
  const client::WorkerInfo info0 = Describe();
  EXPECT_EQ(info0.shape.num_layers, 3);
  EXPECT_EQ(info0.total_pages, 96);
  EXPECT_EQ(info0.free_pages, 96);
  EXPECT_TRUE(info0.serving);
  auto healthy = client_->CheckHealth();
  ASSERT_TRUE(healthy.ok()) << healthy.status();
  EXPECT_TRUE(*healthy);
  auto service_healthy = client_->CheckHealth("pkv.v1.PersistentKV");
  ASSERT_TRUE(service_healthy.ok()) << service_healthy.status();
  EXPECT_TRUE(*service_healthy);

  // Prompts across page boundaries, in odd chunkings and layer orders.
  ASSERT_TRUE(WritePrompt(101, 1, 1, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(102, 15, 7, {2, 1, 0}).ok());
  ASSERT_TRUE(WritePrompt(103, 16, 16, {1, 0, 2}).ok());
  ASSERT_TRUE(WritePrompt(104, 17, 5, {0, 2, 1}, /*rewrite=*/true).ok());
  ASSERT_TRUE(WritePrompt(105, 45, 13, {2, 0, 1}).ok());
  EXPECT_EQ(Describe().used_tokens, 1 + 15 + 16 + 17 + 45);

  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  std::vector<uint64_t> rows = {101, 102, 103, 104, 105};
  const uint64_t base_id = 5000;
  double max_err = 0;
  for (int step = 0; step < 100; ++step) {
    const uint64_t id = base_id + step;
    std::vector<uint64_t> open, free;
    if (step == 40) {  // an `open` delta: a new empty sequence joins as a row
      open.push_back(106);
      expected_[106] = History{};
      Track(106, 0);
      rows.push_back(106);
    }
    if (step == 70) {  // a `free` delta: sequence 101 leaves
      free.push_back(101);
      rows.erase(rows.begin());
    }
    for (int32_t layer = 0; layer < 3; ++layer) {
      StepArgs a = MakeStep(id, layer, rows);
      if (layer == 0) {
        a.open = open;
        a.free = free;
      }
      // Mostly the stream; every 10th token step over unary Step.
      absl::StatusOr<StepResult> r = step % 10 == 9 ? client_->Step(a) : (*stream)->Step(a);
      ASSERT_TRUE(r.ok()) << "step " << step << " layer " << layer << ": " << r.status();
      EXPECT_EQ(r->token_step_id, id);
      EXPECT_EQ(r->layer, layer);
      EXPECT_FALSE(r->replayed);
      CheckOutputs(a, *r, &max_err);
      if (::testing::Test::HasFailure()) return;
    }
    Advance(rows);
  }
  ASSERT_TRUE((*stream)->Finish().ok());
  RecordProperty("max_rel_error", std::to_string(max_err));
  const client::WorkerInfo info = Describe();
  int64_t want_tokens = 0;
  for (uint64_t seq : rows) want_tokens += expected_[seq].len;
  EXPECT_EQ(info.used_tokens, want_tokens);
  EXPECT_EQ(info.num_sequences, static_cast<int64_t>(rows.size()));
  EXPECT_TRUE(server_->engine().CheckConsistency().ok());

  auto free_after = client_->Release(rows);
  ASSERT_TRUE(free_after.ok()) << free_after.status();
  EXPECT_EQ(*free_after, 96);
  const client::WorkerInfo end = Describe();
  EXPECT_EQ(end.free_pages, end.total_pages);
  EXPECT_EQ(end.num_sequences, 0);
}

TEST_F(WorkerIntegrationTest, MalformedRequestMidStreamGetsItsStatusAndTheStreamContinues) {
  StartWorker(32);
  ASSERT_TRUE(WritePrompt(7, 20, 8, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(8, 33, 33, {0, 1, 2}).ok());
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  const std::vector<uint64_t> rows = {7, 8};
  double max_err = 0;

  StepArgs a0 = MakeStep(900, 0, rows);
  auto r0 = (*stream)->Step(a0);
  ASSERT_TRUE(r0.ok()) << r0.status();
  CheckOutputs(a0, *r0, &max_err);
  const uint64_t fingerprint = server_->engine().StateFingerprint();

  StepArgs bad = MakeStep(900, 1, rows);
  bad.q.resize(bad.q.size() - 64);  // truncated q
  auto rb = (*stream)->Step(bad);
  EXPECT_EQ(rb.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rb.status().message().find("q: "), std::string::npos) << rb.status();

  StepArgs unknown = MakeStep(900, 1, rows);
  unknown.rows = {7, 99};  // not the rows of layer 0 (and 99 does not exist)
  auto ru = (*stream)->Step(unknown);
  EXPECT_FALSE(ru.ok());
  EXPECT_NE(ru.status().message().find("rows"), std::string::npos) << ru.status();
  EXPECT_EQ(server_->engine().StateFingerprint(), fingerprint) << "a rejected request changed state";

  for (int32_t layer = 1; layer < 3; ++layer) {
    StepArgs a = MakeStep(900, layer, rows);
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << "the stream must continue after a bad message: " << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  EXPECT_TRUE((*stream)->Finish().ok());
  ASSERT_TRUE(client_->Release(rows).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, ChannelArgumentsReachTheServerAndMessageSizesAreRefused) {
  // The worker's --grpc_arg: at most one concurrent stream per connection. While a StepStream is
  // open on the client's connection, a unary Describe over the same connection cannot start.
  server_channel_args_ = {ChannelArg{.name = "grpc.max_concurrent_streams", .is_int = true, .int_value = 1}};
  StartWorker(32);
  client::ClientOptions copts;
  copts.target = server_->address();
  copts.rpc_timeout = absl::Milliseconds(500);
  copts.ingest_connections = 0;
  auto probe = client::WorkerClient::Connect(copts);
  ASSERT_TRUE(probe.ok()) << probe.status();
  {
    auto stream = (*probe)->OpenStepStream();
    ASSERT_TRUE(stream.ok()) << stream.status();
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    absl::Status described;
    do {  // the stream's HEADERS reach the worker first; then Describe waits for a stream slot
      described = (*probe)->Describe().status();
    } while (described.ok() && absl::Now() < deadline);
    EXPECT_EQ(described.code(), absl::StatusCode::kDeadlineExceeded) << described;
    (*stream)->Cancel();
  }
  EXPECT_TRUE((*probe)->Describe().ok()) << "the slot is free again once the stream ended";
  server_->Shutdown(absl::Seconds(1));

  // Message size limits are max_message_bytes only: a channel argument for them is refused,
  // naming it, by the server and by the client (gRPC would silently keep its own value).
  engine::EngineConfig config;
  config.shape = TestShape();
  config.num_pages = 8;
  config.backend = "cpu";
  auto engine = engine::BuildEngine(config);
  ASSERT_TRUE(engine.ok()) << engine.status();
  service::ServerOptions sopts;
  sopts.listen_address = "127.0.0.1:0";
  sopts.channel_args = {ChannelArg{.name = "grpc.max_receive_message_length", .is_int = true, .int_value = 4096}};
  auto refused = service::WorkerServer::Start(sopts, *std::move(engine));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("grpc.max_receive_message_length"), std::string::npos) << refused.status();
  copts.channel_args = {ChannelArg{.name = "grpc.max_send_message_length", .is_int = true, .int_value = 8}};
  auto small = client::WorkerClient::Connect(copts);
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("grpc.max_send_message_length"), std::string::npos) << small.status();
}

TEST_F(WorkerIntegrationTest, CancelledOrIncompleteWriteKvLeavesNothingBehind) {
  StartWorker(32);
  {
    auto writer = client_->BeginWriteKV(55, 100);
    ASSERT_TRUE(writer.ok()) << writer.status();
    std::string k, v;
    gen_->AppendKv(55, 0, 0, 40, &k, &v);
    ASSERT_TRUE((*writer)->WriteChunk(0, 0, 40, k, v).ok());
    // Wait until the worker holds the prompt's pages, then cut the stream.
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (Describe().writing_sequences != 1 && absl::Now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_EQ(Describe().free_pages, 32 - 7);
    (*writer)->Cancel();
    EXPECT_FALSE((*writer)->Finish().ok());
  }
  EXPECT_TRUE(WaitAllFree()) << "a cancelled WriteKV must release its pages";

  // A stream that ends with tokens missing is refused and leaves nothing either.
  {
    auto writer = client_->BeginWriteKV(56, 20);
    ASSERT_TRUE(writer.ok());
    std::string k, v;
    gen_->AppendKv(56, 0, 0, 20, &k, &v);
    ASSERT_TRUE((*writer)->WriteChunk(0, 0, 20, k, v).ok());
    const absl::Status s = (*writer)->Finish();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  }
  EXPECT_TRUE(WaitAllFree());
  // A malformed chunk ends the stream with INVALID_ARGUMENT naming the field.
  {
    auto writer = client_->BeginWriteKV(57, 20);
    ASSERT_TRUE(writer.ok());
    std::string k(10, '\0'), v(10, '\0');
    (*writer)->WriteChunk(0, 0, 4, k, v).IgnoreError();
    const absl::Status s = (*writer)->Finish();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("k: "), std::string::npos) << s;
  }
  EXPECT_TRUE(WaitAllFree());
  // The ids are free for reuse.
  ASSERT_TRUE(WritePrompt(55, 100, 64, {0, 1, 2}).ok());
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{55}).ok());
  EXPECT_TRUE(WaitAllFree());
}

// Chunks sent while the only ingest thread is busy wait in gRPC's buffers and then land in order
// (decode matches the reference), and a bad chunk among them ends the stream with its status and
// leaves nothing behind, whatever came after it.
TEST_F(WorkerIntegrationTest, WriteKvChunksSentWhileTheIngestThreadIsBusyLandInOrder) {
  StartWorker(32, /*executor_threads=*/2, /*executor_queue=*/64, /*ingest_threads=*/1, /*ingest_queue=*/8);
  {
    ExecutorBlocker blocker(server_->ingest_executor_for_testing());
    ASSERT_TRUE(blocker.Block(/*fill_queue=*/false));
    absl::Status written = absl::UnknownError("not run");
    std::thread writing([&] { written = WritePrompt(61, 48, 8, {0, 1, 2}); });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // messages arrive and wait
    blocker.Release();
    writing.join();
    ASSERT_TRUE(written.ok()) << written;
  }
  double max_err = 0;
  for (int32_t layer = 0; layer < 3; ++layer) {
    StepArgs a = MakeStep(90, layer, {61});
    auto r = client_->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  const int64_t free_with_61 = Describe().free_pages;
  {
    ExecutorBlocker blocker(server_->ingest_executor_for_testing());
    ASSERT_TRUE(blocker.Block(/*fill_queue=*/false));
    auto writer = client_->BeginWriteKV(62, 48);
    ASSERT_TRUE(writer.ok()) << writer.status();
    std::thread writing([&] {
      for (int64_t off = 0; off < 48; off += 8) {
        std::string k, v;
        gen_->AppendKv(62, 0, off, 8, &k, &v);
        if (off == 24) k.resize(10);  // malformed: K of 8 tokens must be 8 rows
        if (!(*writer)->WriteChunk(0, off, 8, k, v).ok()) return;  // the worker ended the stream
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    blocker.Release();
    writing.join();
    const absl::Status s = (*writer)->Finish();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("k: "), std::string::npos) << s;
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (Describe().num_sequences != 1 && absl::Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(Describe().num_sequences, 1);
  EXPECT_EQ(Describe().free_pages, free_with_61);
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{61}).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, CancelledStepStreamLeavesAResumableTokenStep) {
  StartWorker(32);
  ASSERT_TRUE(WritePrompt(1, 30, 30, {0, 1, 2}).ok());
  const std::vector<uint64_t> rows = {1};
  double max_err = 0;
  {
    auto idle = client_->OpenStepStream();  // cancelled before any message
    ASSERT_TRUE(idle.ok());
    (*idle)->Cancel();
    EXPECT_FALSE((*idle)->Finish().ok());
  }
  {
    auto stream = client_->OpenStepStream();
    ASSERT_TRUE(stream.ok());
    auto r = (*stream)->Step(MakeStep(77, 0, rows));
    ASSERT_TRUE(r.ok()) << r.status();
    (*stream)->Cancel();  // mid token step
    EXPECT_FALSE((*stream)->Step(MakeStep(77, 1, rows)).ok());
  }
  EXPECT_TRUE(server_->engine().CheckConsistency().ok());
  EXPECT_EQ(Describe().open_token_steps, 1);
  // Another stream resumes the token step where it stopped.
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  for (int32_t layer = 1; layer < 3; ++layer) {
    StepArgs a = MakeStep(77, layer, rows);
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  EXPECT_EQ(Describe().open_token_steps, 0);
  EXPECT_EQ(Describe().used_tokens, 31);
  EXPECT_TRUE((*stream)->Finish().ok());
  ASSERT_TRUE(client_->Release(rows).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, ShutdownEndsOpenStepStreamsIdleMidTokenStepAndQueued) {
  StartWorker(32, /*executor_threads=*/1);
  ASSERT_TRUE(WritePrompt(1, 30, 30, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(2, 20, 20, {0, 1, 2}).ok());
  auto idle = client_->OpenStepStream();  // never sends
  ASSERT_TRUE(idle.ok());
  auto mid = client_->OpenStepStream();
  ASSERT_TRUE(mid.ok());
  ASSERT_TRUE((*mid)->Step(MakeStep(77, 0, {1})).ok());  // a token step left open
  auto queued = client_->OpenStepStream();
  ASSERT_TRUE(queued.ok());
  // The only decode thread is busy: the next message waits in the executor's queue.
  ExecutorBlocker blocker(server_->executor_for_testing());
  ASSERT_TRUE(blocker.Block(/*fill_queue=*/false));
  ASSERT_TRUE((*queued)->Send(MakeStep(78, 0, {2})).ok());
  for (int i = 0; i < 5000 && server_->executor_for_testing().queued() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server_->executor_for_testing().queued(), 1);
  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    server_->Shutdown(absl::ZeroDuration());
    stopped.store(true);
  });
  // Shutdown waits for the executor's last task, which needs the blocker gone.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(stopped.load());
  blocker.Release();
  stopper.join();
  // Every stream ended; the queued message either ran or was refused, never lost in between.
  EXPECT_FALSE((*idle)->Step(MakeStep(79, 0, {2})).ok());
  EXPECT_FALSE((*mid)->Step(MakeStep(77, 1, {1})).ok());
  auto answer = (*queued)->Receive();
  if (answer.ok()) {
    EXPECT_EQ(answer->token_step_id, 78u);
  }
  EXPECT_FALSE((*queued)->Step(MakeStep(78, 1, {2})).ok());
  EXPECT_TRUE(server_->engine().CheckConsistency().ok());
  const engine::EngineInfo info = server_->engine().Info();
  EXPECT_EQ(info.pager.num_sequences, 2);
}

TEST_F(WorkerIntegrationTest, RetriedStepIdReturnsTheSameOutputsWithoutAppending) {
  StartWorker(32);
  ASSERT_TRUE(WritePrompt(11, 16, 16, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(12, 40, 16, {0, 1, 2}).ok());
  const std::vector<uint64_t> rows = {11, 12};
  std::vector<StepResult> first;
  std::vector<StepArgs> args;
  for (int32_t layer = 0; layer < 3; ++layer) {
    args.push_back(MakeStep(300, layer, rows));
    auto r = client_->Step(args.back());
    ASSERT_TRUE(r.ok()) << r.status();
    first.push_back(*r);
  }
  const client::WorkerInfo after_first = Describe();
  EXPECT_EQ(after_first.used_tokens, 16 + 40 + 2);
  // Retry every layer (layer 0 again too) on a stream and over unary.
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  for (int32_t layer : {1, 0, 2}) {
    auto r = layer == 1 ? client_->Step(args[layer]) : (*stream)->Step(args[layer]);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->replayed);
    EXPECT_EQ(r->out, first[layer].out) << "layer " << layer;
    EXPECT_EQ(r->lse, first[layer].lse);
  }
  const client::WorkerInfo after_retry = Describe();
  EXPECT_EQ(after_retry.used_tokens, after_first.used_tokens) << "a retry must not append";
  EXPECT_EQ(after_retry.free_pages, after_first.free_pages);
  // The next token step appends exactly one token per row and is still exact.
  Advance(rows);
  double max_err = 0;
  for (int32_t layer = 0; layer < 3; ++layer) {
    StepArgs a = MakeStep(301, layer, rows);
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  EXPECT_EQ(Describe().used_tokens, 16 + 40 + 4);
  EXPECT_TRUE((*stream)->Finish().ok());
  ASSERT_TRUE(client_->Release(rows).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, FullPoolIsResourceExhaustedNamingFreePages) {
  StartWorker(8);
  const uint64_t fingerprint = server_->engine().StateFingerprint();
  absl::Status s = WritePrompt(1, 9 * 16, 64, {0, 1, 2});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("8 free"), std::string::npos) << s;
  EXPECT_TRUE(WaitAllFree());
  EXPECT_EQ(server_->engine().StateFingerprint(), fingerprint);
  // Fill the pool exactly; the next token then needs a page that is not there.
  ASSERT_TRUE(WritePrompt(2, 8 * 16, 128, {0, 1, 2}).ok());
  EXPECT_EQ(Describe().free_pages, 0);
  const uint64_t full = server_->engine().StateFingerprint();
  auto r = client_->Step(MakeStep(10, 0, {2}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(r.status().message().find("0 free"), std::string::npos) << r.status();
  EXPECT_EQ(server_->engine().StateFingerprint(), full);
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{2}).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, FullWorkQueueIsResourceExhaustedAndAStreamSurvivesIt) {
  StartWorker(16, /*executor_threads=*/1, /*executor_queue=*/1);
  ASSERT_TRUE(WritePrompt(5, 10, 10, {0, 1, 2}).ok());
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  // Occupy the only executor thread and its one queue slot.
  ExecutorBlocker blocker(server_->executor_for_testing());
  ASSERT_TRUE(blocker.Block(/*fill_queue=*/true));
  auto unary = client_->Step(MakeStep(40, 0, {5}));
  EXPECT_EQ(unary.status().code(), absl::StatusCode::kResourceExhausted) << unary.status();
  EXPECT_NE(unary.status().message().find("work queue"), std::string::npos) << unary.status();
  auto streamed = (*stream)->Step(MakeStep(40, 0, {5}));
  EXPECT_EQ(streamed.status().code(), absl::StatusCode::kResourceExhausted) << streamed.status();
  EXPECT_EQ(metrics_.queue_rejections(WorkerMetrics::Queue::kDecode).Value(), 2);
  EXPECT_EQ(metrics_.queue_rejections(WorkerMetrics::Queue::kIngest).Value(), 0);
  // Prefill ingest runs on its own executor: a full step queue does not hold WriteKV up.
  EXPECT_TRUE(WritePrompt(6, 4, 4, {0, 1, 2}).ok());
  blocker.Release();
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{6}).ok());
  // Nothing ran, so the same token step now goes through on the same stream.
  EXPECT_EQ(Describe().used_tokens, 10);
  double max_err = 0;
  for (int32_t layer = 0; layer < 3; ++layer) {
    StepArgs a = MakeStep(40, layer, {5});
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(r->replayed);
    CheckOutputs(a, *r, &max_err);
  }
  EXPECT_TRUE((*stream)->Finish().ok());
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{5}).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, FullIngestQueueRefusesWriteKvButDecodeStepsGoOn) {
  StartWorker(16, /*executor_threads=*/1, /*executor_queue=*/1, /*ingest_threads=*/1, /*ingest_queue=*/1);
  ASSERT_TRUE(WritePrompt(5, 10, 10, {0, 1, 2}).ok());
  // Occupy the only ingest thread and its one queue slot.
  ExecutorBlocker blocker(server_->ingest_executor_for_testing());
  ASSERT_TRUE(blocker.Block(/*fill_queue=*/true));
  const absl::Status refused = WritePrompt(6, 4, 4, {0, 1, 2});
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_EQ(metrics_.queue_rejections(WorkerMetrics::Queue::kIngest).Value(), 1);
  EXPECT_EQ(metrics_.queue_rejections(WorkerMetrics::Queue::kDecode).Value(), 0);
  // Decode is not behind the ingest queue: a whole token step of sequence 5 runs and checks out.
  double max_err = 0;
  for (int32_t layer = 0; layer < 3; ++layer) {
    StepArgs a = MakeStep(41, layer, {5});
    auto r = client_->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  blocker.Release();
  // Once the queue has room, WriteKV is accepted again; the refused one left nothing behind.
  EXPECT_EQ(Describe().num_sequences, 1);
  ASSERT_TRUE(WritePrompt(6, 4, 4, {0, 1, 2}).ok());
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{5, 6}).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, DrainRefusesNewWorkAndReportsNotServing) {
  StartWorker(16);
  ASSERT_TRUE(WritePrompt(3, 10, 10, {0, 1, 2}).ok());
  server_->BeginDrain();
  auto healthy = client_->CheckHealth();
  ASSERT_TRUE(healthy.ok()) << healthy.status();
  EXPECT_FALSE(*healthy);
  const client::WorkerInfo info = Describe();
  EXPECT_FALSE(info.serving);
  auto r = client_->Step(MakeStep(1, 0, {3}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  EXPECT_EQ((*stream)->Step(MakeStep(1, 0, {3})).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*stream)->Step(MakeStep(2, 0, {3})).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(WritePrompt(4, 10, 10, {0, 1, 2}).code(), absl::StatusCode::kUnavailable);
  // Every refusal is counted, StepStream messages included.
  EXPECT_EQ(metrics_.drain_refusals(RpcMethod::kStep)->Value(), 1);
  EXPECT_EQ(metrics_.drain_refusals(RpcMethod::kStepStream)->Value(), 2);
  EXPECT_EQ(metrics_.drain_refusals(RpcMethod::kWriteKV)->Value(), 1);
  EXPECT_EQ(metrics_.drain_refusals(RpcMethod::kDescribe), nullptr);
  // Release still frees memory while draining.
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{3}).ok());
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, LivenessTurnsNotServingWhileTheExecutorIsStuckAndRecovers) {
  liveness_stall_seconds_ = 0.3;
  StartWorker(16, /*executor_threads=*/1);
  ASSERT_TRUE(WaitHealth(service::kLivenessService, true));
  // The only decode thread never comes back: readiness (answered by gRPC threads) stays SERVING,
  // liveness does not.
  ExecutorBlocker blocker(server_->executor_for_testing());
  ASSERT_TRUE(blocker.Block(/*fill_queue=*/false));
  EXPECT_TRUE(WaitHealth(service::kLivenessService, false));
  EXPECT_TRUE(*client_->CheckHealth());
  EXPECT_TRUE(*client_->CheckHealth("pkv.v1.PersistentKV"));
  EXPECT_GT(metrics_.heartbeat_age().Value(), 0.3);
  blocker.Release();
  EXPECT_TRUE(WaitHealth(service::kLivenessService, true));
}

TEST_F(WorkerIntegrationTest, LivenessTurnsNotServingWhileTheEngineLockIsHeldAndRecovers) {
  liveness_stall_seconds_ = 0.3;
  StartWorker(16, /*executor_threads=*/2);
  ASSERT_TRUE(WritePrompt(5, 10, 10, {0, 1, 2}).ok());
  ASSERT_TRUE(WaitHealth(service::kLivenessService, true));
  // A layer-step that never leaves the engine lock; the heartbeat gets the other thread and waits
  // for the lock there.
  LayerStepBlocker hold;
  server_->engine().SetObserver(&hold);
  StepArgs a = MakeStep(50, 0, {5});
  absl::StatusOr<StepResult> held;
  std::thread step([&] { held = client_->Step(a); });
  hold.WaitEntered();
  EXPECT_TRUE(WaitHealth(service::kLivenessService, false));
  EXPECT_TRUE(*client_->CheckHealth());
  hold.Release();
  step.join();
  server_->engine().SetObserver(nullptr);
  ASSERT_TRUE(held.ok()) << held.status();
  double max_err = 0;
  CheckOutputs(a, *held, &max_err);
  EXPECT_TRUE(WaitHealth(service::kLivenessService, true));
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{5}).ok());  // drops the open token step
}

TEST_F(WorkerIntegrationTest, LivenessStaysServingWhileDraining) {
  liveness_stall_seconds_ = 1.0;
  StartWorker(16);
  ASSERT_TRUE(WaitHealth(service::kLivenessService, true));
  server_->BeginDrain();
  EXPECT_FALSE(*client_->CheckHealth());
  EXPECT_FALSE(*client_->CheckHealth("pkv.v1.PersistentKV"));
  auto live = client_->CheckHealth(service::kLivenessService);
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_TRUE(*live) << "draining turned liveness off";
  // Past the stall limit: the heartbeat keeps going through a drain.
  std::this_thread::sleep_for(std::chrono::milliseconds(1300));
  live = client_->CheckHealth(service::kLivenessService);
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_TRUE(*live);
}

TEST_F(WorkerIntegrationTest, RpcLatencyAndQueueTimeAreRecordedPerMethod) {
  StartWorker(16, /*executor_threads=*/1);
  ASSERT_TRUE(WritePrompt(5, 10, 10, {0, 1, 2}).ok());
  const auto [writes, write_seconds] = HistogramOf(metrics_.rpc_duration(RpcMethod::kWriteKV));
  EXPECT_EQ(writes, 1u);
  EXPECT_GT(write_seconds, 0);
  EXPECT_GE(HistogramOf(metrics_.rpc_queue_time(RpcMethod::kWriteKV)).first, 2u);  // header, chunks, commit
  // A Step that waits 200 ms behind a busy decode thread: its queue time and latency show it.
  ExecutorBlocker blocker(server_->executor_for_testing());
  ASSERT_TRUE(blocker.Block(/*fill_queue=*/false));
  StepArgs a = MakeStep(60, 0, {5});
  absl::StatusOr<StepResult> r;
  std::thread step([&] { r = client_->Step(a); });
  // Once the worker holds the request (queued behind the blocker), let it wait 200 ms.
  while (metrics_.inflight_streams(RpcMethod::kStep).Value() < 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  blocker.Release();
  step.join();
  ASSERT_TRUE(r.ok()) << r.status();
  const auto [queued, queue_seconds] = HistogramOf(metrics_.rpc_queue_time(RpcMethod::kStep));
  const auto [steps, step_seconds] = HistogramOf(metrics_.rpc_duration(RpcMethod::kStep));
  EXPECT_EQ(queued, 1u);
  EXPECT_EQ(steps, 1u);
  EXPECT_GE(queue_seconds, 0.2);
  EXPECT_GE(step_seconds, queue_seconds);
  // StepStream: one observation per message.
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  for (int32_t layer = 1; layer < 3; ++layer) ASSERT_TRUE((*stream)->Step(MakeStep(60, layer, {5})).ok());
  EXPECT_TRUE((*stream)->Finish().ok());
  EXPECT_EQ(HistogramOf(metrics_.rpc_duration(RpcMethod::kStepStream)).first, 2u);
  EXPECT_EQ(HistogramOf(metrics_.rpc_queue_time(RpcMethod::kStepStream)).first, 2u);
}

TEST_F(WorkerIntegrationTest, WriteKvGoesOverConnectionsOfItsOwn) {
  StartWorker(256);
  if (EstablishedConnectionsTo(server_->port()) < 0) GTEST_SKIP() << "no /proc/net/tcp";
  // The fixture's client: the decode connection and one ingest connection (the default).
  ASSERT_TRUE(WritePrompt(1, 20, 8, {0, 1, 2}).ok());
  EXPECT_EQ(WaitForConnections(server_->port(), 2), 2);
  // Two ingest connections, taken in turn; and none (WriteKV shares the decode connection).
  for (const int32_t ingest : {2, 0}) {
    client::ClientOptions copts;
    copts.target = server_->address();
    copts.ingest_connections = ingest;
    copts.own_connection = true;  // its decode connection too is its own, not the fixture's
    auto other = client::WorkerClient::Connect(copts);
    ASSERT_TRUE(other.ok()) << other.status();
    for (uint64_t seq : {10, 11, 12}) {
      ASSERT_TRUE((*other)->WritePrompt(seq + ingest * 10, 9, 4, [&](int32_t layer, int64_t off, int64_t n,
                                                                      std::string* k, std::string* v) {
        gen_->AppendKv(seq + ingest * 10, layer, off, n, k, v);
      }).ok());
    }
    EXPECT_EQ(WaitForConnections(server_->port(), 2 + 1 + ingest), 2 + 1 + ingest) << "ingest_connections=" << ingest;
    std::vector<uint64_t> seqs = {10 + ingest * 10ull, 11 + ingest * 10ull, 12 + ingest * 10ull};
    ASSERT_TRUE((*other)->Release(seqs).ok());
  }
}

TEST_F(WorkerIntegrationTest, StepStreamsGoOverDecodeConnectionsOfTheirOwn) {
  StartWorker(256);
  if (EstablishedConnectionsTo(server_->port()) < 0) GTEST_SKIP() << "no /proc/net/tcp";
  ASSERT_TRUE(WritePrompt(1, 20, 8, {0, 1, 2}).ok());
  EXPECT_EQ(WaitForConnections(server_->port(), 2), 2);  // the fixture's decode and ingest connections
  client::ClientOptions copts;
  copts.target = server_->address();
  copts.ingest_connections = 0;
  copts.decode_connections = 2;
  copts.own_connection = true;
  auto other = client::WorkerClient::Connect(copts);
  ASSERT_TRUE(other.ok()) << other.status();
  // Three streams over two decode connections taken in turn; each answers on its own.
  std::vector<std::unique_ptr<client::StepStreamSession>> streams;
  for (uint64_t id : {90, 91, 92}) {
    auto s = (*other)->OpenStepStream();
    ASSERT_TRUE(s.ok()) << s.status();
    StepArgs a = MakeStep(id, 0, {1});
    a.rows = {4242};  // an unknown sequence: refused in StepResponse.status, the stream goes on
    EXPECT_EQ((*s)->Step(a).status().code(), absl::StatusCode::kNotFound);
    streams.push_back(*std::move(s));
  }
  EXPECT_EQ(WaitForConnections(server_->port(), 2 + 1 + 2), 2 + 1 + 2);
  for (auto& s : streams) EXPECT_TRUE(s->Finish().ok());
}

TEST_F(WorkerIntegrationTest, ServesOverAUnixDomainSocket) {
  const std::string path = ::testing::TempDir() + "/pkv-worker-" + std::to_string(::getpid()) + ".sock";
  ::unlink(path.c_str());
  listen_address_ = "unix:" + path;
  StartWorker(32);
  EXPECT_EQ(server_->address(), "unix:" + path);
  ASSERT_TRUE(WritePrompt(1, 20, 8, {0, 1, 2}).ok());
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  double max_err = 0;
  for (int32_t layer = 0; layer < 3; ++layer) {
    StepArgs a = MakeStep(7, layer, {1});
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  EXPECT_TRUE((*stream)->Finish().ok());
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{1}).ok());
  EXPECT_TRUE(WaitAllFree());
}

// A client with ClientOptions::shared_memory: q, k, v and the outputs of its StepStreams go
// through a shared-memory region of their own (with the ring, the requests and responses too);
// every output matches the double reference, a Send beyond the slots is refused, and a replay
// with micro-batches checks out over it.
class WorkerSharedMemoryTest : public WorkerIntegrationTest, public ::testing::WithParamInterface<bool> {
 protected:
  // A client of the worker with shared memory (the ring when the parameter says so) and `slots`
  // requests in flight per stream.
  std::unique_ptr<client::WorkerClient> ConnectSharedMemoryClient(int32_t slots) {
    client::ClientOptions copts;
    copts.target = server_->address();
    copts.shared_memory = true;
    copts.shared_memory_ring = GetParam();
    copts.shared_memory_spin_us = 50;
    copts.shared_memory_slots = slots;
    auto c = client::WorkerClient::Connect(copts);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
};

INSTANTIATE_TEST_SUITE_P(TensorsOrRing, WorkerSharedMemoryTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) { return p.param ? "Ring" : "Tensors"; });

TEST_P(WorkerSharedMemoryTest, StepStreamsMatchTheReference) {
  StartWorker(128, /*executor_threads=*/3);
  std::unique_ptr<client::WorkerClient> shm_client = ConnectSharedMemoryClient(2);
  ASSERT_NE(shm_client, nullptr);
  EXPECT_GT(Describe().shared_memory_max_bytes, 0);
  ASSERT_TRUE(WritePrompt(11, 20, 8, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(12, 37, 16, {2, 1, 0}).ok());
  auto stream = shm_client->OpenStepStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  const std::vector<uint64_t> rows = {11, 12};
  double max_err = 0;
  for (int step = 0; step < 6; ++step) {
    for (int32_t layer = 0; layer < 3; ++layer) {
      StepArgs a = MakeStep(700 + step, layer, rows);
      auto r = (*stream)->Step(a);
      ASSERT_TRUE(r.ok()) << "step " << step << " layer " << layer << ": " << r.status();
      CheckOutputs(a, *r, &max_err);
    }
    Advance(rows);
  }
  // Send and Receive apart.
  StepArgs a0 = MakeStep(800, 0, rows);
  ASSERT_TRUE((*stream)->Send(StepArgs(a0)).ok());
  auto r0 = (*stream)->Receive();
  ASSERT_TRUE(r0.ok()) << r0.status();
  CheckOutputs(a0, *r0, &max_err);
  for (int32_t layer = 1; layer < 3; ++layer) {
    StepArgs a = MakeStep(800, layer, rows);
    auto r = (*stream)->Step(a);
    ASSERT_TRUE(r.ok()) << r.status();
    CheckOutputs(a, *r, &max_err);
  }
  Advance(rows);
  EXPECT_TRUE((*stream)->Finish().ok());
  RecordProperty("max_rel_error", std::to_string(max_err));
  ASSERT_TRUE(client_->Release(rows).ok());

  // A replay over shared memory, two micro-batches with prompts streaming in.
  std::vector<WorkloadRequest> requests = GenerateWorkload(WorkloadKind::kUniform, 8, 5);
  ScaleWorkload(requests, 0.005, 0, 8);
  client::ReplayOptions options;
  options.batch = 2;
  options.micro_batches = 2;
  options.check_fraction = 0.5;
  options.chunk_tokens = 16;
  options.warmup_steps = 1;
  options.verbose = false;
  auto report = client::RunReplay(*shm_client, options, requests);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_done, 8);
  EXPECT_GT(report->outputs_checked, 10);
  EXPECT_EQ(report->check_failures, 0) << report->first_failure;
  EXPECT_TRUE(WaitAllFree());
}

TEST_P(WorkerSharedMemoryTest, ClientSlotsAreBoundedAndNothingIsLeftBehind) {
  StartWorker(64);
  std::unique_ptr<client::WorkerClient> shm_client = ConnectSharedMemoryClient(1);
  ASSERT_NE(shm_client, nullptr);
  ASSERT_TRUE(WritePrompt(21, 9, 9, {0, 1, 2}).ok());
  ASSERT_TRUE(WritePrompt(22, 9, 9, {0, 1, 2}).ok());
  auto s1 = shm_client->OpenStepStream();
  auto s2 = shm_client->OpenStepStream();
  ASSERT_TRUE(s1.ok() && s2.ok());
  StepArgs a = MakeStep(900, 0, {21});
  StepArgs b = MakeStep(901, 0, {22});
  ASSERT_TRUE((*s1)->Send(StepArgs(a)).ok());
  // One slot: the second request waits for the first answer.
  const absl::Status second = (*s1)->Send(StepArgs(a));
  EXPECT_EQ(second.code(), absl::StatusCode::kFailedPrecondition) << second;
  ASSERT_TRUE((*s2)->Send(StepArgs(b)).ok());  // another stream, another region
  auto ra = (*s1)->Receive();
  auto rb = (*s2)->Receive();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(rb.ok()) << rb.status();
  double max_err = 0;
  CheckOutputs(a, *ra, &max_err);
  CheckOutputs(b, *rb, &max_err);
  // More rows than the worker's max_batch: refused by name (by the worker, from the message; by
  // the client, with the ring).
  std::vector<uint64_t> many(17);
  for (size_t i = 0; i < many.size(); ++i) many[i] = 1000 + i;
  StepArgs big;
  big.token_step_id = 902;
  big.rows = many;
  big.q.assign(many.size() * TestShape().num_q_heads * TestShape().head_dim * 2, '\0');
  big.k.assign(many.size() * TestShape().num_kv_heads * TestShape().head_dim * 2, '\0');
  big.v = big.k;
  auto rbig = (*s1)->Step(big);
  EXPECT_EQ(rbig.status().code(), absl::StatusCode::kInvalidArgument) << rbig.status();
  EXPECT_NE(rbig.status().message().find("rows"), std::string::npos) << rbig.status();
  for (int32_t layer = 1; layer < 3; ++layer) {
    ASSERT_TRUE((*s1)->Step(MakeStep(900, layer, {21})).ok());
    ASSERT_TRUE((*s2)->Step(MakeStep(901, layer, {22})).ok());
  }
  EXPECT_TRUE((*s1)->Finish().ok());
  EXPECT_TRUE((*s2)->Finish().ok());
  // The client unlinked its objects' names once the worker had mapped them: none is left behind.
  int left = 0;
  const std::string prefix = "pkv-" + std::to_string(::getpid()) + "-";
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm")) {
    if (entry.path().filename().string().rfind(prefix, 0) == 0) ++left;
  }
  EXPECT_EQ(left, 0);
}

TEST_F(WorkerIntegrationTest, ReplayOfAShortWorkloadChecksOutAndFreesEverything) {
  StartWorker(256);
  std::vector<WorkloadRequest> requests = GenerateWorkload(WorkloadKind::kBimodal, 10, 7);
  ScaleWorkload(requests, 0.01, 0, 12);
  client::ReplayOptions options;
  options.batch = 4;
  options.check_fraction = 0.5;
  options.chunk_tokens = 24;
  options.verbose = false;
  auto report = client::RunReplay(*client_, options, requests);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_done, 10);
  EXPECT_GT(report->outputs_checked, 20);
  EXPECT_EQ(report->check_failures, 0) << report->first_failure;
  EXPECT_LE(report->max_rel_error, client::Tolerance(TestShape()));
  EXPECT_TRUE(WaitAllFree());
}

TEST_F(WorkerIntegrationTest, ReplayWithInterleavedMicroBatchesAndConcurrentPrefill) {
  StartWorker(256, /*executor_threads=*/3);
  std::vector<WorkloadRequest> requests = GenerateWorkload(WorkloadKind::kUniform, 12, 11);
  ScaleWorkload(requests, 0.005, 0, 10);
  client::ReplayOptions options;
  options.batch = 2;
  options.micro_batches = 3;
  options.prefill_streams = 2;
  options.check_fraction = 0.3;
  options.chunk_tokens = 16;
  options.warmup_steps = 1;
  options.pool_sample_interval = absl::Milliseconds(2);
  options.verbose = false;
  auto report = client::RunReplay(*client_, options, requests);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_done, 12);
  EXPECT_EQ(report->micro_batches, 3);
  EXPECT_EQ(report->layer_steps, report->token_steps * TestShape().num_layers);
  int64_t decode_tokens = 0;
  for (const WorkloadRequest& r : requests) decode_tokens += r.output_tokens;
  EXPECT_EQ(report->decode_tokens, decode_tokens);  // every requested token decoded exactly once
  EXPECT_GT(report->outputs_checked, 10);
  EXPECT_EQ(report->check_failures, 0) << report->first_failure;
  EXPECT_FALSE(report->tbt_ms.empty());
  EXPECT_GT(report->pool_samples, 0);
  EXPECT_GE(report->kv_reserved_peak_bytes, report->kv_used_peak_bytes);
  EXPECT_GT(report->decode_s, 0.0);
  // The time series (pkv-replay --timeline_csv): one time per tbt sample, the measured tokens by
  // token step, every pool sample, all in time order within [0, elapsed].
  ASSERT_EQ(report->tbt_at_s.size(), report->tbt_ms.size());
  int64_t series_tokens = 0;
  for (const auto& [t, n] : report->token_steps_at_s) {
    EXPECT_GE(t, 0.0);
    EXPECT_LE(t, report->elapsed_s);
    series_tokens += n;
  }
  EXPECT_EQ(series_tokens, report->measured_tokens);
  ASSERT_EQ(static_cast<int64_t>(report->pool_at_s.size()), report->pool_samples);
  for (size_t i = 1; i < report->pool_at_s.size(); ++i) {
    EXPECT_GE(report->pool_at_s[i].at_s, report->pool_at_s[i - 1].at_s);
    EXPECT_GE(report->pool_at_s[i].reserved_bytes, report->pool_at_s[i].used_bytes);
  }
  const std::string csv = report->TimelineCsv();
  EXPECT_EQ(csv.rfind("kind,t_s,value,value2\n", 0), 0u);
  EXPECT_EQ(static_cast<size_t>(std::count(csv.begin(), csv.end(), '\n')),
            1 + report->token_steps_at_s.size() + report->tbt_ms.size() + report->pool_at_s.size());
  // The worker's own share of each layer-step: positive, within the client's round trip, and
  // the engine-thread wait within it.
  ASSERT_EQ(report->server_ms.size(), report->layer_step_ms.size());
  ASSERT_EQ(report->queue_ms.size(), report->layer_step_ms.size());
  for (size_t i = 0; i < report->server_ms.size(); ++i) {
    EXPECT_GT(report->server_ms[i], 0.0);
    EXPECT_LE(report->server_ms[i], report->layer_step_ms[i]);
    EXPECT_LE(report->queue_ms[i], report->server_ms[i]);
  }
  // Finished rows were freed by the next token step's `free` delta or by Release: nothing is left.
  EXPECT_TRUE(WaitAllFree());
}

// Every StepResponse splits the worker's hold time into its stages: each filled, non-negative,
// together within server_seconds, and the wall-clock stamps as far apart as server_seconds.
TEST_F(WorkerIntegrationTest, StepResponsesCarryTheStageBreakdown) {
  StartWorker(64);
  ASSERT_TRUE(WritePrompt(5, 30, 16, {0, 1, 2}).ok());
  auto stream = client_->OpenStepStream();
  ASSERT_TRUE(stream.ok());
  for (uint64_t step = 1; step <= 2; ++step) {
    for (int32_t layer = 0; layer < TestShape().num_layers; ++layer) {
      const StepArgs a = MakeStep(step, layer, {5});
      // Token step 1 over the stream, token step 2 unary: both paths fill the same fields.
      auto r = step == 1 ? (*stream)->Step(a) : client_->Step(a);
      ASSERT_TRUE(r.ok()) << r.status();
      double max_err = 0;
      CheckOutputs(a, *r, &max_err);
      EXPECT_FALSE(r->attention_skipped);
      for (double t : {r->queue_seconds, r->validate_seconds, r->host_seconds, r->h2d_seconds,
                       r->kernel_seconds, r->d2h_seconds, r->serialize_seconds, r->send_seconds,
                       r->convert_seconds}) {
        EXPECT_GE(t, 0.0);
      }
      EXPECT_GT(r->validate_seconds, 0.0);
      EXPECT_GT(r->host_seconds, 0.0);
      EXPECT_GT(r->kernel_seconds, 0.0);
      EXPECT_GT(r->serialize_seconds, 0.0);
      const double stages = r->queue_seconds + r->validate_seconds + r->host_seconds + r->h2d_seconds +
                            r->kernel_seconds + r->d2h_seconds + r->serialize_seconds;
      EXPECT_LE(stages, r->server_seconds + 1e-9);
      ASSERT_GT(r->received_unix_nanos, 0);
      const double stamped = static_cast<double>(r->answered_unix_nanos - r->received_unix_nanos) * 1e-9;
      EXPECT_NEAR(stamped, r->server_seconds, 1e-6);
      // One host, one wall clock: the worker read the request after the client began sending it,
      // and the client read the answer after the worker gave it.
      EXPECT_GE(r->received_unix_nanos, r->send_start_unix_nanos);
      EXPECT_LE(std::chrono::duration<double>(r->read_at - r->send_start).count(), 30.0);
      EXPECT_GE(std::chrono::duration<double>(r->read_at - r->send_start).count(), r->server_seconds);
    }
    Advance({5});
  }
  ASSERT_TRUE((*stream)->Finish().ok());
}

// --attention=skip: Describe says so, every step does the host work (pages are appended and
// freed as in a real run) and answers zeros flagged attention_skipped; a replay then checks
// nothing and still decodes every token.
TEST_F(WorkerIntegrationTest, SkipAttentionWorkerAnswersZerosAndTheReplayChecksNothing) {
  StartWorker(128, 2, 64, 2, 64, "skip");
  EXPECT_EQ(Describe().backend, "cpu+skip");
  ASSERT_TRUE(WritePrompt(9, 20, 20, {0, 1, 2}).ok());
  for (int32_t layer = 0; layer < TestShape().num_layers; ++layer) {
    auto r = client_->Step(MakeStep(1, layer, {9}));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->attention_skipped);
    EXPECT_EQ(r->out, std::string(r->out.size(), '\0'));
    EXPECT_EQ(r->kernel_seconds, 0.0);
    EXPECT_GT(r->server_seconds, 0.0);
  }
  EXPECT_EQ(Describe().used_tokens, 21);
  ASSERT_TRUE(client_->Release(std::vector<uint64_t>{9}).ok());

  std::vector<WorkloadRequest> requests = GenerateWorkload(WorkloadKind::kUniform, 6, 3);
  ScaleWorkload(requests, 0.005, 0, 8);
  client::ReplayOptions options;
  options.batch = 3;
  options.micro_batches = 2;
  options.check_fraction = 1.0;  // would check every output of a worker that computes
  options.warmup_steps = 1;
  options.verbose = false;
  auto report = client::RunReplay(*client_, options, requests);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->attention_skipped);
  EXPECT_EQ(report->requests_done, 6);
  EXPECT_EQ(report->outputs_checked, 0);
  EXPECT_EQ(report->check_failures, 0);
  EXPECT_NE(report->Format().find("the worker skips attention"), std::string::npos);
  EXPECT_NE(report->ToJson().find("\"attention_skipped\": true"), std::string::npos);
  EXPECT_TRUE(WaitAllFree());
}

// Pooled payloads (a few rows reused for every position) written and stepped through the worker
// match the double reference rebuilt from the same pool; the same outputs checked against
// another pool's data, or zeros, fail: the check still tells right outputs from wrong ones.
TEST_F(WorkerIntegrationTest, PooledPayloadsPassTheCheckAndWrongOutputsFailIt) {
  StartWorker(64);
  const ModelShape s = TestShape();
  const client::PayloadPool pool(*gen_, kDataSeed, /*rows=*/8);
  const client::PayloadPool other(*gen_, kDataSeed + 1, /*rows=*/8);
  const std::vector<uint64_t> rows = {11, 12};
  std::map<uint64_t, int64_t> len = {{11, 37}, {12, 5}};
  for (uint64_t seq : rows) {
    auto writer = client_->BeginWriteKV(seq, len[seq]);
    ASSERT_TRUE(writer.ok());
    for (int32_t layer = 0; layer < s.num_layers; ++layer) {
      std::string k, v;
      pool.AppendKv(seq, layer, 0, len[seq], &k, &v);
      ASSERT_TRUE((*writer)->WriteChunk(layer, 0, len[seq], k, v).ok());
    }
    ASSERT_TRUE((*writer)->Finish().ok());
  }
  const size_t row_bytes = static_cast<size_t>(s.num_q_heads) * s.head_dim * 2;
  int64_t checked = 0;
  for (uint64_t step = 1; step <= 4; ++step) {
    for (int32_t layer = 0; layer < s.num_layers; ++layer) {
      StepArgs a;
      a.token_step_id = 100 + step;
      a.layer = layer;
      a.rows = rows;
      for (uint64_t seq : rows) {
        pool.AppendQ(seq, layer, len[seq], &a.q);
        pool.AppendKv(seq, layer, len[seq], 1, &a.k, &a.v);
      }
      auto r = client_->Step(a);
      ASSERT_TRUE(r.ok()) << r.status();
      for (size_t i = 0; i < rows.size(); ++i) {
        const uint64_t seq = rows[i];
        const int64_t n = len[seq] + 1;
        auto reference = [&](const client::PayloadPool& data) {
          std::vector<double> out;
          client::ReferenceDecode(s, data.Query(seq, layer, n - 1), data.History(DataKind::kK, seq, layer, n),
                                  data.History(DataKind::kV, seq, layer, n), n, &out, nullptr);
          return out;
        };
        const char* got = r->out.data() + i * row_bytes;
        EXPECT_LE(client::MaxRelativeError(s, got, reference(pool)), client::Tolerance(s));
        EXPECT_GT(client::MaxRelativeError(s, got, reference(other)), client::Tolerance(s));
        const std::string zeros(row_bytes, '\0');
        EXPECT_GT(client::MaxRelativeError(s, zeros.data(), reference(pool)), client::Tolerance(s));
        ++checked;
      }
    }
    for (uint64_t seq : rows) ++len[seq];
  }
  EXPECT_EQ(checked, 4 * s.num_layers * 2);
}

// A replay on a small payload pool at steady full batch: every sampled output checks out, and
// each measured layer-step's stages are non-negative and add up to its round trip.
TEST_F(WorkerIntegrationTest, ReplayOnAPayloadPoolChecksOutAndItsStagesSumToTheRoundTrip) {
  StartWorker(256);
  std::vector<WorkloadRequest> requests = GenerateWorkload(WorkloadKind::kHomogeneous, 4, 5);
  ScaleWorkload(requests, 0.002, 0, 10);
  client::ReplayOptions options;
  options.batch = 2;
  options.micro_batches = 2;
  options.payload_rows = 16;
  options.wait_for_prefill = true;
  options.check_fraction = 0.5;
  options.warmup_steps = 2;
  options.verbose = false;
  auto report = client::RunReplay(*client_, options, requests);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_done, 4);
  EXPECT_FALSE(report->attention_skipped);
  EXPECT_EQ(report->payload_rows, 16);
  EXPECT_GT(report->outputs_checked, 10);
  EXPECT_EQ(report->check_failures, 0) << report->first_failure;
  // Full batches only: every token step of both groups carried 2 rows.
  EXPECT_EQ(report->decode_tokens, 2 * report->token_steps);
  const auto& rt = report->stage_ms[static_cast<int32_t>(client::Stage::kRoundTrip)];
  ASSERT_FALSE(rt.empty());
  for (int32_t i = 0; i < client::kNumStages; ++i) ASSERT_EQ(report->stage_ms[i].size(), rt.size()) << i;
  ASSERT_EQ(report->client_thread_cpu_ms.size(), report->layer_step_ms.size());
  for (size_t j = 0; j < rt.size(); ++j) {
    double sum = 0;
    for (int32_t i = static_cast<int32_t>(client::Stage::kSend); i < static_cast<int32_t>(client::Stage::kRoundTrip); ++i) {
      EXPECT_GE(report->stage_ms[i][j], -1e-6) << client::StageName(static_cast<client::Stage>(i));
      sum += report->stage_ms[i][j];
    }
    EXPECT_NEAR(sum, rt[j], 1e-6 + 1e-9 * rt[j]);
    EXPECT_GT(report->stage_ms[static_cast<int32_t>(client::Stage::kKernels)][j], 0.0);
    EXPECT_GE(report->stage_ms[static_cast<int32_t>(client::Stage::kBuild)][j], 0.0);
  }
  for (double cpu : report->client_thread_cpu_ms) EXPECT_GE(cpu, 0.0);
  EXPECT_GT(report->client_process_cpu_s, 0.0);
  EXPECT_GT(report->client_phase_layer_steps, 0);
  const std::string json = report->ToJson();
  for (const char* key : {"\"breakdown_ms\"", "\"client_build\"", "\"worker_queue\"", "\"kernels\"",
                          "\"back_to_client\"", "\"round_trip\"", "\"client_thread_cpu_ms\"",
                          "\"client_process_cpu_ms_per_layer_step\""}) {
    EXPECT_NE(json.find(key), std::string::npos) << key;
  }
  EXPECT_TRUE(WaitAllFree());
}

}  // namespace
}  // namespace pkv
