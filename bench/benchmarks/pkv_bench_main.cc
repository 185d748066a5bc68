// bench/benchmarks/pkv_bench_main.cc — `pkv-bench <subcommand> [--flag=value ...]`: the benchmarks that need
// no gRPC (kernels, the engine driven like a serving loop, pool memory, prompt ingest).
// `pkv-bench --help` lists the subcommands and every flag with its default; `pkv-bench <sub>
// --help` one subcommand's. Each subcommand's flags are one table (name, help, default, how the
// value is stored) that both the parser and --help read, so the two cannot disagree.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "bench/benchmarks/memory_bench.h"
#include "common/dtype.h"
#ifdef PKV_BENCH_WITH_CUDA
#include "bench/benchmarks/ingest_bench.h"
#include "bench/benchmarks/kernel_bench.h"
#include "bench/benchmarks/trace_bench.h"
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

// One --name=value flag of a subcommand, bound to a field of its options.
struct Flag {
  std::string name;
  std::string help;
  std::string default_value;                     // the field's initial value, as --help prints it
  std::function<bool(const std::string&)> set;  // stores a value; false when it is malformed
};

std::string FormatDouble(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

template <typename T>
std::string JoinNumbers(const std::vector<T>& values) {
  std::string out;
  for (const T& v : values) out += (out.empty() ? "" : ",") + std::to_string(v);
  return out;
}

Flag IntFlag(std::string name, int* field, std::string help) {
  return {std::move(name), std::move(help), std::to_string(*field), [field](const std::string& v) {
            *field = std::atoi(v.c_str());
            return true;
          }};
}

Flag Int64Flag(std::string name, int64_t* field, std::string help) {
  return {std::move(name), std::move(help), std::to_string(*field), [field](const std::string& v) {
            *field = std::atoll(v.c_str());
            return true;
          }};
}

Flag Uint64Flag(std::string name, uint64_t* field, std::string help) {
  return {std::move(name), std::move(help), std::to_string(*field), [field](const std::string& v) {
            *field = std::strtoull(v.c_str(), nullptr, 10);
            return true;
          }};
}

Flag DoubleFlag(std::string name, double* field, std::string help) {
  return {std::move(name), std::move(help), FormatDouble(*field), [field](const std::string& v) {
            *field = std::atof(v.c_str());
            return true;
          }};
}

Flag BoolFlag(std::string name, bool* field, std::string help) {
  return {std::move(name), std::move(help), *field ? "1" : "0", [field](const std::string& v) {
            *field = v != "0";
            return true;
          }};
}

Flag StringFlag(std::string name, std::string* field, std::string help) {
  return {std::move(name), std::move(help), *field, [field](const std::string& v) {
            *field = v;
            return true;
          }};
}

Flag StringListFlag(std::string name, std::vector<std::string>* field, std::string help) {
  std::string shown;
  for (const auto& item : *field) shown += (shown.empty() ? "" : ",") + item;
  return {std::move(name), std::move(help), shown, [field](const std::string& v) {
            *field = SplitCsv(v);
            return true;
          }};
}

// A comma-separated list of integers ("1,8,64").
template <typename T>
Flag NumberListFlag(std::string name, std::vector<T>* field, std::string help) {
  return {std::move(name), std::move(help), JoinNumbers(*field), [field](const std::string& v) {
            field->clear();
            for (const auto& x : SplitCsv(v)) {
              if constexpr (std::is_unsigned_v<T>) {
                field->push_back(static_cast<T>(std::strtoull(x.c_str(), nullptr, 10)));
              } else {
                field->push_back(static_cast<T>(std::atoll(x.c_str())));
              }
            }
            return true;
          }};
}

// "fp16,bf16"; an unknown dtype is a malformed value.
Flag DTypesFlag(std::string name, std::vector<pkv::DType>* field, std::string help) {
  std::string shown;
  for (const pkv::DType d : *field) shown += (shown.empty() ? "" : ",") + std::string(pkv::DTypeName(d));
  return {std::move(name), std::move(help), shown, [field](const std::string& v) {
            field->clear();
            for (const auto& d : SplitCsv(v)) {
              auto dt = pkv::ParseDType(d);
              if (!dt.ok()) return false;
              field->push_back(*dt);
            }
            return true;
          }};
}

// ---- flags of each subcommand ------------------------------------------------------------

std::vector<Flag> MemoryFlags(pkv::bench::MemoryBenchOptions* o) {
  return {
      StringFlag("trace_csv", &o->trace_csv, "request trace (CSV, data/traces format); arrival times are ignored"),
      IntFlag("batch", &o->batch, "rows decoded together (continuous batching), >= 1"),
      IntFlag("requests", &o->num_requests, "requests taken from the trace; 0: all of them"),
      Int64Flag("max_output", &o->max_output, "cap on each request's decode length; 0: none"),
      Int64Flag("static_slot_tokens", &o->static_slot_tokens,
                "tokens the static baseline reserves per sequence; 0: the trace's largest prompt + output"),
      IntFlag("page", &o->page_size, "tokens per KV page"),
      IntFlag("layers", &o->num_layers, "layers of the served shape (bytes are reported for it)"),
      IntFlag("hkv", &o->num_kv_heads, "KV heads of the served shape"),
      IntFlag("d", &o->head_dim, "head size of the served shape"),
      StringFlag("md", &o->md_path, "append the result as markdown to this file; empty: none"),
      StringFlag("commit", &o->commit, "commit recorded with the results"),
  };
}

#ifdef PKV_BENCH_WITH_CUDA
std::vector<Flag> TraceFlags(pkv::bench::TraceBenchOptions* o) {
  return {
      StringListFlag("workloads", &o->workloads,
                     "name:B items, name in uniform, bimodal, zipf, bucketed, homogeneous; B rows per step"),
      NumberListFlag("seeds", &o->seeds, "workload seeds; results are reported as mean and std over them"),
      DTypesFlag("dtypes", &o->dtypes, "dtypes to run: fp16, bf16"),
      IntFlag("layers", &o->num_layers, "layer-steps per token step"),
      IntFlag("hq", &o->num_q_heads, "query heads"),
      IntFlag("hkv", &o->num_kv_heads, "KV heads"),
      IntFlag("d", &o->head_dim, "head size: 64, 128 or 256"),
      IntFlag("page", &o->page_size, "tokens per KV page"),
      IntFlag("warmup-steps", &o->warmup_steps, "token steps run before timing"),
      IntFlag("steps", &o->measured_steps, "timed token steps; 0: 48 (B > 1) or 64 (B 1)"),
      IntFlag("requests", &o->num_requests, "requests per workload; 0: 24 (B > 1) or 16 (B 1)"),
      IntFlag("attention_timing_interval", &o->attention_timing_interval,
              "every arm times its attention with GPU events on one layer-step in this many (pkv-worker "
              "--attention_timing_interval); the attention figures scale the timed ones, wall time pays the "
              "events only where they are recorded. 1: every layer-step"),
      StringFlag("profile", &o->profile_path, "calibration profile (pkv-calibrate); empty: built-in defaults"),
      DoubleFlag("pool-fraction", &o->pool_fraction, "KV pool as this share of free device memory"),
      StringFlag("decode_upload", &o->decode_upload,
                 "how the engine uploads each layer's q|k|v and each token step's descriptor: auto (what the "
                 "worker runs: a copy engine while no prompt ingest is in flight, else pull), pull (a kernel "
                 "reads mapped pinned memory), copy (a copy engine)"),
      StringFlag("csv", &o->csv_path, "write one CSV row per arm and workload here; empty: none"),
      StringFlag("md", &o->md_path, "append the summary as markdown to this file; empty: none"),
      StringFlag("commit", &o->commit, "commit recorded with the results"),
  };
}

std::vector<Flag> KernelFlags(pkv::bench::KernelBenchOptions* o) {
  return {
      DTypesFlag("dtypes", &o->dtypes, "dtypes to run: fp16, bf16"),
      IntFlag("hq", &o->num_q_heads, "query heads"),
      IntFlag("hkv", &o->num_kv_heads, "KV heads"),
      IntFlag("d", &o->head_dim, "head size: 64, 128 or 256"),
      IntFlag("page", &o->page_size, "tokens per KV page"),
      NumberListFlag("batches", &o->batches, "batch sizes of the grid"),
      NumberListFlag("contexts", &o->contexts, "context lengths (tokens) of the grid"),
      NumberListFlag("b1-extra", &o->b1_extra, "extra context lengths run at batch 1 only"),
      BoolFlag("grid", &o->grid, "run the batch x context grid (0: skip)"),
      BoolFlag("mixed", &o->mixed, "run the mixed-length workload steps (0: skip)"),
      IntFlag("mixed-steps", &o->mixed_steps, "steps drawn per mixed workload"),
      IntFlag("runs", &o->runs, "timed launches per case (at least)"),
      IntFlag("warmup", &o->warmup, "untimed launches per case"),
      DoubleFlag("max-kv-gib", &o->max_kv_gib, "device memory for KV, in GiB; larger cases are skipped"),
      Uint64Flag("seed", &o->seed, "seed of the data and the mixed workloads"),
      StringFlag("profile", &o->profile_path,
                 "cost-model profile (pkv-calibrate) of the scheduler whose plan is timed as the \"planned\" "
                 "column, the configuration the engine runs; empty: the built-in default"),
      StringFlag("csv", &o->csv_path, "write one CSV row per case and route here; empty: none"),
      StringFlag("md", &o->md_path, "append the summary as markdown to this file; empty: none"),
      StringFlag("commit", &o->commit, "commit recorded with the results"),
  };
}

std::vector<Flag> IngestFlags(pkv::bench::IngestBenchOptions* o) {
  return {
      IntFlag("prompts", &o->num_prompts, "prompts written together"),
      Int64Flag("min_tokens", &o->min_tokens, "shortest prompt (lengths spread evenly up to max_tokens)"),
      Int64Flag("max_tokens", &o->max_tokens, "longest prompt"),
      IntFlag("chunk_tokens", &o->chunk_tokens, "tokens per WriteKV-like chunk"),
      IntFlag("layers", &o->num_layers, "layers"),
      IntFlag("hkv", &o->num_kv_heads, "KV heads"),
      IntFlag("d", &o->head_dim, "head size"),
      IntFlag("page", &o->page_size, "tokens per KV page"),
      IntFlag("repeats", &o->repeats, "measured rounds (a warm-up round precedes them)"),
      IntFlag("writers", &o->writers, "threads writing the prompts concurrently (prompt i on thread i % writers)"),
      IntFlag("copy_threads", &o->copy_threads,
              "threads helping the writers copy into the pinned ingest buffers (pkv-worker --ingest_copy_threads)"),
      BoolFlag("check_finite", &o->check_finite,
               "the engine scans every chunk for NaN/inf, as pkv-worker does by default; 0: without the scan"),
      StringFlag("md", &o->md_path, "append the result as markdown to this file; empty: none"),
      StringFlag("commit", &o->commit, "commit recorded with the results"),
  };
}
#endif

// ---- parsing and help --------------------------------------------------------------------

// "pkv-bench sub --a=1 ...": the command line, recorded with the results.
std::string CommandLine(int argc, char** argv) {
  std::string command = "pkv-bench";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  return command;
}

// Stores every --name=value after the subcommand through `flags`. Returns 0, or 2 after printing
// why when a flag is malformed, unknown or has a bad value.
int ParseFlags(int argc, char** argv, const std::vector<Flag>& flags) {
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad flag '%s' (want --name=value; pkv-bench %s --help lists the flags)\n", a.c_str(),
                   argv[1]);
      return 2;
    }
    const std::string name = a.substr(2, eq - 2);
    const Flag* flag = nullptr;
    for (const Flag& f : flags) {
      if (f.name == name) flag = &f;
    }
    if (flag == nullptr || !flag->set(a.substr(eq + 1))) {
      std::fprintf(stderr, "unknown flag or bad value: %s (pkv-bench %s --help lists the flags)\n", a.c_str(),
                   argv[1]);
      return 2;
    }
  }
  return 0;
}

