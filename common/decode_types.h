// common/decode_types.h — vocabulary shared by the scheduler, the kernels and the engine.
//
// KernelId names a decode-attention route; DecodeTask is one unit of the compact work queue
// (built on the host by scheduler/, consumed on the device by kernels/cuda). Both live here so
// that scheduler/ and kernels/ stay independent of each other. Thread-safe: plain values.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace pkv {

// A decode-attention route. kReference is the CPU executable specification.
enum class KernelId : uint8_t {
  kReference = 0,      // kernels/reference: CPU, fp32 online softmax over pages
  kPerRequest = 1,     // one CTA per (row, KV head)
  kSequenceSplit = 2,  // S page ranges per (row, KV head), then an LSE merge
  kWorkQueue = 3,      // persistent kernel over a compact task list + merge
  kFlashInfer = 4,     // FlashInfer's batch decode (optional build)
};
inline constexpr int kNumKernelIds = 5;

// Stable lower-case names used in flags, logs and metric labels. (const char*: Debian's Abseil
// has its own absl::string_view, distinct from std::string_view, so StrCat takes C strings.)
const char* KernelName(KernelId id);
absl::StatusOr<KernelId> ParseKernelId(std::string_view name);

// One work item of the compact work queue: pages [page_begin, page_end) (offsets into the row's
// page list) of row `row` for KV head `kv_head`; it produces partial `split` of that row's
// `num_splits` partials (a row with num_splits == 1 writes its output directly).
struct DecodeTask {
  int32_t row;
  int32_t kv_head;
  int32_t split;
  int32_t num_splits;
  int32_t page_begin;
  int32_t page_end;
};

}  // namespace pkv
