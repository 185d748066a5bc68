#include "common/metrics.h"

#include <vector>

#include "prometheus/family.h"

namespace pkv {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Layer-step and attention times: 5 µs (a short GPU step) to 10 s (a long CPU step).
const Histogram::BucketBoundaries& StepBuckets() {
  static const Histogram::BucketBoundaries b = {5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3,
                                                1e-2, 2e-2, 5e-2, 0.1,  0.2,  0.5,  1.0,  2.0,  5.0,  10.0};
  return b;
}

// RPC latency and queue waits: 50 µs (a GPU layer-step answered at once) to 60 s (a long WriteKV
// stream, or a request stuck behind a jammed queue).
const Histogram::BucketBoundaries& RpcBuckets() {
  static const Histogram::BucketBoundaries b = {5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                                                0.1,  0.25, 0.5,    1.0,  2.5,  5.0,    10.0, 30.0, 60.0};
  return b;
}

}  // namespace

const char* RpcMethodName(RpcMethod method) {
  switch (method) {
    case RpcMethod::kDescribe: return "Describe";
    case RpcMethod::kStep: return "Step";
    case RpcMethod::kStepStream: return "StepStream";
    case RpcMethod::kWriteKV: return "WriteKV";
    case RpcMethod::kRelease: return "Release";
  }
  return "unknown";
}

const char* StatusCodeName(int code) {
  static const char* const kNames[kNumStatusCodes] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
      "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  return code >= 0 && code < kNumStatusCodes ? kNames[code] : "UNKNOWN";
}

int SplitBucket(int splits) {
  if (splits <= 1) return 0;
  if (splits <= 4) return 1;
  if (splits <= 16) return 2;
  return 3;
}

const char* SplitBucketName(int bucket) {
  static const char* const kNames[kNumSplitBuckets] = {"1", "2-4", "5-16", "17+"};
  return kNames[bucket];
}

