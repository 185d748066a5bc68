// bench/benchmarks/ingest_rpc_main.cc — pkv-ingest-bench: prompt KV ingest bandwidth of the service path,
// next to what loopback TCP and the engine alone move, in one run.
//
// For each stream count N (--streams, e.g. 1 and 8) it moves the same K,V bytes three ways and
// reports GB/s (K+V payload bytes over the wall time from the first byte to the last stream's
// answer), the ratios, and the CPU seconds per GB the whole process (both ends) spent on it, which
// a busy or shared machine disturbs less than the wall time:
//   tcp     N plain loopback TCP connections, each sending its prompt's chunks (K then V bytes
//           of every chunk, in the chunking WriteKV uses) to a receiver thread that reads them
//           into a chunk-sized buffer and answers one byte at the end: the transport ceiling.
//   tcp_copy the same, but each receiver also copies every byte it reads on into a destination
//           far larger than the caches (--copy_ring_mib per stream, written round and round),
//           as any receiver that stages prompt KV into pinned memory must: the ceiling of a
//           transport that cannot receive straight into the staging memory (gRPC owns its receive
//           buffers). Not run by default.
//   engine  N threads writing prompts into an engine built like pkv-worker's
//           (Engine::BeginPrompt / PromptWrite::Write / Commit): the worker's share, no gRPC.
//   grpc    N WriteKV streams (client::WorkerClient, one thread each) against a worker: the
//           service path end to end.
// The worker is started in this process (service::WorkerServer on 127.0.0.1:0, the server
// pkv-worker runs, with --backend and the model shape of the flags), or is an external one
// (--target; its shape comes from Describe and the engine mode is skipped). Each prompt is
// released after its round. Payload values are finite fp16/bf16, so the worker's finite check
// runs as it does in production.
//
// With --thread_cpu it also prints where each mode's CPU went, by thread name (the worker names its
// threads: pkv-ingest, pkv-copy, pkv-decode, ...; gRPC names its own), over the measured rounds.
//
// Exit 0 after printing the table (also appended as markdown to --md); 1 on any error.
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <latch>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/worker_client.h"
#include "common/channel_args.h"
#include "common/dtype.h"
#include "common/model_shape.h"
#include "common/thread_priority.h"
#include "engine/engine.h"
#include "engine/engine_factory.h"
#include "service/allocator_tuning.h"
#include "service/worker_server.h"

ABSL_FLAG(std::string, streams, "1,8", "Comma-separated counts of concurrent streams to measure.");
ABSL_FLAG(std::string, modes, "tcp,engine,grpc", "Which of tcp, tcp_copy, engine, grpc to run (comma-separated).");
ABSL_FLAG(int32_t, copy_ring_mib, 256, "tcp_copy mode: MiB each receiver copies into, round and round.");
ABSL_FLAG(std::string, target, "",
          "host:port of a running pkv-worker to measure instead of an in-process one (the model "
          "shape then comes from its Describe; the engine mode is skipped).");
ABSL_FLAG(int64_t, prompt_tokens, 2048, "Tokens of each stream's prompt (one prompt per stream per round).");
ABSL_FLAG(int64_t, chunk_tokens, 256, "Tokens per WriteKV chunk (and per TCP chunk).");
ABSL_FLAG(int32_t, layers, 8, "In-process worker: layers.");
ABSL_FLAG(int32_t, hkv, 8, "In-process worker: KV heads.");
ABSL_FLAG(int32_t, d, 128, "In-process worker: head size.");
ABSL_FLAG(int32_t, page, 16, "In-process worker: tokens per page.");
ABSL_FLAG(std::string, backend, "cpu", "In-process worker and engine mode: cpu, cuda or auto.");
ABSL_FLAG(int32_t, ingest_threads, 4, "In-process worker: WriteKV executor threads (pkv-worker --ingest_threads).");
ABSL_FLAG(int32_t, stream_threads, 2,
          "In-process worker: StepStream completion-queue threads (pkv-worker --stream_threads); "
          "gRPC also does socket reads for every connection on them.");
ABSL_FLAG(int32_t, ingest_copy_threads, 4,
          "In-process worker and engine mode, CUDA backend: prompt KV copy helpers (pkv-worker "
          "--ingest_copy_threads).");
