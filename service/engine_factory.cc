#include "service/engine_factory.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "scheduler/cost_profile.h"
#include "scheduler/scheduler.h"
#ifdef PKV_HAVE_CUDA
#include "engine/cuda_backend.h"
#endif

namespace pkv::service {

absl::StatusOr<int64_t> PoolPages(const EngineConfig& config) {
  PKV_RETURN_IF_ERROR(config.shape.Validate());
  if (config.num_pages > 0) return config.num_pages;
  const int64_t page_bytes = config.shape.page_bytes_all_layers();
  const int64_t pages = config.kv_pool_bytes / page_bytes;
  if (pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_pool_bytes (", config.kv_pool_bytes, ") holds no page of ", page_bytes,
        " bytes (", config.shape.DebugString(), "); raise it or set num_pages"));
  }
  return pages;
}

absl::StatusOr<std::unique_ptr<engine::Engine>> BuildEngine(const EngineConfig& config) {
  PKV_ASSIGN_OR_RETURN(const int64_t pages, PoolPages(config));
  if (config.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch must be >= 1, got ", config.max_batch));
  }
  if (config.backend != "auto" && config.backend != "cpu" && config.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend must be auto, cpu or cuda, got '", config.backend, "'"));
  }
  if (config.launch_mode != "eager" && config.launch_mode != "graph") {
    return absl::InvalidArgumentError(
        absl::StrCat("launch_mode must be eager or graph, got '", config.launch_mode, "'"));
  }
  if (config.attention != "run" && config.attention != "skip") {
    return absl::InvalidArgumentError(
        absl::StrCat("attention must be run or skip, got '", config.attention, "'"));
  }
  bool use_cuda = config.backend == "cuda";
#ifdef PKV_HAVE_CUDA
  if (config.backend == "auto") use_cuda = engine::CudaDeviceAvailable();
#endif
  engine::ExecutionBackendPtr backend;
  if (use_cuda) {
#ifdef PKV_HAVE_CUDA
    engine::CudaBackendOptions co;
    co.num_pages = config.gpu_memory_fraction > 0 && config.num_pages <= 0 ? 0 : pages;
    co.free_memory_fraction = config.gpu_memory_fraction;
    co.max_batch = config.max_batch;
    PKV_ASSIGN_OR_RETURN(co.launch_mode, engine::ParseLaunchMode(config.launch_mode));
    PKV_ASSIGN_OR_RETURN(backend, engine::CreateCudaBackend(config.shape, co));
#else
    return absl::FailedPreconditionError("backend=cuda: this build has no CUDA backend (PKV_WITH_CUDA=OFF)");
#endif
  } else {
    if (config.launch_mode == "graph") PKV_LOG(WARNING) << "launch_mode=graph is ignored by the cpu backend";
    PKV_ASSIGN_OR_RETURN(backend, engine::CreateCpuBackend(config.shape, pages, config.cpu_threads));
  }
  if (config.attention == "skip") {
    PKV_LOG(WARNING) << "attention=skip: layer-steps do all host work but write no KV and compute no "
                        "attention; outputs are zeros (for measuring the transport floor, not for serving)";
    backend = engine::SkipAttention(std::move(backend));
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
  engine::EngineOptions options;
  options.max_batch = config.max_batch;
  options.scatter_seed = config.scatter_seed;
  options.static_slot_tokens = config.static_slot_tokens;
  if (config.static_slot_tokens > 0) {
    PKV_LOG(WARNING) << "static baseline mode: every sequence reserves " << config.static_slot_tokens
                     << " tokens of pages at creation (for comparisons, not for serving)";
  }
  PKV_LOG(INFO) << "engine: " << config.shape.DebugString() << " pages=" << pages << " ("
                << pages * config.shape.page_bytes_all_layers() << " bytes) backend="
                << backend->name() << " max_batch=" << config.max_batch
                << " scatter_seed=" << config.scatter_seed;
  return engine::Engine::Create(options, std::move(backend), std::move(sched));
}

}  // namespace pkv::service
