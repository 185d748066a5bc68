// A StepStream's shared memory (service/shared_memory.h).
//
// The SIGBUS handler only reads the table below (atomics, no locks, no allocation) and calls
// mmap, which is a plain system call; Open and the destructor change the table under a mutex.
#include "service/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <atomic>
#include <cstring>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pkv::service {
namespace {

constexpr int kMax = SharedMemoryRegion::kMaxRegions;

// Mapped regions: [begin, end) per slot, 0 when free; slots in use are below g_used.
std::atomic<uintptr_t> g_begin[kMax];
std::atomic<uintptr_t> g_end[kMax];
std::atomic<bool> g_broken[kMax];
std::atomic<int> g_used{0};
std::mutex g_mu;          // slot allocation and the handler's installation
bool g_in_use[kMax];      // under g_mu
bool g_installed = false;  // under g_mu
struct sigaction g_previous;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const int used = g_used.load(std::memory_order_acquire);
  for (int i = 0; i < used; ++i) {
    const uintptr_t b = g_begin[i].load(std::memory_order_acquire);
    const uintptr_t e = g_end[i].load(std::memory_order_acquire);
    if (b == 0 || addr < b || addr >= e) continue;
    // The router shrank its object: fresh zero pages over the whole region, so that this access
    // and any other one completes; the request sees broken() afterwards.
    void* r = mmap(reinterpret_cast<void*>(b), e - b, PROT_READ | PROT_WRITE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r != MAP_FAILED) {
      g_broken[i].store(true, std::memory_order_release);
      return;
    }
    break;
  }
  // Not a region's fault: what the process did before.
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN && g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
    return;
  }
  signal(SIGBUS, SIG_DFL);  // the access faults again and the default action ends the process
}

void InstallLocked() {
  if (g_installed) return;
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_sigaction = OnSigbus;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &g_previous);
  g_installed = true;
}

std::string Errno(int err) { return std::string(std::strerror(err)); }

}  // namespace

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegion::Open(absl::string_view name,
                                                                             int64_t max_bytes) {
  const std::string key = absl::StrCat("metadata ", kSharedMemoryKey);
  if (name.size() < 2 || name.size() > 255 || name[0] != '/' || name.find('/', 1) != absl::string_view::npos ||
      name.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        key, ": \"", name.substr(0, 64), "\" is not a POSIX shared-memory name (\"/\" and 1-254 characters, no other \"/\")"));
  }
  const std::string path(name);
  const int fd = shm_open(path.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int err = errno;
    return absl::FailedPreconditionError(absl::StrCat(
        key, ": cannot open ", path, ": ", Errno(err),
        " (shared memory works only with a router on the same host, or one sharing its /dev/shm, running as the same user)"));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(key, ": cannot stat ", path, ": ", Errno(err)));
  }
  const int64_t size = st.st_size;
  if (size <= 0 || size > max_bytes) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(key, ": ", path, " holds ", size, " bytes; a region holds 1 to ",
                                                   max_bytes, " bytes (--shared_memory_max_bytes)"));
  }
  void* base = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_err = errno;
  close(fd);
  if (base == MAP_FAILED) {
    return absl::FailedPreconditionError(absl::StrCat(key, ": cannot map ", path, ": ", Errno(map_err)));
  }
  // Both sides hold their mappings now: the name is no longer needed, and without it nothing is
  // left in /dev/shm whichever side dies first.
  shm_unlink(path.c_str());
  int slot = -1;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    InstallLocked();
    for (int i = 0; i < kMax; ++i) {
      if (!g_in_use[i]) {
        slot = i;
        break;
      }
    }
    if (slot >= 0) {
      g_in_use[slot] = true;
      g_broken[slot].store(false, std::memory_order_relaxed);
      g_end[slot].store(reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(size), std::memory_order_relaxed);
      g_begin[slot].store(reinterpret_cast<uintptr_t>(base), std::memory_order_release);
      if (slot >= g_used.load(std::memory_order_relaxed)) g_used.store(slot + 1, std::memory_order_release);
    }
  }
  if (slot < 0) {
    munmap(base, static_cast<size_t>(size));
    return absl::ResourceExhaustedError(
        absl::StrCat(key, ": the worker has ", kMax, " shared-memory regions mapped, the most it holds"));
  }
  return std::shared_ptr<SharedMemoryRegion>(
      new SharedMemoryRegion(path, static_cast<uint8_t*>(base), static_cast<uint64_t>(size), slot));
}

SharedMemoryRegion::~SharedMemoryRegion() {
  holders_.clear();  // e.g. unregistered from the GPU while still mapped
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_begin[slot_].store(0, std::memory_order_release);
    g_end[slot_].store(0, std::memory_order_release);
    g_in_use[slot_] = false;
  }
  munmap(base_, static_cast<size_t>(size_));
}

bool SharedMemoryRegion::broken() const { return g_broken[slot_].load(std::memory_order_acquire); }

absl::Status SharedMemoryRegion::CheckIntact() const {
  if (!broken()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "shared memory: the router shrank ", name_,
      " while the worker used it; the region reads as zeros now: open a new StepStream"));
}

absl::StatusOr<std::span<uint8_t>> SharedMemoryRegion::Slice(uint64_t offset, uint64_t size,
                                                            absl::string_view field) const {
  if (offset > size_ || size > size_ - offset) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": bytes [", offset, ", ", offset + size,
                                                   ") do not lie inside the stream's shared memory of ", size_,
                                                   " bytes"));
  }
  if (absl::Status s = CheckIntact(); !s.ok()) return s;
  return std::span<uint8_t>(base_ + offset, static_cast<size_t>(size));
}

}  // namespace pkv::service
