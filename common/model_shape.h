// common/model_shape.h — the attention shape a worker serves and the KV page geometry.
//
// One worker serves one model shape: every layer has the same head counts and head size, and a
// page holds `page_size` consecutive tokens of one sequence for every layer (the page table is
// shared by all layers). Thread-safe: plain values.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/dtype.h"

namespace pkv {

struct ModelShape {
  int32_t num_layers = 32;
  int32_t num_q_heads = 32;
  int32_t num_kv_heads = 8;
  int32_t head_dim = 128;
  int32_t page_size = 16;  // tokens per page
  DType dtype = DType::kF16;

  // Query heads per KV head (G). Valid only when Validate() is OK.
  int32_t group_size() const { return num_q_heads / num_kv_heads; }
  // Bytes of K and V for one token of one layer.
  int64_t kv_bytes_per_token_layer() const {
    return 2LL * num_kv_heads * head_dim * static_cast<int64_t>(DTypeSize(dtype));
  }
  // Bytes of one page of one layer: [2][num_kv_heads][page_size][head_dim].
  int64_t page_bytes_per_layer() const { return kv_bytes_per_token_layer() * page_size; }
  // Bytes one page occupies across all layers.
  int64_t page_bytes_all_layers() const { return page_bytes_per_layer() * num_layers; }

  // Checks ranges: layers >= 1, heads >= 1, num_q_heads % num_kv_heads == 0, head_dim in
  // {64, 128, 256}, page_size in [1, 256].
  absl::Status Validate() const;
  std::string DebugString() const;
};

}  // namespace pkv
