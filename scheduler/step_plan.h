// scheduler/step_plan.h — what the scheduler sees (StepShape) and what it decides (StepPlan).
//
// A StepPlan is built once per token step on the host and reused for every layer of that step:
// the kernel route, split counts, the compact task list and the workspace the route needs. It is
// the plan that runs: the scheduler fits it to the backend's PlanLimits, and backends only pack
// and launch it (they refuse a plan that exceeds their capacity, they never change it).
// Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/decode_types.h"
#include "common/model_shape.h"

namespace pkv::scheduler {

// Capacity of the backend that runs the step; every StepPlan the scheduler returns for a shape
// fits the limits of its DeviceInfo. 0 leaves a limit unbounded (the CPU backend, shapes built by
// hand in tests and benchmarks).
struct PlanLimits {
  int32_t max_partial_slots = 0;  // (row, split) partial states the backend's workspace holds
  int64_t max_tasks = 0;          // kWorkQueue tasks one token step's descriptor holds
};

// Facts about the device that executes the step (filled by the engine's backend).
struct DeviceInfo {
  std::string name = "cpu";
  bool is_gpu = false;
  int32_t num_sms = 0;          // streaming multiprocessors (GPU) or worker threads (CPU)
  PlanLimits limits;
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
  int32_t num_splits = 1;            // uniform split count (kSequenceSplit; 1 otherwise)
  int32_t pages_per_task = 0;        // task size of the compact work list (kWorkQueue)
  // kWorkQueue's compact work list (scheduler/work_list.h; empty for the other routes):
  std::vector<int32_t> row_splits;      // [B] partials each row is cut into (1: not split)
  std::vector<int32_t> partial_offset;  // [B] first partial slot of a split row
  int32_t num_partials = 0;             // partial slots the work list uses
  std::vector<DecodeTask> tasks;        // the tasks: largest first, or grouped by CTA when balanced
  // A balanced work list (BuildBalancedWorkList): CTA c runs tasks [cta_task_begin[c],
  // cta_task_begin[c + 1]) ([balanced_ctas + 1]); empty when a persistent grid strides the list.
  std::vector<int32_t> cta_task_begin;
  int32_t balanced_ctas = 0;
  // kWorkQueue, kSequenceSplit: split rows are merged by a launch of their own after the tasks
  // (else the last task or split of each (row, KV head) merges them, in the same launch).
  bool separate_merge = false;
  int64_t workspace_bytes = 0;       // scratch for partial (m, l, acc) states
  int32_t launches_per_layer = 1;    // kernel launches each layer costs
  double predicted_us = 0.0;         // cost model's prediction per layer (0 when not modelled)
};

}  // namespace pkv::scheduler
