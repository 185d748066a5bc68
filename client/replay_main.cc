// pkv-replay: plays the prefill/router tier against a pkv-worker.
//
// Describe; then for each request of a workload, WriteKV of its prompt (all layers, random
// normal K,V) and decode with continuous batching (--batch rows, all layers per token step),
// checking a sample of outputs (--check_fraction) against an independent double-precision
// reference. q/K/V come from a pool of pre-generated rows (--payload_rows), so the client stays
// cheap next to the worker. Prints progress on long runs and, at the end, decode tokens/s, step
// latency percentiles, the client's own CPU time and a per-stage breakdown of a layer-step
// (client, transport, worker, device). Against a worker started with --attention=skip
// (StepResponse.attention_skipped) no output is checked. Exits 1 when an output check fails, 2 on
// any other error.
//
// --describe_only (the chart's `helm test` pod): connect, Describe, print the worker's shape, pool
// and backend, exit 0; exit 2 with the status when the worker cannot be reached or Describe fails.
// --tls_ca_file turns TLS on; --tls_cert_file/--tls_key_file add a client certificate (mTLS).
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "client/replay.h"
#include "client/worker_client.h"
#include "common/channel_args.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/workload.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "Worker address host:port.");
ABSL_FLAG(std::string, workload, "uniform",
          "Synthetic workload: uniform, bimodal, zipf, bucketed, homogeneous (ignored with --trace_csv).");
ABSL_FLAG(std::string, trace_csv, "",
          "CSV trace (arrival_ms,input_tokens,output_tokens[,block_hashes]) instead of --workload.");
ABSL_FLAG(bool, honor_arrivals, false, "Admit trace requests no earlier than their arrival_ms.");
ABSL_FLAG(int32_t, batch, 8, "Most active rows of one micro-batch (continuous batching).");
ABSL_FLAG(int32_t, micro_batches, 1,
          "Decode micro-batches in flight at once, each on its own StepStream; their layer-steps "
          "interleave on the worker (at most the worker's open token steps, 4 by default).");
ABSL_FLAG(int32_t, prefill_streams, 2, "WriteKV streams writing prompts concurrently with decode.");
ABSL_FLAG(int32_t, prefill_nice, 10,
          "Linux nice value (0-19) of the prefill threads (they stand in for a prefill tier), so that "
          "where they and decode threads compete for a core (also the worker's, on one host) decode "
          "runs first; 0: the same priority.");
ABSL_FLAG(int32_t, ingest_connections, 1,
          "TCP connections of their own for WriteKV streams (taken in turn), apart from the decode "
          "connection, so that prompt bytes never queue ahead of decode steps; 0: WriteKV shares the "
          "decode connection.");
ABSL_FLAG(int32_t, decode_connections, -1,
          "TCP connections of their own for the decode StepStreams (taken in turn by the "
          "micro-batches): streams on one HTTP/2 connection send and receive one after another; 0: "
          "they share the connection of unary calls; -1: one per micro-batch when there are several, "
          "else 0.");
ABSL_FLAG(bool, shared_memory, false,
          "Decode StepStreams pass q, k, v and the outputs through POSIX shared memory instead of in the "
          "messages (a worker on this host, same user, --shared_memory_max_bytes > 0 there).");
ABSL_FLAG(bool, shared_memory_ring, false,
          "With --shared_memory: the decode requests and responses themselves go through a ring in the "
          "shared memory that the worker and pkv-replay poll (no gRPC message per layer-step).");
ABSL_FLAG(int32_t, prefill_ahead, 0,
          "Prompts written ahead of decode, waiting for a free row (0: batch * micro_batches).");
ABSL_FLAG(bool, wait_for_prefill, false,
          "Start decoding only once --prefill_ahead prompts (or every request, if fewer) are "
          "written, so that measured token steps run at full batch with no prompt ingest in "
          "flight (steady-decode measurements).");
ABSL_FLAG(int64_t, payload_rows, 1024,
          "Distinct q/K/V rows per kind generated once and reused for every request and prompt "
          "chunk (each position maps to a row by a seeded hash; checks use the same rows). "
          "0: generate every element on demand (slow; the client can then limit the run).");
ABSL_FLAG(double, pool_sample_ms, 100.0,
          "Milliseconds between Describe samples of the worker's pool (reserved vs used KV; 0: none).");
