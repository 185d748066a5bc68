// MetricsObserver: engine layer-step events become the pre-bound counters of common/metrics.h.
#include "service/metrics_observer.h"

#include "gtest/gtest.h"

namespace pkv::service {
namespace {

// Layer-steps that ran feed the step histograms and the cost-model counters (the attention ones
// only when the attention was timed); a reply from the retry cache counts only as a replay.
TEST(MetricsObserverTest, LayerStepsThatRanAndRetryCacheRepliesAreCountedApart) {
  WorkerMetrics metrics(BuildInfo{"test", "none", "cuda", "none", "fp16", "default"});
  MetricsObserver observer(&metrics);
  engine::LayerStepEvent e;
  e.kernel = KernelId::kWorkQueue;
  e.rows = 8;
  e.launches = 2;
  e.attend_seconds = 0.25;
  e.predicted_seconds = 0.5;
  observer.OnLayerStep(e);
  observer.OnLayerStep(e);
  // A layer-step whose attention was not timed (sampled on CUDA): its launches and duration count,
  // its attention time (0, unmeasured) feeds neither the histogram nor the cost-model counters.
  e.attention_timed = false;
  e.attend_seconds = 0;
  observer.OnLayerStep(e);
  e.attention_timed = true;
  e.attend_seconds = 0.25;
  e.replayed = true;  // answered from the retry cache: no launch at all
  observer.OnLayerStep(e);
  EXPECT_EQ(metrics.step_replays().Value(), 1);
  const prometheus::ClientMetric launches = metrics.launches_per_step().Collect();
  EXPECT_EQ(launches.histogram.sample_count, 3u);
  EXPECT_DOUBLE_EQ(launches.histogram.sample_sum, 6.0);
  EXPECT_EQ(metrics.step_duration(KernelId::kWorkQueue).Collect().histogram.sample_count, 3u);
  EXPECT_EQ(metrics.step_attend(KernelId::kWorkQueue).Collect().histogram.sample_count, 2u);
  EXPECT_DOUBLE_EQ(metrics.measured_seconds(KernelId::kWorkQueue).Value(), 0.5);
  EXPECT_DOUBLE_EQ(metrics.predicted_seconds(KernelId::kWorkQueue).Value(), 1.0);
}

}  // namespace
}  // namespace pkv::service
