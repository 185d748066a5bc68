// common/metrics.h — every Prometheus family the worker exports, declared once, bound at start-up.
//
// WorkerMetrics creates all families in one registry and pre-binds every series whose labels are
// known up front (kernel ids, split buckets, RPC methods x status codes, pool states), so the
// step path only touches handles — nothing is looked up by name or label while serving, and every
// series exists (at zero) from the first scrape, so dashboards never show "No data" for an event
// that has not happened yet. Naming follows Prometheus conventions: `pkv_` prefix, base units
// (`_seconds`, `_bytes`), `_total` on counters, bounded labels only; the process_* families keep
// the names every Prometheus client library gives them, so generic dashboards find them.
// docs/METRICS.md documents every family. Built only with PKV_WITH_SERVICE (it needs
// prometheus-cpp).
// Thread-safety: prometheus-cpp metrics are thread-safe; handles may be used from any thread.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "common/decode_types.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace pkv {

// Labels of pkv_build_info.
struct BuildInfo {
  std::string version;
  std::string commit;
  std::string backend;  // cpu | cuda
  std::string gpu;      // device name, "none" on the CPU backend
  std::string dtype;
  std::string calibration_profile;  // profile path, or "default"
};

// gRPC methods with RPC metrics (label `method`).
enum class RpcMethod : uint8_t { kDescribe = 0, kStep, kStepStream, kWriteKV, kRelease };
inline constexpr int kNumRpcMethods = 5;
const char* RpcMethodName(RpcMethod method);
// gRPC status codes 0..16 (label `code`, e.g. "OK", "INVALID_ARGUMENT").
inline constexpr int kNumStatusCodes = 17;
const char* StatusCodeName(int code);

// Split-count buckets of pkv_scheduler_decisions_total (label `splits`): "1", "2-4", "5-16", "17+".
inline constexpr int kNumSplitBuckets = 4;
int SplitBucket(int splits);
const char* SplitBucketName(int bucket);

class WorkerMetrics {
 public:
  explicit WorkerMetrics(const BuildInfo& build);
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // --- step path (engine observer) ---
  prometheus::Histogram& step_duration(KernelId k) { return *step_duration_[static_cast<int>(k)]; }
  prometheus::Histogram& step_attend(KernelId k) { return *step_attend_[static_cast<int>(k)]; }
  prometheus::Counter& decisions(KernelId k, int splits) {
    return *decisions_[static_cast<int>(k)][SplitBucket(splits)];
  }
  prometheus::Counter& predicted_seconds(KernelId k) { return *predicted_[static_cast<int>(k)]; }
  prometheus::Counter& measured_seconds(KernelId k) { return *measured_[static_cast<int>(k)]; }
  prometheus::Histogram& prediction_error() { return *prediction_error_; }
  prometheus::Histogram& launches_per_step() { return *launches_; }
  prometheus::Counter& decode_tokens() { return *decode_tokens_; }
  prometheus::Counter& token_steps_completed() { return *token_steps_completed_; }
  prometheus::Counter& token_steps_aborted() { return *token_steps_aborted_; }
  prometheus::Counter& step_replays() { return *replays_; }

  // --- ingest ---
  prometheus::Counter& ingest_bytes() { return *ingest_bytes_; }
  prometheus::Histogram& ingest_duration() { return *ingest_duration_; }

  // --- pool and sequences (refreshed by a sampler) ---
  // Capacities have their own families; the `state` series of pages and tokens are disjoint
  // parts that sum to them.
  prometheus::Gauge& pool_capacity_pages() { return *capacity_pages_; }
  prometheus::Gauge& pool_pages_used() { return *pool_used_; }
  prometheus::Gauge& pool_pages_free() { return *pool_free_; }
  prometheus::Gauge& pool_capacity_tokens() { return *capacity_tokens_; }
  prometheus::Gauge& pool_tokens_used() { return *tokens_used_; }
  prometheus::Gauge& pool_tokens_reserved_unused() { return *tokens_reserved_unused_; }
  prometheus::Gauge& pool_tokens_free() { return *tokens_free_; }
  prometheus::Gauge& steps_until_full() { return *steps_until_full_; }
  prometheus::Gauge& sequences_active() { return *seq_active_; }
  prometheus::Gauge& sequences_writing() { return *seq_writing_; }
  prometheus::Gauge& open_token_steps() { return *open_token_steps_; }
  prometheus::Gauge& ready() { return *ready_; }

