#include "kvpool/cuda/device_kv_arena.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "kvpool/cuda/append_kv.h"

namespace pkv::kvpool {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return absl::FailedPreconditionError(msg);
  return absl::InternalError(msg);
}

#define PKV_CUDA_RETURN(expr, what)                          \
  do {                                                       \
    if (absl::Status s_ = CudaStatus((expr), what); !s_.ok()) return s_; \
  } while (0)

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceKvArena>> DeviceKvArena::Create(const ModelShape& shape, const Options& o) {
  if (absl::Status s = shape.Validate(); !s.ok()) return s;
  if (shape.head_dim % 8 != 0) return absl::InvalidArgumentError("head_dim must be a multiple of 8");
  if (o.staging_bytes < (1 << 20)) return absl::InvalidArgumentError("staging_bytes must be >= 1 MiB");
  if (o.ingest_copy_threads < 0) return absl::InvalidArgumentError("ingest_copy_threads must be >= 0");
  if (o.ingest_nice < 0 || o.ingest_nice > 19) return absl::InvalidArgumentError("ingest_nice must be in [0, 19]");
  const int64_t page_bytes_all = shape.page_bytes_all_layers();
  int64_t pages = o.num_pages;
  if (pages <= 0) {
    if (!(o.free_memory_fraction > 0 && o.free_memory_fraction <= 1)) {
      return absl::InvalidArgumentError("set num_pages > 0 or free_memory_fraction in (0, 1]");
    }
    size_t free_b = 0, total_b = 0;
    PKV_CUDA_RETURN(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    pages = static_cast<int64_t>(static_cast<double>(free_b) * o.free_memory_fraction) / page_bytes_all;
    if (pages < 1) return absl::ResourceExhaustedError("free device memory holds no page");
  }
  std::unique_ptr<DeviceKvArena> a(new DeviceKvArena(shape, pages));
  PKV_CUDA_RETURN(cudaMalloc(&a->data_, static_cast<size_t>(pages * page_bytes_all)),
                  absl::StrCat("cudaMalloc of ", pages * page_bytes_all, " bytes of KV pool").c_str());
  PKV_CUDA_RETURN(cudaMemset(a->data_, 0, static_cast<size_t>(pages * page_bytes_all)), "cudaMemset");
  // Prompt ingest yields to decode: the arena's stream takes the lowest priority, so that the
  // block scheduler starts a waiting decode kernel's blocks before more scatter blocks.
  int least_priority = 0, greatest_priority = 0;
  PKV_CUDA_RETURN(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority), "stream priority range");
  PKV_CUDA_RETURN(cudaStreamCreateWithPriority(&a->stream_, cudaStreamNonBlocking, least_priority),
                  "cudaStreamCreate");
  a->staging_bytes_ = o.staging_bytes;
  for (int i = 0; i < 2; ++i) {
    PKV_CUDA_RETURN(cudaHostAlloc(&a->staging_[i], o.staging_bytes, cudaHostAllocDefault), "cudaHostAlloc");
    PKV_CUDA_RETURN(cudaEventCreateWithFlags(&a->staged_[i], cudaEventDisableTiming), "cudaEventCreate");
  }
  if (o.ingest_bytes < IngestPacker::MinCapacity(shape)) {
    return absl::InvalidArgumentError("ingest_bytes: holds no token");
  }
  for (int i = 0; i < 2; ++i) {
    PKV_CUDA_RETURN(cudaHostAlloc(&a->ingest_host_[i], o.ingest_bytes, cudaHostAllocDefault), "cudaHostAlloc ingest");
    PKV_CUDA_RETURN(cudaMalloc(&a->ingest_device_[i], o.ingest_bytes), "cudaMalloc ingest");
    PKV_CUDA_RETURN(cudaEventCreateWithFlags(&a->ingest_done_[i], cudaEventDisableTiming), "cudaEventCreate");
  }
  for (auto& packer : a->packers_) packer = std::make_unique<IngestPacker>(shape, o.ingest_bytes);
  a->copier_ = std::make_unique<ParallelCopier>(o.ingest_copy_threads, ParallelCopier::kDefaultMinPiece, o.ingest_nice);
  a->scratch_bytes_ = o.staging_bytes;
  PKV_CUDA_RETURN(cudaMalloc(&a->scratch_, static_cast<size_t>(a->scratch_bytes_)), "cudaMalloc scratch");
  PKV_CUDA_RETURN(cudaStreamSynchronize(a->stream_), "cudaStreamSynchronize");
  return a;
}

