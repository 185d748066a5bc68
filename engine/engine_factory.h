// engine/engine_factory.h — builds the engine a worker serves from its start-up configuration.
//
// Chooses the execution backend (auto: CUDA when compiled in and a GPU is present, else CPU),
// sizes the KV pool (a page count, a byte budget or, on CUDA, a share of free device memory: at
// most one of them, or the backend's default) and wires the scheduler to the routes the backend
// can run. Used by pkv-worker and by the integration tests, so both serve exactly the same thing.
// Field names follow pkv-worker's flags, and so do the error messages. Thread-safety: pure
// functions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/model_shape.h"
#include "engine/engine.h"

namespace pkv::engine {

// KV pool of a configuration that sets no size: the CPU backend's host bytes, the CUDA backend's
// share of free device memory.
inline constexpr int64_t kDefaultCpuPoolBytes = int64_t{1} << 30;
inline constexpr double kDefaultGpuMemoryFraction = 0.85;

struct EngineConfig {
  ModelShape shape;
  // The KV pool's size: at most one of these three may be set (non-zero); with none set the
  // backend's default above applies.
  int64_t num_pages = 0;             // exactly this many pages, on every backend
  int64_t kv_pool_bytes = 0;         // floor(bytes / page_bytes_all_layers) pages, on every backend
  double gpu_memory_fraction = 0;    // CUDA backend only: this share of free device memory, (0, 1]
  std::string backend = "auto";      // "auto", "cpu" or "cuda"
  int cpu_threads = 0;               // CPU backend threads; 0: hardware concurrency
  int ingest_copy_threads = 4;       // CUDA backend: prompt KV copy helpers (CudaBackendOptions)
  int ingest_nice = 0;               // CUDA backend: those helpers' nice value (CudaBackendOptions)
  // CUDA backend: attention device time measured on one layer-step in this many per descriptor
  // slot (CudaBackendOptions::attention_timing_interval); 1: every layer-step.
  int32_t attention_timing_interval = 8;
  int32_t max_batch = 256;           // rows per step
  uint64_t scatter_seed = 0;         // 0: ascending page order; else a seeded permutation
  std::string calibration_profile;   // cost-model profile JSON; empty: built-in defaults
  std::string fixed_kernel;          // empty: adaptive; else one route for every step
  int64_t static_slot_tokens = 0;    // > 0: static baseline (see EngineOptions)
  // Limits and leases (EngineOptions has the meaning and the defaults of each).
  int32_t retry_window = 32;
  int64_t max_prompt_tokens = 0;
  int64_t max_sequences = 0;
  bool check_finite = true;
  double token_step_idle_seconds = 30;
  double sequence_idle_seconds = 0;
  // "run", or "skip": every host step but no KV write and no attention, zero outputs
  // (SkipAttention; for measuring the transport and host floor).
  std::string attention = "run";
};

// The KV pool one backend gets: `pages` > 0, or (CUDA backend only) pages 0 and
// `gpu_memory_fraction` of the free device memory, which only the device can turn into pages.
struct PoolSize {
  int64_t pages = 0;
  double gpu_memory_fraction = 0;
  std::string origin;  // the setting it comes from, for the start-up log: "--num_pages=4096", ...
};

// The pool size `config` asks of the CPU (`cuda` false) or the CUDA backend. INVALID_ARGUMENT,
// naming the settings, when a bad shape, more than one size is set, a size is out of range, the
// byte budget holds no page, or gpu_memory_fraction is set for the CPU backend.
absl::StatusOr<PoolSize> ResolvePoolSize(const EngineConfig& config, bool cuda);

// Validates the configuration and creates the engine. INVALID_ARGUMENT for a bad shape, pool
// size (ResolvePoolSize), backend name or attention; FAILED_PRECONDITION naming
// --backend=cuda when backend is cuda in a build without CUDA or on a host where no GPU is usable.
absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineConfig& config);

}  // namespace pkv::engine
