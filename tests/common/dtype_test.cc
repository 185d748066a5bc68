#include "common/dtype.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace pkv {
namespace {

TEST(DTypeTest, HalfRoundTripsEveryFiniteValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t raw = static_cast<uint16_t>(h);
    const float f = HalfToFloat(raw);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), raw) << "half bits " << h;
  }
}

TEST(DTypeTest, HalfRoundsToNearestAgainstDouble) {
  std::mt19937 rng(20260622);
  std::normal_distribution<float> dist(0.f, 100.f);
  for (int i = 0; i < 100000; ++i) {
    const float x = dist(rng);
    const float r = HalfToFloat(FloatToHalf(x));
    // Nearest: no representable neighbour is strictly closer.
    const uint16_t bits = FloatToHalf(x);
    const float up = HalfToFloat(static_cast<uint16_t>(bits + 1));
    const float down = HalfToFloat(static_cast<uint16_t>(bits - 1));
    EXPECT_LE(std::fabs(static_cast<double>(r) - x), std::fabs(static_cast<double>(up) - x) + 1e-12);
    EXPECT_LE(std::fabs(static_cast<double>(r) - x), std::fabs(static_cast<double>(down) - x) + 1e-12);
  }
  EXPECT_EQ(FloatToHalf(1e6f), 0x7C00u);    // overflow -> +inf
  EXPECT_EQ(FloatToHalf(-1e6f), 0xFC00u);   // -> -inf
  EXPECT_EQ(FloatToHalf(1e-9f), 0x0000u);   // underflow -> +0
  EXPECT_EQ(HalfToFloat(0x0001u), std::ldexp(1.0f, -24));  // smallest subnormal
}

TEST(DTypeTest, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3F80u);
  EXPECT_EQ(BFloat16ToFloat(0x3F80u), 1.0f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3F80u);
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82u);
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
}

TEST(DTypeTest, ParsesNames) {
  EXPECT_EQ(*ParseDType("fp16"), DType::kF16);
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  EXPECT_FALSE(ParseDType("fp8").ok());
}

}  // namespace
}  // namespace pkv

namespace pkv {
namespace {

TEST(FirstNonFiniteTest, FindsTheFirstNanOrInfinityAtEveryPosition) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    const uint16_t inf = dt == DType::kF16 ? 0x7C00 : 0x7F80;
    const uint16_t nan = dt == DType::kF16 ? 0x7E01 : 0x7FC1;
    const uint16_t big = dt == DType::kF16 ? 0x7BFF : 0x7F7F;  // the largest finite value
    for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{64}, size_t{301}}) {
      std::vector<uint8_t> bytes(2 * n + 1, 0);  // an odd trailing byte is ignored
      for (size_t i = 0; i < n; ++i) {
        bytes[2 * i] = static_cast<uint8_t>(big & 0xFF);
        bytes[2 * i + 1] = static_cast<uint8_t>((big >> 8) | (i % 2 ? 0x80 : 0));
      }
      bytes.back() = 0xFF;
      EXPECT_EQ(FirstNonFinite(dt, bytes.data(), bytes.size()), -1) << n;
      for (size_t at = 0; at < n; ++at) {
        std::vector<uint8_t> b = bytes;
        const uint16_t v = static_cast<uint16_t>((at % 3 == 0 ? nan : inf) | (at % 2 ? 0x8000 : 0));
        b[2 * at] = static_cast<uint8_t>(v & 0xFF);
        b[2 * at + 1] = static_cast<uint8_t>(v >> 8);
        if (at + 1 < n) b[2 * (n - 1) + 1] = static_cast<uint8_t>(inf >> 8 | 0x80), b[2 * (n - 1)] = inf & 0xFF;
        EXPECT_EQ(FirstNonFinite(dt, b.data(), b.size()), static_cast<int64_t>(at)) << DTypeName(dt) << " n " << n;
      }
    }
  }
}

}  // namespace
}  // namespace pkv
