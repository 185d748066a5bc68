// scheduler/cost_profile.h — the calibrated constants of the decode cost model, and their file.
//
// A profile is measured on one GPU for one model shape by `pkv-calibrate` and stored as JSON:
//   {
//     "format": "pkv-calibration-v1",
//     "gpu": "NVIDIA H100 80GB HBM3",          // cudaDeviceProp::name it was measured on
//     "num_sms": 132,
//     "shape": {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 16,
//               "dtype": "fp16"},
//     "stream_read_gbps": 3100.0,    // β: whole-device streaming read of KV
//     "cta_read_gbps": 28.0,         // one work unit (CTA) streaming alone: bounds long rows
//     "resident_ctas_per_sm": 4,     // work units in flight per SM
//     "launch_us": 4.0,              // λ: cost of one kernel launch in a step
//     "merge_gbps": 1500.0,          // bandwidth of writing + reading split partials
//     "task_us": 0.25,               // fixed cost of one work unit (prologue, q load, epilogue)
//     "split_stream_efficiency": 0.8, // optional (1): share of β a uniform split reaches on
//                                     // ragged rows (unequal units leave SMs idle in the tail)
//     "wq_merge_us": 4.0,            // optional (0): the work queue's fused merge, run by the
//                                     // last task of a split row after all others finished
//     "wq_separate_merge_us": 3.0,    // optional (0: not measured, the merge stays fused): the
//                                     // work queue's merge as a launch of its own after the tasks
//     "ss_separate_merge_delta_us": -1.5 // optional (0): sequence-split with its merge as a
//                                     // launch of its own, minus with the merge fused (the last
//                                     // split of a row merges), same splits; below 0 the
//                                     // separate merge is the cheaper
//   }
// Unknown keys are ignored (forward compatible); every listed number is required unless marked
// optional. The engine
// loads the profile at start-up; without one it uses DefaultCostProfile() and logs a warning.
// Thread-safety: plain values and pure functions.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/model_shape.h"

namespace pkv::scheduler {

struct CostProfile {
  std::string gpu = "default";
  int num_sms = 132;
  int num_q_heads = 0;  // 0: any shape (the defaults)
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 0;
  std::string dtype;
  double stream_read_gbps = 2500.0;
  double cta_read_gbps = 20.0;
  int resident_ctas_per_sm = 4;
  double launch_us = 6.0;
  double merge_gbps = 1000.0;
  double task_us = 0.5;
  double split_stream_efficiency = 1.0;
  double wq_merge_us = 0.0;
  double wq_separate_merge_us = 0.0;  // 0: not measured; the work queue then always fuses its merge
  double ss_separate_merge_delta_us = 0.0;  // >= 0 (or not measured): sequence-split fuses its merge

  // OK when the profile was measured for `shape` (or is shape-agnostic).
  absl::Status Matches(const ModelShape& shape) const;
};

// Conservative built-in constants (an H100-class GPU, no calibration).
CostProfile DefaultCostProfile();

// Parses profile JSON (see the file comment). INVALID_ARGUMENT naming the missing or bad key.
absl::StatusOr<CostProfile> ParseCostProfile(const std::string& json);
// Reads and parses a profile file; NOT_FOUND when it cannot be opened.
absl::StatusOr<CostProfile> LoadCostProfile(const std::string& path);
// The JSON text of a profile (what pkv-calibrate writes).
std::string CostProfileToJson(const CostProfile& profile);

}  // namespace pkv::scheduler
