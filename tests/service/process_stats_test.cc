// ReadProcessStats: the test process's own numbers, checked against what it can see itself.
#include "service/process_stats.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>

#include "gtest/gtest.h"

namespace pkv::service {
namespace {

TEST(ProcessStatsTest, ReadsThisProcess) {
  absl::StatusOr<ProcessStats> before = ReadProcessStats();
  ASSERT_TRUE(before.ok()) << before.status();
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  // Started before now, and not before this machine's clock could plausibly have run the test.
  EXPECT_LE(before->start_time_seconds, now + 1);
  EXPECT_GT(before->start_time_seconds, now - 24 * 3600);
  EXPECT_GT(before->resident_bytes, 1 << 20);
  EXPECT_GE(before->virtual_bytes, before->resident_bytes);
  EXPECT_GE(before->open_fds, 3);  // stdin, stdout, stderr
  EXPECT_TRUE(before->max_fds == -1 || before->max_fds >= before->open_fds);

  const int fd = open("/dev/null", O_RDONLY);
  ASSERT_GE(fd, 0);
  absl::StatusOr<ProcessStats> after = ReadProcessStats();
  close(fd);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->open_fds, before->open_fds + 1);
  EXPECT_EQ(after->start_time_seconds, before->start_time_seconds);
}

}  // namespace
}  // namespace pkv::service
