// End-to-end test of the shipped binaries: pkv-worker and pkv-replay as subprocesses on
// loopback. Checks exit codes, the "listening on" line, that the worker exits 0 on SIGTERM, and
// `pkv-replay --describe_only` (the chart's `helm test` command) in plaintext and mutual TLS.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/test_certs.h"

namespace {

// Starts `argv` with stdout (and, with `with_stderr`, stderr) to a pipe returned in *out_fd;
// otherwise stderr is inherited.
pid_t Spawn(const std::vector<std::string>& argv, int* out_fd, bool with_stderr = false) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    if (with_stderr) dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  *out_fd = fds[0];
  return pid;
}

// Reads from `fd` until `marker` appears in a line or `timeout` passes; returns what was read.
std::string ReadUntil(int fd, const std::string& marker, std::chrono::milliseconds timeout) {
  std::string text;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (text.find(marker) == std::string::npos || text.find('\n', text.find(marker)) == std::string::npos) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    char buf[4096];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, n);
  }
  return text;
}

// Waits for `pid` up to `timeout`; returns its wait status, or -1 on timeout (then kills it).
int WaitFor(pid_t pid, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  return -1;
}

std::string DrainPipe(int fd) {
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) text.append(buf, n);
  return text;
}

// Runs pkv-replay with `args` to completion; returns its wait status and stdout.
int RunReplay(const std::vector<std::string>& args, std::string* out) {
  std::vector<std::string> argv = {PKV_REPLAY_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  int fd = -1;
  const pid_t pid = Spawn(argv, &fd);
  if (pid < 0) return -1;
  // Read while it runs so a full pipe cannot block it.
  std::string text;
  std::thread reader([&] { text = DrainPipe(fd); });
  const int status = WaitFor(pid, std::chrono::seconds(60));
  reader.join();
  close(fd);
  *out = text;
  return status;
}

TEST(WorkerProcessTest, ReplayAgainstTheWorkerBinaryThenSigtermExitsZero) {
  int worker_out = -1;
  const pid_t worker = Spawn({PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--num_layers=2",
                              "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64",
                              "--page_size=16", "--num_pages=1024", "--scatter_seed=17",
                              "--backend=cpu", "--cpu_threads=1", "--shutdown_grace_s=5"},
                             &worker_out);
  ASSERT_GT(worker, 0);
  const std::string banner = ReadUntil(worker_out, "pkv-worker listening on ", std::chrono::seconds(20));
  const size_t at = banner.find("pkv-worker listening on 127.0.0.1:");
  ASSERT_NE(at, std::string::npos) << "worker said: " << banner;
  const std::string port = banner.substr(at + 34, banner.find('\n', at) - at - 34);
  ASSERT_GT(std::atoi(port.c_str()), 0) << banner;
  const std::string target = "--target=127.0.0.1:" + port;

  std::string out;
  int status = RunReplay({target, "--workload=bimodal", "--num_requests=8", "--batch=4",
                          "--context_scale=0.02", "--max_output=16", "--check_fraction=0.2",
                          "--progress_s=1"},
                         &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("decode tokens/s"), std::string::npos) << out;
  EXPECT_NE(out.find("8/8 done"), std::string::npos) << out;
  EXPECT_NE(out.find("failures 0"), std::string::npos) << out;

  status = RunReplay({target, "--trace_csv=" PKV_TRACES_DIR "/azure_llm_2023_conv_head.csv",
                      "--num_requests=6", "--batch=3", "--context_scale=0.05", "--max_output=8",
                      "--check_fraction=0.1", "--stream=false"},
                     &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("6/6 done"), std::string::npos) << out;

  // Arrival times honoured: the run cannot finish before the last admitted request arrived.
  const auto t0 = std::chrono::steady_clock::now();
  status = RunReplay({target, "--trace_csv=" PKV_TRACES_DIR "/azure_llm_2023_code_head.csv",
                      "--honor_arrivals=true", "--num_requests=5", "--batch=2",
                      "--context_scale=0.02", "--max_output=4", "--check_fraction=0.1"},
                     &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("5/5 done"), std::string::npos) << out;
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(445));  // 5th arrival

  // A request that can never fit the pool is a clear error, not a hang.
  status = RunReplay({target, "--workload=homogeneous", "--num_requests=1"}, &out);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);

  // Two interleaved micro-batches and the Mooncake slice (with its block_hashes column), with a
  // JSON report; then a bad --micro_batches is refused before anything runs.
  const std::string json = ::testing::TempDir() + "/pkv_replay_report.json";
  std::remove(json.c_str());
  status = RunReplay({target, "--trace_csv=" PKV_TRACES_DIR "/mooncake_fast25_conversation_head.csv",
                      "--num_requests=6", "--batch=2", "--micro_batches=2", "--context_scale=0.005",
                      "--max_output=6", "--check_fraction=0.2", "--report_json=" + json},
                     &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("6/6 done"), std::string::npos) << out;
  EXPECT_NE(out.find("2 micro-batches"), std::string::npos) << out;
  EXPECT_NE(out.find("between tokens ms"), std::string::npos) << out;
  {
    std::ifstream in(json);
    const std::string report((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_FALSE(report.empty()) << "no " << json;
    EXPECT_EQ(report.front(), '{') << report;
    for (const char* key : {"\"requests_done\": 6", "\"micro_batches\": 2", "\"tbt_ms\"", "\"server_ms\"",
                            "\"kv_reserved_peak_bytes\"", "\"check_failures\": 0"}) {
      EXPECT_NE(report.find(key), std::string::npos) << key << " missing in " << report;
    }
  }
  status = RunReplay({target, "--micro_batches=0"}, &out);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);

  ASSERT_EQ(kill(worker, SIGTERM), 0);
  status = WaitFor(worker, std::chrono::seconds(20));
  close(worker_out);
  ASSERT_NE(status, -1) << "the worker did not exit after SIGTERM";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// A small CPU worker with `extra` flags. Returns its pid (or -1) with its API port, the stdout
// read up to the "listening on" line, and its stdout fd.
pid_t StartSmallWorker(const std::vector<std::string>& extra, std::string* port, std::string* banner,
                       int* fd) {
  std::vector<std::string> argv = {PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=",
                                   "--num_layers=2", "--num_q_heads=8", "--num_kv_heads=2",
                                   "--head_dim=64", "--page_size=16", "--num_pages=256",
                                   "--backend=cpu", "--cpu_threads=1", "--shutdown_grace_s=2"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  const pid_t pid = Spawn(argv, fd);
  if (pid < 0) return pid;
  *banner = ReadUntil(*fd, "pkv-worker listening on ", std::chrono::seconds(20));
  const std::string marker = "pkv-worker listening on 127.0.0.1:";
  const size_t at = banner->find(marker);
  if (at == std::string::npos) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    close(*fd);
    return -1;
  }
  *port = banner->substr(at + marker.size(), banner->find('\n', at) - at - marker.size());
  return pid;
}

// SIGTERM, then expects a clean exit 0.
void StopWorker(pid_t pid, int fd) {
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  const int status = WaitFor(pid, std::chrono::seconds(20));
  close(fd);
  ASSERT_NE(status, -1) << "the worker did not exit after SIGTERM";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(WorkerProcessTest, DescribeOnlyPrintsTheWorkerAndExitsZero) {
  std::string port, banner;
  int fd = -1;
  const pid_t worker = StartSmallWorker({}, &port, &banner, &fd);
  ASSERT_GT(worker, 0) << "worker said: " << banner;
  std::string out;
  // The chart's `helm test` command, plaintext.
  int status = RunReplay({"--describe_only", "--connect_timeout_s=30", "--target=127.0.0.1:" + port}, &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("(plaintext)"), std::string::npos) << out;
  EXPECT_NE(out.find("layers=2 hq=8 hkv=2 d=64 page=16 dtype=fp16"), std::string::npos) << out;
  EXPECT_NE(out.find("backend:  cpu"), std::string::npos) << out;
  EXPECT_NE(out.find("256/256 pages free"), std::string::npos) << out;
  EXPECT_NE(out.find("serving:  yes"), std::string::npos) << out;
  EXPECT_EQ(out.find("decode tokens/s"), std::string::npos) << "describe_only ran a workload: " << out;
  StopWorker(worker, fd);

  status = RunReplay({"--describe_only", "--connect_timeout_s=1", "--target=127.0.0.1:1"}, &out);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);
}

// pkv-worker --attention=skip and a steady-decode pkv-replay against it: Describe names the mode,
// the replay checks nothing, exits 0 and writes the stage breakdown and its CPU time; an
// unknown --attention value is refused.
TEST(WorkerProcessTest, SkipAttentionWorkerAndTheReplaysBreakdown) {
  std::string port, banner;
  int fd = -1;
  const pid_t worker = StartSmallWorker({"--attention=skip"}, &port, &banner, &fd);
  ASSERT_GT(worker, 0) << "worker said: " << banner;
  const std::string target = "--target=127.0.0.1:" + port;
  std::string out;
  int status = RunReplay({"--describe_only", target}, &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_NE(out.find("backend:  cpu+skip"), std::string::npos) << out;
  const std::string json = ::testing::TempDir() + "/pkv_replay_skip.json";
  std::remove(json.c_str());
  status = RunReplay({target, "--workload=homogeneous", "--num_requests=4", "--batch=2", "--micro_batches=2",
                      "--prefill_ahead=4", "--wait_for_prefill", "--context_scale=0.001", "--max_output=8",
                      "--warmup_steps=2", "--check_fraction=1", "--payload_rows=64", "--report_json=" + json},
                     &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("4/4 done"), std::string::npos) << out;
  EXPECT_NE(out.find("the worker skips attention"), std::string::npos) << out;
  EXPECT_NE(out.find("layer step breakdown"), std::string::npos) << out;
  EXPECT_NE(out.find("client cpu"), std::string::npos) << out;
  {
    std::ifstream in(json);
    const std::string report((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (const char* key : {"\"attention_skipped\": true", "\"outputs_checked\": 0", "\"breakdown_ms\"",
                            "\"round_trip\"", "\"client_thread_cpu_ms\"", "\"payload_rows\": 64"}) {
      EXPECT_NE(report.find(key), std::string::npos) << key << " missing in " << report;
    }
  }
  StopWorker(worker, fd);

  int bad_fd = -1;
  const pid_t bad = Spawn({PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=", "--backend=cpu",
                           "--num_pages=16", "--attention=maybe"},
                          &bad_fd);
  ASSERT_GT(bad, 0);
  status = WaitFor(bad, std::chrono::seconds(20));
  close(bad_fd);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);
}

TEST(WorkerProcessTest, MutualTlsWorkerWithHealthPortAndTheChartsDescribeOnly) {
  if (!pkv::testing_certs::HaveOpenssl()) {
    GTEST_SKIP() << "the openssl command line is not installed (scripts/setup.sh installs it)";
  }
  bool ok = false;
  const pkv::testing_certs::TestCerts certs = pkv::testing_certs::MakeTestCerts(&ok);
  ASSERT_TRUE(ok);
  // The flags the chart's Deployment passes with tls.enabled and tls.requireClientCert.
  std::string port, banner;
  int fd = -1;
  const pid_t worker = StartSmallWorker(
      {"--tls_cert_file=" + certs.server_crt, "--tls_key_file=" + certs.server_key,
       "--tls_client_ca_file=" + certs.ca_crt, "--health_listen=127.0.0.1:0"},
      &port, &banner, &fd);
  ASSERT_GT(worker, 0) << "worker said: " << banner;
  EXPECT_NE(banner.find("pkv-worker health on port "), std::string::npos) << banner;

  // The test pod's command with the TLS flags the chart appends.
  std::string out;
  int status = RunReplay({"--describe_only", "--connect_timeout_s=30", "--target=127.0.0.1:" + port,
                          "--tls_ca_file=" + certs.ca_crt, "--tls_cert_file=" + certs.client_crt,
                          "--tls_key_file=" + certs.client_key},
                         &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("(mutual TLS)"), std::string::npos) << out;
  EXPECT_NE(out.find("layers=2 hq=8 hkv=2 d=64 page=16 dtype=fp16"), std::string::npos) << out;

  // Without a client certificate, and in plaintext: refused, exit 2.
  status = RunReplay({"--describe_only", "--connect_timeout_s=2", "--target=127.0.0.1:" + port,
                      "--tls_ca_file=" + certs.ca_crt},
                     &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  status = RunReplay({"--describe_only", "--connect_timeout_s=2", "--target=127.0.0.1:" + port}, &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  StopWorker(worker, fd);

  // A certificate without its key is a start-up error (exit 2), not a plaintext server.
  int bad_fd = -1;
  const pid_t bad = Spawn({PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=",
                           "--num_layers=2", "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64",
                           "--num_pages=64", "--backend=cpu", "--tls_cert_file=" + certs.server_crt},
                          &bad_fd);
  ASSERT_GT(bad, 0);
  status = WaitFor(bad, std::chrono::seconds(20));
  close(bad_fd);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);
  pkv::testing_certs::RemoveTestCerts(certs);
}

TEST(WorkerProcessTest, ReplayFailsCleanlyWithoutAWorker) {
  std::string out;
  const int status = RunReplay({"--target=127.0.0.1:1", "--connect_timeout_s=1", "--num_requests=1"}, &out);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);
}

// Runs pkv-worker with `args` (stdout and stderr into *out) and returns its wait status; -1 when
// it was still running after `timeout` (then it has been killed).
int RunWorker(const std::vector<std::string>& args, std::string* out,
              std::chrono::seconds timeout = std::chrono::seconds(30)) {
  std::vector<std::string> argv = {PKV_WORKER_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  int fd = -1;
  const pid_t pid = Spawn(argv, &fd, /*with_stderr=*/true);
  if (pid < 0) return -1;
  std::string text;
  std::thread reader([&] { text = DrainPipe(fd); });
  const int status = WaitFor(pid, timeout);
  reader.join();
  close(fd);
  *out = text;
  return status;
}

// Two KV pool sizes given: start-up stops with exit 2 and a message naming both settings.
TEST(WorkerProcessTest, WorkerRefusesTwoPoolSizesNamingThem) {
  std::string out;
  const int status = RunWorker({"--listen=127.0.0.1:0", "--metrics_listen=", "--backend=cpu", "--num_layers=2",
                                "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64", "--num_pages=64",
                                "--kv_pool_bytes=1073741824"},
                               &out);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("--num_pages=64"), std::string::npos) << out;
  EXPECT_NE(out.find("--kv_pool_bytes=1073741824"), std::string::npos) << out;
  EXPECT_NE(out.find("set only one of"), std::string::npos) << out;
  EXPECT_EQ(out.find("pkv-worker listening on"), std::string::npos) << out;
}

// --backend=cuda never serves on the CPU: without a usable GPU it exits 2 naming the flag.
TEST(WorkerProcessTest, WorkerWithBackendCudaAndNoGpuExitsNamingTheFlag) {
  std::vector<std::string> argv = {PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=", "--backend=cuda",
                                   "--num_layers=2", "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64",
                                   "--num_pages=64"};
  int fd = -1;
  const pid_t worker = Spawn(argv, &fd, /*with_stderr=*/true);
  ASSERT_GT(worker, 0);
  // Either it serves (a GPU is usable here) or it exits: ReadUntil returns at EOF.
  const std::string out = ReadUntil(fd, "pkv-worker listening on ", std::chrono::seconds(60));
  if (out.find("pkv-worker listening on ") != std::string::npos) {
    kill(worker, SIGTERM);
    WaitFor(worker, std::chrono::seconds(20));
    close(fd);
    GTEST_SKIP() << "a GPU is usable here";
  }
  const int status = WaitFor(worker, std::chrono::seconds(20));
  close(fd);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("--backend=cuda"), std::string::npos) << out;
  EXPECT_NE(out.find("--backend=cpu"), std::string::npos) << out;
}

// --help says how the pool is sized on each backend and what happens when two sizes are set.
TEST(WorkerProcessTest, HelpExplainsPoolSizingAndBackends) {
  std::string raw;
  RunWorker({"--help"}, &raw);
  std::string out;  // --help wraps lines: compare with every whitespace run as one space
  for (const char c : raw) {
    const bool space = c == ' ' || c == '\n';
    if (!space || out.empty() || out.back() != ' ') out += space ? ' ' : c;
  }
  for (const char* needle : {"--num_pages", "--kv_pool_bytes", "--gpu_memory_fraction", "on every backend",
                             "Set at most one of", "start-up fails", "no GPU is usable"}) {
    EXPECT_NE(out.find(needle), std::string::npos) << needle << " missing from:\n" << out;
  }
}

TEST(WorkerProcessTest, WorkerRejectsABadShapeWithExitCode2) {
  int fd = -1;
  const pid_t worker = Spawn({PKV_WORKER_BIN, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--head_dim=100"}, &fd);
  ASSERT_GT(worker, 0);
  const int status = WaitFor(worker, std::chrono::seconds(20));
  close(fd);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2);
}

}  // namespace