ABSL_FLAG(std::string, report_json, "", "Also write the report as JSON to this file.");
ABSL_FLAG(std::string, timeline_csv, "",
          "Also write the run's time series as CSV to this file (decode tokens per token step, each "
          "time-between-tokens sample, pool samples: reserved and used KV bytes), for bench/plots.py.");
ABSL_FLAG(int32_t, num_requests, 24, "Requests to replay (first N of a trace; 0 = whole trace).");
ABSL_FLAG(uint64_t, seed, 20260622, "Seed of the workload, the q/K/V data and the check sample.");
ABSL_FLAG(double, context_scale, 1.0, "Multiply prompt lengths by this (0, 1] (small CPU runs).");
ABSL_FLAG(int64_t, max_context, 0, "Cap prompt lengths at this many tokens (0: no cap).");
ABSL_FLAG(int64_t, max_output, 0, "Cap decode lengths at this many tokens (0: no cap).");
ABSL_FLAG(double, check_fraction, 0.01, "Share of (token step, layer, row) outputs checked.");
ABSL_FLAG(int32_t, check_threads, 1,
          "Threads checking outputs while decode runs (kept small so that the replay's CPU stays out "
          "of the worker's way on a shared host); outputs wait in a queue of up to "
          "--check_queue_mib and the backlog is checked on every core once decode is done.");
ABSL_FLAG(int64_t, check_queue_mib, 256, "Most MiB of outputs waiting for a check (then decode waits: a stall).");
ABSL_FLAG(int64_t, max_steps, 0, "Stop after this many token steps (0: run the workload out).");
ABSL_FLAG(int64_t, warmup_steps, 3, "Token steps left out of latency statistics.");
ABSL_FLAG(int64_t, chunk_tokens, 256, "WriteKV chunk size in tokens.");
ABSL_FLAG(bool, stream, true, "Use StepStream (true) or unary Step (false).");
ABSL_FLAG(double, progress_s, 5.0, "Seconds between progress lines (0: none).");
ABSL_FLAG(double, connect_timeout_s, 10.0, "Seconds to wait for the worker.");
ABSL_FLAG(bool, describe_only, false,
          "Connect, call Describe, print the worker's shape, pool and backend, and exit (0 when it "
          "answered); no workload is run.");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA bundle that signed the worker's certificate; turns TLS on (empty: plaintext).");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate for workers that require one (mutual TLS); with --tls_key_file.");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::vector<std::string>, grpc_arg, {},
          "Extra gRPC channel arguments, name=value, comma-separated or the flag repeated (e.g. "
          "grpc.http2.max_frame_size=1048576); integers are passed as integers; not the message size "
          "limits.");
ABSL_FLAG(std::string, router_id, "pkv-replay",
          "Router id sent as request metadata (x-pkv-router-id): the worker's sequences and token steps "
          "of this run belong to it (a worker serving mutual TLS uses the client certificate instead).");

