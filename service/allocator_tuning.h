// service/allocator_tuning.h — how the worker process asks the C library's allocator to keep
// bulk receive buffers mapped.
//
// WriteKV moves gigabytes through gRPC's receive buffers (64 KiB slices, allocated and freed per
// read). With glibc's defaults a freed stretch of a thread's heap is handed back to the kernel
// (madvise) and faulted in again on the next reads: page faults and page clearing on every
// message (about a tenth of the service path's CPU in a profile of pkv-ingest-bench; with freed
// memory kept mapped its CPU per GB was about 15% lower in direct A/B runs on a 2-core VM).
// The price: freed heap memory stays resident (the main heap up to the trim threshold, each
// thread's heap up to its 64 MiB), so the resident size follows the peak of in-flight buffers.
// Thread-safety: call once at start-up, before other threads allocate.
#pragma once

namespace pkv::service {

// Sets glibc's trim and mmap thresholds so that freed receive buffers stay mapped (a no-op with
// other C libraries). pkv-worker and pkv-ingest-bench call it first thing in main.
void KeepFreedBuffersMapped();

// Caps glibc's malloc arenas at `arenas` (0: glibc's default, 8 per core), unless the environment
// sets MALLOC_ARENA_MAX, which wins. With WriteKV on 8 streams the gRPC receive buffers of many
// threads spread over as many arenas; on the H200 host (16 cores) pkv-ingest-bench moved 6.1-8.0
// GB/s over loopback gRPC with the default and 11.2-13.0 GB/s with 2 arenas, at 0.8-1.0 instead
// of 1.2-1.5 CPU s/GB (bench/results/h200-ingest-arenas-fac841b/). A no-op with other C
// libraries. Call before the process starts threads.
void LimitMallocArenas(int arenas);

}  // namespace pkv::service
