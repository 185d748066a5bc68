#include "engine/engine_factory.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "scheduler/cost_profile.h"
#include "scheduler/scheduler.h"
#ifdef PKV_HAVE_CUDA
#include "engine/cuda_backend.h"
#endif

namespace pkv::engine {

absl::StatusOr<PoolSize> ResolvePoolSize(const EngineConfig& config, bool cuda) {
  PKV_RETURN_IF_ERROR(config.shape.Validate());
  if (config.num_pages < 0 || config.kv_pool_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--num_pages (", config.num_pages, ") and --kv_pool_bytes (",
                                                   config.kv_pool_bytes, ") must be >= 0 (0: not set)"));
  }
  if (!(config.gpu_memory_fraction >= 0 && config.gpu_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu_memory_fraction must be in (0, 1] (0: not set), got ",
                                                   config.gpu_memory_fraction));
  }
  std::vector<std::string> set;
  if (config.num_pages > 0) set.push_back(absl::StrCat("--num_pages=", config.num_pages));
  if (config.kv_pool_bytes > 0) set.push_back(absl::StrCat("--kv_pool_bytes=", config.kv_pool_bytes));
  if (config.gpu_memory_fraction > 0) {
    set.push_back(absl::StrCat("--gpu_memory_fraction=", config.gpu_memory_fraction));
  }
  if (set.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the KV pool size is set more than once (", absl::StrJoin(set, ", "),
        "); set only one of --num_pages, --kv_pool_bytes and --gpu_memory_fraction"));
  }
  PoolSize size;
  if (config.gpu_memory_fraction > 0) {
    if (!cuda) {
      return absl::InvalidArgumentError(absl::StrCat(
          set.front(), " sizes the CUDA backend's pool, but the cpu backend serves (--backend=", config.backend,
          config.backend == "auto" ? " found no usable GPU" : "",
          "); size the host pool with --kv_pool_bytes or --num_pages"));
    }
    size.gpu_memory_fraction = config.gpu_memory_fraction;
    size.origin = set.front();
    return size;
  }
  if (config.num_pages > 0) {
    size.pages = config.num_pages;
    size.origin = set.front();
    return size;
  }
  if (config.kv_pool_bytes == 0 && cuda) {
    size.gpu_memory_fraction = kDefaultGpuMemoryFraction;
    size.origin = absl::StrCat("the CUDA default, --gpu_memory_fraction=", kDefaultGpuMemoryFraction);
    return size;
  }
  const int64_t bytes = config.kv_pool_bytes > 0 ? config.kv_pool_bytes : kDefaultCpuPoolBytes;
  size.origin = config.kv_pool_bytes > 0 ? set.front() : absl::StrCat("the CPU default, --kv_pool_bytes=", bytes);
  const int64_t page_bytes = config.shape.page_bytes_all_layers();
  size.pages = bytes / page_bytes;
  if (size.pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        size.origin, " holds no page of ", page_bytes, " bytes (", config.shape.DebugString(),
        "); raise it or set --num_pages"));
  }
  return size;
}

absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineConfig& config) {
  PKV_RETURN_IF_ERROR(config.shape.Validate());
  if (config.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch must be >= 1, got ", config.max_batch));
  }
  if (config.ingest_copy_threads < 0 || config.ingest_copy_threads > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("ingest_copy_threads must be in [0, 64], got ", config.ingest_copy_threads));
  }
  if (config.ingest_nice < 0 || config.ingest_nice > 19) {
    return absl::InvalidArgumentError(absl::StrCat("ingest_nice must be in [0, 19], got ", config.ingest_nice));
  }
  if (config.attention_timing_interval < 1 || config.attention_timing_interval > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("attention_timing_interval must be in [1, 1024], got ",
                                                   config.attention_timing_interval));
  }
  if (config.backend != "auto" && config.backend != "cpu" && config.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend must be auto, cpu or cuda, got '", config.backend, "'"));
  }
  if (config.attention != "run" && config.attention != "skip") {
    return absl::InvalidArgumentError(
        absl::StrCat("attention must be run or skip, got '", config.attention, "'"));
  }
  bool use_cuda = config.backend == "cuda";
#ifdef PKV_HAVE_CUDA
  const bool gpu_usable = config.backend != "cpu" && CudaDeviceAvailable();  // cpu: never probe
  if (config.backend == "auto") {
    use_cuda = gpu_usable;
    if (!gpu_usable) PKV_LOG(WARNING) << "--backend=auto: no usable CUDA device; serving on the cpu backend";
  }
  if (config.backend == "cuda" && !gpu_usable) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--backend=cuda, but no CUDA device is usable: none is visible to this process, or the NVIDIA driver is "
        "missing or older than this build's CUDA ", PKV_CUDA_VERSION, " needs (CUDA 13 needs an R580 or newer "
        "driver). Give the process a GPU (Kubernetes: an nvidia.com/gpu limit and the NVIDIA container runtime) "
        "or pass --backend=cpu"));
  }