ABSL_FLAG(bool, own_connections, true,
          "grpc mode: each stream on a TCP connection of its own (false: all streams share one "
          "connection, gRPC's default for clients of one target).");
ABSL_FLAG(std::vector<std::string>, grpc_arg, {},
          "gRPC core channel arguments name=value, set on the in-process worker's server and on the "
          "clients (pkv-worker / pkv-replay --grpc_arg; e.g. grpc.http2.lookahead_bytes=8388608).");
ABSL_FLAG(int32_t, malloc_arenas, 2,
          "Cap glibc's malloc arenas at this many, as pkv-worker --malloc_arenas (0: glibc's default; "
          "MALLOC_ARENA_MAX wins).");
ABSL_FLAG(int32_t, repeats, 3, "Measured rounds per (mode, streams); the median is reported. One warm-up round precedes.");
ABSL_FLAG(bool, thread_cpu, true,
          "Also print each mode's CPU seconds per GB by thread name over the measured rounds (from "
          "/proc/self/task; threads that ended inside a round count under their name too).");
ABSL_FLAG(std::string, label, "", "Free text naming the machine, printed with the table (e.g. \"2-core VM, CPU backend\").");
ABSL_FLAG(std::string, md, "", "Also append the table as markdown to this file.");
ABSL_FLAG(std::string, commit, "unknown", "Commit recorded with --md.");

namespace pkv::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- CPU by thread -----------------------------------------------------------------------------

// CPU seconds (user + system) of this whole process so far: both ends of every mode run here.
double ProcessCpuSeconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// CPU seconds (user + system) of each live thread of this process, by thread id, with its name.
struct ThreadCpu {
  std::string name;
  double seconds = 0;
};
std::map<long, ThreadCpu> LiveThreadCpu() {
  std::map<long, ThreadCpu> out;
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return out;
  const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  while (const dirent* e = ::readdir(dir)) {
    long tid = 0;
    if (!absl::SimpleAtoi(e->d_name, &tid)) continue;
    std::ifstream in(absl::StrCat("/proc/self/task/", tid, "/stat"));
    std::string line;
    if (!std::getline(in, line)) continue;  // the thread ended meanwhile
    // "tid (name) state ppid ...": the name may hold spaces or parentheses, so cut at the last ')'.
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close < open) continue;
    std::vector<std::string> fields = absl::StrSplit(line.substr(close + 2), ' ');
    long utime = 0, stime = 0;  // fields 14 and 15 of stat; fields[0] is field 3
    if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &utime) || !absl::SimpleAtoi(fields[12], &stime)) continue;
    out[tid] = {line.substr(open + 1, close - open - 1), static_cast<double>(utime + stime) / tick};
  }
  ::closedir(dir);
  return out;
}

// Threads that end inside a round (the streams' senders, the TCP receivers) leave /proc before
// the round's end is read: each adds its own CPU time here, by name, as it ends.
std::mutex g_ended_mu;
std::map<std::string, std::pair<double, int>> g_ended;  // name -> (seconds, threads)

void AddThisThreadAsEnded(const char* name) {
  rusage u{};
  ::getrusage(RUSAGE_THREAD, &u);
  const double seconds = static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
                         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
  std::lock_guard<std::mutex> lock(g_ended_mu);
  auto& [total, count] = g_ended[name];
  total += seconds;
  ++count;
}

// What every stream sends: one prompt of `tokens` tokens of every layer, in `chunk`-token chunks,
// layer by layer, K and V [n, Hkv, d] each, sliced from a shared pool of finite values.
struct Plan {
  ModelShape shape;
  int64_t tokens = 0;
  int64_t chunk = 0;
  // Model-dtype bytes, a whole number of rows. Shared: the gRPC mode sends windows of them without
  // a copy (PromptWriter::WriteSharedChunk), and gRPC may hold them until after a stream ends.
  std::shared_ptr<const std::string> k_pool, v_pool;