void PrintFlags(const std::vector<Flag>& flags) {
  for (const Flag& f : flags) {
    std::printf("  --%s=%s\n      %s\n", f.name.c_str(), f.default_value.c_str(), f.help.c_str());
  }
}

// Prints the flags of a default-constructed Options, i.e. with their defaults.
template <typename Options>
void PrintDefaultFlags(std::vector<Flag> (*flags_of)(Options*)) {
  Options defaults;
  PrintFlags(flags_of(&defaults));
}

int RunMemory(int argc, char** argv) {
  pkv::bench::MemoryBenchOptions o;
  o.command = CommandLine(argc, argv);
  if (const int rc = ParseFlags(argc, argv, MemoryFlags(&o)); rc != 0) return rc;
  if (o.batch < 1) {
    std::fprintf(stderr, "pkv-bench memory: --batch must be >= 1\n");
    return 2;
  }
  return pkv::bench::RunMemoryBench(o);
}

#ifdef PKV_BENCH_WITH_CUDA
int RunTrace(int argc, char** argv) {
  pkv::bench::TraceBenchOptions o;
  o.command = CommandLine(argc, argv);
  if (const int rc = ParseFlags(argc, argv, TraceFlags(&o)); rc != 0) return rc;
  if (o.workloads.empty() || o.seeds.empty() || o.dtypes.empty()) {
    std::fprintf(stderr, "pkv-bench trace: --workloads, --seeds and --dtypes must not be empty\n");
    return 2;
  }
  return pkv::bench::RunTraceBench(o);
}

