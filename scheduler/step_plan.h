// scheduler/step_plan.h — what the scheduler sees (StepShape) and what it decides (StepPlan).
//
// A StepPlan is built once per token step on the host and reused for every layer of that step:
// the kernel route, split counts, the compact task list and the workspace the route needs.
// Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/decode_types.h"
#include "common/model_shape.h"

namespace pkv::scheduler {

// Facts about the device that executes the step (filled by the engine's backend).
struct DeviceInfo {
  std::string name = "cpu";
  bool is_gpu = false;
  int32_t num_sms = 0;          // streaming multiprocessors (GPU) or worker threads (CPU)
};

// The decode batch of one token step.
struct StepShape {
  ModelShape model;
  std::vector<int64_t> row_tokens;  // per row: tokens attended (history incl. the new token)
  DeviceInfo device;
};

// The scheduler's decision for one token step.
struct StepPlan {
  KernelId kernel = KernelId::kReference;
  int32_t num_splits = 1;            // uniform split count (kSequenceSplit)
  std::vector<int32_t> row_splits;   // per-row split count (empty: uniform)
  int32_t pages_per_task = 0;        // task size of the compact work list (kWorkQueue)
  std::vector<DecodeTask> tasks;     // compact work list (kWorkQueue)
  int64_t workspace_bytes = 0;       // scratch for partial (m, l, acc) states
  int32_t launches_per_layer = 1;    // kernel launches each layer costs
  double predicted_us = 0.0;         // cost model's prediction per layer (0 when not modelled)
};

}  // namespace pkv::scheduler