  int64_t row_bytes() const { return int64_t{shape.num_kv_heads} * shape.head_dim * DTypeSize(shape.dtype); }
  int64_t stream_bytes() const { return 2 * tokens * row_bytes() * shape.num_layers; }
  // K and V of chunk (layer, token_offset, n): a window of the pools that moves with each chunk.
  std::string_view K(int32_t layer, int64_t off, int64_t n) const { return Window(*k_pool, layer, off, n); }
  std::string_view V(int32_t layer, int64_t off, int64_t n) const { return Window(*v_pool, layer, off, n); }
  // Calls `send(layer, offset, n)` for every chunk of one prompt, in order.
  template <typename Fn>
  absl::Status ForEachChunk(Fn send) const {
    for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
      for (int64_t off = 0; off < tokens; off += chunk) {
        if (absl::Status s = send(layer, off, std::min(chunk, tokens - off)); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  }

 private:
  std::string_view Window(const std::string& pool, int32_t layer, int64_t off, int64_t n) const {
    const int64_t rows = static_cast<int64_t>(pool.size()) / row_bytes();
    const int64_t first = (int64_t{layer} * tokens + off) % (rows - chunk);
    return std::string_view(pool).substr(first * row_bytes(), n * row_bytes());
  }
};

// Random finite values in [-2, -1] U [1, 2] in the model dtype (fp16 or bf16 bits).
std::string FinitePool(const ModelShape& shape, int64_t rows, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t elems = rows * shape.num_kv_heads * shape.head_dim;
  std::string out(static_cast<size_t>(elems) * 2, '\0');
  for (int64_t i = 0; i < elems; ++i) {
    const uint64_t r = rng();
    const uint16_t bits = shape.dtype == DType::kF16
                              ? static_cast<uint16_t>(0x3C00 | (r & 0x03FF) | ((r >> 15) & 0x8000))
                              : static_cast<uint16_t>(0x3F80 | (r & 0x007F) | ((r >> 15) & 0x8000));
    std::memcpy(out.data() + 2 * i, &bits, 2);
  }
  return out;
}

// Runs `body(stream)` on `streams` threads that start together; returns the wall seconds from the
// start to the last one's end, or its first error.
absl::StatusOr<double> RunStreams(int streams, const std::function<absl::Status(int)>& body) {
  std::latch ready(streams + 1);
  std::vector<absl::Status> results(streams);
  std::vector<std::thread> threads;
  std::latch go(1);
  for (int i = 0; i < streams; ++i) {
    threads.emplace_back([&, i] {
      NameThisThread("bench-stream");
      ready.count_down();
      go.wait();
      results[i] = body(i);
      AddThisThreadAsEnded("bench-stream");
    });
  }
  ready.arrive_and_wait();
  const Clock::time_point t0 = Clock::now();
  go.count_down();
  for (auto& t : threads) t.join();
  const double seconds = Since(t0);
  for (const absl::Status& s : results) {
    if (!s.ok()) return s;
  }
  return seconds;
}

// ---- tcp ---------------------------------------------------------------------------------------

absl::Status Errno(const char* what) { return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno))); }

