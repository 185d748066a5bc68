// tests/support/small_model.h — the small model shape the service and integration tests serve:
// 3 layers, Hq 8, Hkv 2 (G 4), d 64, page 16, fp16. Small enough for the CPU backend on two cores.
#pragma once

#include "common/model_shape.h"

namespace pkv::testing_support {

inline ModelShape SmallTestShape() {
  ModelShape s;
  s.num_layers = 3;
  s.num_q_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 16;
  s.dtype = DType::kF16;
  return s;
}

}  // namespace pkv::testing_support
