// bench/pkv_bench_main.cc — `pkv-bench <subcommand> [--flag=value ...]`. Subcommands:
//   kernels   kernels/cuda routes on the grid and mixed workloads (needs PKV_WITH_CUDA)
//   memory    reserved vs used KV of the paged pool and of a static baseline on a trace
//             (bench/memory_bench.h; CPU only). Flags: --trace_csv --batch --requests
//             --max_output --static_slot_tokens --page --layers --hkv --d --md --commit
//   trace     the engine driven like a serving loop: every arm on the MISSION.md workloads
//             (bench/trace_bench.h; needs PKV_WITH_CUDA)
// Flags of `trace`: --workloads=bimodal:8,uniform:8,... --seeds=20260623,... --dtypes=fp16
//   --layers=32 --hq --hkv --d --page --warmup-steps=3 --steps=0 --requests=0 --profile=PATH
//   --launch-mode=eager|graph
//   --pool-fraction=0.85 --csv=PATH --md=PATH --commit=SHA
// Flags of `kernels`: --dtypes=fp16,bf16 --hq=32 --hkv=8 --d=128 --page=16 --batches=1,2,...
//   --contexts=512,... --grid=1 --mixed=1 --mixed-steps=3 --runs=50 --warmup=5 --max-kv-gib=8
//   --seed=20260622 --csv=PATH --md=PATH --commit=SHA
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/memory_bench.h"
#include "common/dtype.h"
#ifdef PKV_BENCH_WITH_CUDA
#include "bench/ingest_bench.h"
#include "bench/kernel_bench.h"
#include "bench/trace_bench.h"
#endif

namespace {

std::vector<std::string> SplitCsv(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const std::string item = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) out.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

int Usage() {
  std::fprintf(stderr, "usage: pkv-bench kernels|trace|memory|ingest [--flag=value ...] (flags of each: the comment at the top of bench/pkv_bench_main.cc)\n");
  return 2;
}

// "pkv-bench sub --a=1 ...": the command line, recorded with the results.
std::string CommandLine(int argc, char** argv) {
  std::string command = "pkv-bench";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  return command;
}

// Calls on_flag(name, value) for every --name=value after the subcommand. Returns 0, or 2 after
// printing why when a flag is malformed or on_flag rejects it (unknown name, bad value).
int ForEachFlag(int argc, char** argv, const std::function<bool(const std::string&, const std::string&)>& on_flag) {
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad flag '%s' (want --name=value)\n", a.c_str());
      return 2;
    }
    if (!on_flag(a.substr(2, eq - 2), a.substr(eq + 1))) {
      std::fprintf(stderr, "unknown flag or bad value: %s\n", a.c_str());
      return 2;
    }
  }
  return 0;
}

// "fp16,bf16" -> dtypes; false on an unknown name.
bool ParseDTypes(const std::string& v, std::vector<pkv::DType>* out) {
  out->clear();
  for (const auto& d : SplitCsv(v)) {
    auto dt = pkv::ParseDType(d);
    if (!dt.ok()) return false;
    out->push_back(*dt);
  }
  return true;
}