#else
  if (config.backend == "cuda") {
    return absl::FailedPreconditionError(
        "--backend=cuda, but this build has no CUDA backend (built with PKV_WITH_CUDA=OFF); pass --backend=cpu");
  }
#endif
  PKV_ASSIGN_OR_RETURN(const PoolSize pool, ResolvePoolSize(config, use_cuda));
  ExecutionBackendPtr backend;
  if (use_cuda) {
#ifdef PKV_HAVE_CUDA
    CudaBackendOptions co;
    co.num_pages = pool.pages;
    co.free_memory_fraction = pool.gpu_memory_fraction;
    co.max_batch = config.max_batch;
    co.ingest_copy_threads = config.ingest_copy_threads;
    co.ingest_nice = config.ingest_nice;
    co.attention_timing_interval = config.attention_timing_interval;
    PKV_ASSIGN_OR_RETURN(backend, CreateCudaBackend(config.shape, co));
#endif
  } else {
    PKV_ASSIGN_OR_RETURN(backend, CreateCpuBackend(config.shape, pool.pages, config.cpu_threads));
  }
  if (config.attention == "skip") {
    PKV_LOG(WARNING) << "attention=skip: layer-steps do all host work but write no KV and compute no "
                        "attention; outputs are zeros (for measuring the transport floor, not for serving)";
    backend = SkipAttention(std::move(backend));
  }
  scheduler::Scheduler::Options sched_options;
  sched_options.available = backend->kernels();
  if (!config.fixed_kernel.empty()) {
    PKV_ASSIGN_OR_RETURN(sched_options.fixed_kernel, ParseKernelId(config.fixed_kernel));
  }
  if (!config.calibration_profile.empty()) {
    PKV_ASSIGN_OR_RETURN(sched_options.profile, scheduler::LoadCostProfile(config.calibration_profile));
    PKV_RETURN_IF_ERROR(sched_options.profile.Matches(config.shape));
    PKV_LOG(INFO) << "calibration profile " << config.calibration_profile << " (measured on "
                  << sched_options.profile.gpu << ")";
  } else if (backend->device_info().is_gpu) {
    PKV_LOG(WARNING) << "no --calibration_profile: the scheduler uses built-in conservative defaults";
  }
  PKV_ASSIGN_OR_RETURN(scheduler::Scheduler sched, scheduler::Scheduler::Create(sched_options));
  EngineOptions options;
  options.max_batch = config.max_batch;
  options.scatter_seed = config.scatter_seed;
  options.static_slot_tokens = config.static_slot_tokens;
  if (config.retry_window < 1) return absl::InvalidArgumentError("--retry_window must be >= 1");
  if (config.max_prompt_tokens < 0) return absl::InvalidArgumentError("--max_prompt_tokens must be >= 0");
  if (config.max_sequences < 0) return absl::InvalidArgumentError("--max_sequences must be >= 0");
  if (config.token_step_idle_seconds < 0 || config.sequence_idle_seconds < 0) {
    return absl::InvalidArgumentError("--token_step_idle_s and --sequence_idle_s must be >= 0");
  }
  options.retained_token_steps = config.retry_window;
  options.max_prompt_tokens = config.max_prompt_tokens;
  options.max_sequences = config.max_sequences;
  options.check_finite = config.check_finite;
  options.token_step_idle_seconds = config.token_step_idle_seconds;
  options.sequence_idle_seconds = config.sequence_idle_seconds;
  if (config.static_slot_tokens > 0) {
    PKV_LOG(WARNING) << "static baseline mode: every sequence reserves " << config.static_slot_tokens
                     << " tokens of pages at creation (for comparisons, not for serving)";
  }
  PKV_ASSIGN_OR_RETURN(auto engine, Engine::Create(options, std::move(backend), std::move(sched)));
  const int64_t pages = engine->Info().pager.total_pages;
  PKV_LOG(INFO) << "engine: " << config.shape.DebugString() << " pages=" << pages << " ("
                << pages * config.shape.page_bytes_all_layers() << " bytes, from " << pool.origin
                << ") backend=" << engine->Info().backend << " max_batch=" << config.max_batch
                << " scatter_seed=" << config.scatter_seed;
  return engine;
}

}  // namespace pkv::engine
