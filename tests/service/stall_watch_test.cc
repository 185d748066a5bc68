// Tests of StallWatch (service/stall_watch.h): it counts its timer's late wake-ups, and a real
// process-wide stall (the process stopped with SIGSTOP and continued by a child) shows as one.
#include "service/stall_watch.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "gtest/gtest.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace pkv::service {
namespace {

TEST(StallWatchTest, CountsWakeUpsLaterThanItsThreshold) {
  // Every timer wake-up comes some microseconds late: with a 1 us threshold each is counted.
  StallWatch::Options o;
  o.threshold = std::chrono::microseconds(1);
  o.log = false;
  StallWatch watch(o);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  watch.Stop();
  EXPECT_GT(watch.stalls(), 5);
  EXPECT_GT(watch.max_late_us(), 1);
  const int64_t after = watch.stalls();
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(watch.stalls(), after);  // stopped
}

TEST(StallWatchTest, AStoppedProcessIsAStall) {
  prometheus::Registry registry;
  prometheus::Histogram& histogram =
      prometheus::BuildHistogram().Name("stalls").Register(registry).Add({}, prometheus::Histogram::BucketBoundaries{0.01});
  StallWatch::Options o;  // 1 ms tick, 1 ms threshold
  o.histogram = &histogram;
  StallWatch watch(o);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  int done[2];
  ASSERT_EQ(pipe(done), 0);
  const pid_t parent = getpid();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Continues the parent every 30 ms until it says it runs again (at most about 3 s).
    close(done[1]);
    for (int i = 0; i < 100; ++i) {
      usleep(30000);
      kill(parent, SIGCONT);
      pollfd p{done[0], POLLIN, 0};
      if (poll(&p, 1, 0) > 0) break;
    }
    _exit(0);
  }
  close(done[0]);
  const auto stopped = std::chrono::steady_clock::now();
  raise(SIGSTOP);  // the whole process, the watch's thread included, until the child continues it
  const auto resumed = std::chrono::steady_clock::now();
  ASSERT_EQ(write(done[1], "x", 1), 1);
  close(done[1]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the watch wakes and measures
  watch.Stop();
  const int64_t stopped_us = std::chrono::duration_cast<std::chrono::microseconds>(resumed - stopped).count();
  ASSERT_GE(stopped_us, 20000) << "the process was not stopped";
  EXPECT_GE(watch.stalls(), 1);
  EXPECT_GE(watch.max_late_us(), stopped_us / 2);
  // Each stall is observed with its lateness: the stop is at least one of them, over 10 ms.
  const prometheus::ClientMetric m = histogram.Collect();
  EXPECT_EQ(static_cast<int64_t>(m.histogram.sample_count), watch.stalls());
  EXPECT_GE(m.histogram.sample_sum, stopped_us / 2 * 1e-6);
  EXPECT_LT(m.histogram.bucket.front().cumulative_count, m.histogram.sample_count);  // one over 10 ms
}

}  // namespace
}  // namespace pkv::service
