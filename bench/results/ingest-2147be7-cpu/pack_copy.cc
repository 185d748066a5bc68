// pack_copy.cc — the host copy of staged ingest in isolation: 1 GiB per thread in 512 KiB pieces (one
// 256-token chunk of K at Hkv 8, d 128, fp16) from a 64 MiB source ring into a 64 MiB destination
// ring, with memcpy and with SSE2 streaming stores (what kvpool::CopyRows does). Best of 3.
//   g++ -O2 -std=c++20 -pthread pack_copy.cc -o pack_copy && ./pack_copy 512 1 && ./pack_copy 512 2
#include <emmintrin.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <vector>
#include <thread>
static void nt_copy(char* dst, const char* src, size_t n) {
  // dst 16-aligned
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m128i a = _mm_loadu_si128((const __m128i*)(src + i));
    __m128i b = _mm_loadu_si128((const __m128i*)(src + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i*)(src + i + 32));
    __m128i d = _mm_loadu_si128((const __m128i*)(src + i + 48));
    _mm_stream_si128((__m128i*)(dst + i), a);
    _mm_stream_si128((__m128i*)(dst + i + 16), b);
    _mm_stream_si128((__m128i*)(dst + i + 32), c);
    _mm_stream_si128((__m128i*)(dst + i + 48), d);
  }
  if (i < n) memcpy(dst + i, src + i, n - i);
  _mm_sfence();
}
int main(int argc, char** argv) {
  size_t piece = (argc > 1 ? atol(argv[1]) : 512) << 10;
  int threads = argc > 2 ? atoi(argv[2]) : 1;
  size_t src_sz = 64 << 20, dst_sz = 64 << 20;
  std::vector<std::vector<char>> srcs(threads, std::vector<char>(src_sz, 1)), dsts(threads, std::vector<char>(dst_sz, 0));
  for (int mode = 0; mode < 2; ++mode) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> th;
      for (int t = 0; t < threads; ++t) th.emplace_back([&, t] {
        auto& src = srcs[t]; auto& dst = dsts[t];
        size_t total = 0, s = 0, d = 0;
        while (total < (size_t(1) << 30)) {
          if (s + piece > src_sz) s = 0;
          if (d + piece > dst_sz) d = 0;
          if (mode == 0) memcpy(dst.data() + d, src.data() + s, piece); else nt_copy(dst.data() + d, src.data() + s, piece);
          s += piece; d += piece; total += piece;
        }
      });
      for (auto& x : th) x.join();
      double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double g = threads * double(1 << 30) / sec / 1e9;
      if (g > best) best = g;
    }
    printf("%s piece %zu KiB threads %d: %.2f GB/s\n", mode ? "nt-store" : "memcpy  ", piece >> 10, threads, best);
  }
}
