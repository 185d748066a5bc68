#include "common/channel_args.h"

#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pkv {

absl::StatusOr<std::vector<ChannelArg>> ParseChannelArgs(const std::vector<std::string>& items,
                                                         absl::string_view flag) {
  std::vector<ChannelArg> out;
  for (const std::string& item : items) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": \"", item, "\" is not name=value (e.g. grpc.http2.max_frame_size=1048576)"));
    }
    ChannelArg arg;
    arg.name = std::string(absl::StripAsciiWhitespace(item.substr(0, eq)));
    const std::string value(absl::StripAsciiWhitespace(item.substr(eq + 1)));
    int64_t v = 0;
    if (!value.empty() && absl::SimpleAtoi(value, &v)) {
      if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat(flag, ": ", arg.name, "=", value, " does not fit a 32-bit integer argument"));
      }
      arg.is_int = true;
      arg.int_value = v;
    } else {
      arg.string_value = value;
    }
    out.push_back(std::move(arg));
  }
  return out;
}

absl::Status CheckChannelArgs(const std::vector<ChannelArg>& args, absl::string_view flag, absl::string_view hint) {
  for (const ChannelArg& a : args) {
    if (a.name == "grpc.max_receive_message_length" || a.name == "grpc.max_send_message_length") {
      return absl::InvalidArgumentError(absl::StrCat(flag, ": ", a.name, " is not accepted: ", hint));
    }
  }
  return absl::OkStatus();
}

bool HasChannelArg(const std::vector<ChannelArg>& args, absl::string_view name) {
  for (const ChannelArg& a : args) {
    if (a.name == name) return true;
  }
  return false;
}

std::string ChannelArgsToString(const std::vector<ChannelArg>& args) {
  return absl::StrJoin(args, ",", [](std::string* s, const ChannelArg& a) {
    absl::StrAppend(s, a.name, "=", a.is_int ? absl::StrCat(a.int_value) : a.string_value);
  });
}

}  // namespace pkv
