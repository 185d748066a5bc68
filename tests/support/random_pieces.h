// tests/support/random_pieces.h — a buffer cut at random byte offsets, as gRPC hands a received
// message over: pieces of any length (empty ones among them), boundaries that may split an element.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace pkv::testing_support {

// [data, data + size) cut at `cuts` random offsets, in order.
inline std::vector<std::span<const uint8_t>> RandomPieces(const uint8_t* data, size_t size, int cuts,
                                                          std::mt19937_64& rng) {
  std::vector<size_t> at;
  for (int i = 0; i < cuts; ++i) at.push_back(rng() % (size + 1));
  std::sort(at.begin(), at.end());
  std::vector<std::span<const uint8_t>> pieces;
  size_t from = 0;
  for (size_t a : at) {
    pieces.emplace_back(data + from, a - from);
    from = a;
  }
  pieces.emplace_back(data + from, size - from);
  return pieces;
}

}  // namespace pkv::testing_support
