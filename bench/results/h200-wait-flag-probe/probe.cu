// How soon can the host learn that a layer's kernels are done? A decode layer-step waits for its
// attention before it answers; the engine waits with cudaStreamSynchronize. Alternative: the
// kernel's last CTA to finish writes a sequence number into mapped pinned host memory (after a
// system-scope fence, so every CTA's mapped-memory outputs are visible first) and the host spins
// on it; or the stream writes the flag after the kernel (cuStreamWriteValue32, a memory operation
// of the stream that fences before its write: no change to the kernels). This probe times the three
// round trips on the calling thread (host steady_clock, from before
// the first call to the wake), for an empty kernel, for a 132-CTA kernel that spins about 15 us
// (about a B1 layer's attention), and for the B1 layer pattern (12 KiB cudaMemcpyAsync, then that
// kernel). Medians and p99 over many repetitions, after a warm-up; the spin variants also call
// cudaStreamQuery once after waking (the engine would still poll the stream for errors), timed
// inside the round trip.
#include <cuda.h>
#include <cuda_runtime.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

// Every CTA spins `ns` nanoseconds (0: none), writes one word of output to mapped host memory,
// fences at system scope and counts itself done; the last one resets the counter and, when
// `flag` is set, publishes `seq` there.
__global__ void Work(long long ns, unsigned* done, unsigned* out, volatile unsigned* flag, unsigned seq) {
  if (ns > 0) {
    const long long t0 = clock64();
    // clock64 runs at the SM clock (about 1.98 GHz on an H200): ns * 2 cycles.
    while (clock64() - t0 < ns * 2) {}
  }
  if (threadIdx.x == 0) {
    out[blockIdx.x] = seq;
    __threadfence_system();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      if (flag != nullptr) {
        __threadfence_system();
        *flag = seq;
      }
    }
  }
}

// A kernel with arguments the size of the engine's attention launch (DecodeParams, about 256
// bytes, and the workspace's three pointers): what the launch call itself costs the host with
// <<<>>>, with cudaLaunchKernelEx and no attribute, and with the programmatic-serialisation
// attribute the engine's route kernels are launched with.
struct BigParams { long long words[32]; };
struct Ws { unsigned* counters; float* lse; float* o; };
__global__ void BigArgs(BigParams p, Ws w) {
#if __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
  if (threadIdx.x == 0 && p.words[0] == 42) w.counters[blockIdx.x] = 1;
}

using Clock = std::chrono::steady_clock;
static double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
static double Pct(std::vector<double> v, int p) { std::sort(v.begin(), v.end()); return v[v.size() * p / 100]; }

template <typename F>
static void Row(const char* name, int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps / 10; ++i) f();
  for (int i = 0; i < reps; ++i) { const auto a = Clock::now(); f(); t.push_back(Us(Clock::now() - a)); }
  printf("| %-62s | %7.2f | %7.2f |\n", name, Pct(t, 50), Pct(t, 99));
}

