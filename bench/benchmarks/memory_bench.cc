#include "bench/benchmarks/memory_bench.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "bench/benchmarks/random_data.h"
#include "common/workload.h"
#include "engine/engine.h"

namespace pkv::bench {
namespace {

struct Usage {
  int64_t steps = 0;
  double reserved_sum = 0, used_sum = 0;
  int64_t reserved_peak = 0, used_peak = 0;
  int64_t worst_slack_per_seq = 0;  // max over steps of (reserved - used) / active sequences
  int64_t pool_pages = 0;
};

absl::StatusOr<Usage> Run(const std::vector<WorkloadRequest>& reqs, int batch, int page_size, int64_t static_slot) {
  ModelShape toy;
  toy.num_layers = 1;
  toy.num_q_heads = 1;
  toy.num_kv_heads = 1;
  toy.head_dim = 64;
  toy.page_size = page_size;
  int64_t longest = 0;
  for (const auto& r : reqs) longest = std::max(longest, r.input_tokens + r.output_tokens);
  const int64_t slot = std::max(longest, static_slot);
  const int64_t pages = static_cast<int64_t>(batch) * ((slot + page_size - 1) / page_size + 1) + 16;
  auto backend = engine::CreateCpuBackend(toy, pages, 1);
  if (!backend.ok()) return backend.status();
  auto sched = scheduler::Scheduler::Create(scheduler::Scheduler::Options{});
  engine::EngineOptions eo;
  eo.max_batch = batch;
  eo.scatter_seed = 20260622;
  eo.static_slot_tokens = static_slot;
  auto eng = engine::Engine::Create(eo, std::move(*backend), std::move(*sched));
  if (!eng.ok()) return eng.status();
  engine::Engine& e = **eng;
  const auto q = RandomNormalBytes(DType::kF16, batch * 64, 1);
  struct Row {
    engine::SeqId id;
    int64_t left;
  };
  std::vector<Row> active;
  size_t next = 0;
  uint64_t step_id = 0;
  Usage u;
  u.pool_pages = pages;
  while (next < reqs.size() || !active.empty()) {
    while (static_cast<int>(active.size()) < batch && next < reqs.size()) {
      const engine::SeqId id = next + 1;
      if (auto s = e.AdoptUnwrittenPromptForBenchmark(id, reqs[next].input_tokens); !s.ok()) return s;
      active.push_back(Row{id, reqs[next].output_tokens});
      ++next;
    }
    engine::StepInput in;
    in.token_step_id = ++step_id;
    for (const Row& r : active) in.rows.push_back(r.id);
    const size_t b = in.rows.size();
    in.q = std::span<const uint8_t>(q).first(b * 64 * 2);
    in.k = in.q;
    in.v = in.q;
    if (auto out = e.Step(in); !out.ok()) return out.status();
    const kvpool::PagerStats st = e.Info().pager;
    ++u.steps;
    u.reserved_sum += st.reserved_tokens;
    u.used_sum += st.used_tokens;
    u.reserved_peak = std::max(u.reserved_peak, st.reserved_tokens);
    u.used_peak = std::max(u.used_peak, st.used_tokens);
    u.worst_slack_per_seq = std::max<int64_t>(u.worst_slack_per_seq, (st.reserved_tokens - st.used_tokens) / static_cast<int64_t>(b));
    std::vector<engine::SeqId> done;
    for (Row& r : active) {
      if (--r.left <= 0) done.push_back(r.id);
    }
    if (!done.empty()) {
      if (auto s = e.Release(done); !s.ok()) return s;
      active.erase(std::remove_if(active.begin(), active.end(), [](const Row& r) { return r.left <= 0; }), active.end());
    }
  }
  if (auto s = e.CheckConsistency(); !s.ok()) return s;
  return u;
}

}  // namespace

int RunMemoryBench(const MemoryBenchOptions& o) {
  auto reqs = ReadTraceCsv(o.trace_csv);
  if (!reqs.ok()) {
    std::fprintf(stderr, "pkv-bench memory: %s\n", std::string(reqs.status().message()).c_str());
    return 2;
  }
  if (o.num_requests > 0 && static_cast<int>(reqs->size()) > o.num_requests) reqs->resize(o.num_requests);
  ScaleWorkload(*reqs, 1.0, 0, o.max_output);
  int64_t longest = 0;
  for (const auto& r : *reqs) longest = std::max(longest, r.input_tokens + r.output_tokens);
  const int64_t slot = o.static_slot_tokens > 0 ? o.static_slot_tokens : longest;
  auto paged = Run(*reqs, o.batch, o.page_size, 0);
  auto fixed = Run(*reqs, o.batch, o.page_size, slot);
  if (!paged.ok() || !fixed.ok()) {
    std::fprintf(stderr, "pkv-bench memory: %s\n",
                 std::string((paged.ok() ? fixed.status() : paged.status()).message()).c_str());
    return 1;
  }
  const double token_bytes = 2.0 * o.num_layers * o.num_kv_heads * o.head_dim * 2;
  std::ostringstream out;
  out << "# pkv-bench memory\n\ncommit " << o.commit << ", command `" << o.command << "`\n\n"
      << "Trace " << o.trace_csv << ": " << reqs->size() << " requests, batch " << o.batch << ", page "
      << o.page_size << ", static slot " << slot << " tokens (largest prompt + output); bytes for "
      << o.num_layers << " layers x " << o.num_kv_heads << " KV heads x d " << o.head_dim << " fp16 ("
      << token_bytes / 1024 << " KiB per token).\n\n"
      << "| mode | token steps | mean used | mean reserved | peak reserved | reserved / used (mean) | worst slack per sequence |\n"
      << "|---|---|---|---|---|---|---|\n";
  auto row = [&](const char* name, const Usage& u) {
    char line[512];
    std::snprintf(line, sizeof(line), "| %s | %lld | %.1f MiB | %.1f MiB | %.1f MiB | %.3f | %lld tokens |\n", name,
                  static_cast<long long>(u.steps), u.used_sum / u.steps * token_bytes / (1 << 20),
                  u.reserved_sum / u.steps * token_bytes / (1 << 20), u.reserved_peak * token_bytes / (1 << 20),
                  u.reserved_sum / u.used_sum, static_cast<long long>(u.worst_slack_per_seq));
    out << line;
  };
  row("paged (block pager)", *paged);
  row("static (max context per slot)", *fixed);
  char tail[256];
  std::snprintf(tail, sizeof(tail), "\nStatic / paged reserved: %.2fx (mean), %.2fx (peak).\n",
                fixed->reserved_sum / paged->reserved_sum,
                static_cast<double>(fixed->reserved_peak) / paged->reserved_peak);
  out << tail;
  std::fputs(out.str().c_str(), stdout);
  if (!o.md_path.empty()) std::ofstream(o.md_path) << out.str();
  return 0;
}

}  // namespace pkv::bench
