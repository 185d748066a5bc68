// bench/benchmarks/transport_bench_main.cc — pkv-transport-bench: the gRPC round trip of one
// layer-step's bytes with no engine behind it, for each way of running the two ends.
//
// One bidi stream per client thread (--streams) sends --request_bytes and waits for
// --response_bytes back, --iterations times after --warmup, over loopback TCP to a server in this
// process. The payloads are built once and sent as shared slices (no copy per message), so what
// is timed is gRPC and the kernel's loopback path, nothing else. Server modes:
//   callback   a CallbackGenericService reactor answers on gRPC's callback threads (the way
//              StepStream was served before the decode polling threads);
//   poll       --server_threads threads each own a completion queue and poll it without
//              sleeping (AsyncNext with a zero deadline), answering inline;
//   block      the same threads, blocking in Next (woken by gRPC when an event arrives).
// Client modes: sync (ClientReaderWriter Write then Read, the thread blocks in gRPC's poller,
// as pkv-replay's decode threads do) and poll (the async API on a per-stream completion queue
// polled without sleeping).
// --unix_socket=PATH serves and connects over a Unix domain socket instead of loopback TCP.
// Prints round trip p50 / p99 / mean in microseconds and the process CPU per round trip; exit 0,
// or 1 on any error.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "common/channel_args.h"

ABSL_FLAG(std::string, server, "poll", "Server mode: callback, poll or block.");
ABSL_FLAG(std::string, client, "sync", "Client mode: sync or poll.");
ABSL_FLAG(int, server_threads, 2, "Completion-queue threads of the poll and block servers.");
ABSL_FLAG(int, streams, 1, "Concurrent streams, one client thread each.");
ABSL_FLAG(int64_t, request_bytes, 98304, "Bytes per request (B8, Hq 32, d 128, fp16: q + k + v = 96 KiB).");
ABSL_FLAG(int64_t, response_bytes, 65536, "Bytes per response (B8: 64 KiB of outputs).");
ABSL_FLAG(bool, own_connections, false,
          "Each stream on a TCP connection of its own (false: gRPC shares one connection among "
          "channels of the same target and arguments).");
ABSL_FLAG(std::string, unix_socket, "",
          "Serve and connect over this Unix domain socket path instead of loopback TCP.");
ABSL_FLAG(int, iterations, 20000, "Timed round trips per stream.");
ABSL_FLAG(int, warmup, 2000, "Round trips per stream before timing.");
ABSL_FLAG(std::vector<std::string>, grpc_arg, {},
          "gRPC core channel arguments name=value, set on both the server and the client channels "
          "(e.g. grpc.http2.lookahead_bytes=1048576).");

namespace {

using Clock = std::chrono::steady_clock;
constexpr char kMethod[] = "/pkv.bench.Transport/Echo";

grpc::ByteBuffer Payload(int64_t bytes) {
  std::string s(static_cast<size_t>(bytes), '\0');
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(i * 131 + 7);
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

// ---- callback server ----
class CallbackEcho final : public grpc::CallbackGenericService {
 public:
  explicit CallbackEcho(const grpc::ByteBuffer* response) : response_(response) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      explicit Reactor(const grpc::ByteBuffer* response) : response_(*response) { StartRead(&request_); }
      void OnReadDone(bool ok) override {
        if (!ok) return Finish(grpc::Status::OK);
        StartWrite(&response_);
      }
      void OnWriteDone(bool ok) override {
        if (!ok) return Finish(grpc::Status::CANCELLED);
        StartRead(&request_);
      }
      void OnDone() override { delete this; }

     private:
      grpc::ByteBuffer request_, response_;
    };
    return new Reactor(response_);
  }

 private:
  const grpc::ByteBuffer* response_;
};

// ---- completion-queue server (poll / block) ----
struct AsyncCall {
  enum Op { kNew, kRead, kWrite, kFinish };
  struct Tag {
    AsyncCall* call;
    Op op;
  };
  explicit AsyncCall(const grpc::ByteBuffer& response) : stream(&ctx), response(response) {}
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer request, response;
  Tag tags[4] = {{this, kNew}, {this, kRead}, {this, kWrite}, {this, kFinish}};
};

