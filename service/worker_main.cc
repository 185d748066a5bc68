// pkv-worker: the PersistentKV decode-attention worker (gRPC API v1, health, reflection).
//
// The gRPC port is plaintext, TLS (--tls_cert_file/--tls_key_file) or mutual TLS (plus
// --tls_client_ca_file); --health_listen adds a plaintext grpc.health.v1-only port for probes.
// Starts the engine for one model shape, serves it, prints
//   pkv-worker listening on HOST:PORT
// on stdout once ready, and on SIGTERM/SIGINT drains (health NOT_SERVING, new token steps and
// prompts refused with UNAVAILABLE), lets open token steps and prompts finish within
// --shutdown_grace_s, stops and exits 0.
#include <pthread.h>
#include <signal.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "common/channel_args.h"
#include "common/log.h"
#include "common/metrics.h"
#include "engine/engine_factory.h"
#include "prometheus/exposer.h"
#include "service/allocator_tuning.h"
#include "service/metrics_observer.h"
#include "service/worker_server.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051",
          "Address to listen on: host:port (port 0 picks a free port; e.g. 127.0.0.1:0), or "
          "unix:PATH, a Unix domain socket for routers on the same host (no TCP stack on the decode "
          "path).");
ABSL_FLAG(int32_t, num_layers, 32, "Attention layers of the served model.");
ABSL_FLAG(int32_t, num_q_heads, 32, "Query heads Hq.");
ABSL_FLAG(int32_t, num_kv_heads, 8, "KV heads Hkv (Hq must be a multiple).");
ABSL_FLAG(int32_t, head_dim, 128, "Head size d: 64, 128 or 256.");
ABSL_FLAG(int32_t, page_size, 16, "Tokens per KV page.");
ABSL_FLAG(std::string, dtype, "fp16", "Dtype of q, K, V and outputs: fp16 or bf16.");
ABSL_FLAG(int64_t, num_pages, 0,
          "KV pool size in pages (each holds page_size tokens of every layer), on every backend. "
          "0: not set. Set at most one of --num_pages, --kv_pool_bytes and --gpu_memory_fraction "
          "(start-up fails otherwise); with none set, the CPU backend's pool is 1 GiB of host memory "
          "and the CUDA backend's 0.85 of the free device memory.");
ABSL_FLAG(int64_t, kv_pool_bytes, 0,
          "KV pool size in bytes (all layers; rounded down to whole pages), on every backend: host "
          "memory on the CPU backend, device memory on the CUDA backend. 0: not set (see --num_pages).");
ABSL_FLAG(std::string, backend, "auto",
          "Execution backend: auto (CUDA when compiled in and a GPU is usable, else CPU, with a "
          "warning), cpu, or cuda (start-up fails when no GPU is usable: use it wherever a GPU is "
          "expected).");
ABSL_FLAG(int32_t, cpu_threads, 0, "Threads of the CPU backend's attention; 0: hardware concurrency.");
ABSL_FLAG(int32_t, max_batch, 256, "Most rows one Step may carry.");
ABSL_FLAG(uint64_t, scatter_seed, 0,
          "0: hand out pages in ascending order; otherwise a seeded random permutation.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{64} << 20, "gRPC max request/response message size, in [1 MiB, 2 GiB).");
ABSL_FLAG(int32_t, service_threads, 2,
          "Threads that run decode steps (Step, StepStream), Describe and Release; token steps of "
          "different micro-batches run on them concurrently.");
ABSL_FLAG(int32_t, service_spin_us, -1,
          "Microseconds an idle service thread polls for the next decode step before it sleeps: the "
          "next layer-step then starts without a thread wake-up (tens of microseconds), at the price "
          "of that much CPU after each step; at most 2 threads poll at once. 0: sleep at once. "
          "-1 (automatic): 1000 on the CUDA backend (a layer-step's answer comes back well within "
          "that), 0 on the CPU backend (its attention needs every core).");
ABSL_FLAG(int32_t, stream_threads, 2,
          "Threads that read and write StepStream messages, each polling its own completion queue "
          "(a stream stays on one): after a message a thread keeps polling for --service_spin_us "
          "before it blocks, so the next layer-step's request is read without a thread wake-up.");
ABSL_FLAG(int32_t, service_queue, 64,
          "Engine tasks that may wait for a service thread before new work gets RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, ingest_threads, 4,
          "Threads that write prompt KV (WriteKV); separate from --service_threads so that prefill "
          "ingest never queues in front of decode steps.");
ABSL_FLAG(int32_t, ingest_copy_threads, 4,
          "CUDA backend: threads that help the --ingest_threads scan prompt KV for NaN/inf and copy "
          "it into the pinned buffers the GPU's copy engine reads (one core does either at a fraction "
          "of what the copy engine takes); asleep while no prompt arrives. 0: each ingest thread "
          "works alone, which can be faster when every core is already busy with WriteKV streams.");
ABSL_FLAG(int32_t, ingest_nice, 10,
          "Linux nice value (0-19) of the threads that only ingest prompt KV (--ingest_threads and the CUDA "
          "backend's --ingest_copy_threads): where they and decode compete for a core, decode runs first; "
          "where cores are free nothing changes. 0: the same priority as decode.");
ABSL_FLAG(int32_t, attention_timing_interval, 8,
          "CUDA backend: time the attention's device time (pkv_step_attention_seconds, the cost-model "
          "counters, StepResponse.attend_seconds) on one layer-step in this many per descriptor slot, "
          "1-1024; the two GPU events cost each timed layer-step about 3 us. 1: every layer-step.");
ABSL_FLAG(int32_t, ingest_queue, 64,
          "WriteKV tasks that may wait for an ingest thread before a new WriteKV gets RESOURCE_EXHAUSTED.");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9400",
          "host:port of the Prometheus exposition (/metrics); empty disables it.");