absl::Status SendAll(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("send");
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// One round of `streams` loopback TCP connections moving the plan's bytes. With `copy_rings`
// (one per stream), each receiver also copies what it reads into its ring, wrapping around.
absl::StatusOr<double> TcpRound(const Plan& plan, int streams, std::vector<std::vector<char>>* copy_rings = nullptr) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  if (listener < 0) return Errno("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(listener, streams) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const absl::Status s = Errno("bind/listen");
    ::close(listener);
    return s;
  }
  // Receivers: read everything into one chunk-sized buffer each, then answer one byte.
  const size_t chunk_bytes = static_cast<size_t>(plan.chunk * plan.row_bytes());
  std::vector<std::thread> receivers;
  std::atomic<int64_t> received{0};
  for (int i = 0; i < streams; ++i) {
    receivers.emplace_back([&, i] {
      NameThisThread("bench-tcp-recv");
      const int fd = ::accept(listener, nullptr, nullptr);
      if (fd < 0) return;
      std::vector<char> buffer(chunk_bytes);
      std::vector<char>* ring = copy_rings != nullptr ? &(*copy_rings)[i] : nullptr;
      size_t at = 0;  // next byte of the ring to write
      int64_t got = 0;
      for (;;) {
        const ssize_t n = ::recv(fd, buffer.data(), buffer.size(), 0);
        if (n > 0) {
          got += n;
          for (size_t done = 0; ring != nullptr && done < static_cast<size_t>(n);) {
            const size_t piece = std::min(static_cast<size_t>(n) - done, ring->size() - at);
            std::memcpy(ring->data() + at, buffer.data() + done, piece);
            done += piece;
            at = (at + piece) % ring->size();
          }
        } else if (n == 0 || errno != EINTR) {
          break;
        }
      }
      received += got;
      const char ack = 1;
      (void)::send(fd, &ack, 1, MSG_NOSIGNAL);
      ::close(fd);
      AddThisThreadAsEnded("bench-tcp-recv");
    });
  }
  std::vector<int> fds(streams, -1);
  absl::Status connected;
  for (int i = 0; i < streams && connected.ok(); ++i) {
    fds[i] = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fds[i] < 0 || ::connect(fds[i], reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) connected = Errno("connect");
  }
  absl::StatusOr<double> seconds = absl::InternalError("tcp: not run");
  if (!connected.ok()) {
    seconds = connected;
  } else {
    seconds = RunStreams(streams, [&](int i) -> absl::Status {
      const int fd = fds[i];
      absl::Status s = plan.ForEachChunk([&](int32_t layer, int64_t off, int64_t n) -> absl::Status {
        if (absl::Status k = SendAll(fd, plan.K(layer, off, n)); !k.ok()) return k;
        return SendAll(fd, plan.V(layer, off, n));
      });
      if (!s.ok()) return s;
      ::shutdown(fd, SHUT_WR);
      char ack = 0;
      if (::recv(fd, &ack, 1, 0) != 1) return absl::InternalError("tcp: no answer from the receiver");
      return absl::OkStatus();
    });
  }
  for (int fd : fds) {
    if (fd >= 0) ::close(fd);
  }
  ::shutdown(listener, SHUT_RDWR);  // wakes receivers still in accept
  for (auto& t : receivers) t.join();
  ::close(listener);
  if (seconds.ok() && received.load() != plan.stream_bytes() * streams) {
    return absl::InternalError(absl::StrCat("tcp: received ", received.load(), " of ", plan.stream_bytes() * streams, " bytes"));
  }
  return seconds;
}

// ---- engine ------------------------------------------------------------------------------------

absl::StatusOr<double> EngineRound(engine::Engine& engine, const Plan& plan, int streams, uint64_t first_id) {
  absl::StatusOr<double> seconds = RunStreams(streams, [&](int i) -> absl::Status {
    absl::StatusOr<std::unique_ptr<engine::PromptWrite>> w = engine.BeginPrompt(first_id + i, plan.tokens, "");
    if (!w.ok()) return w.status();
    absl::Status s = plan.ForEachChunk([&](int32_t layer, int64_t off, int64_t n) {
      const std::string_view k = plan.K(layer, off, n), v = plan.V(layer, off, n);
      return (*w)->Write(layer, off, n, {reinterpret_cast<const uint8_t*>(k.data()), k.size()},
                         {reinterpret_cast<const uint8_t*>(v.data()), v.size()});
    });
    return s.ok() ? (*w)->Commit() : s;
  });
  std::vector<engine::SeqId> ids;
  for (int i = 0; i < streams; ++i) ids.push_back(first_id + i);
  if (seconds.ok()) {
    if (absl::Status s = engine.Release(ids, ""); !s.ok()) return s;
  }
  return seconds;
}

// ---- grpc --------------------------------------------------------------------------------------

absl::StatusOr<double> GrpcRound(std::vector<std::unique_ptr<client::WorkerClient>>& clients, const Plan& plan,
                                 int streams, uint64_t first_id) {
  absl::StatusOr<double> seconds = RunStreams(streams, [&](int i) -> absl::Status {
    absl::StatusOr<std::unique_ptr<client::PromptWriter>> w = clients[i]->BeginWriteKV(first_id + i, plan.tokens);
    if (!w.ok()) return w.status();
    absl::Status s = plan.ForEachChunk([&](int32_t layer, int64_t off, int64_t n) {
      return (*w)->WriteSharedChunk(layer, off, n, {plan.k_pool, plan.K(layer, off, n)},
                                    {plan.v_pool, plan.V(layer, off, n)});
    });
    return s.ok() ? (*w)->Finish() : s;
  });
  if (seconds.ok()) {
    std::vector<uint64_t> ids;
    for (int i = 0; i < streams; ++i) ids.push_back(first_id + i);
    if (absl::StatusOr<int64_t> freed = clients[0]->Release(ids); !freed.ok()) return freed.status();
  }
  return seconds;
}