namespace {

absl::StatusOr<pkv::client::ClientOptions> ClientOptionsFromFlags() {
  pkv::client::ClientOptions options;
  PKV_ASSIGN_OR_RETURN(options.channel_args, pkv::ParseChannelArgs(absl::GetFlag(FLAGS_grpc_arg), "--grpc_arg"));
  PKV_RETURN_IF_ERROR(pkv::CheckChannelArgs(options.channel_args, "--grpc_arg", "pkv-replay's message size limit is 256 MiB"));
  options.target = absl::GetFlag(FLAGS_target);
  options.connect_timeout = absl::Seconds(absl::GetFlag(FLAGS_connect_timeout_s));
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.router_id = absl::GetFlag(FLAGS_router_id);
  options.ingest_connections = absl::GetFlag(FLAGS_ingest_connections);
  options.decode_connections = absl::GetFlag(FLAGS_decode_connections);
  options.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  options.shared_memory_ring = absl::GetFlag(FLAGS_shared_memory_ring);
  if (options.decode_connections < 0) {
    const int32_t micro = absl::GetFlag(FLAGS_micro_batches);
    options.decode_connections = micro > 1 ? std::min(micro, 64) : 0;
  }
  return options;
}

// --describe_only: one Describe, printed as a block.
int DescribeOnly() {
  const absl::StatusOr<pkv::client::ClientOptions> parsed = ClientOptionsFromFlags();
  if (!parsed.ok()) {
    PKV_LOG(ERROR) << parsed.status().message();
    return 2;
  }
  const pkv::client::ClientOptions& options = *parsed;
  auto client = pkv::client::WorkerClient::Connect(options);
  if (!client.ok()) {
    PKV_LOG(ERROR) << client.status();
    return 2;
  }
  auto info = (*client)->Describe();
  if (!info.ok()) {
    PKV_LOG(ERROR) << "Describe: " << info.status();
    return 2;
  }
  const bool tls = !options.tls_ca_file.empty() || !options.tls_cert_file.empty();
  std::printf(
      "pkv-replay: worker %s (%s)\n"
      "  model:    %s\n"
      "  backend:  %s (%s)\n"
      "  pool:     %lld/%lld pages free, %lld bytes/page, %lld sequences, %lld tokens\n"
      "  activity: %lld active, %lld writing, %lld open token steps\n"
      "  limits:   max_batch %d, max_message_bytes %lld\n"
      "  serving:  %s\n",
      options.target.c_str(),
      tls ? (options.tls_cert_file.empty() ? "TLS" : "mutual TLS") : "plaintext",
      info->shape.DebugString().c_str(), info->backend.c_str(), info->device.c_str(),
      static_cast<long long>(info->free_pages), static_cast<long long>(info->total_pages),
      static_cast<long long>(info->page_bytes), static_cast<long long>(info->num_sequences),
      static_cast<long long>(info->used_tokens), static_cast<long long>(info->active_sequences),
      static_cast<long long>(info->writing_sequences),
      static_cast<long long>(info->open_token_steps), info->max_batch,
      static_cast<long long>(info->max_message_bytes), info->serving ? "yes" : "no (draining)");
  std::fflush(stdout);
  return 0;
}

int Run() {
  if (absl::GetFlag(FLAGS_describe_only)) return DescribeOnly();
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"--batch", absl::GetFlag(FLAGS_batch)},
                                    {"--micro_batches", absl::GetFlag(FLAGS_micro_batches)},
                                    {"--prefill_streams", absl::GetFlag(FLAGS_prefill_streams)},
                                    {"--check_threads", absl::GetFlag(FLAGS_check_threads)}}) {
    if (value < 1) {
      PKV_LOG(ERROR) << name << ": must be >= 1, got " << value;
      return 2;
    }
  }
  if (const int32_t n = absl::GetFlag(FLAGS_ingest_connections); n < 0 || n > 64) {
    PKV_LOG(ERROR) << "--ingest_connections: must be in [0, 64], got " << n;
    return 2;
  }
  if (const int32_t n = absl::GetFlag(FLAGS_decode_connections); n < -1 || n > 64) {
    PKV_LOG(ERROR) << "--decode_connections: must be -1 or in [0, 64], got " << n;
    return 2;
  }
  if (absl::GetFlag(FLAGS_payload_rows) < 0) {
    PKV_LOG(ERROR) << "--payload_rows: must be >= 0, got " << absl::GetFlag(FLAGS_payload_rows);
    return 2;
  }
  std::vector<pkv::WorkloadRequest> requests;
  const std::string trace = absl::GetFlag(FLAGS_trace_csv);
  const int32_t num_requests = absl::GetFlag(FLAGS_num_requests);
  std::string source;
  if (!trace.empty()) {
    auto parsed = pkv::ReadTraceCsv(trace);
    if (!parsed.ok()) {
      PKV_LOG(ERROR) << parsed.status();
      return 2;
    }
    requests = *std::move(parsed);
    if (num_requests > 0 && static_cast<size_t>(num_requests) < requests.size()) {
      requests.resize(num_requests);
    }
    source = trace;
  } else {
    auto kind = pkv::ParseWorkloadKind(absl::GetFlag(FLAGS_workload));
    if (!kind.ok()) {
      PKV_LOG(ERROR) << "--workload: " << kind.status();
      return 2;
    }
    requests = pkv::GenerateWorkload(*kind, num_requests, absl::GetFlag(FLAGS_seed));
    source = std::string(pkv::WorkloadKindName(*kind));
  }
  pkv::ScaleWorkload(requests, absl::GetFlag(FLAGS_context_scale), absl::GetFlag(FLAGS_max_context),
                     absl::GetFlag(FLAGS_max_output));

  const absl::StatusOr<pkv::client::ClientOptions> parsed_options = ClientOptionsFromFlags();
  if (!parsed_options.ok()) {
    PKV_LOG(ERROR) << parsed_options.status().message();
    return 2;
  }
  const pkv::client::ClientOptions& client_options = *parsed_options;
  auto client = pkv::client::WorkerClient::Connect(client_options);
  if (!client.ok()) {
    PKV_LOG(ERROR) << client.status();
    return 2;
  }
  auto info = (*client)->Describe();
  if (!info.ok()) {
    PKV_LOG(ERROR) << "Describe: " << info.status();
    return 2;
  }
  std::printf("pkv-replay: worker %s: %s, backend %s (%s), %lld/%lld pages free, max_batch %d\n",
              client_options.target.c_str(), info->shape.DebugString().c_str(),
              info->backend.c_str(), info->device.c_str(), static_cast<long long>(info->free_pages),
              static_cast<long long>(info->total_pages), info->max_batch);
  std::printf("pkv-replay: workload %s, %zu requests, batch %d x %d micro-batches, seed %llu\n",
              source.c_str(), requests.size(), absl::GetFlag(FLAGS_batch), absl::GetFlag(FLAGS_micro_batches),
              static_cast<unsigned long long>(absl::GetFlag(FLAGS_seed)));
  std::fflush(stdout);

  pkv::client::ReplayOptions options;
  options.batch = absl::GetFlag(FLAGS_batch);
  options.micro_batches = absl::GetFlag(FLAGS_micro_batches);
  options.prefill_streams = absl::GetFlag(FLAGS_prefill_streams);
  options.prefill_nice = absl::GetFlag(FLAGS_prefill_nice);
  options.prefill_ahead = absl::GetFlag(FLAGS_prefill_ahead);
  options.wait_for_prefill = absl::GetFlag(FLAGS_wait_for_prefill);
  options.payload_rows = absl::GetFlag(FLAGS_payload_rows);
  options.pool_sample_interval = absl::Milliseconds(absl::GetFlag(FLAGS_pool_sample_ms));
  options.seed = absl::GetFlag(FLAGS_seed);
  options.check_fraction = absl::GetFlag(FLAGS_check_fraction);
  options.check_threads = absl::GetFlag(FLAGS_check_threads);
  options.check_queue_bytes = static_cast<size_t>(std::max<int64_t>(1, absl::GetFlag(FLAGS_check_queue_mib))) << 20;
  options.max_steps = absl::GetFlag(FLAGS_max_steps);
  options.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  options.chunk_tokens = absl::GetFlag(FLAGS_chunk_tokens);
  options.honor_arrivals = absl::GetFlag(FLAGS_honor_arrivals);
  options.use_stream = absl::GetFlag(FLAGS_stream);
  options.progress_interval = absl::Seconds(absl::GetFlag(FLAGS_progress_s));
  auto report = pkv::client::RunReplay(**client, options, requests);
  if (!report.ok()) {
    PKV_LOG(ERROR) << "replay failed: " << report.status();
    return 2;
  }
  std::printf("%s", report->Format().c_str());
  std::fflush(stdout);
  if (const std::string path = absl::GetFlag(FLAGS_report_json); !path.empty()) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr || std::fprintf(f, "%s\n", report->ToJson().c_str()) < 0 || std::fclose(f) != 0) {
      PKV_LOG(ERROR) << "--report_json: cannot write " << path;
      return 2;
    }
  }
  if (const std::string path = absl::GetFlag(FLAGS_timeline_csv); !path.empty()) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    const std::string csv = report->TimelineCsv();
    if (f == nullptr || std::fwrite(csv.data(), 1, csv.size(), f) != csv.size() || std::fclose(f) != 0) {
      PKV_LOG(ERROR) << "--timeline_csv: cannot write " << path;
      return 2;
    }
  }
  if (report->check_failures > 0) {
    PKV_LOG(ERROR) << report->check_failures << " output checks failed";
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Replays a workload against a pkv-worker (prefill via WriteKV, decode via StepStream).\n"
      "  pkv-replay --target=127.0.0.1:50051 --workload=bimodal --batch=8 --num_requests=24 "
      "--context_scale=0.05\n"
      "  pkv-replay --describe_only --target=worker:50051 --tls_ca_file=ca.crt");
  absl::FlagsUsageConfig usage;
  // --help lists this program's flags (those defined in replay_main.cc).
  usage.contains_help_flags = [](absl::string_view path) { return absl::StrContains(path, "replay_main."); };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  return Run();
}
