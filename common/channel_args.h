// common/channel_args.h — gRPC channel arguments given on a command line ("name=value").
//
// pkv-worker and pkv-replay pass extra gRPC core channel arguments through (--grpc_arg), for
// example HTTP/2 window and frame sizes or TCP read sizes. This header only parses them (no gRPC
// types here); service/ and client/ apply them. A value that is a decimal integer is passed as an
// integer argument, anything else as a string. Thread-safe: plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pkv {

struct ChannelArg {
  std::string name;
  bool is_int = false;
  int64_t int_value = 0;     // when is_int
  std::string string_value;  // otherwise
};

// Parses "name=value" items. INVALID_ARGUMENT naming `flag` and the item for one without a
// name or without '=', or an integer that does not fit an int (gRPC's integer arguments are int).
absl::StatusOr<std::vector<ChannelArg>> ParseChannelArgs(const std::vector<std::string>& items,
                                                         absl::string_view flag);

// OK unless `args` sets a message size limit (grpc.max_receive_message_length,
// grpc.max_send_message_length): those come from the program's own limit, which gRPC applies over
// any channel argument, so INVALID_ARGUMENT naming `flag`, the argument and `hint` (where the
// limit is set instead).
absl::Status CheckChannelArgs(const std::vector<ChannelArg>& args, absl::string_view flag, absl::string_view hint);

// Whether `args` sets `name`.
bool HasChannelArg(const std::vector<ChannelArg>& args, absl::string_view name);

// "name=value,name=value" as given (for logs).
std::string ChannelArgsToString(const std::vector<ChannelArg>& args);

}  // namespace pkv
