#include "common/model_shape.h"

#include "absl/strings/str_cat.h"

namespace pkv {

absl::Status ModelShape::Validate() const {
  if (num_layers < 1 || num_layers > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("num_layers must be in [1, 1024], got ", num_layers));
  }
  if (num_kv_heads < 1 || num_q_heads < 1 || num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads (", num_q_heads,
                                                   ") must be a positive multiple of num_kv_heads (",
                                                   num_kv_heads, ")"));
  }
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim must be 64, 128 or 256, got ", head_dim));
  }
  if (page_size < 1 || page_size > 256) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be in [1, 256], got ", page_size));
  }
  return absl::OkStatus();
}

std::string ModelShape::DebugString() const {
  return absl::StrCat("layers=", num_layers, " hq=", num_q_heads, " hkv=", num_kv_heads,
                      " d=", head_dim, " page=", page_size, " dtype=", DTypeName(dtype));
}

}  // namespace pkv
