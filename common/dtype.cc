#include "common/dtype.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace pkv {

const char* DTypeName(DType dtype) { return dtype == DType::kF16 ? "fp16" : "bf16"; }

absl::StatusOr<DType> ParseDType(std::string_view name) {
  const std::string n = absl::AsciiStrToLower(std::string(name));
  if (n == "fp16" || n == "float16" || n == "half" || n == "f16") return DType::kF16;
  if (n == "bf16" || n == "bfloat16") return DType::kBF16;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", std::string(name), "' (want fp16 or bf16)"));
}

}  // namespace pkv
