#include "client/replay.h"

#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/kv_data.h"
#include "client/payload_pool.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/thread_priority.h"
#include "common/workload.h"

namespace pkv::client {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// CPU time of the calling thread.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// CPU time of the whole process (user + system, every thread).
double ProcessCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6; };
  return s(u.ru_utime) + s(u.ru_stime);
}

// The worker measured this layer-step's device stages. A worker samples them (the CUDA backend
// times one layer-step in a few per descriptor slot) and reports all three 0 on the others; a
// worker that skips attention has none to time, so its zeros are measurements.
bool HasDeviceStages(const StepResult& r) {
  return r.attention_skipped || r.h2d_seconds > 0 || r.kernel_seconds > 0 || r.d2h_seconds > 0;
}

// One layer-step's stages in ms (Stage order), from its build time and its result. The device
// stages (kH2D, kKernels, kD2H) and kWorkerOther (which would absorb the device time) are NaN,
// "not measured", on a layer-step without device stage times: they are left out of their
// percentiles.
std::array<double, kNumStages> StageSample(double build_ms, const StepResult& r) {
  std::array<double, kNumStages> ms{};
  auto at = [&ms](Stage s) -> double& { return ms[static_cast<int32_t>(s)]; };
  // From the start of the send to the response read, the worker held the request for
  // server_seconds; the rest (clock-independent) is the client's send and the two transport legs.
  // The worker's wall-clock stamp of its read splits it: send and the way there end at that
  // read (a Write that returns later overlaps the worker), the way back is what remains. With
  // clocks of two hosts an offset moves time between the legs but never changes their sum.
  const double outside = std::max(0.0, Seconds(r.read_at - r.send_start) - r.server_seconds);
  double up = r.received_unix_nanos > 0
                  ? static_cast<double>(r.received_unix_nanos - r.send_start_unix_nanos) * 1e-9
                  : std::min(outside, r.send_seconds);
  up = std::clamp(up, 0.0, outside);
  const double send = std::min(r.send_seconds, up);
  at(Stage::kBuild) = build_ms;
  at(Stage::kSend) = send * 1e3;
  at(Stage::kToWorker) = (up - send) * 1e3;
  at(Stage::kQueue) = r.queue_seconds * 1e3;
  at(Stage::kValidate) = r.validate_seconds * 1e3;
  at(Stage::kHost) = r.host_seconds * 1e3;
  at(Stage::kH2D) = r.h2d_seconds * 1e3;
  at(Stage::kKernels) = r.kernel_seconds * 1e3;
  at(Stage::kD2H) = r.d2h_seconds * 1e3;
  at(Stage::kSerialize) = r.serialize_seconds * 1e3;
  at(Stage::kWorkerOther) = (r.server_seconds - r.queue_seconds - r.validate_seconds - r.host_seconds -
                             r.h2d_seconds - r.kernel_seconds - r.d2h_seconds - r.serialize_seconds) * 1e3;
  at(Stage::kBack) = (outside - up) * 1e3;
  at(Stage::kReceive) = r.convert_seconds * 1e3;
  at(Stage::kRoundTrip) = (Seconds(r.read_at - r.send_start) + r.convert_seconds) * 1e3;
  if (!HasDeviceStages(r)) {
    for (Stage s : {Stage::kH2D, Stage::kKernels, Stage::kD2H, Stage::kWorkerOther}) at(s) = std::nan("");
  }
  return ms;
}

struct Row {
  uint64_t seq = 0;         // wire id
  uint64_t data_id = 0;     // key of its data (the request index)
  int64_t length = 0;       // tokens held (prompt + decoded so far)
  int64_t decoded = 0;      // token steps done
  int64_t target = 0;       // decode tokens wanted
  int64_t life_pages = 0;   // pages for prompt + all decode tokens
  // Time between tokens: completion of this row's last measured token step, and the decode
  // group's check stall total at that moment (stalls are left out).
  bool has_last = false;
  Clock::time_point last_token_at;
  Clock::duration stall_at_last{};
};

// Deterministic sample of (token step, layer, row) for checking.
bool Sampled(uint64_t seed, uint64_t step, int32_t layer, uint64_t data_id, double fraction) {
  if (fraction <= 0) return false;
  if (fraction >= 1) return true;
  SplitMix64 rng(seed ^ (step * 0x9E3779B97F4A7C15ull) ^ (static_cast<uint64_t>(layer) << 40) ^
                 (data_id * 0xD1B54A32D192ED03ull));
  return static_cast<double>(rng.Next() >> 11) * 0x1.0p-53 < fraction;
}

// Unique-enough 64-bit bases so that a second replay against the same worker never reuses a
// retained token step id or a live sequence id.
uint64_t FreshBase(uint64_t seed, uint64_t salt) {
  SplitMix64 rng(seed ^ salt ^
                 static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()));
  return (rng.Next() & 0x3FFFFFFFFFFFFFFFull) << 1 | 1ull << 62;
}

// RESOURCE_EXHAUSTED from the worker's work queue is backpressure: the same step may be resent.
bool IsBackpressure(const absl::Status& s) {
  return s.code() == absl::StatusCode::kResourceExhausted &&
         s.message().find("work queue") != std::string_view::npos;
}

// One sampled output, checked off the decode path.
struct CheckItem {
  uint64_t data_id = 0;
  int64_t token_step = 0;
  int32_t layer = 0;
  int64_t len = 0;          // history including the new token
  std::string out;          // [Hq, d] dtype bytes
  std::vector<float> lse;   // [Hq], empty when missing
};

// Checks outputs against the double-precision reference on its own threads, off the decode
// path. While decode runs only `threads` checkers work (one by default), so the replay's CPU stays
// out of the worker's way on a shared host; the queue holds up to `max_queued_bytes` of outputs
// and Close() finishes the backlog on `finish_threads`. Push blocks only when the queue is full
// (the caller counts that as a stall).
class Checker {
 public:
  Checker(const ModelShape& shape, const PayloadPool& data, int threads, int finish_threads, size_t max_queued_bytes)
      : shape_(shape),
        data_(data),
        tolerance_(Tolerance(shape)),
        max_queued_bytes_(max_queued_bytes),
        finish_threads_(std::max(threads, finish_threads)) {
    for (int i = 0; i < std::max(1, threads); ++i) {
      threads_.emplace_back([this] {
        NameThisThread("replay-check");
        Loop();
      });
    }
  }
  ~Checker() { Close(); }

  // Returns the time spent waiting for room.
  Clock::duration Push(CheckItem item) {
    const Clock::time_point t0 = Clock::now();
    const size_t bytes = ItemBytes(item);
    std::unique_lock<std::mutex> lock(mu_);
    room_.wait(lock, [&] { return queued_bytes_ == 0 || queued_bytes_ + bytes <= max_queued_bytes_; });
    const Clock::duration waited = Clock::now() - t0;
    queued_bytes_ += bytes;
    queue_.push_back(std::move(item));
    work_.notify_one();
    return waited;
  }

