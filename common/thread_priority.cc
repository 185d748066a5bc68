#include "common/thread_priority.h"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace pkv {

absl::Status SetThisThreadNice(int nice) {
  if (nice < 0 || nice > 19) return absl::InvalidArgumentError(absl::StrCat("nice ", nice, " is not in [0, 19]"));
  if (nice == 0) return absl::OkStatus();
  // On Linux a nice value is per thread: PRIO_PROCESS with a thread id sets that thread's alone.
  const pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  if (setpriority(PRIO_PROCESS, static_cast<id_t>(tid), nice) != 0) {
    const int err = errno;
    return absl::FailedPreconditionError(absl::StrCat("setpriority(", nice, "): ", std::strerror(err)));
  }
  return absl::OkStatus();
}

void NameThisThread(std::string_view name) {
  const std::string cut(name.substr(0, 15));  // Linux keeps 15 bytes and the terminator
  (void)pthread_setname_np(pthread_self(), cut.c_str());
}

}  // namespace pkv
