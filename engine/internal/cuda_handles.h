// engine/internal/cuda_handles.h — the CUDA backend's error-to-Status helper and the small RAII
// owners of its CUDA runtime handles (streams, events, pinned and device buffers).
// Private to engine/cuda_*.cc. Each owner frees its handle in its destructor and never
// synchronises: whoever owns a stream drains it before the buffers its work touches are freed.
// Thread-safety: plain owners; the usual rules of std::unique_ptr.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace pkv::engine::internal {

// OK for cudaSuccess, else INTERNAL "cuda backend: <what>: <CUDA's message>".
inline absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorString(e)));
}

struct StreamDeleter {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct PinnedDeleter {
  void operator()(void* p) const { cudaFreeHost(p); }
};
struct DeviceDeleter {
  void operator()(void* p) const { cudaFree(p); }
};

// cudaStream_t is CUstream_st*, and so on: each owner holds the handle itself.
using CudaStream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;
using CudaEvent = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
using PinnedBuffer = std::unique_ptr<void, PinnedDeleter>;  // cudaMallocHost or cudaHostAlloc
using DeviceBuffer = std::unique_ptr<void, DeviceDeleter>;  // cudaMalloc

}  // namespace pkv::engine::internal

// Returns the INTERNAL status of CudaStatus(expr, what) from the enclosing function on failure.
#define PKV_CUDA_RETURN(expr, what)                                                           \
  do {                                                                                        \
    if (absl::Status pkv_cuda_status_ = ::pkv::engine::internal::CudaStatus((expr), what);    \
        !pkv_cuda_status_.ok()) {                                                             \
      return pkv_cuda_status_;                                                                \
    }                                                                                         \
  } while (0)
