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
