// common/log.h — minimal leveled logging and invariant checks.
//
// Abseil 20220623 ships neither absl::log nor CHECK, so PersistentKV has its own small pair:
//   PKV_LOG(INFO) << "...";    one line to stderr with time, level and source location.
//   PKV_CHECK(cond) << "why";  aborts with the message when an invariant is broken.
// Checks are for broken invariants only; input and environment problems are absl::Status.
// Thread-safe: each message is formatted privately and written with one call.
#pragma once

#include <sstream>
#include <string_view>

namespace pkv {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

// Messages below this level are dropped. Default kInfo; PKV_LOG_LEVEL=debug|info|warning|error.
LogLevel MinLogLevel();
void SetMinLogLevel(LogLevel level);

namespace internal {

// Collects one log line and emits it in the destructor (aborting for kFatal).
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

// Swallows the stream expression when a message is filtered out.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace pkv

#define PKV_LOG_LEVEL_DEBUG ::pkv::LogLevel::kDebug
#define PKV_LOG_LEVEL_INFO ::pkv::LogLevel::kInfo
#define PKV_LOG_LEVEL_WARNING ::pkv::LogLevel::kWarning
#define PKV_LOG_LEVEL_ERROR ::pkv::LogLevel::kError
#define PKV_LOG_LEVEL_FATAL ::pkv::LogLevel::kFatal

#define PKV_LOG(level)                                                     \
  !(PKV_LOG_LEVEL_##level >= ::pkv::MinLogLevel())                         \
      ? (void)0                                                            \
      : ::pkv::internal::LogVoidify() &                                    \
            ::pkv::internal::LogMessage(PKV_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#define PKV_CHECK(cond)                                                               \
  (cond) ? (void)0                                                                    \
         : ::pkv::internal::LogVoidify() &                                            \
               ::pkv::internal::LogMessage(::pkv::LogLevel::kFatal, __FILE__, __LINE__) \
                       .stream()                                                      \
                   << "Check failed: " #cond " "