int main() {
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  int rt = 0, drv = 0; cudaRuntimeGetVersion(&rt); cudaDriverGetVersion(&drv);
  printf("%s, runtime %d, driver %d\n\n", prop.name, rt, drv);
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  unsigned* done; CK(cudaMalloc(&done, 4)); CK(cudaMemset(done, 0, 4));
  unsigned *out_h, *out_d; CK(cudaHostAlloc(&out_h, 4096, cudaHostAllocMapped)); CK(cudaHostGetDevicePointer((void**)&out_d, out_h, 0));
  unsigned *flag_h, *flag_d; CK(cudaHostAlloc(&flag_h, 64, cudaHostAllocMapped)); CK(cudaHostGetDevicePointer((void**)&flag_d, flag_h, 0));
  *flag_h = 0;
  const CUdeviceptr flag_dptr = reinterpret_cast<CUdeviceptr>(flag_d);
  int can_write_value = 0;
  cuDeviceGetAttribute(&can_write_value, CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1, 0);
  printf("stream memory operations supported: %d\n\n", can_write_value);
  const size_t kB1 = 12 * 1024;  // B1 q|k|v at Hq 32, Hkv 8, d 128, fp16
  unsigned *go_h, *go_d;  // written by the host, waited on by the stream (layers enqueued ahead)
  CK(cudaHostAlloc(&go_h, 64, cudaHostAllocMapped));
  CK(cudaHostGetDevicePointer((void**)&go_d, go_h, 0));
  *go_h = 0;
  const CUdeviceptr go_dptr = reinterpret_cast<CUdeviceptr>(go_d);
  std::vector<char> src(kB1, 1);
  void* io_h; CK(cudaHostAlloc(&io_h, kB1, cudaHostAllocDefault));
  void* io_d; CK(cudaMalloc(&io_d, kB1));
  CK(cudaDeviceSynchronize());
  unsigned seq = 0;
  auto spin = [&](unsigned want) {
    while (__atomic_load_n(flag_h, __ATOMIC_ACQUIRE) != want) _mm_pause();
    // Every CTA's output is visible now: check one, as a user of the outputs would.
    if (__atomic_load_n(&out_h[0], __ATOMIC_RELAXED) != want) { printf("output not visible\n"); std::abort(); }
    (void)cudaStreamQuery(s);
  };
  for (int pass = 0; pass < 2; ++pass) {
    printf("pass %d\n\n| round trip (us) | p50 | p99 |\n|---|---|---|\n", pass + 1);
    struct Case { int ctas; long long ns; const char* label; };
    const Case cases[] = {{1, 0, "empty kernel, 1 CTA"}, {132, 0, "132 CTAs, no work"}, {132, 15000, "132 CTAs, 15 us each"}};
    for (const Case& c : cases) {
      const int ctas = c.ctas;
      const long long ns = c.ns;
      const char* label = c.label;
      char name[128];
      snprintf(name, sizeof(name), "%s + cudaStreamSynchronize", label);
      Row(name, 20000, [&] { Work<<<ctas, 32, 0, s>>>(ns, done, out_d, nullptr, ++seq); cudaStreamSynchronize(s); });
      snprintf(name, sizeof(name), "%s + spin on a mapped flag", label);
      Row(name, 20000, [&] { ++seq; Work<<<ctas, 32, 0, s>>>(ns, done, out_d, flag_d, seq); spin(seq); });
      snprintf(name, sizeof(name), "%s + cuStreamWriteValue32 + spin", label);
      Row(name, 20000, [&] {
        ++seq;
        Work<<<ctas, 32, 0, s>>>(ns, done, out_d, nullptr, seq);
        cuStreamWriteValue32(s, flag_dptr, seq, CU_STREAM_WRITE_VALUE_DEFAULT);
        spin(seq);
      });
    }
    Row("B1 pattern: memcpyAsync 12 KiB, 132 CTAs 15 us, cudaStreamSynchronize", 20000, [&] {
      cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
      Work<<<132, 32, 0, s>>>(15000, done, out_d, nullptr, ++seq);
      cudaStreamSynchronize(s);
    });
    Row("B1 pattern: memcpyAsync 12 KiB, 132 CTAs 15 us, cuStreamWriteValue32, spin", 20000, [&] {
      cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
      ++seq;
      Work<<<132, 32, 0, s>>>(15000, done, out_d, nullptr, seq);
      cuStreamWriteValue32(s, flag_dptr, seq, CU_STREAM_WRITE_VALUE_DEFAULT);
      spin(seq);
    });
    Row("B1 pattern: memcpyAsync 12 KiB, 132 CTAs 15 us, spin on the flag", 20000, [&] {
      cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
      ++seq;
      Work<<<132, 32, 0, s>>>(15000, done, out_d, flag_d, seq);
      spin(seq);
    });
    // A layer enqueued ahead: the stream waits (cuStreamWaitValue32 on a word of mapped pinned
    // memory) before the 12 KiB copy and the kernel, and writes the done word after them. The host
    // stages the inputs (a 12 KiB memcpy), stores the go word, and spins on the done word; no CUDA
    // call is left on that path. Against the same stage + memcpyAsync + launch + synchronise.
    for (const long long ns : {15000LL, 0LL}) {
      const int ctas = ns > 0 ? 132 : 1;
      char name[160];
      snprintf(name, sizeof(name), "stage 12 KiB, memcpyAsync, %d CTA(s) %lld us, cudaStreamSynchronize", ctas, ns / 1000);
      Row(name, 20000, [&] {
        std::memcpy(io_h, src.data(), kB1);
        cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
        Work<<<ctas, 32, 0, s>>>(ns, done, out_d, nullptr, ++seq);
        cudaStreamSynchronize(s);
      });
      auto ahead = [&](unsigned k) {
        cuStreamWaitValue32(s, go_dptr, k, CU_STREAM_WAIT_VALUE_GEQ);
        cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
        Work<<<ctas, 32, 0, s>>>(ns, done, out_d, nullptr, k);
        cuStreamWriteValue32(s, flag_dptr, k, CU_STREAM_WRITE_VALUE_DEFAULT);
      };
      // (a) the next layer enqueued after the go word, while the device runs this one.
      unsigned k = seq + 1;
      ahead(k);
      snprintf(name, sizeof(name), "enqueued ahead, next enqueued after go: %d CTA(s) %lld us", ctas, ns / 1000);
      Row(name, 20000, [&] {
        std::memcpy(io_h, src.data(), kB1);
        __atomic_store_n(go_h, k, __ATOMIC_RELEASE);
        ahead(k + 1);
        spin(k);
        ++k;
      });
      __atomic_store_n(go_h, k, __ATOMIC_RELEASE);  // releases the last layer enqueued ahead
      CK(cudaStreamSynchronize(s));
      seq = k;
      // (b) the device critical path alone: each layer enqueued just before the timing starts.
      std::vector<double> t;
      for (int i = 0; i < 22000; ++i) {
        const unsigned kk = ++seq;
        ahead(kk);
        const auto a0 = Clock::now();
        std::memcpy(io_h, src.data(), kB1);
        __atomic_store_n(go_h, kk, __ATOMIC_RELEASE);
        spin(kk);
        if (i >= 2000) t.push_back(Us(Clock::now() - a0));
      }
      snprintf(name, sizeof(name), "enqueued ahead, stage to done only: %d CTA(s) %lld us", ctas, ns / 1000);
      printf("| %-62s | %7.2f | %7.2f |\n", name, Pct(t, 50), Pct(t, 99));
    }
    printf("\n");
  }
  // Launch-call cost (host time of the call alone, 64 launches then a synchronisation, per call)
  // and the round trip of one launch + cudaStreamSynchronize, for each way.
  BigParams bp = {};
  Ws ws = {done, nullptr, nullptr};
  auto launch = [&](int how) {
    if (how == 0) {
      BigArgs<<<132, 128, 0, s>>>(bp, ws);
      return;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(132);
    config.blockDim = dim3(128);
    config.stream = s;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = how == 2 ? attribute : nullptr;
    config.numAttrs = how == 2 ? 1 : 0;
    cudaLaunchKernelEx(&config, BigArgs, bp, ws);
  };
  const char* hows[3] = {"<<<>>>", "cudaLaunchKernelEx", "cudaLaunchKernelEx + programmatic serialisation"};
  for (int pass = 0; pass < 2; ++pass) {
    printf("launch pass %d\n\n| 280-byte arguments, 132 CTAs (us) | call p50 | call p99 | after a 12 KiB copy: round trip p50 | p99 |\n|---|---|---|---|---|\n", pass + 1);
    for (int how = 0; how < 3; ++how) {
      std::vector<double> call, trip;
      for (int rep = 0; rep < 400; ++rep) {
        for (int i = 0; i < 64; ++i) {
          const auto a = Clock::now();
          launch(how);
          call.push_back(Us(Clock::now() - a));
        }
        cudaStreamSynchronize(s);
      }
      for (int rep = 0; rep < 20000; ++rep) {
        const auto a = Clock::now();
        cudaMemcpyAsync(io_d, io_h, kB1, cudaMemcpyHostToDevice, s);
        launch(how);
        cudaStreamSynchronize(s);
        trip.push_back(Us(Clock::now() - a));
      }
      printf("| %-50s | %6.2f | %6.2f | %6.2f | %6.2f |\n", hows[how], Pct(call, 50), Pct(call, 99), Pct(trip, 50),
             Pct(trip, 99));
    }
    printf("\n");
  }
  CK(cudaStreamSynchronize(s));
  CK(cudaGetLastError());
  return 0;
}
