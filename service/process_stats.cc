#include "service/process_stats.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace pkv::service {
namespace {

absl::StatusOr<std::string> ReadText(const char* path) {
  std::ifstream in(path);
  if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return std::move(text).str();
}

}  // namespace

absl::StatusOr<ProcessStats> ReadProcessStats() {
#ifndef __linux__
  return absl::UnimplementedError("process metrics need /proc (Linux)");
#else
  ProcessStats out;
  // /proc/self/stat: "pid (comm) state ...". comm may hold spaces and parentheses, so fields are
  // counted after the last ')': field 3 (state) is the first; starttime is 22, vsize 23, rss 24.
  absl::StatusOr<std::string> stat = ReadText("/proc/self/stat");
  if (!stat.ok()) return stat.status();
  const size_t paren = stat->rfind(')');
  if (paren == std::string::npos) return absl::UnavailableError("/proc/self/stat: no ')'");
  const std::vector<std::string> fields =
      absl::StrSplit(stat->substr(paren + 1), ' ', absl::SkipWhitespace());
  constexpr size_t kStartTime = 22 - 3, kVsize = 23 - 3, kRss = 24 - 3;
  uint64_t start_ticks = 0, vsize = 0, rss_pages = 0;
  if (fields.size() <= kRss || !absl::SimpleAtoi(fields[kStartTime], &start_ticks) ||
      !absl::SimpleAtoi(fields[kVsize], &vsize) || !absl::SimpleAtoi(fields[kRss], &rss_pages)) {
    return absl::UnavailableError("/proc/self/stat: unexpected format");
  }
  // Boot time: the "btime <seconds since the epoch>" line of /proc/stat.
  absl::StatusOr<std::string> system_stat = ReadText("/proc/stat");
  if (!system_stat.ok()) return system_stat.status();
  uint64_t boot_time = 0;
  for (absl::string_view line : absl::StrSplit(*system_stat, '\n')) {
    if (absl::ConsumePrefix(&line, "btime ") && absl::SimpleAtoi(line, &boot_time)) break;
  }
  if (boot_time == 0) return absl::UnavailableError("/proc/stat: no btime line");
  const long ticks_per_second = sysconf(_SC_CLK_TCK);
  const long page_bytes = sysconf(_SC_PAGESIZE);
  if (ticks_per_second <= 0 || page_bytes <= 0) return absl::UnavailableError("sysconf failed");
  out.start_time_seconds = static_cast<double>(boot_time) + static_cast<double>(start_ticks) / ticks_per_second;
  out.virtual_bytes = static_cast<int64_t>(vsize);
  out.resident_bytes = static_cast<int64_t>(rss_pages) * page_bytes;

  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return absl::UnavailableError("cannot list /proc/self/fd");
  const std::string own = std::to_string(dirfd(dir));
  while (const dirent* e = readdir(dir)) {
    const absl::string_view name = e->d_name;
    if (name != "." && name != ".." && name != own) ++out.open_fds;  // not the listing's own fd
  }
  closedir(dir);

  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    out.max_fds = limit.rlim_cur == RLIM_INFINITY ? -1 : static_cast<int64_t>(limit.rlim_cur);
  }
  return out;
#endif
}

}  // namespace pkv::service
