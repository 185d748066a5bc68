// service/engine_factory.h — builds the engine a worker serves from its start-up configuration.
//
// Chooses the execution backend (auto: CUDA when compiled in and a GPU is present, else CPU),
// sizes the KV pool (an explicit page count, or as many pages as fit in a byte budget) and wires
// the scheduler to the routes the backend can run. Used by pkv-worker and by the integration
// tests, so both serve exactly the same thing. Thread-safety: pure function.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/model_shape.h"
#include "engine/engine.h"

namespace pkv::service {

struct EngineConfig {
  ModelShape shape;
  int64_t num_pages = 0;             // > 0: exactly this many pages (wins over kv_pool_bytes)
  int64_t kv_pool_bytes = 1LL << 30;  // otherwise: floor(bytes / page_bytes_all_layers) pages
  std::string backend = "auto";      // "auto", "cpu" or "cuda"
  int cpu_threads = 0;               // CPU backend threads; 0: hardware concurrency
  int32_t max_batch = 256;           // rows per step
  uint64_t scatter_seed = 0;         // 0: ascending page order; else a seeded permutation
  // CUDA backend: > 0 sizes the pool as this share of free device memory (ignores
  // kv_pool_bytes; num_pages still wins).
  double gpu_memory_fraction = 0;
  std::string calibration_profile;   // cost-model profile JSON; empty: built-in defaults
  std::string fixed_kernel;          // empty: adaptive; else one route for every step
  int64_t static_slot_tokens = 0;    // > 0: static baseline (see engine::EngineOptions)
  std::string launch_mode = "eager";  // CUDA backend: "eager" or "graph" (engine::LaunchMode)
  // "run", or "skip": every host step but no KV write and no attention, zero outputs
  // (engine::SkipAttention; for measuring the transport and host floor).
  std::string attention = "run";
};

// Pages the configuration asks for (INVALID_ARGUMENT when fewer than one).
absl::StatusOr<int64_t> PoolPages(const EngineConfig& config);

// Validates the configuration and creates the engine. INVALID_ARGUMENT for a bad shape, pool
// size, backend name, launch_mode or attention; FAILED_PRECONDITION for backend=cuda in a build or host without CUDA.
absl::StatusOr<std::unique_ptr<engine::Engine>> BuildEngine(const EngineConfig& config);

}  // namespace pkv::service