ABSL_FLAG(std::string, calibration_profile, "",
          "Cost-model profile JSON written by pkv-calibrate; empty: built-in conservative defaults.");
ABSL_FLAG(std::string, fixed_kernel, "",
          "Run every step with one route (per_request, sequence_split, workqueue; reference on the CPU) "
          "instead of the adaptive scheduler: comparisons and debugging.");
ABSL_FLAG(double, gpu_memory_fraction, 0,
          "CUDA backend only: KV pool size as this share, in (0, 1], of the device memory free at "
          "start-up. 0: not set (see --num_pages; unset everywhere, the CUDA backend uses 0.85). "
          "Start-up fails when it is set and the CPU backend serves.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain of the gRPC port; with --tls_key_file serves TLS (empty: plaintext).");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "With TLS: PEM CA bundle; clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(int32_t, tls_reload_s, 30,
          "With TLS: read --tls_cert_file, --tls_key_file and --tls_client_ca_file again this often "
          "(seconds, at least 1); new connections use what they hold, so a rotated certificate needs no "
          "restart.");
ABSL_FLAG(std::string, health_listen, "",
          "host:port of a second, plaintext gRPC server that serves only grpc.health.v1 (same "
          "status as the gRPC port) for Kubernetes probes when that port uses TLS; empty: none.");
ABSL_FLAG(int64_t, static_slot_tokens, 0,
          "Static baseline for comparisons: > 0 makes every sequence reserve pages for this many tokens "
          "at creation, like a fixed-shape engine without a pager (0: paged growth).");
ABSL_FLAG(std::string, attention, "run",
          "run: compute attention. skip: every layer-step does all host work (pager, plan, "
          "descriptor, validation, RPC) but writes no KV and computes no attention, and answers "
          "zero outputs with StepResponse.attention_skipped set; Describe reports the backend as "
          "cpu+skip / cuda+skip. For measuring the transport and host floor, never for serving.");
ABSL_FLAG(double, shutdown_grace_s, 10.0,
          "On SIGTERM/SIGINT: health turns NOT_SERVING and new token steps and prompts get UNAVAILABLE "
          "at once; the API port stays open up to this many seconds while open token steps and prompts "
          "being written finish (later layers, Describe and Release still run), then what remains is "
          "cancelled and the worker exits 0.");
ABSL_FLAG(int32_t, retry_window, 32,
          "Completed token steps (worker-wide) whose outputs are kept, so that a lost answer of any of "
          "their layers can be asked for again; older ids are remembered a while longer and a resent "
          "one gets FAILED_PRECONDITION instead of appending twice.");
ABSL_FLAG(int64_t, max_prompt_tokens, 0,
          "Most tokens one WriteKV prompt may hold (checked before any page is reserved); 0: the pool's "
          "token capacity.");
ABSL_FLAG(int64_t, max_sequences, 0, "Most sequences held at once (steppable or being written); 0: 65536.");
ABSL_FLAG(bool, check_finite, true,
          "Refuse NaN or infinity in q, k, v and prompt K,V with INVALID_ARGUMENT naming the tensor and "
          "element (a non-finite K or V would poison every later output of its sequence).");
ABSL_FLAG(double, token_step_idle_s, 30,
          "Lease of an open token step: aborted (its rows lose the token it appended) when no layer of it "
          "began or finished for this many seconds; 0: never.");
ABSL_FLAG(double, prompt_idle_s, 60,
          "Lease of a WriteKV stream: cancelled (its sequence and pages released) when no message came for "
          "this many seconds; 0: never.");
ABSL_FLAG(int64_t, shared_memory_max_bytes, int64_t{1} << 30,
          "Largest POSIX shared-memory object a StepStream may name (request metadata x-pkv-shared-memory): "
          "a router on the same host then passes q, k, v and the outputs through it instead of in the "
          "messages. On the CUDA backend the region is also pinned for the GPU while its stream lasts. "
          "0: off.");