DeviceKvArena::~DeviceKvArena() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (int i = 0; i < 2; ++i) {
    if (staging_[i] != nullptr) cudaFreeHost(staging_[i]);
    if (staged_[i] != nullptr) cudaEventDestroy(staged_[i]);
    if (ingest_host_[i] != nullptr) cudaFreeHost(ingest_host_[i]);
    if (ingest_device_[i] != nullptr) cudaFree(ingest_device_[i]);
    if (ingest_done_[i] != nullptr) cudaEventDestroy(ingest_done_[i]);
  }
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (data_ != nullptr) cudaFree(data_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

// Copy-kernel parameters for `n` tokens of one layer staged in scratch_ as
// [slots (slot_bytes)][K (n * row)][V (n * row)].
cuda::AppendKvParams DeviceKvArena::ScratchParams(int32_t layer, int64_t n, int64_t slot_bytes,
                                                  int64_t row) const {
  cuda::AppendKvParams p;
  p.arena = data_;
  p.layer_stride = layer_bytes() / 2;
  p.first_layer = layer;
  p.num_layers = 1;
  p.num_kv_heads = shape_.num_kv_heads;
  p.page_size = shape_.page_size;
  p.head_dim = shape_.head_dim;
  p.num_tokens = static_cast<int32_t>(n);
  p.slots = static_cast<const int32_t*>(scratch_);
  p.k = static_cast<char*>(scratch_) + slot_bytes;
  p.v = static_cast<char*>(scratch_) + slot_bytes + n * row;
  return p;
}

absl::Status DeviceKvArena::CheckAccess(int32_t layer, std::span<const SlotAddr> slots) const {
  if (layer < 0 || layer >= shape_.num_layers) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  for (const SlotAddr& s : slots) {
    if (s.page < 0 || s.page >= num_pages_ || s.slot < 0 || s.slot >= shape_.page_size) {
      return absl::InvalidArgumentError(absl::StrCat("slot (", s.page, ", ", s.slot, ") out of range"));
    }
  }
  return absl::OkStatus();
}

namespace {

// Per-chunk token count that fits slots + K + V in `bytes`.
int64_t TokensPerChunk(const ModelShape& s, int64_t bytes) {
  const int64_t per_token = 8 + 2 * s.num_kv_heads * static_cast<int64_t>(s.head_dim) * 2;
  return std::max<int64_t>(1, (bytes - 256) / per_token);
}

}  // namespace

absl::Status DeviceKvArena::WriteTokens(int32_t layer, std::span<const SlotAddr> slots, const void* k, const void* v) {
  if (absl::Status s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t row = static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim * 2;  // bytes per token of K
  const int64_t chunk = TokensPerChunk(shape_, std::min(staging_bytes_, scratch_bytes_));
  for (int64_t t0 = 0; t0 < static_cast<int64_t>(slots.size()); t0 += chunk) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(slots.size()) - t0);
    // Stage [slots | K | V] in pinned memory, one copy up, one append launch.
    char* st = static_cast<char*>(staging_[0]);
    const int64_t slot_bytes = (n * 8 + 15) / 16 * 16;
    std::memcpy(st, slots.data() + t0, n * 8);
    std::memcpy(st + slot_bytes, static_cast<const char*>(k) + t0 * row, n * row);
    std::memcpy(st + slot_bytes + n * row, static_cast<const char*>(v) + t0 * row, n * row);
    PKV_CUDA_RETURN(cudaMemcpyAsync(scratch_, st, slot_bytes + 2 * n * row, cudaMemcpyHostToDevice, stream_), "H2D");
    const cuda::AppendKvParams p = ScratchParams(layer, n, slot_bytes, row);
    PKV_CUDA_RETURN(cuda::LaunchAppendKv(p, stream_), "append kernel");
    PKV_CUDA_RETURN(cudaStreamSynchronize(stream_), "append sync");  // staging is reused
  }
  return absl::OkStatus();
}