  // --- RPCs ---
  prometheus::Counter& rpc(RpcMethod m, int code) {
    return *rpc_[static_cast<int>(m)][code >= 0 && code < kNumStatusCodes ? code : 2];
  }
  prometheus::Gauge& inflight_streams(RpcMethod m) { return *inflight_[static_cast<int>(m)]; }
  // Time from a request's arrival to its answer (StepStream: per message; WriteKV: the stream).
  prometheus::Histogram& rpc_duration(RpcMethod m) { return *rpc_duration_[static_cast<int>(m)]; }
  // Time engine work of a request waited in an executor queue for a thread.
  prometheus::Histogram& rpc_queue_time(RpcMethod m) { return *rpc_queue_[static_cast<int>(m)]; }
  // The executors (label `queue`): decode steps, Describe and Release; WriteKV.
  enum class Queue : uint8_t { kDecode = 0, kIngest };
  prometheus::Counter& queue_rejections(Queue q) { return *queue_rejections_[static_cast<int>(q)]; }
  // New work refused with UNAVAILABLE because the worker is draining; null for the methods that
  // are never refused (Describe, Release).
  prometheus::Counter* drain_refusals(RpcMethod m) { return drain_refusals_[static_cast<int>(m)]; }
  // Messages that could not be parsed as the method's request type (answered INVALID_ARGUMENT).
  prometheus::Counter& malformed(RpcMethod m) { return *malformed_[static_cast<int>(m)]; }

  // --- leases: what a dead or stalled router left behind and the worker took back ---
  enum class Reclaim : uint8_t { kTokenStep = 0, kPrompt, kSequence };
  prometheus::Counter& reclaimed(Reclaim kind) { return *reclaimed_[static_cast<int>(kind)]; }
  prometheus::Counter& reclaimed_pages() { return *reclaimed_pages_; }

  // --- liveness ---
  // Seconds since the engine heartbeat last went through the decode executor and the engine
  // lock (service/heartbeat.h).
  prometheus::Gauge& heartbeat_age() { return *heartbeat_age_; }
  // How late the stall watch's 1 ms timer woke, in seconds, each time it was over 1 ms late: the
  // process got no CPU for that long (service/stall_watch.h).
  prometheus::Histogram& process_stalls() { return *process_stalls_; }

  // --- the process (read from /proc/self by the sampler; standard client-library names) ---
  prometheus::Gauge& process_start_time() { return *process_start_time_; }
  prometheus::Gauge& process_resident_memory() { return *process_resident_; }
  prometheus::Gauge& process_virtual_memory() { return *process_virtual_; }
  prometheus::Gauge& process_open_fds() { return *process_open_fds_; }
  prometheus::Gauge& process_max_fds() { return *process_max_fds_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::array<prometheus::Histogram*, kNumKernelIds> step_duration_{};
  std::array<prometheus::Histogram*, kNumKernelIds> step_attend_{};
  std::array<std::array<prometheus::Counter*, kNumSplitBuckets>, kNumKernelIds> decisions_{};
  std::array<prometheus::Counter*, kNumKernelIds> predicted_{};
  std::array<prometheus::Counter*, kNumKernelIds> measured_{};
  prometheus::Histogram* prediction_error_ = nullptr;
  prometheus::Histogram* launches_ = nullptr;
  prometheus::Counter* decode_tokens_ = nullptr;
  prometheus::Counter* token_steps_completed_ = nullptr;
  prometheus::Counter* token_steps_aborted_ = nullptr;
  prometheus::Counter* replays_ = nullptr;
  prometheus::Counter* ingest_bytes_ = nullptr;
  prometheus::Histogram* ingest_duration_ = nullptr;
  prometheus::Gauge* capacity_pages_ = nullptr;
  prometheus::Gauge* pool_used_ = nullptr;
  prometheus::Gauge* pool_free_ = nullptr;
  prometheus::Gauge* capacity_tokens_ = nullptr;
  prometheus::Gauge* tokens_used_ = nullptr;
  prometheus::Gauge* tokens_reserved_unused_ = nullptr;
  prometheus::Gauge* tokens_free_ = nullptr;
  prometheus::Gauge* steps_until_full_ = nullptr;
  prometheus::Gauge* seq_active_ = nullptr;
  prometheus::Gauge* seq_writing_ = nullptr;
  prometheus::Gauge* open_token_steps_ = nullptr;
  prometheus::Gauge* ready_ = nullptr;
  std::array<std::array<prometheus::Counter*, kNumStatusCodes>, kNumRpcMethods> rpc_{};
  std::array<prometheus::Gauge*, kNumRpcMethods> inflight_{};
  std::array<prometheus::Histogram*, kNumRpcMethods> rpc_duration_{};
  std::array<prometheus::Histogram*, kNumRpcMethods> rpc_queue_{};
  std::array<prometheus::Counter*, 2> queue_rejections_{};
  std::array<prometheus::Counter*, kNumRpcMethods> drain_refusals_{};
  std::array<prometheus::Counter*, kNumRpcMethods> malformed_{};
  std::array<prometheus::Counter*, 3> reclaimed_{};
  prometheus::Counter* reclaimed_pages_ = nullptr;
  prometheus::Gauge* heartbeat_age_ = nullptr;
  prometheus::Histogram* process_stalls_ = nullptr;
  prometheus::Gauge* process_start_time_ = nullptr;
  prometheus::Gauge* process_resident_ = nullptr;
  prometheus::Gauge* process_virtual_ = nullptr;
  prometheus::Gauge* process_open_fds_ = nullptr;
  prometheus::Gauge* process_max_fds_ = nullptr;
};

}  // namespace pkv