  // Finishes every queued check (on finish_threads threads) and joins the threads.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    for (int i = static_cast<int>(threads_.size()); i < finish_threads_; ++i) {
      threads_.emplace_back([this] {
        NameThisThread("replay-check");
        Loop();
      });
    }
    work_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

  // Folds the results into `report` (after Close).
  void Report(ReplayReport* report) const {
    report->outputs_checked = checked_;
    report->check_failures = failures_;
    report->max_rel_error = max_rel_error_;
    report->max_lse_error = max_lse_error_;
    report->first_failure = first_failure_;
  }

  int64_t checked() const {
    std::lock_guard<std::mutex> lock(mu_);
    return checked_;
  }

 private:
  void Loop() {
    for (;;) {
      CheckItem item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(lock, [&] { return closed_ || !queue_.empty(); });
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
        queued_bytes_ -= ItemBytes(item);
        room_.notify_one();
      }
      Check(item);
    }
  }

  void Check(const CheckItem& c) {
    std::vector<double> out, lse;
    // The reference sees exactly the rows the replay sent (prompt chunks and every token step).
    ReferenceDecode(shape_, data_.Query(c.data_id, c.layer, c.len - 1),
                    data_.History(DataKind::kK, c.data_id, c.layer, c.len),
                    data_.History(DataKind::kV, c.data_id, c.layer, c.len), c.len, &out, &lse);
    const double err = MaxRelativeError(shape_, c.out.data(), out);
    double lse_err = 0;
    if (c.lse.size() == static_cast<size_t>(shape_.num_q_heads)) {
      for (int32_t h = 0; h < shape_.num_q_heads; ++h) {
        lse_err = std::max(lse_err, std::abs(c.lse[h] - lse[h]) / std::max(1.0, std::abs(lse[h])));
      }
    } else {
      lse_err = INFINITY;  // asked for and missing
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++checked_;
    max_rel_error_ = std::max(max_rel_error_, err);
    max_lse_error_ = std::max(max_lse_error_, lse_err);
    if (!(err <= tolerance_) || !(lse_err <= 1e-3)) {
      ++failures_;
      if (first_failure_.empty()) {
        first_failure_ = absl::StrFormat(
            "request %d token step %d layer %d length %d: rel error %.3g (tol %.3g), lse error %.3g",
            c.data_id, c.token_step, c.layer, c.len, err, tolerance_, lse_err);
      }
    }
  }

  static size_t ItemBytes(const CheckItem& c) { return sizeof(CheckItem) + c.out.size() + c.lse.size() * sizeof(float); }

  const ModelShape shape_;
  const PayloadPool& data_;
  const double tolerance_;
  const size_t max_queued_bytes_;
  const int finish_threads_;
  mutable std::mutex mu_;
  std::condition_variable work_, room_;
  std::deque<CheckItem> queue_;
  size_t queued_bytes_ = 0;
  bool closed_ = false;
  int64_t checked_ = 0, failures_ = 0;
  double max_rel_error_ = 0, max_lse_error_ = 0;
  std::string first_failure_;
  std::vector<std::thread> threads_;
};

// Total length of the union of [start, end) intervals.
double UnionSeconds(std::vector<std::pair<Clock::time_point, Clock::time_point>> spans) {
  std::sort(spans.begin(), spans.end());
  double total = 0;
  Clock::time_point cur_start{}, cur_end{};
  bool open = false;
  for (const auto& [s, e] : spans) {
    if (!open || s > cur_end) {
      if (open) total += Seconds(cur_end - cur_start);
      cur_start = s;
      cur_end = e;
      open = true;
    } else {
      cur_end = std::max(cur_end, e);
    }
  }
  if (open) total += Seconds(cur_end - cur_start);
  return total;
}

double Mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0.0 : sum / static_cast<double>(v.size());
}

// Table rows of the stage breakdown: the name and what the stage covers.
constexpr const char* kStageRows[kNumStages][2] = {
    {"client build", "q/k/v rows copied from the payload pool (overlaps the previous layer)"},
    {"client send", "request message built, encoded, written (until the worker read it)"},
    {"to worker", "transport (gRPC or the shared-memory ring) up to the worker's read (split by wall clocks)"},
    {"worker queue", "waiting for an engine thread"},
    {"worker validation", "wire checks + engine validation (incl. engine lock wait)"},
    {"worker host", "pager, plan, descriptor; staging, launches, output copies"},
    {"H2D", "device: q/k/v upload"},
    {"kernels", "device: KV append + attention (CPU: KV write + reference kernel)"},
    {"D2H", "device: out/lse download (none on the CUDA backend: kernels write host memory)"},
    {"worker serialize", "response message built"},
    {"worker other", "held by the worker, in no stage above (device waits, thread hand-offs)"},
    {"back to client", "transport back (gRPC or the ring) and the client's read"},
    {"client receive", "response converted"},
    {"round trip", "client send .. client receive"},
};

}  // namespace

const char* StageName(Stage stage) {
  static constexpr const char* kNames[kNumStages] = {
      "client_build", "client_send", "to_worker", "worker_queue", "worker_validate", "worker_host", "h2d",
      "kernels", "d2h", "worker_serialize", "worker_other", "back_to_client", "client_receive", "round_trip"};
  return kNames[static_cast<int32_t>(stage)];
}

double Percentile(std::vector<double> values, double pct) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = pct / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(values.size() - 1, lo + 1);
  return values[lo] + (values[hi] - values[lo]) * (pos - static_cast<double>(lo));
}

WindowStats SlidingWindowThroughput(std::vector<std::pair<double, int64_t>> completions,
                                    std::vector<std::pair<double, double>> busy, double begin_s,
                                    double end_s, double window_s, double min_busy) {
  WindowStats stats;
  if (window_s <= 0 || end_s - begin_s < window_s) return stats;
  std::sort(completions.begin(), completions.end());
  // Merge the busy intervals.
  std::sort(busy.begin(), busy.end());
  std::vector<std::pair<double, double>> merged;
  for (const auto& [s, e] : busy) {
    if (!merged.empty() && s <= merged.back().second) {
      merged.back().second = std::max(merged.back().second, e);
    } else {
      merged.emplace_back(s, e);
    }
  }
  std::vector<double> rates;
  const double stride = window_s / 100.0;
  size_t lo = 0, hi = 0, first_busy = 0;
  int64_t in_window = 0;
  for (double t = begin_s; t + window_s <= end_s + 1e-12; t += stride) {
    // Window (t, t + window_s]: a completion at exactly t belongs to the window before.
    while (hi < completions.size() && completions[hi].first <= t + window_s) in_window += completions[hi++].second;
    while (lo < hi && completions[lo].first <= t) in_window -= completions[lo++].second;
    while (first_busy < merged.size() && merged[first_busy].second <= t) ++first_busy;
    double covered = 0;
    for (size_t i = first_busy; i < merged.size() && merged[i].first < t + window_s; ++i) {
      covered += std::min(t + window_s, merged[i].second) - std::max(t, merged[i].first);
    }
    if (covered < min_busy * window_s) continue;
    const double rate = static_cast<double>(in_window) / window_s;
    if (rates.empty() || rate < stats.worst_tokens_per_s) {
      stats.worst_tokens_per_s = rate;
      stats.worst_start_s = t;
    }
    rates.push_back(rate);
  }
  stats.windows = static_cast<int64_t>(rates.size());
  stats.median_tokens_per_s = Percentile(rates, 50);
  return stats;
}

