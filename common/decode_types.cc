#include "common/decode_types.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace pkv {

const char* KernelName(KernelId id) {
  switch (id) {
    case KernelId::kReference: return "reference";
    case KernelId::kPerRequest: return "per_request";
    case KernelId::kSequenceSplit: return "sequence_split";
    case KernelId::kWorkQueue: return "workqueue";
    case KernelId::kFlashInfer: return "flashinfer";
  }
  return "unknown";
}

absl::StatusOr<KernelId> ParseKernelId(std::string_view name) {
  for (int i = 0; i < kNumKernelIds; ++i) {
    const auto id = static_cast<KernelId>(i);
    if (name == KernelName(id)) return id;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown kernel '", std::string(name), "' (want reference, per_request, sequence_split, workqueue, flashinfer)"));
}

}  // namespace pkv
