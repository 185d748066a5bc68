// bench/pkv_bench_main.cc — `pkv-bench <subcommand> [--flag=value ...]`. Subcommands:
//   kernels   kernels/cuda routes on the grid and mixed workloads (needs PKV_WITH_CUDA)
//   trace     the engine driven like a serving loop: every arm on the MISSION.md workloads
//             (bench/trace_bench.h; needs PKV_WITH_CUDA)
// Flags of `trace`: --workloads=bimodal:8,uniform:8,... --seeds=20260623,... --dtypes=fp16
//   --layers=32 --hq --hkv --d --page --warmup-steps=3 --steps=0 --requests=0 --profile=PATH
//   --pool-fraction=0.85 --csv=PATH --md=PATH --commit=SHA
// Flags of `kernels`: --dtypes=fp16,bf16 --hq=32 --hkv=8 --d=128 --page=16 --batches=1,2,...
//   --contexts=512,... --grid=1 --mixed=1 --mixed-steps=3 --runs=50 --warmup=5 --max-kv-gib=8
//   --seed=20260622 --csv=PATH --md=PATH --commit=SHA
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/dtype.h"
#ifdef PKV_BENCH_WITH_CUDA
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
  std::fprintf(stderr, "usage: pkv-bench kernels|trace [--flag=value ...] (see bench/pkv_bench_main.cc)\n");
  return 2;
}

#ifdef PKV_BENCH_WITH_CUDA
int RunTrace(int argc, char** argv) {
  pkv::bench::TraceBenchOptions o;
  std::string command = "pkv-bench";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  o.command = command;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad flag '%s' (want --name=value)\n", a.c_str());
      return 2;
    }
    const std::string k = a.substr(2, eq - 2), v = a.substr(eq + 1);
    if (k == "workloads") {
      o.workloads = SplitCsv(v);
    } else if (k == "seeds") {
      o.seeds.clear();
      for (const auto& x : SplitCsv(v)) o.seeds.push_back(std::strtoull(x.c_str(), nullptr, 10));
    } else if (k == "dtypes") {
      o.dtypes.clear();
      for (const auto& d : SplitCsv(v)) {
        auto dt = pkv::ParseDType(d);
        if (!dt.ok()) return Usage();
        o.dtypes.push_back(*dt);
      }
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
    } else if (k == "pool-fraction") {
      o.pool_fraction = std::atof(v.c_str());
    } else if (k == "csv") {
      o.csv_path = v;
    } else if (k == "md") {
      o.md_path = v;
    } else if (k == "commit") {
      o.commit = v;
    } else {
      std::fprintf(stderr, "unknown flag --%s\n", k.c_str());
      return 2;
    }
  }
  if (o.workloads.empty() || o.seeds.empty() || o.dtypes.empty()) return Usage();
  return pkv::bench::RunTraceBench(o);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string sub = argv[1];
  if (sub != "kernels" && sub != "trace") return Usage();
#ifdef PKV_BENCH_WITH_CUDA
  if (sub == "trace") return RunTrace(argc, argv);
#endif
#ifndef PKV_BENCH_WITH_CUDA
  std::fprintf(stderr, "pkv-bench kernels needs a build with PKV_WITH_CUDA=ON\n");
  return 2;
#else
  pkv::bench::KernelBenchOptions o;
  std::string command = "pkv-bench";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  o.command = command;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad flag '%s' (want --name=value)\n", a.c_str());
      return 2;
    }
    const std::string k = a.substr(2, eq - 2), v = a.substr(eq + 1);
    if (k == "dtypes") {
      o.dtypes.clear();
      for (const auto& d : SplitCsv(v)) {
        auto dt = pkv::ParseDType(d);
        if (!dt.ok()) {
          std::fprintf(stderr, "bad dtype %s\n", d.c_str());
          return 2;
        }
        o.dtypes.push_back(*dt);
      }
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
      std::fprintf(stderr, "unknown flag --%s\n", k.c_str());
      return 2;
    }
  }
  if (o.batches.empty() || o.dtypes.empty()) return Usage();
  return pkv::bench::RunKernelBench(o);
#endif
}
