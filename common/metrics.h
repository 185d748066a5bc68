// common/metrics.h — every Prometheus family the worker exports, declared once, bound at start-up.
//
// WorkerMetrics creates all families in one registry and pre-binds every series whose labels are
// known up front (kernel ids, split buckets, RPC methods x status codes, pool states), so the
// step path only touches handles — nothing is looked up by name or label while serving, and every
// series exists (at zero) from the first scrape, so dashboards never show "No data" for an event
// that has not happened yet. Naming follows Prometheus conventions: `pkv_` prefix, base units
// (`_seconds`, `_bytes`), `_total` on counters, bounded labels only. docs/METRICS.md documents
// every family. Built only with PKV_WITH_SERVICE (it needs prometheus-cpp).
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
  prometheus::Counter& graph_hits() { return *graph_hits_; }
  prometheus::Counter& graph_misses() { return *graph_misses_; }
  prometheus::Counter& graph_padding_rows() { return *graph_padding_rows_; }

  // --- ingest ---
  prometheus::Counter& ingest_bytes() { return *ingest_bytes_; }
  prometheus::Histogram& ingest_duration() { return *ingest_duration_; }

  // --- pool and sequences (refreshed by a sampler) ---
  prometheus::Gauge& pool_pages_total() { return *pool_total_; }
  prometheus::Gauge& pool_pages_used() { return *pool_used_; }
  prometheus::Gauge& pool_pages_free() { return *pool_free_; }
  prometheus::Gauge& pool_tokens_reserved() { return *tokens_reserved_; }
  prometheus::Gauge& pool_tokens_used() { return *tokens_used_; }
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
  prometheus::Counter& queue_rejections() { return *queue_rejections_; }
  // Messages that could not be parsed as the method's request type (answered INVALID_ARGUMENT).
  prometheus::Counter& malformed(RpcMethod m) { return *malformed_[static_cast<int>(m)]; }

  // --- leases: what a dead or stalled router left behind and the worker took back ---
  enum class Reclaim : uint8_t { kTokenStep = 0, kPrompt, kSequence };
  prometheus::Counter& reclaimed(Reclaim kind) { return *reclaimed_[static_cast<int>(kind)]; }
  prometheus::Counter& reclaimed_pages() { return *reclaimed_pages_; }

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
  prometheus::Counter* graph_hits_ = nullptr;
  prometheus::Counter* graph_misses_ = nullptr;
  prometheus::Counter* graph_padding_rows_ = nullptr;
  prometheus::Counter* ingest_bytes_ = nullptr;
  prometheus::Histogram* ingest_duration_ = nullptr;
  prometheus::Gauge* pool_total_ = nullptr;
  prometheus::Gauge* pool_used_ = nullptr;
  prometheus::Gauge* pool_free_ = nullptr;
  prometheus::Gauge* tokens_reserved_ = nullptr;
  prometheus::Gauge* tokens_used_ = nullptr;
  prometheus::Gauge* steps_until_full_ = nullptr;
  prometheus::Gauge* seq_active_ = nullptr;
  prometheus::Gauge* seq_writing_ = nullptr;
  prometheus::Gauge* open_token_steps_ = nullptr;
  prometheus::Gauge* ready_ = nullptr;
  std::array<std::array<prometheus::Counter*, kNumStatusCodes>, kNumRpcMethods> rpc_{};
  std::array<prometheus::Gauge*, kNumRpcMethods> inflight_{};
  prometheus::Counter* queue_rejections_ = nullptr;
  std::array<prometheus::Counter*, kNumRpcMethods> malformed_{};
  std::array<prometheus::Counter*, 3> reclaimed_{};
  prometheus::Counter* reclaimed_pages_ = nullptr;
};

}  // namespace pkv