// ---- driver ------------------------------------------------------------------------------------

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}


// CPU seconds per GB of one thread name over the measured rounds.
struct NamedCpu {
  std::string name;
  int threads = 0;
  double per_gb = 0;
};

struct Result {
  double gbps = -1;            // median over the rounds
  double cpu_per_gb = -1;      // median CPU seconds (both ends) per GB moved
  std::vector<NamedCpu> by_thread;  // all measured rounds together, largest first
};

// CPU by thread name between two points: live threads from /proc plus the threads that ended and
// added themselves; what neither holds (threads that ended unrecorded, tick rounding) is "other".
struct CpuMark {
  std::map<long, ThreadCpu> live;
  std::map<std::string, std::pair<double, int>> ended;
  double process = 0;
};
CpuMark MarkCpu() {
  CpuMark m;
  m.live = LiveThreadCpu();
  {
    std::lock_guard<std::mutex> lock(g_ended_mu);
    m.ended = g_ended;
  }
  m.process = ProcessCpuSeconds();
  return m;
}
std::vector<NamedCpu> CpuBetween(const CpuMark& a, const CpuMark& b, double gb) {
  std::map<std::string, std::pair<double, int>> by_name;
  double counted = 0;
  for (const auto& [tid, t] : b.live) {
    const auto before = a.live.find(tid);
    const double d = t.seconds - (before == a.live.end() ? 0.0 : before->second.seconds);
    by_name[t.name].first += d;
    ++by_name[t.name].second;
    counted += d;
  }
  for (const auto& [name, e] : b.ended) {
    const auto before = a.ended.find(name);
    const double d = e.first - (before == a.ended.end() ? 0.0 : before->second.first);
    const int n = e.second - (before == a.ended.end() ? 0 : before->second.second);
    if (n == 0) continue;
    by_name[name + " (ended)"] = {d, n};
    counted += d;
  }
  std::vector<NamedCpu> out;
  for (const auto& [name, v] : by_name) {
    if (v.first > 0) out.push_back({name, v.second, v.first / gb});
  }
  const double other = (b.process - a.process) - counted;
  if (other > 0.005) out.push_back({"other (ended unrecorded, tick rounding)", 0, other / gb});
  std::sort(out.begin(), out.end(), [](const NamedCpu& x, const NamedCpu& y) { return x.per_gb > y.per_gb; });
  return out;
}

// `round` (returning wall seconds): one warm-up, then the medians of `repeats`; gbps < 0 on
// error (printed).
Result Measure(const char* mode, int streams, int64_t bytes, int repeats,
               const std::function<absl::StatusOr<double>(int round)>& round) {
  std::vector<double> gbps, cpu;
  CpuMark first;
  for (int r = 0; r <= repeats; ++r) {
    if (r == 1) first = MarkCpu();
    const double cpu0 = ProcessCpuSeconds();
    absl::StatusOr<double> s = round(r);
    if (!s.ok()) {
      std::fprintf(stderr, "pkv-ingest-bench: %s, %d streams: %s\n", mode, streams, s.status().ToString().c_str());
      return {};
    }
    if (r > 0) {
      gbps.push_back(static_cast<double>(bytes) / *s / 1e9);
      cpu.push_back((ProcessCpuSeconds() - cpu0) / (static_cast<double>(bytes) / 1e9));
    }
  }
  return {Median(gbps), Median(cpu), CpuBetween(first, MarkCpu(), static_cast<double>(bytes) * repeats / 1e9)};
}

engine::EngineConfig EngineConfigFor(const ModelShape& shape, int64_t pages) {
  engine::EngineConfig c;
  c.shape = shape;
  c.backend = absl::GetFlag(FLAGS_backend);
  c.num_pages = pages;
  c.max_batch = 8;
  c.scatter_seed = 20260701;  // scattered physical pages, as in a long-running pool
  c.ingest_copy_threads = absl::GetFlag(FLAGS_ingest_copy_threads);
  return c;
}

