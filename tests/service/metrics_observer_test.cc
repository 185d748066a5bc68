// MetricsObserver: engine layer-step events become the pre-bound counters of common/metrics.h.
#include "service/metrics_observer.h"

#include "gtest/gtest.h"

namespace pkv::service {
namespace {

TEST(MetricsObserverTest, CudaGraphOutcomeOfEachLayerStepIsCounted) {
  WorkerMetrics metrics(BuildInfo{"test", "none", "cuda", "none", "fp16", "default"});
  MetricsObserver observer(&metrics);
  engine::LayerStepEvent e;
  e.kernel = KernelId::kWorkQueue;
  e.rows = 8;
  e.graph_replay = false;  // the token step's first layer: captured and updated the graph
  observer.OnLayerStep(e);
  e.graph_replay = true;   // later layers: patched and replayed
  observer.OnLayerStep(e);
  observer.OnLayerStep(e);
  e.replayed = true;       // answered from the retry cache: no launch at all
  observer.OnLayerStep(e);
  EXPECT_EQ(metrics.graph_hits().Value(), 2);
  EXPECT_EQ(metrics.graph_misses().Value(), 1);
  EXPECT_EQ(metrics.step_replays().Value(), 1);
}

}  // namespace
}  // namespace pkv::service
