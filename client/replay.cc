#include "client/replay.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/kv_data.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/workload.h"

namespace pkv::client {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct Row {
  uint64_t seq = 0;         // wire id
  uint64_t data_id = 0;     // key of its data (the request index)
  int64_t length = 0;       // tokens held (prompt + decoded so far)
  int64_t decoded = 0;      // token steps done
  int64_t target = 0;       // decode tokens wanted
  int64_t life_pages = 0;   // pages for prompt + all decode tokens
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

}  // namespace

double Percentile(std::vector<double> values, double pct) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = pct / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(values.size() - 1, lo + 1);
  return values[lo] + (values[hi] - values[lo]) * (pos - static_cast<double>(lo));
}

double ReplayReport::DecodeTokensPerSecond() const {
  return decode_s > 0 ? static_cast<double>(measured_tokens) / decode_s : 0.0;
}

std::string ReplayReport::Format() const {
  const double layer_max = layer_step_ms.empty()
                               ? 0.0
                               : *std::max_element(layer_step_ms.begin(), layer_step_ms.end());
  std::string s;
  absl::StrAppendFormat(&s, "requests          %d/%d done, %d prompt tokens written in %.2f s\n",
                        requests_done, requests_total, prompt_tokens, prefill_s);
  absl::StrAppendFormat(&s, "token steps       %d (%d layer steps, %d decode tokens, %d backpressure retries)\n",
                        token_steps, layer_steps, decode_tokens, backpressure_retries);
  absl::StrAppendFormat(&s, "decode tokens/s   %.1f (measured steps), %.1f overall in %.2f s\n",
                        DecodeTokensPerSecond(),
                        elapsed_s > 0 ? static_cast<double>(decode_tokens) / elapsed_s : 0.0, elapsed_s);
  absl::StrAppendFormat(&s, "layer step ms     p50 %.3f  p99 %.3f  max %.3f  (n=%d)\n",
                        Percentile(layer_step_ms, 50), Percentile(layer_step_ms, 99), layer_max,
                        layer_step_ms.size());
  absl::StrAppendFormat(&s, "token step ms     p50 %.3f  p99 %.3f  (n=%d)\n",
                        Percentile(token_step_ms, 50), Percentile(token_step_ms, 99),
                        token_step_ms.size());
  absl::StrAppendFormat(&s, "checked outputs   %d, max relative error %.3g, max lse error %.3g, failures %d\n",
                        outputs_checked, max_rel_error, max_lse_error, check_failures);
  if (!first_failure.empty()) absl::StrAppend(&s, "first failure     ", first_failure, "\n");
  return s;
}