int Main() {
  std::vector<int> stream_counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_streams), ',', absl::SkipEmpty())) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) {
      std::fprintf(stderr, "pkv-ingest-bench: --streams: '%s' is not a count >= 1\n", std::string(s).c_str());
      return 1;
    }
    stream_counts.push_back(n);
  }
  absl::StatusOr<std::vector<ChannelArg>> parsed_args = ParseChannelArgs(absl::GetFlag(FLAGS_grpc_arg), "--grpc_arg");
  if (!parsed_args.ok()) {
    std::fprintf(stderr, "pkv-ingest-bench: %s\n", parsed_args.status().ToString().c_str());
    return 1;
  }
  const std::vector<ChannelArg> grpc_args = *std::move(parsed_args);
  std::vector<std::string> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty())) {
    if (m != "tcp" && m != "tcp_copy" && m != "engine" && m != "grpc") {
      std::fprintf(stderr, "pkv-ingest-bench: --modes: '%s' is not one of tcp, tcp_copy, engine, grpc\n", std::string(m).c_str());
      return 1;
    }
    modes.emplace_back(m);
  }
  auto want_mode = [&](absl::string_view m) { return std::find(modes.begin(), modes.end(), m) != modes.end(); };
  const std::string target = absl::GetFlag(FLAGS_target);
  const bool run_tcp = want_mode("tcp");
  const bool run_tcp_copy = want_mode("tcp_copy");
  const bool run_engine = want_mode("engine") && target.empty();
  const bool run_grpc = want_mode("grpc");
  const int repeats = absl::GetFlag(FLAGS_repeats);
  if (stream_counts.empty() || repeats < 1 || absl::GetFlag(FLAGS_prompt_tokens) < 1 ||
      absl::GetFlag(FLAGS_chunk_tokens) < 1) {
    std::fprintf(stderr, "pkv-ingest-bench: need --streams, --repeats >= 1, --prompt_tokens >= 1, --chunk_tokens >= 1\n");
    return 1;
  }
  const int max_streams = *std::max_element(stream_counts.begin(), stream_counts.end());

  Plan plan;
  plan.tokens = absl::GetFlag(FLAGS_prompt_tokens);
  plan.chunk = std::min(absl::GetFlag(FLAGS_chunk_tokens), plan.tokens);
  plan.shape.num_layers = absl::GetFlag(FLAGS_layers);
  plan.shape.num_kv_heads = absl::GetFlag(FLAGS_hkv);
  plan.shape.num_q_heads = plan.shape.num_kv_heads * 4;
  plan.shape.head_dim = absl::GetFlag(FLAGS_d);
  plan.shape.page_size = absl::GetFlag(FLAGS_page);
  plan.shape.dtype = DType::kF16;

  // The worker: in this process unless --target.
  std::unique_ptr<service::WorkerServer> server;
  std::string address = target;
  const int64_t pages_per_prompt = (plan.tokens + plan.shape.page_size - 1) / plan.shape.page_size;
  if (target.empty()) {
    if (absl::Status s = plan.shape.Validate(); !s.ok()) {
      std::fprintf(stderr, "pkv-ingest-bench: %s\n", s.ToString().c_str());
      return 1;
    }
    if (run_grpc) {
      absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
          engine::BuildEngine(EngineConfigFor(plan.shape, pages_per_prompt * max_streams + 16));
      if (!engine.ok()) {
        std::fprintf(stderr, "pkv-ingest-bench: worker engine: %s\n", engine.status().ToString().c_str());
        return 1;
      }
      service::ServerOptions so;
      so.listen_address = "127.0.0.1:0";
      so.ingest_threads = absl::GetFlag(FLAGS_ingest_threads);
      so.stream_threads = absl::GetFlag(FLAGS_stream_threads);
      so.channel_args = grpc_args;
      so.max_message_bytes = std::max<int64_t>(64 << 20, 4 * plan.chunk * plan.row_bytes());
      absl::StatusOr<std::unique_ptr<service::WorkerServer>> started = service::WorkerServer::Start(so, *std::move(engine));
      if (!started.ok()) {
        std::fprintf(stderr, "pkv-ingest-bench: worker: %s\n", started.status().ToString().c_str());
        return 1;
      }
      server = *std::move(started);
      address = server->address();
    }
  }
  std::vector<std::unique_ptr<client::WorkerClient>> clients;
  if (run_grpc) {
    for (int i = 0; i < max_streams; ++i) {
      client::ClientOptions co;
      co.target = address;
      co.own_connection = absl::GetFlag(FLAGS_own_connections);
      co.channel_args = grpc_args;
      co.max_message_bytes = std::max<int64_t>(256 << 20, 4 * plan.chunk * plan.row_bytes());
      absl::StatusOr<std::unique_ptr<client::WorkerClient>> c = client::WorkerClient::Connect(co);
      if (!c.ok()) {
        std::fprintf(stderr, "pkv-ingest-bench: connect %s: %s\n", address.c_str(), c.status().ToString().c_str());
        return 1;
      }
      clients.push_back(*std::move(c));
    }
    if (!target.empty()) plan.shape = clients[0]->shape();
  }
  const int64_t pool_rows = std::max<int64_t>(4 * plan.chunk, (int64_t{32} << 20) / plan.row_bytes());
  plan.k_pool = std::make_shared<const std::string>(FinitePool(plan.shape, pool_rows, 1));
  plan.v_pool = std::make_shared<const std::string>(FinitePool(plan.shape, pool_rows, 2));

  std::unique_ptr<engine::Engine> engine;
  if (run_engine) {
    absl::StatusOr<std::unique_ptr<engine::Engine>> e =
        engine::BuildEngine(EngineConfigFor(plan.shape, pages_per_prompt * max_streams + 16));
    if (!e.ok()) {
      std::fprintf(stderr, "pkv-ingest-bench: engine: %s\n", e.status().ToString().c_str());
      return 1;
    }
    engine = *std::move(e);
  }

  const std::string label = absl::GetFlag(FLAGS_label);
  const std::string where =
      target.empty() ? absl::StrCat("in-process worker (", absl::GetFlag(FLAGS_backend), " backend, ",
                                    absl::GetFlag(FLAGS_ingest_threads), " ingest threads, ",
                                    absl::GetFlag(FLAGS_ingest_copy_threads), " copy helpers)")
                     : absl::StrCat("worker at ", target);
  const std::string setup = absl::StrCat(
      plan.tokens, "-token prompts, ", plan.shape.num_layers, " layers, Hkv ", plan.shape.num_kv_heads, ", d ",
      plan.shape.head_dim, ", ", DTypeName(plan.shape.dtype), ", ", plan.chunk, "-token chunks (",
      2 * plan.chunk * plan.row_bytes() / 1024, " KiB of K+V per chunk), ",
      static_cast<double>(plan.stream_bytes()) / (1 << 20), " MiB per stream; ", where, "; gRPC streams ",
      absl::GetFlag(FLAGS_own_connections) ? "on their own connections" : "sharing one connection",
      "; median of ", repeats, " rounds after one warm-up");
  std::string table =
      "| streams | tcp GB/s | engine GB/s | grpc GB/s | grpc / tcp | engine / tcp | CPU s/GB tcp | engine | grpc |" +
      std::string(run_tcp_copy ? " tcp_copy GB/s | grpc / tcp_copy | CPU s/GB tcp_copy |" : "") +
      "\n|---|---|---|---|---|---|---|---|---|" + std::string(run_tcp_copy ? "---|---|---|" : "") + "\n";
  std::vector<std::vector<char>> copy_rings;
  if (run_tcp_copy) {
    // Written once here, so that no round pays for first touches.
    const size_t ring_bytes = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_copy_ring_mib))) << 20;
    copy_rings.assign(static_cast<size_t>(max_streams), std::vector<char>(ring_bytes, 1));
  }
  std::printf("pkv-ingest-bench%s%s: %s\n", label.empty() ? "" : " on ", label.c_str(), setup.c_str());
  std::printf("%s", table.c_str());

  const bool thread_cpu = absl::GetFlag(FLAGS_thread_cpu);
  std::string threads_table =
      "| mode | streams | thread (live threads of that name) | CPU s/GB |\n|---|---|---|---|\n";
  uint64_t next_id = 1;
  auto cell = [](double v) { return v < 0 ? std::string("-") : absl::StrFormat("%.2f", v); };
  for (int n : stream_counts) {
    const int64_t bytes = plan.stream_bytes() * n;
    Result tcp, tcp_copy, eng, grpc;
    if (run_tcp && (tcp = Measure("tcp", n, bytes, repeats, [&](int) { return TcpRound(plan, n); })).gbps < 0) return 1;
    if (run_tcp_copy &&
        (tcp_copy = Measure("tcp_copy", n, bytes, repeats, [&](int) { return TcpRound(plan, n, &copy_rings); })).gbps < 0) {
      return 1;
    }
    if (run_engine && (eng = Measure("engine", n, bytes, repeats, [&](int) {
                         const uint64_t id = next_id;
                         next_id += n;
                         return EngineRound(*engine, plan, n, id);
                       })).gbps < 0) {
      return 1;
    }
    if (run_grpc && (grpc = Measure("grpc", n, bytes, repeats, [&](int) {
                       const uint64_t id = next_id;
                       next_id += n;
                       return GrpcRound(clients, plan, n, id);
                     })).gbps < 0) {
      return 1;
    }
    auto ratio = [&](const Result& a, const Result& b) { return a.gbps > 0 && b.gbps > 0 ? cell(a.gbps / b.gbps) : "-"; };
    const std::string row = absl::StrCat("| ", n, " | ", cell(tcp.gbps), " | ", cell(eng.gbps), " | ", cell(grpc.gbps),
                                         " | ", ratio(grpc, tcp), " | ", ratio(eng, tcp), " | ", cell(tcp.cpu_per_gb),
                                         " | ", cell(eng.cpu_per_gb), " | ", cell(grpc.cpu_per_gb), " |",
                                         run_tcp_copy ? absl::StrCat(" ", cell(tcp_copy.gbps), " | ", ratio(grpc, tcp_copy),
                                                                     " | ", cell(tcp_copy.cpu_per_gb), " |")
                                                      : "",
                                         "\n");
    std::printf("%s", row.c_str());
    std::fflush(stdout);
    table += row;
    for (const auto& [mode, r] : {std::pair<const char*, const Result*>{"tcp", &tcp}, {"tcp_copy", &tcp_copy},
                                  {"engine", &eng}, {"grpc", &grpc}}) {
      for (const NamedCpu& t : r->by_thread) {
        if (t.per_gb < 0.005) continue;
        threads_table += absl::StrCat("| ", mode, " | ", n, " | ", t.name,
                                      t.threads > 0 ? absl::StrCat(" (", t.threads, ")") : "", " | ",
                                      absl::StrFormat("%.3f", t.per_gb), " |\n");
      }
    }
  }
  if (thread_cpu) {
    std::printf("\nCPU by thread over the measured rounds (s/GB; threads under 0.005 left out):\n%s",
                threads_table.c_str());
  }
  if (const std::string md = absl::GetFlag(FLAGS_md); !md.empty()) {
    FILE* f = std::fopen(md.c_str(), "a");
    if (f == nullptr) {
      std::fprintf(stderr, "pkv-ingest-bench: cannot open %s\n", md.c_str());
      return 1;
    }
    std::fprintf(f, "\n## pkv-ingest-bench (commit %s)%s%s\n\n%s\n\n%s", absl::GetFlag(FLAGS_commit).c_str(),
                 label.empty() ? "" : ", ", label.c_str(), setup.c_str(), table.c_str());
    if (thread_cpu) std::fprintf(f, "\nCPU by thread over the measured rounds (s/GB):\n\n%s", threads_table.c_str());
    std::fclose(f);
  }
  if (server != nullptr) server->Shutdown(absl::Seconds(2));
  return 0;
}

}  // namespace
}  // namespace pkv::bench

int main(int argc, char** argv) {
  pkv::service::KeepFreedBuffersMapped();  // as pkv-worker does
  absl::SetProgramUsageMessage(
      "Prompt KV ingest bandwidth: WriteKV over loopback gRPC next to a raw loopback TCP stream "
      "of the same bytes and the engine alone, for N concurrent streams.\n"
      "  pkv-ingest-bench [--streams=1,8] [--modes=tcp,tcp_copy,engine,grpc] [--target=host:port] ...");
  absl::FlagsUsageConfig usage;
  // --help lists this program's flags (those defined in this file).
  usage.contains_help_flags = [](absl::string_view path) { return absl::StrContains(path, "ingest_rpc_main."); };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  pkv::service::LimitMallocArenas(absl::GetFlag(FLAGS_malloc_arenas));  // as pkv-worker does
  return pkv::bench::Main();
}