WorkerMetrics::WorkerMetrics(const BuildInfo& build) : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  BuildGauge()
      .Name("pkv_build_info")
      .Help("Build and runtime facts of this worker; the value is always 1.")
      .Register(r)
      .Add({{"version", build.version},
            {"commit", build.commit},
            {"backend", build.backend},
            {"gpu", build.gpu},
            {"dtype", build.dtype},
            {"calibration_profile", build.calibration_profile}})
      .Set(1);

  auto& duration = BuildHistogram()
                       .Name("pkv_step_duration_seconds")
                       .Help("Worker-side time of one layer-step (validation, KV append, attention), by kernel.")
                       .Register(r);
  auto& attend = BuildHistogram()
                     .Name("pkv_step_attention_seconds")
                     .Help("Device time of the attention of one layer-step (GPU events on CUDA), by kernel.")
                     .Register(r);
  auto& decisions = BuildCounter()
                        .Name("pkv_scheduler_decisions_total")
                        .Help("Token steps planned, by kernel and split-count bucket.")
                        .Register(r);
  auto& predicted = BuildCounter()
                        .Name("pkv_scheduler_predicted_seconds_total")
                        .Help("Sum of the cost model's predicted attention time of layer-steps, by kernel.")
                        .Register(r);
  auto& measured = BuildCounter()
                       .Name("pkv_scheduler_measured_seconds_total")
                       .Help("Sum of the measured attention time of the layer-steps counted in "
                             "pkv_scheduler_predicted_seconds_total, by kernel.")
                       .Register(r);
  for (int k = 0; k < kNumKernelIds; ++k) {
    const std::string name = KernelName(static_cast<KernelId>(k));
    step_duration_[k] = &duration.Add({{"kernel", name}}, StepBuckets());
    step_attend_[k] = &attend.Add({{"kernel", name}}, StepBuckets());
    predicted_[k] = &predicted.Add({{"kernel", name}});
    measured_[k] = &measured.Add({{"kernel", name}});
    for (int b = 0; b < kNumSplitBuckets; ++b) {
      decisions_[k][b] = &decisions.Add({{"kernel", name}, {"splits", SplitBucketName(b)}});
    }
  }
  prediction_error_ = &BuildHistogram()
                           .Name("pkv_scheduler_prediction_error_ratio")
                           .Help("|measured - predicted| / measured attention time of modelled layer-steps.")
                           .Register(r)
                           .Add({}, Histogram::BucketBoundaries{0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0});
  launches_ = &BuildHistogram()
                   .Name("pkv_step_launches")
                   .Help("Kernel launches per layer-step.")
                   .Register(r)
                   .Add({}, Histogram::BucketBoundaries{1, 2, 3, 4, 8, 16, 32});
  decode_tokens_ = &BuildCounter()
                        .Name("pkv_decode_tokens_total")
                        .Help("Tokens decoded: rows of token steps whose every layer ran.")
                        .Register(r)
                        .Add({});
  auto& token_steps = BuildCounter()
                          .Name("pkv_token_steps_total")
                          .Help("Token steps by outcome (completed: every layer ran; aborted: a row was released).")
                          .Register(r);
  token_steps_completed_ = &token_steps.Add({{"outcome", "completed"}});
  token_steps_aborted_ = &token_steps.Add({{"outcome", "aborted"}});
  replays_ = &BuildCounter()
                  .Name("pkv_step_replays_total")
                  .Help("Layer-steps answered from the retry cache (a retried token_step_id and layer).")
                  .Register(r)
                  .Add({});
  ingest_bytes_ = &BuildCounter()
                       .Name("pkv_ingest_bytes_total")
                       .Help("Prompt K,V bytes committed through WriteKV.")
                       .Register(r)
                       .Add({});
  ingest_duration_ = &BuildHistogram()
                          .Name("pkv_ingest_duration_seconds")
                          .Help("Time from a WriteKV header to the commit of its prompt.")
                          .Register(r)
                          .Add({}, Histogram::BucketBoundaries{1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60});

  capacity_pages_ = &BuildGauge()
                         .Name("pkv_kv_pool_capacity_pages")
                         .Help("KV pool size in pages (each holds page_size tokens of every layer).")
                         .Register(r)
                         .Add({});
  auto& pages = BuildGauge()
                    .Name("pkv_kv_pool_pages")
                    .Help("KV pool pages by state: used (held by a sequence) and free; they sum to "
                          "pkv_kv_pool_capacity_pages.")
                    .Register(r);
  pool_used_ = &pages.Add({{"state", "used"}});
  pool_free_ = &pages.Add({{"state", "free"}});
  capacity_tokens_ = &BuildGauge()
                          .Name("pkv_kv_pool_capacity_tokens")
                          .Help("KV pool size in token slots (capacity pages x page size).")
                          .Register(r)
                          .Add({});
  auto& tokens = BuildGauge()
                     .Name("pkv_kv_pool_tokens")
                     .Help("Token slots of the pool by state: used (a token stored), reserved_unused (in a "
                           "page a sequence holds, beyond its tokens) and free (in a free page); they sum to "
                           "pkv_kv_pool_capacity_tokens.")
                     .Register(r);
  tokens_used_ = &tokens.Add({{"state", "used"}});
  tokens_reserved_unused_ = &tokens.Add({{"state", "reserved_unused"}});
  tokens_free_ = &tokens.Add({{"state", "free"}});
  steps_until_full_ = &BuildGauge()
                           .Name("pkv_kv_pool_steps_until_full")
                           .Help("Token steps until the pool is full if active sequences keep growing by one "
                                 "token per step (free token slots / active sequences).")
                           .Register(r)
                           .Add({});
  auto& seqs = BuildGauge().Name("pkv_sequences").Help("Sequences by state (active: steppable; writing: "
                                                         "prompt being written).").Register(r);
  seq_active_ = &seqs.Add({{"state", "active"}});
  seq_writing_ = &seqs.Add({{"state", "writing"}});
  open_token_steps_ = &BuildGauge()
                           .Name("pkv_open_token_steps")
                           .Help("Token steps begun (layer 0 ran) with layers still to run.")
                           .Register(r)
                           .Add({});
  ready_ = &BuildGauge()
                .Name("pkv_ready")
                .Help("1 while the worker serves steps (health SERVING), 0 while starting or draining.")
                .Register(r)
                .Add({});

  auto& rpcs = BuildCounter()
                   .Name("pkv_rpc_requests_total")
                   .Help("Finished RPCs (or stream messages for StepStream), by method and gRPC status code.")
                   .Register(r);
  auto& inflight = BuildGauge()
                       .Name("pkv_rpc_inflight")
                       .Help("RPCs and streams in flight, by method.")
                       .Register(r);
  for (int m = 0; m < kNumRpcMethods; ++m) {
    const std::string method = RpcMethodName(static_cast<RpcMethod>(m));
    inflight_[m] = &inflight.Add({{"method", method}});
    for (int c = 0; c < kNumStatusCodes; ++c) {
      rpc_[m][c] = &rpcs.Add({{"method", method}, {"code", StatusCodeName(c)}});
    }
  }
  auto& rpc_durations = BuildHistogram()
                            .Name("pkv_rpc_duration_seconds")
                            .Help("Worker-side time from a request's arrival to its answer, queueing included, "
                                  "by method (StepStream: each message; WriteKV: the whole stream).")
                            .Register(r);
  auto& rpc_queues = BuildHistogram()
                         .Name("pkv_rpc_queue_seconds")
                         .Help("Time the engine work of a request waited in an executor queue for a thread, by "
                               "method (WriteKV: each message).")
                         .Register(r);
  for (int m = 0; m < kNumRpcMethods; ++m) {
    const std::string method = RpcMethodName(static_cast<RpcMethod>(m));
    rpc_duration_[m] = &rpc_durations.Add({{"method", method}}, RpcBuckets());
    rpc_queue_[m] = &rpc_queues.Add({{"method", method}}, RpcBuckets());
  }
  auto& rejections = BuildCounter()
                         .Name("pkv_executor_rejections_total")
                         .Help("Requests refused with RESOURCE_EXHAUSTED because their executor queue was full, "
                               "by queue (decode: steps, Describe, Release; ingest: WriteKV).")
                         .Register(r);
  queue_rejections_[static_cast<int>(Queue::kDecode)] = &rejections.Add({{"queue", "decode"}});
  queue_rejections_[static_cast<int>(Queue::kIngest)] = &rejections.Add({{"queue", "ingest"}});
  auto& drain = BuildCounter()
                    .Name("pkv_drain_refusals_total")
                    .Help("New work refused with UNAVAILABLE because the worker is draining, by method "
                          "(StepStream: each message).")
                    .Register(r);
  for (RpcMethod m : {RpcMethod::kStep, RpcMethod::kStepStream, RpcMethod::kWriteKV}) {
    drain_refusals_[static_cast<int>(m)] = &drain.Add({{"method", RpcMethodName(m)}});
  }
  auto& malformed = BuildCounter()
                        .Name("pkv_malformed_messages_total")
                        .Help("Request messages that could not be parsed (answered INVALID_ARGUMENT), by method.")
                        .Register(r);
  for (int m = 0; m < kNumRpcMethods; ++m) {
    malformed_[m] = &malformed.Add({{"method", RpcMethodName(static_cast<RpcMethod>(m))}});
  }
  auto& reclaimed = BuildCounter()
                        .Name("pkv_reclaimed_total")
                        .Help("Resources a dead or stalled router left behind, taken back by a lease: open token "
                              "steps aborted, WriteKV prompts cancelled, idle sequences released.")
                        .Register(r);
  reclaimed_[0] = &reclaimed.Add({{"kind", "token_step"}});
  reclaimed_[1] = &reclaimed.Add({{"kind", "prompt"}});
  reclaimed_[2] = &reclaimed.Add({{"kind", "sequence"}});
  reclaimed_pages_ = &BuildCounter()
                          .Name("pkv_reclaimed_pages_total")
                          .Help("KV pages returned to the free list by leases (idle sequences and cancelled prompts).")
                          .Register(r)
                          .Add({});
  heartbeat_age_ = &BuildGauge()
                        .Name("pkv_engine_heartbeat_age_seconds")
                        .Help("Seconds since the engine heartbeat last ran through the decode executor and the "
                              "engine lock; liveness fails when it exceeds --liveness_stall_s.")
                        .Register(r)
                        .Add({});
  process_stalls_ = &BuildHistogram()
                         .Name("pkv_process_stall_seconds")
                         .Help("How late the worker's 1 ms stall-watch timer woke, each time it was over 1 ms "
                               "late: the process got no CPU for that long (busy cores, a CPU quota, or the "
                               "host stopping a virtual machine's processors).")
                         .Register(r)
                         .Add({}, Histogram::BucketBoundaries{0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5});

  auto process_gauge = [&r](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(r).Add({});
  };
  process_start_time_ = process_gauge("process_start_time_seconds",
                                      "Start time of the process since the Unix epoch, in seconds.");
  process_resident_ = process_gauge("process_resident_memory_bytes", "Resident memory size in bytes.");
  process_virtual_ = process_gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.");
  process_open_fds_ = process_gauge("process_open_fds", "Number of open file descriptors.");
  process_max_fds_ = process_gauge("process_max_fds", "Maximum number of open file descriptors.");
}

}  // namespace pkv
