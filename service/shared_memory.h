// service/shared_memory.h — a StepStream's shared memory: a POSIX shared-memory object that a
// router on the same host names when it opens the stream, mapped by the worker for the stream's
// life, so that q, k, v and the outputs of its layer-steps travel through memory instead of in
// the gRPC messages (see "Shared memory" in proto/pkv/v1/worker.proto).
//
// A router owns the object and may shrink it while the worker reads it; on Linux the next access
// past the new end raises SIGBUS, which would take the whole worker down. So every mapped region
// is registered with a SIGBUS handler (installed once, by the first Open): a fault inside a
// region maps fresh zero pages over the whole region, marks it broken and returns, and the
// access completes on zeros. The request that read it, and every later one on the stream, is
// refused (broken()). A fault anywhere else still ends the process as before.
//
// Thread-safety: a region is immutable after Open except for its bytes (read and written by the
// requests of one stream, one at a time) and the broken flag (atomic).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pkv::service {

// The request metadata key whose value names the StepStream's shared-memory object.
inline constexpr char kSharedMemoryKey[] = "x-pkv-shared-memory";

class SharedMemoryRegion final {
 public:
  // Opens the POSIX shared-memory object `name` ("/" then up to 254 characters, no other "/")
  // read-write, maps all of it and unlinks the name (the mappings stay). INVALID_ARGUMENT for a bad name, an empty object or one above
  // `max_bytes`; FAILED_PRECONDITION when it cannot be opened or mapped (the message gives the
  // system's reason: a router on another host, another user, a name already unlinked, ...);
  // RESOURCE_EXHAUSTED when kMaxRegions regions are mapped.
  static absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Open(absl::string_view name, int64_t max_bytes);
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;
  // Unmaps.
  ~SharedMemoryRegion();

  // The bytes [offset, offset + size) of the region; INVALID_ARGUMENT naming `field` (e.g.
  // "q.shm.offset") when they do not lie inside it, FAILED_PRECONDITION when it is broken.
  absl::StatusOr<std::span<uint8_t>> Slice(uint64_t offset, uint64_t size, absl::string_view field) const;

  // The router shrank the object while the worker read or wrote it (the region reads as zeros
  // from then on).
  bool broken() const;
  // FAILED_PRECONDITION naming the region when broken, else OK.
  absl::Status CheckIntact() const;

  // The first byte of the mapping, valid for the region's life (zeros once broken).
  uint8_t* base() const { return base_; }
  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }

  // Keeps `holder` (e.g. the engine's registration of the region with the GPU) until the region
  // is unmapped, and releases it just before.
  void HoldUntilUnmapped(std::shared_ptr<void> holder) { holders_.push_back(std::move(holder)); }

  // Regions mapped at once, in the whole process.
  static constexpr int kMaxRegions = 1024;

 private:
  SharedMemoryRegion(std::string name, uint8_t* base, uint64_t size, int slot)
      : name_(std::move(name)), base_(base), size_(size), slot_(slot) {}

  const std::string name_;
  uint8_t* const base_;
  const uint64_t size_;
  const int slot_;  // in the SIGBUS handler's table (which holds the broken flag)
  std::vector<std::shared_ptr<void>> holders_;  // released before the unmapping
};

}  // namespace pkv::service
