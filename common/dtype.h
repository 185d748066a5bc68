// common/dtype.h — element types of KV pages and activations, with host conversions.
//
// KV, q and outputs are 16-bit floats (fp16 or bf16) stored as raw little-endian uint16 on the
// host; accumulation is always fp32. These conversions are the host's (and the CPU backend's)
// single definition of rounding: round-to-nearest-even, NaN preserved. Thread-safe: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
// The AVX2 scan of FirstNonFinite is compiled for the host compiler's translation units only
// (not under nvcc, which never calls it).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define PKV_DTYPE_AVX2 1
#include <immintrin.h>
#endif

#include "absl/status/statusor.h"

namespace pkv {

enum class DType : uint8_t { kF16 = 0, kBF16 = 1 };

// Bytes per element.
constexpr size_t DTypeSize(DType) { return 2; }

// "fp16" / "bf16".
const char* DTypeName(DType dtype);

// Parses "fp16"/"float16"/"half" and "bf16"/"bfloat16".
absl::StatusOr<DType> ParseDType(std::string_view name);

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> float.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    // Subnormal: normalise.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3FFu;
    return BitsFloat(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13));
  }
  if (exp == 0x1F) return BitsFloat(sign | 0x7F800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// float -> IEEE binary16, round to nearest even.
inline uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // Inf or NaN
    return sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u);
  }
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: overflow to Inf
  if (abs < 0x38800000u) {                         // below the smallest normal half (2^-14)
    if (abs < 0x33000000u) return sign;            // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14 + (113 - exp) with the implicit bit
    uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return sign | static_cast<uint16_t>(half_mant);
  }
  uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);  // round mantissa to 10 bits, ties even
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// bfloat16 -> float.
inline float BFloat16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even, NaN kept quiet.
inline uint16_t FloatToBFloat16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float ToFloat(DType dtype, uint16_t raw) {
  return dtype == DType::kF16 ? HalfToFloat(raw) : BFloat16ToFloat(raw);
}
inline uint16_t FromFloat(DType dtype, float f) {
  return dtype == DType::kF16 ? FloatToHalf(f) : FloatToBFloat16(f);
}

namespace dtype_internal {
#if defined(PKV_DTYPE_AVX2)
// The number of leading elements of `bytes` (a multiple of 64, at most n) that hold no element
// with all of `mask`'s bits set, 64 elements (128 bytes) per loop with AVX2. Call only where the
// CPU has AVX2 (HasAvx2).
__attribute__((target("avx2"))) inline size_t FiniteBlocksAvx2(const uint8_t* bytes, size_t n, uint16_t mask) {
  const __m256i m = _mm256_set1_epi16(static_cast<short>(mask));
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m256i* p = reinterpret_cast<const __m256i*>(bytes + 2 * i);
    const __m256i a = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(p), m), m);
    const __m256i b = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(p + 1), m), m);
    const __m256i c = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(p + 2), m), m);
    const __m256i d = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(p + 3), m), m);
    const __m256i any = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    if (!_mm256_testz_si256(any, any)) break;  // a hit among these 64
  }
  return i;
}
inline bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif
}  // namespace dtype_internal

// Index of the first NaN or infinity among the 2-byte little-endian elements of `bytes` (an odd
// trailing byte is ignored), or -1 when every element is finite. Whole blocks first, with AVX2
// where the CPU has it (64 elements per loop, about 2 us per 100 KB) or SSE2 (32 per loop), each
// block's compares merged into one branch; the block holding a hit, and the tail, go through the
// scalar loop. An element is non-finite when all its exponent bits are set.
inline int64_t FirstNonFinite(DType dtype, const uint8_t* bytes, size_t size) {
  const uint16_t mask = dtype == DType::kF16 ? 0x7C00u : 0x7F80u;
  const size_t n = size / 2;
  size_t i = 0;
#if defined(PKV_DTYPE_AVX2)
  if (dtype_internal::HasAvx2()) i = dtype_internal::FiniteBlocksAvx2(bytes, n, mask);
#endif
#if defined(__SSE2__)
  const __m128i m = _mm_set1_epi16(static_cast<short>(mask));
  auto hit = [&](size_t at) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 2 * at));
    return _mm_cmpeq_epi16(_mm_and_si128(x, m), m);
  };
  for (; i + 32 <= n; i += 32) {
    const __m128i any = _mm_or_si128(_mm_or_si128(hit(i), hit(i + 8)), _mm_or_si128(hit(i + 16), hit(i + 24)));
    if (_mm_movemask_epi8(any) != 0) break;  // a hit among these 32
  }
#endif
  for (; i < n; ++i) {
    const uint16_t x = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
    if ((x & mask) == mask) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace pkv