absl::Status DeviceKvArena::ReadTokens(int32_t layer, std::span<const SlotAddr> slots, void* k, void* v) const {
  if (absl::Status s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t row = static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim * 2;
  const int64_t chunk = TokensPerChunk(shape_, std::min(staging_bytes_, scratch_bytes_));
  for (int64_t t0 = 0; t0 < static_cast<int64_t>(slots.size()); t0 += chunk) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(slots.size()) - t0);
    const int64_t slot_bytes = (n * 8 + 15) / 16 * 16;
    PKV_CUDA_RETURN(cudaMemcpyAsync(scratch_, slots.data() + t0, n * 8, cudaMemcpyHostToDevice, stream_), "H2D");
    const cuda::AppendKvParams p = ScratchParams(layer, n, slot_bytes, row);
    PKV_CUDA_RETURN(cuda::LaunchGatherKv(p, stream_), "gather kernel");
    PKV_CUDA_RETURN(cudaMemcpyAsync(static_cast<char*>(k) + t0 * row, p.k, n * row, cudaMemcpyDeviceToHost, stream_), "D2H");
    PKV_CUDA_RETURN(cudaMemcpyAsync(static_cast<char*>(v) + t0 * row, p.v, n * row, cudaMemcpyDeviceToHost, stream_), "D2H");
    PKV_CUDA_RETURN(cudaStreamSynchronize(stream_), "gather sync");
  }
  return absl::OkStatus();
}

absl::Status DeviceKvArena::CopyPage(PageId src, PageId dst) {
  if (src < 0 || src >= num_pages_ || dst < 0 || dst >= num_pages_) {
    return absl::InvalidArgumentError("CopyPage: page out of range");
  }
  const size_t page_bytes = static_cast<size_t>(page_elems()) * 2;
  char* base = static_cast<char*>(data_);
  // One 2-D copy moves the page in every layer (pitch = one layer).
  PKV_CUDA_RETURN(cudaMemcpy2DAsync(base + dst * page_bytes, layer_bytes(), base + src * page_bytes, layer_bytes(),
                                    page_bytes, shape_.num_layers, cudaMemcpyDeviceToDevice, stream_),
                  "CopyPage");
  PKV_CUDA_RETURN(cudaStreamSynchronize(stream_), "CopyPage sync");
  return absl::OkStatus();
}

