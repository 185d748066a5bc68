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

}  // namespace pkv::service