void ServeQueue(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq, const grpc::ByteBuffer* response,
                bool poll) {
  auto listen = [&] {
    auto* call = new AsyncCall(*response);
    service->RequestCall(&call->ctx, &call->stream, cq, cq, &call->tags[AsyncCall::kNew]);
  };
  listen();
  for (;;) {
    void* raw = nullptr;
    bool ok = false;
    if (poll) {
      grpc::CompletionQueue::NextStatus s;
      do {
        s = cq->AsyncNext(&raw, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
      } while (s == grpc::CompletionQueue::TIMEOUT);
      if (s == grpc::CompletionQueue::SHUTDOWN) return;
    } else if (!cq->Next(&raw, &ok)) {
      return;
    }
    auto* tag = static_cast<AsyncCall::Tag*>(raw);
    AsyncCall* call = tag->call;
    switch (tag->op) {
      case AsyncCall::kNew:
        if (!ok) {  // shutting down
          delete call;
          break;
        }
        listen();
        call->stream.Read(&call->request, &call->tags[AsyncCall::kRead]);
        break;
      case AsyncCall::kRead:
        if (!ok) {
          call->stream.Finish(grpc::Status::OK, &call->tags[AsyncCall::kFinish]);
          break;
        }
        call->stream.Write(call->response, &call->tags[AsyncCall::kWrite]);
        break;
      case AsyncCall::kWrite:
        if (!ok) {
          call->stream.Finish(grpc::Status::CANCELLED, &call->tags[AsyncCall::kFinish]);
          break;
        }
        call->stream.Read(&call->request, &call->tags[AsyncCall::kRead]);
        break;
      case AsyncCall::kFinish:
        delete call;
        break;
    }
  }
}

// ---- clients ----
struct Result {
  std::vector<double> us;
  std::string error;
};

void SyncClient(const std::shared_ptr<grpc::Channel>& channel, const grpc::ByteBuffer& request, Result* out) {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), grpc::internal::RpcMethod(kMethod, grpc::internal::RpcMethod::BIDI_STREAMING), &ctx));
  const int warmup = absl::GetFlag(FLAGS_warmup), n = absl::GetFlag(FLAGS_iterations);
  grpc::ByteBuffer response;
  for (int i = 0; i < warmup + n; ++i) {
    const auto t0 = Clock::now();
    if (!stream->Write(request) || !stream->Read(&response)) {
      out->error = "stream broke";
      return;
    }
    if (i >= warmup) out->us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  stream->WritesDone();
  grpc::Status s = stream->Finish();
  if (!s.ok()) out->error = s.error_message();
}

