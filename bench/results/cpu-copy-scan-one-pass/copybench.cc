#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>
#include <random>
#include "kvpool/parallel_copy.h"
#include "kvpool/ingest_staging.h"
#include "common/dtype.h"
using namespace pkv;
using Clock = std::chrono::steady_clock;
int main() {
  const size_t src_bytes = 64 << 20, dst_bytes = 256 << 20, chunk = 1 << 20;
  std::vector<uint16_t> src(src_bytes / 2);
  std::mt19937 rng(1);
  for (auto& x : src) x = rng() & 0xBBFF;
  std::vector<char> dst(dst_bytes);
  std::memset(dst.data(), 1, dst_bytes);
  kvpool::ParallelCopier pc(0);
  const char* s = reinterpret_cast<const char*>(src.data());
  for (int rep = 0; rep < 3; ++rep)
  for (int mode = 0; mode < 4; ++mode) {
    const size_t total = size_t{4} << 30;
    auto t0 = Clock::now();
    size_t so = 0, d = 0;
    int64_t sink = 0;
    for (size_t moved = 0; moved < total; moved += chunk) {
      char* dp = dst.data() + d;
      const char* sp = s + so;
      if (mode == 0) std::memcpy(dp, sp, chunk);
      else if (mode == 1) kvpool::CopyRows(dp, sp, chunk);
      else if (mode == 2) {
        kvpool::ParallelCopier::Span sp1{dp, sp, chunk};
        kvpool::ParallelCopier::ScanOf sc{0, 0};
        int64_t first = -1;
        pc.CopyAndScan({&sp1, 1}, {&sc, 1}, DType::kF16, {&first, 1});
        sink += first;
      } else {
        sink += FirstNonFinite(DType::kF16, reinterpret_cast<const uint8_t*>(sp), chunk);
        kvpool::CopyRows(dp, sp, chunk);
      }
      so = (so + chunk) % src_bytes; d = (d + chunk) % dst_bytes;
    }
    double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    const char* names[] = {"memcpy", "CopyRows (NT)", "CopyAndScan", "scan then CopyRows"};
    std::printf("%-20s %.2f GB/s (%lld)\n", names[mode], total / sec / 1e9, (long long)sink);
  }
}