absl::Status DeviceKvArena::FlushIngestBuffer(std::unique_lock<std::mutex>& lock) {
  const int cur = ingest_cur_;
  IngestPacker& packer = *packers_[cur];
  if (packer.empty() || sealing_[cur]) return absl::OkStatus();
  const int next = cur ^ 1;
  // Packing moves to the other buffer once its last flush was issued (by a concurrent flush that
  // may still wait for copies into it) and done (the copy read it, the scatter read its twin).
  ingest_cv_.wait(lock, [&] { return !sealing_[next]; });
  if (ingest_cur_ != cur) return absl::OkStatus();  // a concurrent flush took this buffer meanwhile
  absl::Status st = CudaStatus(cudaEventSynchronize(ingest_done_[next]), "ingest wait");
  if (st.ok()) {
    sealing_[cur] = true;
    ingest_cur_ = next;
    // Rows reserved in this buffer are being copied by their StageTokens calls, without the lock.
    ingest_cv_.wait(lock, [&] { return copying_[cur] == 0; });
    size_t runs_at = 0;
    const size_t bytes = packer.Finish(ingest_host_[cur], &runs_at);
    cuda::ScatterRunsParams p;
    p.arena = data_;
    p.layer_stride = layer_bytes() / 2;
    p.num_kv_heads = shape_.num_kv_heads;
    p.page_size = shape_.page_size;
    p.head_dim = shape_.head_dim;
    p.num_runs = static_cast<int32_t>(packer.num_runs());
    p.runs = static_cast<char*>(ingest_device_[cur]) + runs_at;
    p.data = ingest_device_[cur];
    const int64_t kv_bytes = 2 * packer.num_tokens() * packer.row_bytes();
    packer.Reset();
    // One copy of the whole buffer. A copy engine serves it without regard to stream priority,
    // however finely it is cut, so while it is in flight (IngestCopiesIdle false) the engine's
    // decode path uploads its inputs with a kernel and never queues behind it.
    ingest_flushes_in_flight_.fetch_add(1, std::memory_order_acq_rel);
    st = CudaStatus(cudaMemcpyAsync(ingest_device_[cur], ingest_host_[cur], bytes, cudaMemcpyHostToDevice, stream_),
                    "ingest H2D");
    if (st.ok()) st = CudaStatus(cuda::LaunchScatterRuns(p, stream_), "ingest scatter");
    if (st.ok()) st = CudaStatus(cudaEventRecord(ingest_done_[cur], stream_), "ingest event");
    // Uncounted once the stream got past the flush (the callback only touches the counter).
    if (!st.ok() || cudaLaunchHostFunc(
                        stream_,
                        [](void* counter) {
                          static_cast<std::atomic<int>*>(counter)->fetch_sub(1, std::memory_order_acq_rel);
                        },
                        &ingest_flushes_in_flight_) != cudaSuccess) {
      ingest_flushes_in_flight_.fetch_sub(1, std::memory_order_acq_rel);
    }
    sealing_[cur] = false;
    ingest_cv_.notify_all();
    if (st.ok()) {
      staged_stats_.bytes += kv_bytes;
      ++staged_stats_.copies;
    }
  }
  if (!st.ok()) {
    ingest_error_ = absl::InternalError(absl::StrCat("merged prompt ingest failed (the arena refuses further "
                                                     "staging): ", st.message()));
    return ingest_error_;
  }
  return absl::OkStatus();
}