IngestHold MeasureIngestHold(const std::vector<IngestOverlapSample>& samples, int64_t min_quiet) {
  IngestHold hold;
  using Kind = std::pair<int32_t, bool>;  // (rows, first layer)
  std::map<Kind, std::vector<double>> quiet_by_kind;
  for (const IngestOverlapSample& s : samples) {
    if (s.overlapped) {
      ++hold.overlapped;
    } else {
      ++hold.quiet;
      quiet_by_kind[{s.rows, s.first_layer}].push_back(s.ms);
    }
  }
  std::map<Kind, double> median;
  for (auto& [kind, ms] : quiet_by_kind) {
    if (static_cast<int64_t>(ms.size()) >= min_quiet) median[kind] = Percentile(std::move(ms), 50);
  }
  for (const IngestOverlapSample& s : samples) {
    if (!s.overlapped) continue;
    const auto it = median.find({s.rows, s.first_layer});
    if (it == median.end() || it->second <= 0) continue;
    // In units of a later layer's quiet time at this batch size (the shorter one) where known.
    const auto unit = median.find({s.rows, false});
    const double step_ms = unit != median.end() && unit->second > 0 ? unit->second : it->second;
    hold.excess_ms.push_back(s.ms - it->second);
    hold.excess_steps.push_back((s.ms - it->second) / step_ms);
    if (s.first_layer) hold.first_layer_excess_steps.push_back(hold.excess_steps.back());
    hold.worst.push_back({hold.excess_steps.back(), it->second, s});
    std::sort(hold.worst.begin(), hold.worst.end(),
              [](const IngestHold::Worst& a, const IngestHold::Worst& b) { return a.excess_steps > b.excess_steps; });
    if (hold.worst.size() > IngestHold::kWorstKept) hold.worst.pop_back();
  }
  if (hold.excess_ms.empty()) return hold;  // nothing compared: no control either
  for (const IngestOverlapSample& s : samples) {
    if (s.overlapped) continue;
    const auto it = median.find({s.rows, s.first_layer});
    if (it == median.end() || it->second <= 0) continue;
    const auto unit = median.find({s.rows, false});
    const double step_ms = unit != median.end() && unit->second > 0 ? unit->second : it->second;
    hold.quiet_excess_steps.push_back((s.ms - it->second) / step_ms);
  }
  return hold;
}

double ReplayReport::DecodeTokensPerSecond() const {
  return decode_s > 0 ? static_cast<double>(measured_tokens) / decode_s : 0.0;
}

std::string ReplayReport::Format() const {
  auto max_of = [](const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); };
  constexpr double kMiB = 1024.0 * 1024.0;
  std::string s;
  absl::StrAppendFormat(&s, "requests          %d/%d done, %d prompt tokens written in %.2f s (WriteKV time, summed)\n",
                        requests_done, requests_total, prompt_tokens, prefill_s);
  absl::StrAppendFormat(&s, "token steps       %d (%d layer steps, %d decode tokens, %d backpressure retries, %d micro-batches)\n",
                        token_steps, layer_steps, decode_tokens, backpressure_retries, micro_batches);
  absl::StrAppendFormat(&s, "decode tokens/s   %.1f (measured steps), %.1f overall in %.2f s\n",
                        DecodeTokensPerSecond(),
                        elapsed_s > 0 ? static_cast<double>(decode_tokens) / elapsed_s : 0.0, elapsed_s);
  absl::StrAppendFormat(&s, "layer step ms     p50 %.3f  p99 %.3f  max %.3f  (n=%d)\n",
                        Percentile(layer_step_ms, 50), Percentile(layer_step_ms, 99), max_of(layer_step_ms),
                        layer_step_ms.size());
  absl::StrAppendFormat(&s, "  beyond attention p50 %.3f  p99 %.3f  max %.3f  (layer step minus the worker's attention device time, on the layer steps it timed)\n",
                        Percentile(overhead_ms, 50), Percentile(overhead_ms, 99), max_of(overhead_ms));
  absl::StrAppendFormat(&s, "  in the worker    p50 %.3f  p99 %.3f  max %.3f  (of which waiting for an engine thread p50 %.3f  p99 %.3f)\n",
                        Percentile(server_ms, 50), Percentile(server_ms, 99), max_of(server_ms),
                        Percentile(queue_ms, 50), Percentile(queue_ms, 99));
  absl::StrAppendFormat(&s, "token step ms     p50 %.3f  p99 %.3f  max %.3f  (n=%d)\n",
                        Percentile(token_step_ms, 50), Percentile(token_step_ms, 99), max_of(token_step_ms),
                        token_step_ms.size());
  absl::StrAppendFormat(&s, "between tokens ms p50 %.3f  p99 %.3f  max %.3f  (n=%d)\n", Percentile(tbt_ms, 50),
                        Percentile(tbt_ms, 99), max_of(tbt_ms), tbt_ms.size());
  if (busy_windows > 0) {
    absl::StrAppendFormat(&s, "%.1f s windows     worst %.1f tokens/s (starting at %.2f s), median %.1f tokens/s (%d busy windows)\n",
                          window_s, worst_window_tokens_per_s, worst_window_start_s, median_window_tokens_per_s,
                          busy_windows);
  } else {
    absl::StrAppendFormat(&s, "%.1f s windows     none (no %.1f s window with decode in flight 95%% of the time)\n",
                          window_s, window_s);
  }
  if (ingest_hold.overlapped > 0) {
    const std::vector<double>& ms = ingest_hold.excess_ms;
    const std::vector<double>& steps = ingest_hold.excess_steps;
    absl::StrAppendFormat(&s, "prompt ingest     %d layer steps overlapped a prompt write (%d did not); against the median of "
                          "those that did not at the same batch size and layer kind (layer 0 or later; n=%d compared): later by p50 %.3f  "
                          "p99 %.3f  max %.3f ms = %.2f / %.2f / %.2f layer steps (layer 0 alone, n=%d: p99 %.2f max %.2f)\n",
                          ingest_hold.overlapped, ingest_hold.quiet, ms.size(), Percentile(ms, 50), Percentile(ms, 99),
                          max_of(ms), Percentile(steps, 50), Percentile(steps, 99), max_of(steps),
                          ingest_hold.first_layer_excess_steps.size(), Percentile(ingest_hold.first_layer_excess_steps, 99),
                          max_of(ingest_hold.first_layer_excess_steps));
    const std::vector<double>& quiet = ingest_hold.quiet_excess_steps;
    absl::StrAppendFormat(&s, "                  control: the quiet layer steps against the same medians, n=%d: p99 %.2f  "
                          "max %.2f layer steps\n", quiet.size(), Percentile(quiet, 99), max_of(quiet));
    for (const IngestHold::Worst& w : ingest_hold.worst) {
      absl::StrAppendFormat(&s, "                  held %.2f layer steps (B%d, %s, %.3f ms against %.3f):", w.excess_steps,
                            w.sample.rows, w.sample.first_layer ? "layer 0" : "later layer", w.sample.ms, w.median_ms);
      for (int32_t i = 0; i < kNumStages; ++i) {
        if (static_cast<Stage>(i) == Stage::kRoundTrip) continue;
        const double v = w.sample.stages[i];
        if (std::isnan(v)) continue;
        absl::StrAppendFormat(&s, " %s %.3f", StageName(static_cast<Stage>(i)), v);
      }
      absl::StrAppend(&s, "\n");
    }
  }
  if (pool_samples > 0) {
    absl::StrAppendFormat(&s,
                          "KV pool           reserved mean %.1f MiB peak %.1f MiB; used mean %.1f MiB peak %.1f MiB; "
                          "reserved/used %.3f (mean) (%d samples)\n",
                          kv_reserved_mean_bytes / kMiB, kv_reserved_peak_bytes / kMiB, kv_used_mean_bytes / kMiB,
                          kv_used_peak_bytes / kMiB,
                          kv_used_mean_bytes > 0 ? kv_reserved_mean_bytes / kv_used_mean_bytes : 0.0, pool_samples);
  }
  absl::StrAppendFormat(&s, "client            %.3f ms to build one layer-step request (overlapped with the worker); "
                        "%.2f s waiting for checks; payload pool %d rows per kind (%.1f MiB)\n",
                        client_gen_ms, check_stall_s, payload_rows, static_cast<double>(payload_bytes) / kMiB);
  const double phase_steps = static_cast<double>(std::max<int64_t>(1, client_phase_layer_steps));
  absl::StrAppendFormat(&s, "client cpu        decode thread p50 %.3f  p99 %.3f ms per layer step; process %.3f ms per "
                        "layer step (all threads), %.2f cores over %.2f s\n",
                        Percentile(client_thread_cpu_ms, 50), Percentile(client_thread_cpu_ms, 99),
                        client_process_cpu_s * 1e3 / phase_steps,
                        client_phase_s > 0 ? client_process_cpu_s / client_phase_s : 0.0, client_phase_s);
  const std::vector<double>& round_trip = stage_ms[static_cast<int32_t>(Stage::kRoundTrip)];
  absl::StrAppendFormat(&s, "layer step breakdown (ms; n=%d measured layer steps without retries)\n", round_trip.size());
  const size_t timed = stage_ms[static_cast<int32_t>(Stage::kKernels)].size();
  if (timed != round_trip.size()) {
    absl::StrAppendFormat(&s, "  H2D, kernels, D2H and worker other: the n=%d of them with device stage times (the "
                          "worker times a sample of layer-steps)\n", timed);
  }
  const bool overlapped = !stage_ms_overlapped[static_cast<int32_t>(Stage::kRoundTrip)].empty();
  if (overlapped) {
    absl::StrAppendFormat(&s, "  last columns: the n=%d of them that overlapped a prompt write\n",
                          stage_ms_overlapped[static_cast<int32_t>(Stage::kRoundTrip)].size());
    absl::StrAppendFormat(&s, "  %-18s %9s %9s %9s %9s %9s\n", "stage", "p50", "p99", "mean", "p50 ovl", "p99 ovl");
  } else {
    absl::StrAppendFormat(&s, "  %-18s %9s %9s %9s\n", "stage", "p50", "p99", "mean");
  }
  for (int32_t i = 0; i < kNumStages; ++i) {
    const std::string ovl = overlapped ? absl::StrFormat(" %9.4f %9.4f", Percentile(stage_ms_overlapped[i], 50),
                                                         Percentile(stage_ms_overlapped[i], 99))
                                       : "";
    absl::StrAppendFormat(&s, "  %-18s %9.4f %9.4f %9.4f%s  %s\n", kStageRows[i][0], Percentile(stage_ms[i], 50),
                          Percentile(stage_ms[i], 99), Mean(stage_ms[i]), ovl, kStageRows[i][1]);
  }
  if (attention_skipped) {
    absl::StrAppend(&s, "checked outputs   none: the worker skips attention (--attention=skip), its outputs are zeros\n");
  } else {
    absl::StrAppendFormat(&s, "checked outputs   %d, max relative error %.3g, max lse error %.3g, failures %d\n",
                          outputs_checked, max_rel_error, max_lse_error, check_failures);
  }
  if (!first_failure.empty()) absl::StrAppend(&s, "first failure     ", first_failure, "\n");
  return s;
}

