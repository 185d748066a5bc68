// service/allocator_tuning.h — how the worker process asks the C library's allocator to keep
// bulk receive buffers mapped.
//
// WriteKV moves gigabytes through gRPC's receive buffers (64 KiB slices, allocated and freed per
// read). With glibc's defaults a freed stretch of a thread's heap is handed back to the kernel
// (madvise) and faulted in again on the next reads: page faults and page clearing on every
// message (pkv-ingest-bench measured the service path's CPU per GB about a sixth lower without).
// Keeping freed memory mapped trades that for a resident size that follows the peak of the
// in-flight receive buffers.
// Thread-safety: call once at start-up, before other threads allocate.
#pragma once

namespace pkv::service {

// Sets glibc's trim and mmap thresholds so that freed receive buffers stay mapped (a no-op with
// other C libraries). pkv-worker and pkv-ingest-bench call it first thing in main.
void KeepFreedBuffersMapped();

}  // namespace pkv::service