absl::Status DeviceKvArena::StageTokens(int32_t layer, std::span<const SlotAddr> slots, const PieceBytes& k,
                                        const PieceBytes& v, StageScan* scan) {
  if (absl::Status s = CheckAccess(layer, slots); !s.ok()) return s;
  const int64_t row = shape_.kv_bytes_per_token_layer() / 2;
  if (k.size() < slots.size() * static_cast<size_t>(row) || v.size() < slots.size() * static_cast<size_t>(row)) {
    return absl::InvalidArgumentError("StageTokens: k and v must hold [tokens, num_kv_heads, head_dim] each");
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(slots.size());
  if (scan != nullptr) {
    std::unique_lock<std::mutex> lock(ingest_mu_);
    if (!ingest_error_.ok()) return ingest_error_;
    const int buffer = ingest_cur_;
    IngestPacker& packer = *packers_[buffer];
    if (n > 0 && packer.Fits(n)) {
      // The whole chunk fits the current buffer: copy and scan it in one pass over its bytes, and
      // take the placement back when the scan finds a NaN or infinity, so nothing of a refused
      // chunk reaches the pool. The buffer is not issued while copying_ counts this copy.
      const IngestPacker::Placement at = packer.Reserve(layer, slots);
      PKV_CHECK(at.tokens == n) << "a chunk that fits takes all its tokens";
      ++copying_[buffer];
      lock.unlock();
      char* base = static_cast<char*>(ingest_host_[buffer]);
      const size_t bytes = static_cast<size_t>(n * row);
      std::vector<ParallelCopier::Span> spans;
      std::vector<ParallelCopier::ScanOf> scans;
      std::vector<int64_t> split[2];
      ParallelCopier::AppendStaging(k, 0, bytes, base + at.k_offset, 0, &spans, &scans, &split[0]);
      ParallelCopier::AppendStaging(v, 0, bytes, base + at.v_offset, 1, &spans, &scans, &split[1]);
      int64_t first[2] = {-1, -1};
      copier_->CopyAndScan(spans, scans, shape_.dtype, first);
      for (int t = 0; t < 2; ++t) {
        for (const int64_t e : split[t]) {  // elements split between two pieces
          uint8_t bits[2];
          (t == 0 ? k : v).CopyTo(static_cast<size_t>(2 * e), 2, bits);
          if (FirstNonFinite(shape_.dtype, bits, 2) == 0 && (first[t] < 0 || e < first[t])) first[t] = e;
        }
      }
      lock.lock();
      scan->first_k = first[0];
      scan->first_v = first[1];
      if (!scan->clean()) packer.Void(at);
      if (--copying_[buffer] == 0) ingest_cv_.notify_all();
      staged_stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return absl::OkStatus();
    }
    lock.unlock();
    // A chunk that does not fit may be split across buffers, and the first may be issued before
    // the rest is copied: scan it all before anything is reserved.
    const PieceBytes* tensors[] = {&k, &v};
    int64_t first[2] = {-1, -1};
    copier_->FirstNonFinite(tensors, shape_.dtype, first);
    scan->first_k = first[0];
    scan->first_v = first[1];
    if (!scan->clean()) return absl::OkStatus();
  }
  std::vector<ParallelCopier::Span> spans;
  std::unique_lock<std::mutex> lock(ingest_mu_);
  for (int64_t done = 0; done < n;) {
    if (!ingest_error_.ok()) return ingest_error_;
    const int buffer = ingest_cur_;
    IngestPacker& packer = *packers_[buffer];
    const IngestPacker::Placement at = packer.Reserve(layer, slots.subspan(done));
    if (at.tokens == 0) {
      // Invariant: an empty buffer holds a token (checked at Create), so a full one made progress
      // possible again once it was flushed (here or by a concurrent call).
      PKV_CHECK(!packer.empty()) << "empty ingest buffer holds no token";
      if (absl::Status s = FlushIngestBuffer(lock); !s.ok()) return s;
      continue;
    }
    // Copy without the lock; the buffer is not issued while copying_ counts this copy.
    ++copying_[buffer];
    lock.unlock();
    char* base = static_cast<char*>(ingest_host_[buffer]);
    const size_t bytes = static_cast<size_t>(at.tokens * row);
    spans.clear();
    for (const auto& [src, offset] : {std::pair{&k, at.k_offset}, std::pair{&v, at.v_offset}}) {
      src->ForEachPart(static_cast<size_t>(done * row), bytes, [&](size_t part, const uint8_t* from, size_t len) {
        spans.push_back({base + offset + part, from, len});
      });
    }
    copier_->Copy(spans);
    lock.lock();
    if (--copying_[buffer] == 0) ingest_cv_.notify_all();
    done += at.tokens;
  }
  staged_stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::Status DeviceKvArena::FlushStaged() {
  std::unique_lock<std::mutex> lock(ingest_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status st = ingest_error_;
  if (st.ok()) {
    st = FlushIngestBuffer(lock);
  } else {
    // What is staged cannot be trusted; nothing staged can commit. Copies still running land in
    // their buffer first.
    ingest_cv_.wait(lock, [&] { return copying_[0] == 0 && copying_[1] == 0 && !sealing_[0] && !sealing_[1]; });
    for (auto& packer : packers_) packer->Reset();
  }
  // A concurrent flush may hold this caller's rows in a buffer it is sealing: wait until that one
  // was issued, then for the stream. Wait even after an error: the caller may free pages the
  // in-flight scatter writes.
  ingest_cv_.wait(lock, [&] { return !sealing_[0] && !sealing_[1]; });
  const absl::Status sync = CudaStatus(cudaStreamSynchronize(stream_), "ingest sync");
  if (st.ok() && !sync.ok()) {
    ingest_error_ = absl::InternalError(absl::StrCat("merged prompt ingest failed: ", sync.message()));
    st = ingest_error_;
  }
  staged_stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

absl::StatusOr<IngestStats> DeviceKvArena::IngestPages(std::span<const PageId> pages, const void* host_pages) {
  for (PageId p : pages) {
    if (p < 0 || p >= num_pages_) return absl::InvalidArgumentError(absl::StrCat("IngestPages: page ", p, " out of range"));
  }
  const auto t_start = std::chrono::steady_clock::now();
  IngestStats stats;
  const int64_t page_bytes = page_elems() * 2;
  const int64_t n = static_cast<int64_t>(pages.size());
  const auto* src = static_cast<const char*>(host_pages);
  char* dev = static_cast<char*>(data_);
  // Pinned (page-locked) sources skip the staging copy: one DMA per page run, straight from them.
  cudaPointerAttributes attr{};
  const bool pinned = cudaPointerGetAttributes(&attr, host_pages) == cudaSuccess && attr.type == cudaMemoryTypeHost;
  (void)cudaGetLastError();  // an unregistered pointer may leave an error behind on older drivers
  if (pinned) {
    for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
      for (int64_t r = 0; r < n;) {
        int64_t e = r + 1;
        while (e < n && pages[e] == pages[e - 1] + 1) ++e;
        PKV_CUDA_RETURN(cudaMemcpyAsync(dev + layer * layer_bytes() + static_cast<int64_t>(pages[r]) * page_bytes,
                                        src + (static_cast<int64_t>(layer) * n + r) * page_bytes, (e - r) * page_bytes,
                                        cudaMemcpyHostToDevice, stream_),
                        "ingest H2D (pinned)");
        ++stats.copies;
        r = e;
      }
    }
    PKV_CUDA_RETURN(cudaStreamSynchronize(stream_), "ingest sync");
    stats.bytes = n * page_bytes * shape_.num_layers;
    stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    return stats;
  }
  const int64_t pages_per_stage = std::max<int64_t>(1, staging_bytes_ / page_bytes);
  int buf = 0;
  // Walk (layer, page) in source order, in staging-sized pieces; inside a piece, every run of
  // consecutive physical pages becomes one copy. Two staging buffers: fill one while the other's
  // copies run.
  for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int64_t i0 = 0; i0 < n; i0 += pages_per_stage) {
      const int64_t cnt = std::min(pages_per_stage, n - i0);
      PKV_CUDA_RETURN(cudaEventSynchronize(staged_[buf]), "staging wait");  // its last copies are done
      char* st = static_cast<char*>(staging_[buf]);
      std::memcpy(st, src + (static_cast<int64_t>(layer) * n + i0) * page_bytes, cnt * page_bytes);
      for (int64_t r = 0; r < cnt;) {
        int64_t e = r + 1;
        while (e < cnt && pages[i0 + e] == pages[i0 + e - 1] + 1) ++e;
        PKV_CUDA_RETURN(cudaMemcpyAsync(dev + layer * layer_bytes() + static_cast<int64_t>(pages[i0 + r]) * page_bytes,
                                        st + r * page_bytes, (e - r) * page_bytes, cudaMemcpyHostToDevice, stream_),
                        "ingest H2D");
        ++stats.copies;
        r = e;
      }
      PKV_CUDA_RETURN(cudaEventRecord(staged_[buf], stream_), "event");
      buf ^= 1;
    }
  }
  PKV_CUDA_RETURN(cudaStreamSynchronize(stream_), "ingest sync");
  stats.bytes = n * page_bytes * shape_.num_layers;
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return stats;
}

}  // namespace pkv::kvpool