ABSL_FLAG(int32_t, malloc_arenas, 2,
          "Cap glibc's malloc arenas at this many (0: glibc's default, 8 per core; the MALLOC_ARENA_MAX "
          "environment variable wins). Fewer arenas made WriteKV on 8 streams faster on a 16-core host.");
ABSL_FLAG(double, sequence_idle_s, 0,
          "Lease of a sequence: released when it was in no token step for this many seconds; 0: never "
          "(routers free their sequences with Release or `free`).");
ABSL_FLAG(double, keepalive_s, 30,
          "HTTP/2 keepalive: ping every connection this often; one that does not answer within "
          "--keepalive_timeout_s is dropped (its streams are cancelled). 0: no pings.");
ABSL_FLAG(double, keepalive_timeout_s, 10, "Seconds a keepalive ping may go unanswered.");
ABSL_FLAG(std::vector<std::string>, grpc_arg, {},
          "Extra gRPC channel arguments of the API server, name=value, comma-separated or the flag "
          "repeated (e.g. grpc.http2.max_frame_size=1048576); integers are passed as integers. One the "
          "worker sets itself (keepalive) replaces its setting; message sizes are --max_message_bytes's.");
ABSL_FLAG(double, liveness_stall_s, 60,
          "Liveness: the grpc.health.v1 service pkv.v1.Liveness turns NOT_SERVING when the engine "
          "heartbeat (a probe queued on the decode threads every second that takes the engine lock) has "
          "not got through for this many seconds, and SERVING again when it does; it stays SERVING while "
          "draining. Keep it above the longest wait a full --service_queue can cause. 0: no heartbeat.");

namespace {

int Run() {
  // Block the stop signals in every thread (gRPC's and the executor's inherit this mask); this
  // thread waits for them with sigwait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  pkv::engine::EngineConfig config;
  config.shape.num_layers = absl::GetFlag(FLAGS_num_layers);
  config.shape.num_q_heads = absl::GetFlag(FLAGS_num_q_heads);
  config.shape.num_kv_heads = absl::GetFlag(FLAGS_num_kv_heads);
  config.shape.head_dim = absl::GetFlag(FLAGS_head_dim);
  config.shape.page_size = absl::GetFlag(FLAGS_page_size);
  auto dtype = pkv::ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) {
    PKV_LOG(ERROR) << "--dtype: " << dtype.status();
    return 2;
  }
  config.shape.dtype = *dtype;
  config.num_pages = absl::GetFlag(FLAGS_num_pages);
  config.kv_pool_bytes = absl::GetFlag(FLAGS_kv_pool_bytes);
  config.backend = absl::GetFlag(FLAGS_backend);
  config.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  config.ingest_copy_threads = absl::GetFlag(FLAGS_ingest_copy_threads);
  config.ingest_nice = absl::GetFlag(FLAGS_ingest_nice);
  config.attention_timing_interval = absl::GetFlag(FLAGS_attention_timing_interval);
  config.max_batch = absl::GetFlag(FLAGS_max_batch);
  config.scatter_seed = absl::GetFlag(FLAGS_scatter_seed);
  config.gpu_memory_fraction = absl::GetFlag(FLAGS_gpu_memory_fraction);
  config.calibration_profile = absl::GetFlag(FLAGS_calibration_profile);
  config.fixed_kernel = absl::GetFlag(FLAGS_fixed_kernel);
  config.static_slot_tokens = absl::GetFlag(FLAGS_static_slot_tokens);
  config.retry_window = absl::GetFlag(FLAGS_retry_window);
  config.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  config.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  config.check_finite = absl::GetFlag(FLAGS_check_finite);
  config.token_step_idle_seconds = absl::GetFlag(FLAGS_token_step_idle_s);
  config.sequence_idle_seconds = absl::GetFlag(FLAGS_sequence_idle_s);
  config.attention = absl::GetFlag(FLAGS_attention);