#ifdef PKV_BENCH_WITH_CUDA
int RunTrace(int argc, char** argv) {
  pkv::bench::TraceBenchOptions o;
  o.command = CommandLine(argc, argv);
  const int rc = ForEachFlag(argc, argv, [&o](const std::string& k, const std::string& v) {
    if (k == "workloads") {
      o.workloads = SplitCsv(v);
    } else if (k == "seeds") {
      o.seeds.clear();
      for (const auto& x : SplitCsv(v)) o.seeds.push_back(std::strtoull(x.c_str(), nullptr, 10));
    } else if (k == "dtypes") {
      return ParseDTypes(v, &o.dtypes);
    } else if (k == "layers") {
      o.num_layers = std::atoi(v.c_str());
    } else if (k == "hq") {
      o.num_q_heads = std::atoi(v.c_str());
    } else if (k == "hkv") {
      o.num_kv_heads = std::atoi(v.c_str());
    } else if (k == "d") {
      o.head_dim = std::atoi(v.c_str());
    } else if (k == "page") {
      o.page_size = std::atoi(v.c_str());
    } else if (k == "warmup-steps") {
      o.warmup_steps = std::atoi(v.c_str());
    } else if (k == "steps") {
      o.measured_steps = std::atoi(v.c_str());
    } else if (k == "requests") {
      o.num_requests = std::atoi(v.c_str());
    } else if (k == "profile") {
      o.profile_path = v;
    } else if (k == "launch-mode") {
      o.launch_mode = v;
    } else if (k == "pool-fraction") {
      o.pool_fraction = std::atof(v.c_str());
    } else if (k == "csv") {
      o.csv_path = v;
    } else if (k == "md") {
      o.md_path = v;
    } else if (k == "commit") {
      o.commit = v;
    } else {
      return false;
    }
    return true;
  });
  if (rc != 0) return rc;
  if (o.workloads.empty() || o.seeds.empty() || o.dtypes.empty()) return Usage();
  return pkv::bench::RunTraceBench(o);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string sub = argv[1];
  if (sub != "kernels" && sub != "trace" && sub != "memory" && sub != "ingest") return Usage();
  if (sub == "memory") {
    pkv::bench::MemoryBenchOptions o;
    o.command = CommandLine(argc, argv);
    const int rc = ForEachFlag(argc, argv, [&o](const std::string& k, const std::string& v) {
      if (k == "trace_csv") o.trace_csv = v;
      else if (k == "batch") o.batch = std::atoi(v.c_str());
      else if (k == "requests") o.num_requests = std::atoi(v.c_str());
      else if (k == "max_output") o.max_output = std::atoll(v.c_str());
      else if (k == "static_slot_tokens") o.static_slot_tokens = std::atoll(v.c_str());
      else if (k == "page") o.page_size = std::atoi(v.c_str());
      else if (k == "layers") o.num_layers = std::atoi(v.c_str());
      else if (k == "hkv") o.num_kv_heads = std::atoi(v.c_str());
      else if (k == "d") o.head_dim = std::atoi(v.c_str());
      else if (k == "md") o.md_path = v;
      else if (k == "commit") o.commit = v;
      else return false;
      return true;
    });
    if (rc != 0) return rc;
    if (o.batch < 1) return Usage();
    return pkv::bench::RunMemoryBench(o);
  }
#ifdef PKV_BENCH_WITH_CUDA
  if (sub == "trace") return RunTrace(argc, argv);
  if (sub == "ingest") {
    pkv::bench::IngestBenchOptions o;
    o.command = CommandLine(argc, argv);
    const int rc = ForEachFlag(argc, argv, [&o](const std::string& k, const std::string& v) {
      if (k == "prompts") o.num_prompts = std::atoi(v.c_str());
      else if (k == "min_tokens") o.min_tokens = std::atoll(v.c_str());
      else if (k == "max_tokens") o.max_tokens = std::atoll(v.c_str());
      else if (k == "chunk_tokens") o.chunk_tokens = std::atoi(v.c_str());
      else if (k == "layers") o.num_layers = std::atoi(v.c_str());
      else if (k == "hkv") o.num_kv_heads = std::atoi(v.c_str());
      else if (k == "d") o.head_dim = std::atoi(v.c_str());
      else if (k == "page") o.page_size = std::atoi(v.c_str());
      else if (k == "repeats") o.repeats = std::atoi(v.c_str());
      else if (k == "md") o.md_path = v;
      else if (k == "commit") o.commit = v;
      else return false;
      return true;
    });
    if (rc != 0) return rc;
    return pkv::bench::RunIngestBench(o);
  }
#endif
#ifndef PKV_BENCH_WITH_CUDA
  std::fprintf(stderr, "pkv-bench %s needs a build with PKV_WITH_CUDA=ON\n", sub.c_str());
  return 2;
#else
  pkv::bench::KernelBenchOptions o;
  o.command = CommandLine(argc, argv);
  const int rc = ForEachFlag(argc, argv, [&o](const std::string& k, const std::string& v) {
    if (k == "dtypes") {
      return ParseDTypes(v, &o.dtypes);
    } else if (k == "hq") {
      o.num_q_heads = std::atoi(v.c_str());
    } else if (k == "hkv") {
      o.num_kv_heads = std::atoi(v.c_str());
    } else if (k == "d") {
      o.head_dim = std::atoi(v.c_str());
    } else if (k == "page") {
      o.page_size = std::atoi(v.c_str());
    } else if (k == "batches") {
      o.batches.clear();
      for (const auto& x : SplitCsv(v)) o.batches.push_back(std::atoi(x.c_str()));
    } else if (k == "contexts") {
      o.contexts.clear();
      for (const auto& x : SplitCsv(v)) o.contexts.push_back(std::atoll(x.c_str()));
    } else if (k == "b1-extra") {
      o.b1_extra.clear();
      for (const auto& x : SplitCsv(v)) o.b1_extra.push_back(std::atoll(x.c_str()));
    } else if (k == "grid") {
      o.grid = v != "0";
    } else if (k == "mixed") {
      o.mixed = v != "0";
    } else if (k == "mixed-steps") {
      o.mixed_steps = std::atoi(v.c_str());
    } else if (k == "runs") {
      o.runs = std::atoi(v.c_str());
    } else if (k == "warmup") {
      o.warmup = std::atoi(v.c_str());
    } else if (k == "max-kv-gib") {
      o.max_kv_gib = std::atof(v.c_str());
    } else if (k == "seed") {
      o.seed = std::strtoull(v.c_str(), nullptr, 10);
    } else if (k == "csv") {
      o.csv_path = v;
    } else if (k == "md") {
      o.md_path = v;
    } else if (k == "commit") {
      o.commit = v;
    } else {
      return false;
    }
    return true;
  });
  if (rc != 0) return rc;
  if (o.batches.empty() || o.dtypes.empty()) return Usage();
  return pkv::bench::RunKernelBench(o);
#endif
}
