// service/process_stats.h — this process's start time, memory and file descriptors, from /proc.
//
// The PoolSampler publishes them as the standard process_* metrics (common/metrics.h). Linux
// only: elsewhere ReadProcessStats returns UNIMPLEMENTED.
// Thread-safety: ReadProcessStats may be called from any thread.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace pkv::service {

struct ProcessStats {
  double start_time_seconds = 0;  // since the Unix epoch
  int64_t resident_bytes = 0;
  int64_t virtual_bytes = 0;
  int64_t open_fds = 0;
  int64_t max_fds = 0;  // the soft RLIMIT_NOFILE; -1 when unlimited
};

// Reads /proc/self/stat, /proc/stat (boot time) and /proc/self/fd. UNAVAILABLE when one of them
// cannot be read or parsed.
absl::StatusOr<ProcessStats> ReadProcessStats();

}  // namespace pkv::service