void PollClient(const std::shared_ptr<grpc::Channel>& channel, const grpc::ByteBuffer& request, Result* out) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto wait = [&](int count) {
    for (int got = 0; got < count;) {
      void* tag;
      bool ok;
      grpc::CompletionQueue::NextStatus s = cq.AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
      if (s == grpc::CompletionQueue::TIMEOUT) continue;
      if (s == grpc::CompletionQueue::SHUTDOWN || !ok) return false;
      ++got;
    }
    return true;
  };
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> stream = stub.PrepareCall(&ctx, kMethod, &cq);
  stream->StartCall(reinterpret_cast<void*>(1));
  if (!wait(1)) {
    out->error = "call did not start";
    return;
  }
  const int warmup = absl::GetFlag(FLAGS_warmup), n = absl::GetFlag(FLAGS_iterations);
  grpc::ByteBuffer response;
  for (int i = 0; i < warmup + n; ++i) {
    const auto t0 = Clock::now();
    stream->Write(request, reinterpret_cast<void*>(2));
    stream->Read(&response, reinterpret_cast<void*>(3));
    if (!wait(2)) {
      out->error = "stream broke";
      return;
    }
    if (i >= warmup) out->us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  stream->WritesDone(reinterpret_cast<void*>(4));
  grpc::Status status;
  stream->Finish(&status, reinterpret_cast<void*>(5));
  wait(2);
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) out->error = status.error_message();
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times gRPC round trips of a layer-step's request and response bytes over loopback, with no engine "
      "behind them, for one server and client mode (see the flags).");
  absl::ParseCommandLine(argc, argv);
  const std::string server_mode = absl::GetFlag(FLAGS_server), client_mode = absl::GetFlag(FLAGS_client);
  if (server_mode != "callback" && server_mode != "poll" && server_mode != "block") {
    std::fprintf(stderr, "--server: callback, poll or block, not %s\n", server_mode.c_str());
    return 1;
  }
  if (client_mode != "sync" && client_mode != "poll") {
    std::fprintf(stderr, "--client: sync or poll, not %s\n", client_mode.c_str());
    return 1;
  }
  absl::StatusOr<std::vector<pkv::ChannelArg>> extra = pkv::ParseChannelArgs(absl::GetFlag(FLAGS_grpc_arg), "--grpc_arg");
  if (!extra.ok()) {
    std::fprintf(stderr, "%s\n", extra.status().ToString().c_str());
    return 1;
  }
  const grpc::ByteBuffer request = Payload(absl::GetFlag(FLAGS_request_bytes));
  const grpc::ByteBuffer response = Payload(absl::GetFlag(FLAGS_response_bytes));

  grpc::ServerBuilder builder;
  int port = 0;
  const std::string unix_path = absl::GetFlag(FLAGS_unix_socket);
  if (unix_path.empty()) {
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  } else {
    ::unlink(unix_path.c_str());
    builder.AddListeningPort("unix:" + unix_path, grpc::InsecureServerCredentials(), &port);
  }
  builder.SetMaxMessageSize(64 << 20);
  for (const pkv::ChannelArg& a : *extra) {
    if (a.is_int) {
      builder.AddChannelArgument(a.name, static_cast<int>(a.int_value));
    } else {
      builder.AddChannelArgument(a.name, a.string_value);
    }
  }
  CallbackEcho callback(&response);
  grpc::AsyncGenericService async;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs;
  if (server_mode == "callback") {
    builder.RegisterCallbackGenericService(&callback);
  } else {
    builder.RegisterAsyncGenericService(&async);
    for (int i = 0; i < std::max(1, absl::GetFlag(FLAGS_server_threads)); ++i) cqs.push_back(builder.AddCompletionQueue());
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    std::fprintf(stderr, "the server did not start\n");
    return 1;
  }
  std::vector<std::thread> server_threads;
  for (auto& cq : cqs) server_threads.emplace_back(ServeQueue, &async, cq.get(), &response, server_mode == "poll");

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  for (const pkv::ChannelArg& a : *extra) {
    if (a.is_int) {
      args.SetInt(a.name, static_cast<int>(a.int_value));
    } else {
      args.SetString(a.name, a.string_value);
    }
  }
  const int streams = std::max(1, absl::GetFlag(FLAGS_streams));
  std::vector<Result> results(streams);
  std::vector<std::thread> clients;
  const double cpu0 = CpuSeconds();
  const auto wall0 = Clock::now();
  for (int i = 0; i < streams; ++i) {
    // A channel per stream; with --own_connections each also gets a connection of its own.
    grpc::ChannelArguments channel_args = args;
    if (absl::GetFlag(FLAGS_own_connections)) {
      channel_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      channel_args.SetString("pkv.connection_role", absl::StrCat("stream-", i));
    }
    auto channel =
        grpc::CreateCustomChannel(unix_path.empty() ? absl::StrCat("127.0.0.1:", port) : "unix:" + unix_path, grpc::InsecureChannelCredentials(), channel_args);
    clients.emplace_back([&, i, channel] {
      if (client_mode == "sync") {
        SyncClient(channel, request, &results[i]);
      } else {
        PollClient(channel, request, &results[i]);
      }
    });
  }
  for (auto& t : clients) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - wall0).count();
  const double cpu = CpuSeconds() - cpu0;
  server->Shutdown();
  for (auto& cq : cqs) cq->Shutdown();
  for (auto& t : server_threads) t.join();

  std::vector<double> all;
  for (const Result& r : results) {
    if (!r.error.empty()) {
      std::fprintf(stderr, "client: %s\n", r.error.c_str());
      return 1;
    }
    all.insert(all.end(), r.us.begin(), r.us.end());
  }
  std::sort(all.begin(), all.end());
  double sum = 0;
  for (double v : all) sum += v;
  auto q = [&](double p) { return all[std::min(all.size() - 1, static_cast<size_t>(p * all.size()))]; };
  const double rps = all.size() / wall;
  std::printf("| %s%s | %s | %d%s | %lld / %lld | %.1f | %.1f | %.1f | %.0f | %.1f |\n", server_mode.c_str(),
              unix_path.empty() ? "" : " (unix socket)", client_mode.c_str(), streams, absl::GetFlag(FLAGS_own_connections) ? " (own connections)" : "", static_cast<long long>(absl::GetFlag(FLAGS_request_bytes)),
              static_cast<long long>(absl::GetFlag(FLAGS_response_bytes)), q(0.5), q(0.99), sum / all.size(), rps,
              1e6 * cpu / (all.size() + static_cast<double>(streams) * absl::GetFlag(FLAGS_warmup)));
  return 0;
}
