#include "common/channel_args.h"

#include <gtest/gtest.h>

namespace pkv {
namespace {

TEST(ChannelArgsTest, IntegersAndStrings) {
  absl::StatusOr<std::vector<ChannelArg>> args =
      ParseChannelArgs({"grpc.http2.max_frame_size=1048576", " grpc.optimization_target = latency", "x.neg=-3"},
                       "--grpc_arg");
  ASSERT_TRUE(args.ok()) << args.status();
  ASSERT_EQ(args->size(), 3u);
  EXPECT_EQ((*args)[0].name, "grpc.http2.max_frame_size");
  EXPECT_TRUE((*args)[0].is_int);
  EXPECT_EQ((*args)[0].int_value, 1048576);
  EXPECT_EQ((*args)[1].name, "grpc.optimization_target");
  EXPECT_FALSE((*args)[1].is_int);
  EXPECT_EQ((*args)[1].string_value, "latency");
  EXPECT_TRUE((*args)[2].is_int);
  EXPECT_EQ((*args)[2].int_value, -3);
  EXPECT_EQ(ChannelArgsToString(*args),
            "grpc.http2.max_frame_size=1048576,grpc.optimization_target=latency,x.neg=-3");
}

TEST(ChannelArgsTest, EmptyValueIsAString) {
  absl::StatusOr<std::vector<ChannelArg>> args = ParseChannelArgs({"a="}, "--grpc_arg");
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_FALSE((*args)[0].is_int);
  EXPECT_EQ((*args)[0].string_value, "");
}

TEST(ChannelArgsTest, RefusesItemsWithoutNameOrValue) {
  for (const char* bad : {"grpc.http2.max_frame_size", "=5", ""}) {
    absl::StatusOr<std::vector<ChannelArg>> args = ParseChannelArgs({bad}, "--grpc_arg");
    ASSERT_FALSE(args.ok()) << bad;
    EXPECT_EQ(args.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(args.status().message().find("--grpc_arg"), std::string::npos) << args.status();
  }
}

TEST(ChannelArgsTest, RefusesIntegersBeyondInt) {
  absl::StatusOr<std::vector<ChannelArg>> args = ParseChannelArgs({"a=4294967296"}, "--grpc_arg");
  ASSERT_FALSE(args.ok());
  EXPECT_NE(args.status().message().find("32-bit"), std::string::npos) << args.status();
}

TEST(ChannelArgsTest, MessageSizeLimitsAreRefusedWithAHint) {
  absl::StatusOr<std::vector<ChannelArg>> ok = ParseChannelArgs({"grpc.http2.max_frame_size=1048576"}, "--grpc_arg");
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(CheckChannelArgs(*ok, "--grpc_arg", "set --max_message_bytes").ok());
  EXPECT_TRUE(HasChannelArg(*ok, "grpc.http2.max_frame_size"));
  EXPECT_FALSE(HasChannelArg(*ok, "grpc.keepalive_time_ms"));
  for (const char* name : {"grpc.max_receive_message_length", "grpc.max_send_message_length"}) {
    absl::StatusOr<std::vector<ChannelArg>> args = ParseChannelArgs({std::string(name) + "=1024"}, "--grpc_arg");
    ASSERT_TRUE(args.ok());
    const absl::Status st = CheckChannelArgs(*args, "--grpc_arg", "set --max_message_bytes");
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(st.message(), std::string("--grpc_arg: ") + name + " is not accepted: set --max_message_bytes");
  }
}

}  // namespace
}  // namespace pkv