std::string ReplayReport::TimelineCsv() const {
  std::string csv = "kind,t_s,value,value2\n";
  for (const auto& [t, n] : token_steps_at_s) absl::StrAppendFormat(&csv, "tokens,%.6f,%d,\n", t, n);
  for (size_t i = 0; i < tbt_ms.size() && i < tbt_at_s.size(); ++i) {
    absl::StrAppendFormat(&csv, "tbt,%.6f,%.4f,\n", tbt_at_s[i], tbt_ms[i]);
  }
  for (const PoolPoint& p : pool_at_s) {
    absl::StrAppendFormat(&csv, "kv,%.6f,%.0f,%.0f\n", p.at_s, p.reserved_bytes, p.used_bytes);
  }
  return csv;
}

std::string ReplayReport::ToJson() const {
  auto max_of = [](const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); };
  auto dist = [&](const std::vector<double>& v) {
    return absl::StrFormat(R"({"n": %d, "p50": %.6g, "p99": %.6g, "max": %.6g})", v.size(), Percentile(v, 50),
                           Percentile(v, 99), max_of(v));
  };
  std::string failure = first_failure;
  std::replace(failure.begin(), failure.end(), '"', '\'');
  std::string worst;  // the worst held layer-steps and their stages (ms; null: not measured)
  for (const IngestHold::Worst& w : ingest_hold.worst) {
    absl::StrAppendFormat(&worst, R"(%s{"excess_layer_steps": %.6g, "rows": %d, "first_layer": %s, "ms": %.6g, )"
                          R"("quiet_median_ms": %.6g, "stages_ms": {)",
                          worst.empty() ? "" : ", ", w.excess_steps, w.sample.rows,
                          w.sample.first_layer ? "true" : "false", w.sample.ms, w.median_ms);
    for (int32_t i = 0; i < kNumStages; ++i) {
      const double v = w.sample.stages[i];
      absl::StrAppendFormat(&worst, R"(%s"%s": %s)", i > 0 ? ", " : "", StageName(static_cast<Stage>(i)),
                            std::isnan(v) ? std::string("null") : absl::StrFormat("%.6g", v));
    }
    absl::StrAppend(&worst, "}}");
  }
  std::string breakdown, breakdown_overlapped;
  for (int32_t i = 0; i < kNumStages; ++i) {
    absl::StrAppendFormat(&breakdown, R"(%s"%s": {"n": %d, "p50": %.6g, "p99": %.6g, "mean": %.6g})", i > 0 ? ", " : "",
                          StageName(static_cast<Stage>(i)), stage_ms[i].size(), Percentile(stage_ms[i], 50),
                          Percentile(stage_ms[i], 99), Mean(stage_ms[i]));
    absl::StrAppendFormat(&breakdown_overlapped, R"(%s"%s": {"n": %d, "p50": %.6g, "p99": %.6g, "mean": %.6g})",
                          i > 0 ? ", " : "", StageName(static_cast<Stage>(i)), stage_ms_overlapped[i].size(),
                          Percentile(stage_ms_overlapped[i], 50), Percentile(stage_ms_overlapped[i], 99),
                          Mean(stage_ms_overlapped[i]));
  }
  return absl::StrCat(
      "{", absl::StrFormat(R"("requests_total": %d, "requests_done": %d, "prompt_tokens": %d, "prefill_s": %.6g, )",
                           requests_total, requests_done, prompt_tokens, prefill_s),
      absl::StrFormat(R"("token_steps": %d, "layer_steps": %d, "decode_tokens": %d, "backpressure_retries": %d, )",
                      token_steps, layer_steps, decode_tokens, backpressure_retries),
      absl::StrFormat(R"("micro_batches": %d, "elapsed_s": %.6g, "decode_s": %.6g, "measured_tokens": %d, )",
                      micro_batches, elapsed_s, decode_s, measured_tokens),
      absl::StrFormat(R"("decode_tokens_per_s": %.6g, )", DecodeTokensPerSecond()),
      R"("layer_step_ms": )", dist(layer_step_ms), R"(, "overhead_ms": )", dist(overhead_ms), R"(, "server_ms": )", dist(server_ms), R"(, "queue_ms": )", dist(queue_ms), R"(, "token_step_ms": )", dist(token_step_ms),
      R"(, "tbt_ms": )", dist(tbt_ms), ", ",
      absl::StrFormat(R"("window_s": %.6g, "worst_window_tokens_per_s": %.6g, "worst_window_start_s": %.6g, )"
                      R"("median_window_tokens_per_s": %.6g, "busy_windows": %d, )",
                      window_s, worst_window_tokens_per_s, worst_window_start_s, median_window_tokens_per_s,
                      busy_windows),
      absl::StrFormat(R"("ingest_overlapped_layer_steps": %d, "ingest_quiet_layer_steps": %d, )", ingest_hold.overlapped,
                      ingest_hold.quiet),
      R"("ingest_hold_ms": )", dist(ingest_hold.excess_ms), R"(, "ingest_hold_layer_steps": )",
      dist(ingest_hold.excess_steps), R"(, "ingest_hold_first_layer_steps": )",
      dist(ingest_hold.first_layer_excess_steps), R"(, "ingest_quiet_excess_layer_steps": )",
      dist(ingest_hold.quiet_excess_steps), R"(, "ingest_hold_worst": [)", worst, "], ",
      absl::StrFormat(R"("pool_samples": %d, "kv_reserved_mean_bytes": %.6g, "kv_reserved_peak_bytes": %.6g, )"
                      R"("kv_used_mean_bytes": %.6g, "kv_used_peak_bytes": %.6g, )",
                      pool_samples, kv_reserved_mean_bytes, kv_reserved_peak_bytes, kv_used_mean_bytes,
                      kv_used_peak_bytes),
      absl::StrFormat(R"("client_gen_ms": %.6g, "check_stall_s": %.6g, "outputs_checked": %d, "check_failures": %d, )"
                      R"("max_rel_error": %.6g, "max_lse_error": %.6g, "first_failure": "%s", )",
                      client_gen_ms, check_stall_s, outputs_checked, check_failures, max_rel_error,
                      std::isfinite(max_lse_error) ? max_lse_error : 1e300, failure),
      absl::StrFormat(R"("attention_skipped": %s, "payload_rows": %d, "payload_bytes": %d, )",
                      attention_skipped ? "true" : "false", payload_rows, payload_bytes),
      R"("client_thread_cpu_ms": )", dist(client_thread_cpu_ms), ", ",
      absl::StrFormat(R"("client_process_cpu_s": %.6g, "client_phase_s": %.6g, "client_phase_layer_steps": %d, )"
                      R"("client_process_cpu_ms_per_layer_step": %.6g, "client_cpu_cores": %.6g, )",
                      client_process_cpu_s, client_phase_s, client_phase_layer_steps,
                      client_phase_layer_steps > 0 ? client_process_cpu_s * 1e3 / static_cast<double>(client_phase_layer_steps) : 0.0,
                      client_phase_s > 0 ? client_process_cpu_s / client_phase_s : 0.0),
      R"("breakdown_ms": {)", breakdown, R"(}, "breakdown_overlapped_ms": {)", breakdown_overlapped, "}}");
}