int RunKernels(int argc, char** argv) {
  pkv::bench::KernelBenchOptions o;
  o.command = CommandLine(argc, argv);
  if (const int rc = ParseFlags(argc, argv, KernelFlags(&o)); rc != 0) return rc;
  if (o.batches.empty() || o.dtypes.empty()) {
    std::fprintf(stderr, "pkv-bench kernels: --batches and --dtypes must not be empty\n");
    return 2;
  }
  return pkv::bench::RunKernelBench(o);
}

int RunIngest(int argc, char** argv) {
  pkv::bench::IngestBenchOptions o;
  o.command = CommandLine(argc, argv);
  if (const int rc = ParseFlags(argc, argv, IngestFlags(&o)); rc != 0) return rc;
  return pkv::bench::RunIngestBench(o);
}
#endif

struct Subcommand {
  const char* name;
  const char* summary;
  void (*print_flags)();          // nullptr: not in this build
  int (*run)(int argc, char** argv);  // nullptr: not in this build
};

#ifdef PKV_BENCH_WITH_CUDA
#define PKV_CUDA_SUBCOMMAND(print, run) print, run
#else
#define PKV_CUDA_SUBCOMMAND(print, run) nullptr, nullptr
#endif

const Subcommand kSubcommands[] = {
    {"kernels",
     "every kernels/cuda route on a batch x context grid and on mixed-length steps, timed with CUDA events "
     "against a streaming-read ceiling measured in the same run (needs a GPU)",
     PKV_CUDA_SUBCOMMAND([] { PrintDefaultFlags(KernelFlags); }, RunKernels)},
    {"trace",
     "the engine driven like a serving loop on synthetic workloads: the adaptive scheduler and every fixed "
     "route, tokens/s and token-step times (needs a GPU)",
     PKV_CUDA_SUBCOMMAND([] { PrintDefaultFlags(TraceFlags); }, RunTrace)},
    {"memory",
     "reserved versus used KV memory of the paged pool and of a static baseline on a request trace (CPU only)",
     [] { PrintDefaultFlags(MemoryFlags); }, RunMemory},
    {"ingest",
     "WriteKV-style prompt ingest bandwidth into the device pool, next to a plain pinned copy (needs a GPU)",
     PKV_CUDA_SUBCOMMAND([] { PrintDefaultFlags(IngestFlags); }, RunIngest)},
};

