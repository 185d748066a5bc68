// bench/benchmarks/random_data.h — host buffers of N(0, 1) values in the model dtype for the benchmarks
// (q, k, v of a step; never zeros). Thread-safety: pure function.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "common/dtype.h"

namespace pkv::bench {

// `elems` little-endian 16-bit values of `dtype`, drawn from N(0, 1) with `seed`.
inline std::vector<uint8_t> RandomNormalBytes(DType dtype, size_t elems, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> bytes(elems * 2);
  for (size_t i = 0; i < elems; ++i) {
    const uint16_t h = FromFloat(dtype, normal(rng));
    bytes[2 * i] = static_cast<uint8_t>(h & 0xFF);
    bytes[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  return bytes;
}

}  // namespace pkv::bench