  auto engine = pkv::engine::BuildEngine(config);
  if (!engine.ok()) {
    PKV_LOG(ERROR) << "cannot create the engine: " << engine.status();
    return 2;
  }
  // Metrics: every family bound now; engine events feed them through the observer.
  const pkv::engine::EngineInfo info = (*engine)->Info();
  pkv::BuildInfo build;
  build.version = PKV_VERSION;
  build.commit = PKV_COMMIT;
  build.backend = info.backend;
  build.gpu = absl::StartsWith(info.backend, "cpu") ? "none" : info.device;
  build.dtype = pkv::DTypeName(info.shape.dtype);
  build.calibration_profile = config.calibration_profile.empty() ? "default" : config.calibration_profile;
  pkv::WorkerMetrics metrics(build);
  pkv::service::MetricsObserver observer(&metrics);
  (*engine)->SetObserver(&observer);
  std::unique_ptr<prometheus::Exposer> exposer;
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (!metrics_listen.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(metrics_listen);
    } catch (const std::exception& e) {
      PKV_LOG(ERROR) << "--metrics_listen=" << metrics_listen << ": cannot serve metrics: " << e.what();
      return 2;
    }
    exposer->RegisterCollectable(metrics.registry());
    const auto ports = exposer->GetListeningPorts();
    PKV_LOG(INFO) << "metrics on http://" << metrics_listen.substr(0, metrics_listen.rfind(':')) << ":"
                  << (ports.empty() ? 0 : ports.front()) << "/metrics";
    std::printf("pkv-worker metrics on port %d\n", ports.empty() ? 0 : ports.front());
  }

  pkv::service::ServerOptions options;
  options.metrics = &metrics;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.executor_threads = absl::GetFlag(FLAGS_service_threads);
  options.executor_queue = absl::GetFlag(FLAGS_service_queue);
  options.executor_spin_us = absl::GetFlag(FLAGS_service_spin_us);
  options.stream_threads = absl::GetFlag(FLAGS_stream_threads);
  options.ingest_threads = absl::GetFlag(FLAGS_ingest_threads);
  options.ingest_nice = absl::GetFlag(FLAGS_ingest_nice);
  options.ingest_queue = absl::GetFlag(FLAGS_ingest_queue);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  options.tls_reload_seconds = absl::GetFlag(FLAGS_tls_reload_s);
  options.health_listen_address = absl::GetFlag(FLAGS_health_listen);
  options.prompt_idle_seconds = absl::GetFlag(FLAGS_prompt_idle_s);
  options.shared_memory_max_bytes = absl::GetFlag(FLAGS_shared_memory_max_bytes);
  options.keepalive_seconds = absl::GetFlag(FLAGS_keepalive_s);
  options.keepalive_timeout_seconds = absl::GetFlag(FLAGS_keepalive_timeout_s);
  options.liveness_stall_seconds = absl::GetFlag(FLAGS_liveness_stall_s);
  {
    absl::StatusOr<std::vector<pkv::ChannelArg>> args =
        pkv::ParseChannelArgs(absl::GetFlag(FLAGS_grpc_arg), "--grpc_arg");
    absl::Status checked = args.ok() ? pkv::CheckChannelArgs(*args, "--grpc_arg", "the message size limit is --max_message_bytes") : args.status();
    if (!checked.ok()) {
      PKV_LOG(ERROR) << checked.message();
      return 2;
    }
    options.channel_args = *std::move(args);
    if (!options.channel_args.empty()) {
      PKV_LOG(INFO) << "gRPC channel arguments: " << pkv::ChannelArgsToString(options.channel_args);
    }
  }
  auto server = pkv::service::WorkerServer::Start(options, *std::move(engine));
  if (!server.ok()) {
    PKV_LOG(ERROR) << "cannot start the server: " << server.status();
    return 2;
  }
  pkv::service::WorkerServer* served = server->get();
  pkv::service::PoolSampler sampler(&served->engine(), &metrics, [served] { return !served->draining(); });
  PKV_LOG(INFO) << "serving pkv.v1.PersistentKV + grpc.health.v1 (readiness; liveness as "
                << pkv::service::kLivenessService << ") + reflection ("
                << served->security_mode() << ")";
  if (served->health_port() != 0) {
    std::printf("pkv-worker health on port %d\n", served->health_port());
  }
  std::printf("pkv-worker listening on %s\n", (*server)->address().c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  const absl::Duration grace = absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_s));
  PKV_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining, grace "
                << absl::FormatDuration(grace);
  (*server)->Shutdown(grace);
  sampler.Stop();
  server->get()->engine().SetObserver(nullptr);
  server->reset();
  PKV_LOG(INFO) << "pkv-worker exited cleanly";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  pkv::service::KeepFreedBuffersMapped();
  absl::SetProgramUsageMessage(
      "PersistentKV decode-attention worker.\n"
      "  pkv-worker --listen=127.0.0.1:0 --num_layers=4 --num_q_heads=8 --num_kv_heads=2 "
      "--head_dim=64 --num_pages=4096 --backend=cpu\n"
      "  pkv-worker --backend=cuda --kv_pool_bytes=34359738368   (a 32 GiB pool on the GPU)");
  absl::FlagsUsageConfig usage;
  // --help lists this program's flags (those defined in worker_main.cc).
  usage.contains_help_flags = [](absl::string_view path) { return absl::StrContains(path, "worker_main."); };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  pkv::service::LimitMallocArenas(absl::GetFlag(FLAGS_malloc_arenas));  // before any thread starts
  return Run();
}
