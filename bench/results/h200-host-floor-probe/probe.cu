// The host's floor per decode layer-step on this GPU host: what each CUDA call a layer-step makes
// costs the calling thread, and the launch + synchronise round trip, with nothing else in the way.
// Medians over many repetitions (host steady_clock), after a warm-up.
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

struct Big { char bytes[512]; };  // a parameter block the size of the attention launch's
__global__ void Empty() {}
__global__ void WithParams(Big b, int* sink) { if (b.bytes[threadIdx.x] == 77 && sink) *sink = 1; }
__global__ void Pull(uint4* dst, const uint4* src, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}

using Clock = std::chrono::steady_clock;
static double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
static double Median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
static double P99(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() * 99 / 100]; }

template <typename F>
static void Row(const char* name, int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps / 10; ++i) f();
  for (int i = 0; i < reps; ++i) { const auto a = Clock::now(); f(); t.push_back(Us(Clock::now() - a)); }
  printf("| %-58s | %7.2f | %7.2f |\n", name, Median(t), P99(t));
}

int main() {
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  int rt = 0, drv = 0; cudaRuntimeGetVersion(&rt); cudaDriverGetVersion(&drv);
  printf("%s, runtime %d, driver %d\n\n| host work per call (us) | p50 | p99 |\n|---|---|---|\n", prop.name, rt, drv);
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  int* sink; CK(cudaMalloc(&sink, 4));
  Big big; std::memset(&big, 0, sizeof(big));
  const int kBytes = 80 * 1024;  // B8 q|k|v (64 KiB + 2 x 8 KiB)
  void* host; CK(cudaHostAlloc(&host, kBytes, cudaHostAllocMapped)); std::memset(host, 1, kBytes);
  void* host_dev; CK(cudaHostGetDevicePointer(&host_dev, host, 0));
  void* dev; CK(cudaMalloc(&dev, kBytes));
  std::vector<char> src(kBytes, 3);
  CK(cudaStreamSynchronize(s));
  // Each call alone (the stream drained every 32 calls, outside the timing, so the queue never fills).
  int n = 0;
  auto drain = [&] { if (++n % 32 == 0) cudaStreamSynchronize(s); };
  Row("cudaLaunchKernel, empty kernel", 20000, [&] { Empty<<<1, 32, 0, s>>>(); drain(); });
  Row("cudaLaunchKernel, 512-byte parameters, 132 CTAs", 20000, [&] { WithParams<<<132, 128, 0, s>>>(big, sink); drain(); });
  Row("cudaEventRecord", 20000, [&] { cudaEventRecord(e0, s); drain(); });
  cudaEventRecord(e0, s); cudaEventRecord(e1, s); cudaStreamSynchronize(s);
  float ms;
  Row("cudaEventElapsedTime (both events done)", 20000, [&] { cudaEventElapsedTime(&ms, e0, e1); });
  Row("cudaStreamSynchronize, idle stream", 20000, [&] { cudaStreamSynchronize(s); });
  Row("memcpy 80 KiB into pinned memory (B8 q|k|v staging)", 20000, [&] { std::memcpy(host, src.data(), kBytes); });
  printf("\n| round trip on the calling thread (us) | p50 | p99 |\n|---|---|---|\n");
  Row("empty kernel + cudaStreamSynchronize", 20000, [&] { Empty<<<1, 32, 0, s>>>(); cudaStreamSynchronize(s); });
  Row("pull 80 KiB from mapped host memory (132 CTAs) + sync", 20000,
      [&] { Pull<<<132, 256, 0, s>>>((uint4*)dev, (const uint4*)host_dev, kBytes / 16); cudaStreamSynchronize(s); });
  Row("cudaMemcpyAsync 80 KiB H2D + sync", 20000,
      [&] { cudaMemcpyAsync(dev, host, kBytes, cudaMemcpyHostToDevice, s); cudaStreamSynchronize(s); });
  Row("engine's pattern: pull, event, 512-B launch, event, sync, elapsed", 20000, [&] {
    Pull<<<132, 256, 0, s>>>((uint4*)dev, (const uint4*)host_dev, kBytes / 16);
    cudaEventRecord(e0, s); WithParams<<<132, 128, 0, s>>>(big, sink); cudaEventRecord(e1, s);
    cudaStreamSynchronize(s); cudaEventElapsedTime(&ms, e0, e1);
  });
  Row("FlashInfer loop's pattern: memcpyAsync, event, 2 launches, event, sync", 20000, [&] {
    cudaMemcpyAsync(dev, host, kBytes, cudaMemcpyHostToDevice, s);
    cudaEventRecord(e0, s); Empty<<<8, 128, 0, s>>>(); WithParams<<<132, 128, 0, s>>>(big, sink); cudaEventRecord(e1, s);
    cudaStreamSynchronize(s); cudaEventElapsedTime(&ms, e0, e1);
  });
  return 0;
}
