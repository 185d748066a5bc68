// kernels/cuda/internal/kv_map.h — the layer's page pool described as a TMA tensor (Hopper), so
// that one thread of a warp can fetch a whole 16-token K or V tile with a few bulk-tensor copies.
// Not a public interface.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "kernels/decode_attention.h"

namespace pkv::kernels::cuda::internal {

// 2-D tensor {head_dim elements of a token row, every token row of the layer's pool} with 128-byte
// swizzle, box {64, 16}. `enabled` = 0: the kernels gather with 16-byte cp.async instead.
struct KvMap {
  CUtensorMap map;
  int enabled;
};

// The map for p.kv when the kernels can use it: a device of compute capability 9.0 (the sm_90a
// code), page_size >= 16, p.num_pages known, and PKV_KV_LOADS not set to "cp_async"; else
// enabled = 0. Encodings are cached per thread (a handful of layer pools).
KvMap MakeKvMap(const DecodeParams& p);

// Whether launches on this device use TMA loads when the shape allows (PKV_KV_LOADS and the
// device's compute capability).
bool TmaLoadsAvailable();

}  // namespace pkv::kernels::cuda::internal
