// common/thread_priority.h — lowering the scheduling priority of bulk-work threads, and naming
// threads.
//
// Prompt ingest (scanning and copying prompt KV) is bulk work that may fill every core; the
// decode path is latency work that must not wait behind it for a core. A thread that does only
// bulk work can lower its own priority with a Linux nice value, so that where both compete for a
// core the kernel's scheduler runs the decode thread first; where cores are free nothing changes.
// Raising it back is not possible without privileges, so threads that serve both must not call it.
// Every long-lived thread also names itself (NameThisThread), so that `top -H`, `ps -L`, a
// debugger and /proc/<pid>/task/*/comm tell the decode, ingest and copy threads apart.
// Thread-safety: affects only the calling thread.
#pragma once

#include <string_view>

#include "absl/status/status.h"

namespace pkv {

// Sets the calling thread's nice value to `nice` (0 .. 19; 0 does nothing). INVALID_ARGUMENT
// outside that range; the system's error (e.g. a sandbox that refuses it) otherwise.
absl::Status SetThisThreadNice(int nice);

// Names the calling thread `name`, cut to Linux's 15 bytes. Best effort: does nothing where the
// system has no thread names.
void NameThisThread(std::string_view name);

}  // namespace pkv
