#include "service/allocator_tuning.h"

#include <cstdlib>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace pkv::service {

void KeepFreedBuffersMapped() {
#if defined(__GLIBC__)
  // Heap tops up to 512 MiB stay mapped; allocations up to 32 MiB (glibc's largest mmap
  // threshold on 64-bit) come from the heaps instead of mmap/munmap of their own.
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
#endif
}

void LimitMallocArenas(int arenas) {
#if defined(__GLIBC__)
  if (arenas > 0 && std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, arenas);
#else
  (void)arenas;
#endif
}

}  // namespace pkv::service