absl::StatusOr<ReplayReport> RunReplay(WorkerClient& client, const ReplayOptions& options,
                                       const std::vector<WorkloadRequest>& requests) {
  PKV_ASSIGN_OR_RETURN(const WorkerInfo info, client.Describe());
  const ModelShape& shape = info.shape;
  const KvDataGen gen(shape, options.seed);
  // Every q/K/V byte the replay sends comes from here (generated once, before the clock starts).
  const PayloadPool data(gen, options.seed, options.payload_rows);
  const int32_t batch = std::max(1, std::min(options.batch, info.max_batch));
  const int32_t groups = std::max(1, options.micro_batches);
  const int32_t ahead = options.prefill_ahead > 0 ? options.prefill_ahead : batch * groups;
  const int64_t page = shape.page_size;
  auto life_pages = [&](const WorkloadRequest& r) {
    return (r.input_tokens + r.output_tokens + page - 1) / page;
  };
  // Pages the replay may plan with: what is free now (other tenants keep theirs).
  const int64_t budget = info.free_pages;
  const size_t row_bytes = static_cast<size_t>(shape.num_q_heads) * shape.head_dim * DTypeSize(shape.dtype);

  ReplayReport report;
  report.requests_total = static_cast<int64_t>(requests.size());
  report.micro_batches = groups;
  report.payload_rows = data.rows();
  report.payload_bytes = data.bytes();
  const uint64_t seq_base = FreshBase(options.seed, 1);
  const uint64_t step_base = FreshBase(options.seed, 2);
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  Checker checker(shape, data, options.check_threads,
                  std::max(1, hw - groups - std::max(1, options.prefill_streams)), options.check_queue_bytes);

  // Shared by every thread, under mu.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Row> ready;          // prompts written, waiting for a decode row
  size_t next = 0;                // next request to prefill
  int64_t reserved_pages = 0;     // life pages of admitted requests not yet freed on the worker
  int32_t prefilling = 0;         // prompts being written
  size_t prompts_written = 0;     // prompts ready or handed to decode
  // wait_for_prefill: decode starts once this many prompts are written; never more than the pool
  // holds at once (prompts are admitted with their whole life's pages), or decode would wait
  // for prompts that cannot be admitted until decode frees pages.
  size_t prefill_gate = std::min(static_cast<size_t>(ahead), requests.size());
  {
    int64_t pages = 0;
    size_t fit = 0;
    while (fit < prefill_gate && pages + life_pages(requests[fit]) <= budget) pages += life_pages(requests[fit++]);
    if (options.wait_for_prefill && fit < prefill_gate && options.verbose) {
      std::fprintf(stderr, "[pkv-replay] the worker's %lld free pages hold %zu of the %zu prompts to write ahead: "
                   "decode starts once those are written\n", static_cast<long long>(budget), fit, prefill_gate);
    }
    prefill_gate = std::max<size_t>(1, fit);
  }
  int32_t workers_left = std::max(1, options.prefill_streams) + groups;  // threads still running
  bool stop = false;              // a failure or --max_steps: everyone winds down
  absl::Status failure;
  int64_t token_steps = 0;
  std::vector<std::pair<Clock::time_point, Clock::time_point>> measured_spans;
  std::vector<std::pair<Clock::time_point, int64_t>> measured_completions;
  // Prompts being written (WriteKV in flight) and prompt writes begun: a layer-step overlapped
  // prompt ingest when one was in flight at its send or its answer, or one began in between.
  std::atomic<int32_t> prompts_streaming{0};
  std::atomic<int64_t> prompt_writes_begun{0};
  // Measured layer-steps answered without a retry: (rows, ms, overlapped prompt ingest).
  std::vector<IngestOverlapSample> overlap_samples;
  Clock::duration gen_time{};
  int64_t gen_count = 0;
  Clock::duration stall_time{};
  // Process CPU over the measured phase: from the first measured token step's start to the last
  // one's end, with the layer-steps answered meanwhile.
  bool cpu_phase_started = false;
  double cpu_first = 0, cpu_last = 0;
  Clock::time_point cpu_first_at, cpu_last_at;
  int64_t cpu_first_layer_steps = 0, cpu_last_layer_steps = 0;

  auto fail = [&](absl::Status s) {  // under mu
    if (failure.ok()) failure = std::move(s);
    stop = true;
    cv.notify_all();
  };
  // Every request has been prefilled and handed to a decode group (or the run stops).
  auto drained = [&] { return stop || (next >= requests.size() && prefilling == 0 && ready.empty()); };

  const Clock::time_point start = Clock::now();

  auto prefill_loop = [&] {
    if (absl::Status st = SetThisThreadNice(options.prefill_nice); !st.ok()) {
      static std::atomic<bool> told{false};
      if (!told.exchange(true)) {
        std::fprintf(stderr, "pkv-replay: prefill threads keep their priority: %s\n", st.ToString().c_str());
      }
    }
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      // Take the next request once it has arrived, fits the pool next to the admitted ones, and
      // the ready queue has room.
      if (stop || next >= requests.size()) break;
      const WorkloadRequest& r = requests[next];
      const int64_t need = life_pages(r);
      if (need > budget) {
        fail(absl::InvalidArgumentError(absl::StrCat(
            "request ", next, " needs ", need, " pages (", r.input_tokens, " prompt + ", r.output_tokens,
            " decode tokens) but the pool has ", budget,
            " free; shrink it with --context_scale/--max_context or give the worker more pages")));
        break;
      }
      const Clock::time_point arrival = start + std::chrono::milliseconds(r.arrival_ms);
      if (static_cast<int64_t>(ready.size()) + prefilling >= ahead || reserved_pages + need > budget) {
        cv.wait(lock);
        continue;
      }
      if (options.honor_arrivals && Clock::now() < arrival) {
        cv.wait_until(lock, arrival);
        continue;
      }
      const size_t index = next++;
      reserved_pages += need;
      ++prefilling;
      lock.unlock();
      Row row;
      row.seq = seq_base + index;
      row.data_id = index;
      row.length = r.input_tokens;
      row.target = r.output_tokens;
      row.life_pages = need;
      const Clock::time_point t0 = Clock::now();
      prompt_writes_begun.fetch_add(1, std::memory_order_relaxed);
      prompts_streaming.fetch_add(1, std::memory_order_relaxed);
      absl::Status s = client.WritePrompt(row.seq, r.input_tokens, options.chunk_tokens,
                                          [&](int32_t layer, int64_t off, int64_t n, std::string* k, std::string* v) {
                                            data.AppendKv(row.data_id, layer, off, n, k, v);
                                          });
      const double took = Seconds(Clock::now() - t0);
      prompts_streaming.fetch_sub(1, std::memory_order_relaxed);
      lock.lock();
      --prefilling;
      if (!s.ok()) {
        fail(absl::Status(s.code(), absl::StrCat("WriteKV of request ", index, ": ", s.message())));
        break;
      }
      report.prefill_s += took;
      report.prompt_tokens += r.input_tokens;
      ++prompts_written;
      ready.push_back(row);
      cv.notify_all();
    }
    --workers_left;
    cv.notify_all();
  };

  auto decode_loop = [&] {
    std::unique_ptr<StepStreamSession> stream;
    if (options.use_stream) {
      absl::StatusOr<std::unique_ptr<StepStreamSession>> opened = client.OpenStepStream();
      if (!opened.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        fail(opened.status());
        return;
      }
      stream = *std::move(opened);
    }
    std::vector<Row> active;
    std::vector<uint64_t> pending_free;  // finished rows, freed by the next token step's layer 0
    int64_t pending_pages = 0;
    int64_t group_steps = 0;
    Clock::duration group_stall{};
    Clock::duration group_gen_time{};  // request builds, folded into gen_time per token step
    int64_t group_gen_count = 0;
    bool skipped_seen = false;  // a response said the worker skips attention
    absl::Status group_failure;

    // Frees `pending_free` with a Release call (the group has no next token step to carry them).
    auto release_pending = [&]() -> absl::Status {
      if (pending_free.empty()) return absl::OkStatus();
      absl::StatusOr<int64_t> freed = client.Release(pending_free);
      if (!freed.ok()) return absl::Status(freed.status().code(), absl::StrCat("Release: ", freed.status().message()));
      pending_free.clear();
      std::lock_guard<std::mutex> lock(mu);
      reserved_pages -= pending_pages;
      pending_pages = 0;
      cv.notify_all();
      return absl::OkStatus();
    };

    for (;;) {
      int64_t step_index = 0;
      {
        std::unique_lock<std::mutex> lock(mu);
        if (options.wait_for_prefill) cv.wait(lock, [&] { return stop || prompts_written >= prefill_gate; });
        while (static_cast<int32_t>(active.size()) < batch && !ready.empty() && !stop) {
          active.push_back(ready.front());
          ready.pop_front();
          cv.notify_all();  // room in the ready queue
        }
        if (stop) break;
        if (active.empty()) {
          if (drained()) break;
          lock.unlock();
          if (absl::Status s = release_pending(); !s.ok()) {
            group_failure = s;
            break;
          }
          lock.lock();
          cv.wait(lock, [&] { return stop || !ready.empty() || drained(); });
          continue;
        }
        if (options.max_steps > 0 && token_steps >= options.max_steps) {
          stop = true;
          cv.notify_all();
          break;
        }
        step_index = token_steps++;
        if (group_steps >= options.warmup_steps && !cpu_phase_started) {
          cpu_phase_started = true;
          cpu_first = ProcessCpuSeconds();
          cpu_first_at = Clock::now();
          cpu_first_layer_steps = report.layer_steps;
        }
      }

      // One token step: every layer in order, each after the previous one's answer.
      const uint64_t step_id = step_base + static_cast<uint64_t>(step_index);
      const bool measured = group_steps >= options.warmup_steps;
      std::vector<std::vector<size_t>> checked(shape.num_layers);
      auto build = [&](int32_t layer) {
        StepArgs args;
        args.token_step_id = step_id;
        args.layer = layer;
        if (layer == 0) args.free = pending_free;
        const size_t b = active.size();
        args.q.reserve(b * row_bytes);
        for (size_t i = 0; i < b; ++i) {
          const Row& row = active[i];
          args.rows.push_back(row.seq);
          data.AppendQ(row.data_id, layer, row.length, &args.q);
          data.AppendKv(row.data_id, layer, row.length, 1, &args.k, &args.v);
          if (Sampled(options.seed, step_index, layer, row.data_id, options.check_fraction)) {
            checked[layer].push_back(i);
          }
        }
        args.want_lse = !checked[layer].empty();
        return args;
      };
      // Builds a layer's request; *ms: how long that took.
      auto timed_build = [&](int32_t layer, double* ms) {
        const Clock::time_point t0 = Clock::now();
        StepArgs args = build(layer);
        const Clock::duration took = Clock::now() - t0;
        group_gen_time += took;
        ++group_gen_count;
        *ms = Seconds(took) * 1e3;
        return args;
      };

      const Clock::time_point step_t0 = Clock::now();
      const Clock::duration stall_before = group_stall;
      std::vector<double> layer_ms, overhead_ms, server_ms, queue_ms, thread_cpu_ms;
      std::vector<std::array<double, kNumStages>> stages;
      std::vector<IngestOverlapSample> overlaps;
      int64_t retries = 0;
      double build_ms = 0;
      StepArgs args = timed_build(0, &build_ms);
      for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
        const double cpu0 = ThreadCpuSeconds();
        const int64_t begun0 = prompt_writes_begun.load(std::memory_order_relaxed);
        const bool streaming0 = prompts_streaming.load(std::memory_order_relaxed) > 0;
        const Clock::time_point t0 = Clock::now();
        StepArgs next_args;
        double next_build_ms = 0;
        absl::StatusOr<StepResult> result;
        if (stream) {
          absl::Status sent = stream->Send(std::move(args));
          if (sent.ok()) {
            // Build the next layer's request while the worker runs this one.
            if (layer + 1 < shape.num_layers) next_args = timed_build(layer + 1, &next_build_ms);
            result = stream->Receive();
          } else {
            result = sent;
          }
        } else {
          result = client.Step(args);
          if (result.ok() && layer + 1 < shape.num_layers) next_args = timed_build(layer + 1, &next_build_ms);
        }
        bool retried = false;
        for (int attempt = 0; !result.ok() && IsBackpressure(result.status()) && attempt < 200; ++attempt) {
          ++retries;
          retried = true;
          std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50, 1 << std::min(attempt, 6))));
          checked[layer].clear();
          StepArgs again = build(layer);  // the same request (deterministic data)
          if (!stream) {
            result = client.Step(again);
          } else if (absl::Status sent = stream->Send(std::move(again)); sent.ok()) {
            result = stream->Receive();
          } else {
            result = sent;
          }
        }
        const Clock::time_point t1 = Clock::now();
        const bool overlapped = streaming0 || prompts_streaming.load(std::memory_order_relaxed) > 0 ||
                                prompt_writes_begun.load(std::memory_order_relaxed) != begun0;
        if (!result.ok()) {
          group_failure = absl::Status(result.status().code(),
                                       absl::StrCat("Step (token step ", step_index, ", layer ", layer,
                                                    "): ", result.status().message()));
          break;
        }
        if (result->out.size() != row_bytes * active.size()) {
          group_failure = absl::InternalError(absl::StrCat("Step returned ", result->out.size(),
                                                           " output bytes, expected ", row_bytes * active.size()));
          break;
        }
        layer_ms.push_back(Seconds(t1 - t0) * 1e3);
        // Beyond attention: on the layer-steps whose attention the worker timed (it samples).
        if (result->attention_timed) overhead_ms.push_back(layer_ms.back() - result->attend_seconds * 1e3);
        server_ms.push_back(result->server_seconds * 1e3);
        queue_ms.push_back(result->queue_seconds * 1e3);
        if (!retried) {
          stages.push_back(StageSample(build_ms, *result));
          overlaps.push_back({static_cast<int32_t>(active.size()), layer_ms.back(), overlapped, layer == 0, stages.back()});
        }
        if (layer == 0 && !pending_free.empty()) {
          // The worker applied the frees with layer 0.
          pending_free.clear();
          std::lock_guard<std::mutex> lock(mu);
          reserved_pages -= pending_pages;
          pending_pages = 0;
          cv.notify_all();
        }
        // A worker that skips attention answers zeros: nothing to check.
        if (result->attention_skipped) {
          skipped_seen = true;
          checked[layer].clear();
        }
        for (size_t i : checked[layer]) {
          CheckItem item;
          item.data_id = active[i].data_id;
          item.token_step = step_index;
          item.layer = layer;
          item.len = active[i].length + 1;  // history plus the new token
          item.out.assign(result->out.data() + i * row_bytes, row_bytes);
          if (result->lse.size() == active.size() * shape.num_q_heads) {
            item.lse.assign(result->lse.begin() + i * shape.num_q_heads,
                            result->lse.begin() + (i + 1) * shape.num_q_heads);
          }
          group_stall += checker.Push(std::move(item));
        }
        thread_cpu_ms.push_back((ThreadCpuSeconds() - cpu0) * 1e3);
        args = std::move(next_args);
        build_ms = next_build_ms;
      }
      const Clock::time_point step_t1 = Clock::now();
      {
        std::lock_guard<std::mutex> lock(mu);
        report.backpressure_retries += retries;
        report.layer_steps += static_cast<int64_t>(layer_ms.size());
        gen_time += group_gen_time;
        gen_count += group_gen_count;
        group_gen_time = Clock::duration{};
        group_gen_count = 0;
        if (skipped_seen) report.attention_skipped = true;
        if (!group_failure.ok()) {
          fail(group_failure);
          break;
        }
        const Clock::duration stalled = group_stall - stall_before;
        stall_time += stalled;
        ++report.token_steps;
        report.decode_tokens += static_cast<int64_t>(active.size());
        if (measured) {
          report.layer_step_ms.insert(report.layer_step_ms.end(), layer_ms.begin(), layer_ms.end());
          report.overhead_ms.insert(report.overhead_ms.end(), overhead_ms.begin(), overhead_ms.end());
          report.server_ms.insert(report.server_ms.end(), server_ms.begin(), server_ms.end());
          report.queue_ms.insert(report.queue_ms.end(), queue_ms.begin(), queue_ms.end());
          report.client_thread_cpu_ms.insert(report.client_thread_cpu_ms.end(), thread_cpu_ms.begin(),
                                             thread_cpu_ms.end());
          overlap_samples.insert(overlap_samples.end(), overlaps.begin(), overlaps.end());
          for (size_t j = 0; j < stages.size(); ++j) {
            for (int32_t i = 0; i < kNumStages; ++i) {
              if (std::isnan(stages[j][i])) continue;  // NaN: not measured
              report.stage_ms[i].push_back(stages[j][i]);
              if (overlaps[j].overlapped) report.stage_ms_overlapped[i].push_back(stages[j][i]);
            }
          }
          cpu_last = ProcessCpuSeconds();
          cpu_last_at = step_t1;
          cpu_last_layer_steps = report.layer_steps;
          report.token_step_ms.push_back(Seconds(step_t1 - step_t0 - stalled) * 1e3);
          report.measured_tokens += static_cast<int64_t>(active.size());
          measured_spans.emplace_back(step_t0, step_t1);
          measured_completions.emplace_back(step_t1, static_cast<int64_t>(active.size()));
          report.token_steps_at_s.emplace_back(Seconds(step_t1 - start), static_cast<int64_t>(active.size()));
          for (const Row& row : active) {
            if (row.has_last) {
              report.tbt_ms.push_back(Seconds(step_t1 - row.last_token_at - (group_stall - row.stall_at_last)) * 1e3);
              report.tbt_at_s.push_back(Seconds(step_t1 - start));
            }
          }
        }
      }
      ++group_steps;
      // Retire finished rows: their frees ride on this group's next token step.
      std::vector<Row> still;
      int64_t done = 0;
      for (Row& row : active) {
        ++row.length;
        ++row.decoded;
        row.has_last = measured;
        row.last_token_at = step_t1;
        row.stall_at_last = group_stall;
        if (row.decoded >= row.target) {
          pending_free.push_back(row.seq);
          pending_pages += row.life_pages;
          ++done;
        } else {
          still.push_back(row);
        }
      }
      active.swap(still);
      if (done > 0) {
        std::lock_guard<std::mutex> lock(mu);
        report.requests_done += done;
      }
    }

    // Leave nothing behind: finished rows not yet freed, and rows cut by --max_steps or an error.
    for (const Row& row : active) pending_free.push_back(row.seq);
    absl::Status released = release_pending();
    if (stream) {
      absl::Status s = stream->Finish();
      if (released.ok()) released = s;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!group_failure.ok()) fail(group_failure);
    if (!released.ok()) fail(released);
    --workers_left;
    cv.notify_all();
  };

  std::vector<std::thread> threads;
  for (int i = 0; i < std::max(1, options.prefill_streams); ++i) {
    threads.emplace_back([&prefill_loop] {
      NameThisThread("replay-prefill");
      prefill_loop();
    });
  }
  for (int32_t g = 0; g < groups; ++g) {
    threads.emplace_back([&decode_loop] {
      NameThisThread("replay-decode");
      decode_loop();
    });
  }

  // This thread: pool samples and progress lines until the workers are done.
  double reserved_sum = 0, used_sum = 0;
  {
    Clock::time_point last_progress = start;
    Clock::time_point next_sample = start;
    const int64_t token_bytes = info.page_bytes / std::max<int64_t>(1, page);
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      Clock::time_point wake = Clock::now() + std::chrono::milliseconds(100);
      if (options.pool_sample_interval > absl::ZeroDuration()) wake = std::min(wake, next_sample);
      cv.wait_until(lock, wake);
      if (workers_left == 0) break;
      const Clock::time_point now = Clock::now();
      if (options.pool_sample_interval > absl::ZeroDuration() && now >= next_sample) {
        next_sample = now + absl::ToChronoNanoseconds(options.pool_sample_interval);
        lock.unlock();
        absl::StatusOr<WorkerInfo> pool = client.Describe();
        lock.lock();
        if (pool.ok()) {
          const double reserved = static_cast<double>(pool->used_pages) * static_cast<double>(pool->page_bytes);
          const double used = static_cast<double>(pool->used_tokens) * static_cast<double>(token_bytes);
          ++report.pool_samples;
          report.pool_at_s.push_back({Seconds(now - start), reserved, used});
          reserved_sum += reserved;
          used_sum += used;
          report.kv_reserved_peak_bytes = std::max(report.kv_reserved_peak_bytes, reserved);
          report.kv_used_peak_bytes = std::max(report.kv_used_peak_bytes, used);
        }
      }
      if (options.verbose && options.progress_interval > absl::ZeroDuration() &&
          now - last_progress >= absl::ToChronoNanoseconds(options.progress_interval)) {
        last_progress = now;
        std::fprintf(stderr,
                     "[pkv-replay] %.1f s: %lld token steps, %lld decode tokens, %lld/%lld requests done, "
                     "%zu prompts ready, %lld outputs checked\n",
                     Seconds(now - start), static_cast<long long>(report.token_steps),
                     static_cast<long long>(report.decode_tokens), static_cast<long long>(report.requests_done),
                     static_cast<long long>(report.requests_total), ready.size(),
                     static_cast<long long>(checker.checked()));
      }
    }
  }
  for (std::thread& t : threads) t.join();

  // Prompts written but never decoded (a failure or --max_steps): release them.
  std::vector<uint64_t> leftover;
  for (const Row& row : ready) leftover.push_back(row.seq);
  if (!leftover.empty()) {
    absl::StatusOr<int64_t> freed = client.Release(leftover);
    if (!freed.ok() && failure.ok()) failure = freed.status();
  }
  checker.Close();
  checker.Report(&report);
  report.elapsed_s = Seconds(Clock::now() - start);
  if (!failure.ok()) return failure;

  report.decode_s = UnionSeconds(measured_spans);
  report.ingest_hold = MeasureIngestHold(overlap_samples);
  report.client_gen_ms = gen_count > 0 ? Seconds(gen_time) * 1e3 / static_cast<double>(gen_count) : 0.0;
  report.check_stall_s = Seconds(stall_time);
  if (cpu_last_layer_steps > cpu_first_layer_steps) {
    report.client_process_cpu_s = cpu_last - cpu_first;
    report.client_phase_s = Seconds(cpu_last_at - cpu_first_at);
    report.client_phase_layer_steps = cpu_last_layer_steps - cpu_first_layer_steps;
  }
  if (report.pool_samples > 0) {
    report.kv_reserved_mean_bytes = reserved_sum / static_cast<double>(report.pool_samples);
    report.kv_used_mean_bytes = used_sum / static_cast<double>(report.pool_samples);
  }
  if (!measured_spans.empty()) {
    Clock::time_point first = measured_spans.front().first, last = measured_spans.front().second;
    for (const auto& [s, e] : measured_spans) {
      first = std::min(first, s);
      last = std::max(last, e);
    }
    std::vector<std::pair<double, int64_t>> completions;
    for (const auto& [t, n] : measured_completions) completions.emplace_back(Seconds(t - start), n);
    std::vector<std::pair<double, double>> busy;
    for (const auto& [s, e] : measured_spans) busy.emplace_back(Seconds(s - start), Seconds(e - start));
    const WindowStats w = SlidingWindowThroughput(std::move(completions), std::move(busy), Seconds(first - start),
                                                  Seconds(last - start), report.window_s);
    report.busy_windows = w.windows;
    report.worst_window_tokens_per_s = w.worst_tokens_per_s;
    report.worst_window_start_s = w.worst_start_s;
    report.median_window_tokens_per_s = w.median_tokens_per_s;
  }
  return report;
}

}  // namespace pkv::client