#undef PKV_CUDA_SUBCOMMAND

bool IsHelp(const char* arg) {
  return std::strcmp(arg, "--help") == 0 || std::strcmp(arg, "-h") == 0 || std::strcmp(arg, "--helpfull") == 0 ||
         std::strcmp(arg, "help") == 0;
}

void PrintSubcommandHelp(const Subcommand& sub) {
  std::printf("pkv-bench %s [--flag=value ...]\n  %s\n", sub.name, sub.summary);
  if (sub.print_flags == nullptr) {
    std::printf("  Not in this build: it needs one configured with PKV_WITH_CUDA=ON.\n");
    return;
  }
  std::printf("Flags (shown with their defaults):\n");
  sub.print_flags();
}

void PrintHelp() {
  std::printf(
      "pkv-bench: PersistentKV benchmarks without gRPC.\n"
      "usage: pkv-bench <subcommand> [--flag=value ...]\n"
      "       pkv-bench <subcommand> --help   that subcommand's flags\n"
      "Every flag is --name=value; results go to stdout and, with --md/--csv, to files.\n\n"
      "Subcommands:\n");
  for (const Subcommand& sub : kSubcommands) std::printf("  %-8s %s\n", sub.name, sub.summary);
  for (const Subcommand& sub : kSubcommands) {
    std::printf("\n");
    PrintSubcommandHelp(sub);
  }
}

int UsageError(const char* why) {
  std::fprintf(stderr, "pkv-bench: %s\nusage: pkv-bench kernels|trace|memory|ingest [--flag=value ...]; "
               "pkv-bench --help lists the subcommands and their flags\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("no subcommand");
  if (IsHelp(argv[1])) {
    PrintHelp();
    return 0;
  }
  const Subcommand* sub = nullptr;
  for (const Subcommand& s : kSubcommands) {
    if (argv[1] == std::string(s.name)) sub = &s;
  }
  if (sub == nullptr) return UsageError((std::string("unknown subcommand '") + argv[1] + "'").c_str());
  for (int i = 2; i < argc; ++i) {
    if (IsHelp(argv[i])) {
      PrintSubcommandHelp(*sub);
      return 0;
    }
  }
  if (sub->run == nullptr) {
    std::fprintf(stderr, "pkv-bench %s needs a build with PKV_WITH_CUDA=ON\n", sub->name);
    return 2;
  }
  return sub->run(argc, argv);
}
