// kernels/cuda/param_upload.cu — LaunchParamUpload (kernels/cuda/param_upload.h).
#include "kernels/cuda/param_upload.h"

#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace pkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxUnits = static_cast<int>(kMaxParamUploadBytes / 16);

// The launch's parameters: the destination, then the bytes. Sized per launch from a few classes
// (the driver copies the whole struct on every launch), the largest within the 32,764-byte limit.
template <int kUnits>
struct Payload {
  uint4* dst;
  int32_t units;  // 16-byte units to store, <= kUnits
  int32_t unused;
  uint4 data[kUnits];
};
static_assert(sizeof(Payload<kMaxUnits>) <= 32764, "kernel parameters are limited to 32,764 bytes");

// One 16-byte unit per thread. __grid_constant__ keeps the indexed reads in parameter memory
// (without it each thread would first copy the whole struct to local memory).
template <int kUnits>
__global__ void __launch_bounds__(kThreads) ParamUploadKernel(const __grid_constant__ Payload<kUnits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
  const int i = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (i < p.units) p.dst[i] = p.data[i];
}

template <int kUnits>
absl::Status Launch(void* dst, const ParamUploadPiece* pieces, int count, int units, cudaStream_t stream) {
  Payload<kUnits> p;  // only its first `units` data units are written and read
  p.dst = static_cast<uint4*>(dst);
  p.units = units;
  p.unused = 0;
  char* at = reinterpret_cast<char*>(p.data);
  for (int i = 0; i < count; ++i) {
    if (pieces[i].bytes == 0) continue;
    std::memcpy(at, pieces[i].src, pieces[i].bytes);
    at += pieces[i].bytes;
  }
  ParamUploadKernel<kUnits><<<(units + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("LaunchParamUpload: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchParamUpload(void* dst, const ParamUploadPiece* pieces, int count, cudaStream_t stream) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return absl::InvalidArgumentError("LaunchParamUpload: dst must be 16-byte aligned");
  }
  size_t total = 0;
  for (int i = 0; i < count; ++i) {
    if (pieces[i].bytes % 16 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LaunchParamUpload: piece sizes must be multiples of 16 (piece ", i, ": ", pieces[i].bytes, ")"));
    }
    total += pieces[i].bytes;
  }
  if (total > kMaxParamUploadBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchParamUpload: ", total, " bytes, at most ", kMaxParamUploadBytes));
  }
  const int units = static_cast<int>(total / 16);
  if (units == 0) return absl::OkStatus();
  if (units <= 256) return Launch<256>(dst, pieces, count, units, stream);    // 4 KiB
  if (units <= 512) return Launch<512>(dst, pieces, count, units, stream);    // 8 KiB
  if (units <= 768) return Launch<768>(dst, pieces, count, units, stream);    // 12 KiB: a B1 layer at Hq 32, d 128
  if (units <= 1024) return Launch<1024>(dst, pieces, count, units, stream);  // 16 KiB
  if (units <= 1536) return Launch<1536>(dst, pieces, count, units, stream);  // 24 KiB
  return Launch<kMaxUnits>(dst, pieces, count, units, stream);
}

}  // namespace pkv::kernels::cuda
