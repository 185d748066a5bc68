// engine/step_observer.h — what the engine reports about each step, for metrics and logs.
//
// The engine calls an observer (set once before serving) at fixed points of a step's life. The
// service binds these events to its Prometheus families at start-up, so nothing on the step path
// looks a metric up by name. Calls are made with the engine's lock held: implementations must be
// cheap and non-blocking (atomic increments), and must not call back into the engine.
#pragma once

#include <cstdint>

#include "common/decode_types.h"

namespace pkv::engine {

// A token step was planned (layer 0 applied its deltas).
struct TokenStepEvent {
  KernelId kernel = KernelId::kReference;
  int32_t rows = 0;
  int64_t kv_tokens = 0;        // tokens attended per layer, summed over rows
  int32_t num_splits = 1;        // kSequenceSplit: splits of every row
  int32_t pages_per_task = 0;    // kWorkQueue: task size
  int32_t max_row_splits = 1;    // most partials any row is cut into (1: no merge)
  int32_t launches_per_layer = 1;
  double predicted_seconds = 0;  // cost model's prediction per layer (0 when not modelled)
};

// One layer of a token step ran (or was replayed from the retry cache).
struct LayerStepEvent {
  KernelId kernel = KernelId::kReference;
  int32_t rows = 0;
  int32_t layer = 0;
  bool replayed = false;
  double step_seconds = 0;       // Engine::Step from entry to the answer (lock wait included)
  double attend_seconds = 0;     // device time of the attention of this layer, when attention_timed
  bool attention_timed = true;   // attend_seconds was measured on this layer (sampled on CUDA)
  double predicted_seconds = 0;  // cost model's prediction (0 when not modelled)
  int32_t launches = 1;
};

class StepObserver {
 public:
  virtual ~StepObserver() = default;
  virtual void OnTokenStepPlanned(const TokenStepEvent&) {}
  virtual void OnLayerStep(const LayerStepEvent&) {}
  // Every layer of a token step ran: `rows` tokens were decoded.
  virtual void OnTokenStepCompleted(int32_t /*rows*/) {}
  // A token step was dropped before all layers ran (a row was released).
  virtual void OnTokenStepAborted(int32_t /*rows*/) {}
  // A WriteKV prompt was committed: `bytes` of K,V over `seconds` from BeginPrompt to Commit.
  virtual void OnPromptCommitted(int64_t /*bytes*/, double /*seconds*/) {}
};

}  // namespace pkv::engine