absl::StatusOr<ReplayReport> RunReplay(WorkerClient& client, const ReplayOptions& options,
                                       const std::vector<WorkloadRequest>& requests) {
  PKV_ASSIGN_OR_RETURN(const WorkerInfo info, client.Describe());
  const ModelShape& shape = info.shape;
  const KvDataGen gen(shape, options.seed);
  const int32_t batch = std::max(1, std::min(options.batch, info.max_batch));
  const int64_t page = shape.page_size;
  auto life_pages = [&](const WorkloadRequest& r) {
    return (r.input_tokens + r.output_tokens + page - 1) / page;
  };
  // Pages the replay may plan with: what is free now (other tenants keep theirs).
  const int64_t budget = info.free_pages;
  const double tolerance = Tolerance(shape);

  ReplayReport report;
  report.requests_total = static_cast<int64_t>(requests.size());
  const uint64_t seq_base = FreshBase(options.seed, 1);
  const uint64_t step_base = FreshBase(options.seed, 2);

  std::unique_ptr<StepStreamSession> stream;
  if (options.use_stream) {
    PKV_ASSIGN_OR_RETURN(stream, client.OpenStepStream());
  }
  auto send = [&](const StepArgs& args) -> absl::StatusOr<StepResult> {
    for (int attempt = 0;; ++attempt) {
      absl::StatusOr<StepResult> r = stream ? stream->Step(args) : client.Step(args);
      // RESOURCE_EXHAUSTED from the work queue is backpressure: retry the same step id (safe).
      if (r.ok() || r.status().code() != absl::StatusCode::kResourceExhausted ||
          r.status().message().find("work queue") == std::string_view::npos || attempt >= 200) {
        return r;
      }
      ++report.backpressure_retries;
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50, 1 << std::min(attempt, 6))));
    }
  };

  const Clock::time_point start = Clock::now();
  Clock::time_point last_progress = start;
  std::vector<Row> active;
  int64_t reserved_pages = 0;
  size_t next = 0;
  absl::Status failure;

  while (true) {
    // Admission: fill free rows with arrived requests whose whole life fits the pool.
    while (static_cast<int32_t>(active.size()) < batch && next < requests.size()) {
      const WorkloadRequest& r = requests[next];
      if (options.honor_arrivals && Clock::now() < start + std::chrono::milliseconds(r.arrival_ms)) break;
      const int64_t need = life_pages(r);
      if (need > budget) {
        failure = absl::InvalidArgumentError(absl::StrCat(
            "request ", next, " needs ", need, " pages (", r.input_tokens, " prompt + ",
            r.output_tokens, " decode tokens) but the pool has ", budget,
            " free; shrink it with --context_scale/--max_context or give the worker more pages"));
        break;
      }
      if (reserved_pages + need > budget) break;  // wait for active rows to finish
      Row row;
      row.seq = seq_base + next;
      row.data_id = next;
      row.length = r.input_tokens;
      row.target = r.output_tokens;
      row.life_pages = need;
      const Clock::time_point t0 = Clock::now();
      absl::Status s = client.WritePrompt(
          row.seq, r.input_tokens, options.chunk_tokens,
          [&](int32_t layer, int64_t off, int64_t n, std::string* k, std::string* v) {
            gen.AppendKv(row.data_id, layer, off, n, k, v);
          });
      report.prefill_s += Seconds(Clock::now() - t0);
      if (!s.ok()) {
        failure = absl::Status(s.code(), absl::StrCat("WriteKV of request ", next, ": ", s.message()));
        break;
      }
      report.prompt_tokens += r.input_tokens;
      reserved_pages += need;
      active.push_back(row);
      ++next;
    }
    if (!failure.ok()) break;
    if (active.empty()) {
      if (next >= requests.size()) break;
      // Idle until the next arrival.
      std::this_thread::sleep_until(start + std::chrono::milliseconds(requests[next].arrival_ms));
      continue;
    }
    if (options.max_steps > 0 && report.token_steps >= options.max_steps) break;

    // One token step: every layer in order.
    const uint64_t step_id = step_base + static_cast<uint64_t>(report.token_steps);
    const bool measured = report.token_steps >= options.warmup_steps;
    const Clock::time_point step_t0 = Clock::now();
    Clock::duration check_time{};  // client-side reference work, left out of the step time
    for (int32_t layer = 0; layer < shape.num_layers && failure.ok(); ++layer) {
      StepArgs args;
      args.token_step_id = step_id;
      args.layer = layer;
      std::vector<size_t> checked;
      for (size_t i = 0; i < active.size(); ++i) {
        const Row& row = active[i];
        args.rows.push_back(row.seq);
        gen.AppendQ(row.data_id, layer, row.length, &args.q);
        gen.AppendKv(row.data_id, layer, row.length, 1, &args.k, &args.v);
        if (Sampled(options.seed, report.token_steps, layer, row.data_id, options.check_fraction)) {
          checked.push_back(i);
        }
      }
      args.want_lse = !checked.empty();
      const Clock::time_point t0 = Clock::now();
      absl::StatusOr<StepResult> result = send(args);
      const double ms = Seconds(Clock::now() - t0) * 1e3;
      if (!result.ok()) {
        failure = absl::Status(result.status().code(),
                               absl::StrCat("Step (token step ", report.token_steps, ", layer ",
                                            layer, "): ", result.status().message()));
        break;
      }
      ++report.layer_steps;
      if (measured) report.layer_step_ms.push_back(ms);
      const size_t row_bytes = static_cast<size_t>(shape.num_q_heads) * shape.head_dim * 2;
      if (result->out.size() != row_bytes * active.size()) {
        failure = absl::InternalError(absl::StrCat("Step returned ", result->out.size(),
                                                   " output bytes, expected ", row_bytes * active.size()));
        break;
      }
      const Clock::time_point check_t0 = Clock::now();
      for (size_t i : checked) {
        const Row& row = active[i];
        const int64_t len = row.length + 1;  // history plus the new token
        std::vector<double> out, lse;
        ReferenceDecode(shape, gen.Query(row.data_id, layer, row.length),
                        gen.History(DataKind::kK, row.data_id, layer, len),
                        gen.History(DataKind::kV, row.data_id, layer, len), len, &out, &lse);
        const double err = MaxRelativeError(shape, result->out.data() + i * row_bytes, out);
        double lse_err = 0;
        if (result->lse.size() == active.size() * shape.num_q_heads) {
          for (int32_t h = 0; h < shape.num_q_heads; ++h) {
            lse_err = std::max(lse_err, std::abs(result->lse[i * shape.num_q_heads + h] - lse[h]) /
                                            std::max(1.0, std::abs(lse[h])));
          }
        } else {
          lse_err = INFINITY;  // asked for and missing
        }
        ++report.outputs_checked;
        report.max_rel_error = std::max(report.max_rel_error, err);
        report.max_lse_error = std::max(report.max_lse_error, lse_err);
        if (!(err <= tolerance) || !(lse_err <= 1e-3)) {
          ++report.check_failures;
          if (report.first_failure.empty()) {
            report.first_failure = absl::StrFormat(
                "request %d token step %d layer %d length %d: rel error %.3g (tol %.3g), lse error %.3g",
                row.data_id, report.token_steps, layer, len, err, tolerance, lse_err);
          }
        }
      }
      check_time += Clock::now() - check_t0;
    }
    if (!failure.ok()) break;
    const double step_ms = Seconds(Clock::now() - step_t0 - check_time) * 1e3;
    ++report.token_steps;
    report.decode_tokens += static_cast<int64_t>(active.size());
    if (measured) {
      report.token_step_ms.push_back(step_ms);
      report.decode_s += step_ms / 1e3;
      report.measured_tokens += static_cast<int64_t>(active.size());
    }
    // Retire finished rows.
    std::vector<uint64_t> finished;
    std::vector<Row> still;
    for (Row& row : active) {
      ++row.length;
      ++row.decoded;
      if (row.decoded >= row.target) {
        finished.push_back(row.seq);
        reserved_pages -= row.life_pages;
        ++report.requests_done;
      } else {
        still.push_back(row);
      }
    }
    active.swap(still);
    if (!finished.empty()) {
      absl::StatusOr<int64_t> freed = client.Release(finished);
      if (!freed.ok()) {
        failure = absl::Status(freed.status().code(), absl::StrCat("Release: ", freed.status().message()));
        break;
      }
    }
    const Clock::time_point now = Clock::now();
    if (options.verbose && options.progress_interval > absl::ZeroDuration() &&
        now - last_progress >= absl::ToChronoNanoseconds(options.progress_interval)) {
      last_progress = now;
      std::fprintf(stderr,
                   "[pkv-replay] %.1f s: %lld token steps, %lld decode tokens, %lld/%lld requests "
                   "done, %zu active, %lld outputs checked\n",
                   Seconds(now - start), static_cast<long long>(report.token_steps),
                   static_cast<long long>(report.decode_tokens),
                   static_cast<long long>(report.requests_done),
                   static_cast<long long>(report.requests_total), active.size(),
                   static_cast<long long>(report.outputs_checked));
    }
  }

  // Leave nothing behind (rows cut by --max_steps, or after an error).
  if (!active.empty()) {
    std::vector<uint64_t> ids;
    for (const Row& row : active) ids.push_back(row.seq);
    absl::StatusOr<int64_t> freed = client.Release(ids);
    if (!freed.ok() && failure.ok()) failure = freed.status();
  }
  if (stream) {
    absl::Status s = stream->Finish();
    if (!s.ok() && failure.ok()) failure = s;
  }
  report.elapsed_s = Seconds(Clock::now() - start);
  if (!failure.ok()) return failure;
  return report;
}

}  // namespace pkv::client
