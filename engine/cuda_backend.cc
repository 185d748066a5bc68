#include "engine/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "kernels/cuda/decode_attention_cuda.h"
#include "kernels/cuda/work_plan.h"
#include "kvpool/cuda/append_kv.h"
#include "kvpool/cuda/device_kv_arena.h"

namespace pkv::engine {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorString(e)));
}

#define PKV_CUDA_RETURN(expr, what)                            \
  do {                                                         \
    if (absl::Status s_ = CudaStatus((expr), what); !s_.ok()) return s_; \
  } while (0)

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

class CudaBackend final : public ExecutionBackend {
 public:
  CudaBackend(std::unique_ptr<kvpool::DeviceKvArena> arena, const CudaBackendOptions& options)
      : arena_(std::move(arena)), options_(options) {}

  ~CudaBackend() override {
    for (Slot& s : slots_) {
      if (s.stream != nullptr) cudaStreamSynchronize(s.stream);
      cudaFreeHost(s.host);
      cudaFree(s.device);
      cudaFreeHost(s.io_host);
      cudaFree(s.io_device);
      cudaFreeHost(s.out_host);
      cudaFree(s.out_device);
      cudaFree(s.workspace);
      if (s.start != nullptr) cudaEventDestroy(s.start);
      if (s.stop != nullptr) cudaEventDestroy(s.stop);
      if (s.uploaded != nullptr) cudaEventDestroy(s.uploaded);
      for (cudaEvent_t e : {s.h2d_start, s.h2d_done, s.d2h_done}) {
        if (e != nullptr) cudaEventDestroy(e);
      }
      for (GraphEntry& g : s.graphs) {
        if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
        if (g.graph != nullptr) cudaGraphDestroy(g.graph);
      }
      if (s.step_capture != nullptr) cudaGraphDestroy(s.step_capture);
      if (s.stream != nullptr) cudaStreamDestroy(s.stream);
    }
  }

  absl::Status Init() {
    const ModelShape& s = arena_->shape();
    cudaDeviceProp prop;
    PKV_CUDA_RETURN(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    info_.name = prop.name;
    info_.is_gpu = true;
    info_.num_sms = prop.multiProcessorCount;
    if (options_.max_open_token_steps < 1) return absl::InvalidArgumentError("max_open_token_steps must be >= 1");

    const int64_t b = options_.max_batch;
    indices_capacity_ = 2 * arena_->num_pages() + b;
    tasks_capacity_ = std::min<int64_t>(static_cast<int64_t>(s.num_kv_heads) * indices_capacity_, 1 << 20);
    descriptor_bytes_ = Align16((b + 1) * 4) + 4 * Align16(2 * b * 4) + Align16(indices_capacity_ * 4) +
                        Align16(tasks_capacity_ * sizeof(DecodeTask));
    const size_t el = DTypeSize(s.dtype);
    q_bytes_ = static_cast<size_t>(b) * s.num_q_heads * s.head_dim * el;
    kv_bytes_ = static_cast<size_t>(b) * s.num_kv_heads * s.head_dim * el;
    const size_t io = Align16(q_bytes_) + 2 * Align16(kv_bytes_);
    out_bytes_ = Align16(q_bytes_) + static_cast<size_t>(b) * s.num_q_heads * sizeof(float);
    kernels::DecodeParams ws = BaseParams(0);
    ws.batch = 1;
    ws.num_splits = options_.max_partial_slots;
    workspace_bytes_ = kernels::cuda::WorkspaceBytes(KernelId::kSequenceSplit, ws);
    grid_ = kernels::cuda::PersistentGridSize(ws);
    // Everything a layer touches is per slot, so slots run concurrently on their own streams;
    // only the arena's pages are shared (disjoint writes, see engine/backend.h).
    slots_.resize(options_.max_open_token_steps);
    for (Slot& slot : slots_) {
      PKV_CUDA_RETURN(cudaStreamCreateWithFlags(&slot.stream, cudaStreamNonBlocking), "stream");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.start), "event");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.stop), "event");
      PKV_CUDA_RETURN(cudaEventCreateWithFlags(&slot.uploaded, cudaEventDisableTiming), "event");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.h2d_start), "event");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.h2d_done), "event");
      PKV_CUDA_RETURN(cudaEventCreate(&slot.d2h_done), "event");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.host, descriptor_bytes_), "pinned descriptor");
      PKV_CUDA_RETURN(cudaMalloc(&slot.device, descriptor_bytes_), "device descriptor");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.io_host, io), "pinned io");
      PKV_CUDA_RETURN(cudaMalloc(&slot.io_device, io), "device io");
      PKV_CUDA_RETURN(cudaMallocHost(&slot.out_host, out_bytes_), "pinned out");
      PKV_CUDA_RETURN(cudaMalloc(&slot.out_device, out_bytes_), "device out");
      PKV_CUDA_RETURN(cudaMalloc(&slot.workspace, workspace_bytes_), "workspace");
      // The fused-merge counters must start at zero; every launch leaves them at zero.
      PKV_CUDA_RETURN(cudaMemset(slot.workspace, 0, workspace_bytes_), "workspace memset");
      // Graph mode: one executable per (batch bucket, arm, lse) at most; reserved so the step
      // path never grows the vector.
      slot.graphs.reserve(kMaxGraphsPerSlot);
    }
    PKV_CUDA_RETURN(cudaDeviceSynchronize(), "init");
    PKV_LOG(INFO) << "cuda backend on " << info_.name << " (" << info_.num_sms << " SMs): "
                  << arena_->num_pages() << " pages (" << arena_->layer_bytes() * s.num_layers / (1 << 20)
                  << " MiB KV), " << slots_.size() << " descriptor slots with a stream and "
                  << workspace_bytes_ / (1 << 20) << " MiB workspace each, persistent grid " << grid_ << ", "
                  << (options_.launch_mode == LaunchMode::kGraph ? "CUDA graph replay" : "eager launches");
    return absl::OkStatus();
  }

  const char* name() const override { return "cuda"; }
  kvpool::KvArena& arena() override { return *arena_; }
  scheduler::DeviceInfo device_info() const override { return info_; }
  std::vector<KernelId> kernels() const override {
    return {KernelId::kPerRequest, KernelId::kSequenceSplit, KernelId::kWorkQueue};
  }
  int32_t max_open_token_steps() const override { return options_.max_open_token_steps; }

  absl::StatusOr<int32_t> BeginTokenStep(const scheduler::StepPlan& plan, const PageTableCsr& table,
                                         std::span<const kvpool::SlotAddr> new_slots) override {
    int32_t id = -1;
    for (int32_t i = 0; i < static_cast<int32_t>(slots_.size()); ++i) {
      if (!slots_[i].used) {
        id = i;
        break;
      }
    }
    if (id < 0) return absl::ResourceExhaustedError("no free descriptor slot");
    Slot& slot = slots_[id];
    const int32_t b = static_cast<int32_t>(table.last_page_len.size());
    if (b > options_.max_batch) return absl::InvalidArgumentError("batch larger than max_batch");
    if (static_cast<int64_t>(table.indices.size()) > indices_capacity_) {
      return absl::ResourceExhaustedError("page table larger than the descriptor holds");
    }

    // The route's work: splits or the compact task list (policy came from the scheduler).
    slot.kernel = plan.kernel;
    slot.num_splits = 1;
    slot.num_partials = 0;
    kernels::cuda::WorkPlan work;
    if (plan.kernel == KernelId::kSequenceSplit) {
      slot.num_splits = std::clamp(plan.num_splits, 1, std::max(1, options_.max_partial_slots / std::max(1, b)));
    } else if (plan.kernel == KernelId::kWorkQueue) {
      std::vector<int32_t> row_pages(b);
      for (int32_t r = 0; r < b; ++r) row_pages[r] = table.indptr[r + 1] - table.indptr[r];
      int32_t per_task = plan.pages_per_task > 0
                             ? plan.pages_per_task
                             : kernels::cuda::PagesPerTaskFor(row_pages, arena_->shape().num_kv_heads, grid_);
      for (;;) {
        work = kernels::cuda::BuildWorkPlan(row_pages, arena_->shape().num_kv_heads, per_task);
        if (work.num_partials <= options_.max_partial_slots &&
            static_cast<int64_t>(work.tasks.size()) <= tasks_capacity_) {
          break;
        }
        per_task *= 2;  // the workspace bounds how finely rows may be cut
      }
      slot.num_partials = work.num_partials;
      slot.num_tasks = static_cast<int32_t>(work.tasks.size());
    }

    // The slot's previous upload read slot.host; it finished unless that token step ran no layer
    // (then this returns at once, as after every RunLayer, which waits for its stream).
    PKV_CUDA_RETURN(cudaEventSynchronize(slot.uploaded), "descriptor reuse");
    // Pack the descriptor: [indptr | last | row_splits | partial_offset | slots | indices | tasks].
    char* h = static_cast<char*>(slot.host);
    size_t off = 0;
    auto put = [&](const void* src, size_t bytes) {
      const size_t at = off;
      if (bytes > 0) std::memcpy(h + at, src, bytes);
      off += Align16(bytes);
      return at;
    };
    slot.off_indptr = put(table.indptr.data(), table.indptr.size() * 4);
    slot.off_last = put(table.last_page_len.data(), table.last_page_len.size() * 4);
    slot.off_row_splits = put(work.row_splits.data(), work.row_splits.size() * 4);
    slot.off_partial_offset = put(work.partial_offset.data(), work.partial_offset.size() * 4);
    static_assert(sizeof(kvpool::SlotAddr) == 8);
    slot.off_slots = put(new_slots.data(), new_slots.size() * sizeof(kvpool::SlotAddr));
    slot.off_indices = put(table.indices.data(), table.indices.size() * 4);
    slot.off_tasks = put(work.tasks.data(), work.tasks.size() * sizeof(DecodeTask));
    slot.batch = b;
    PKV_CUDA_RETURN(cudaMemcpyAsync(slot.device, slot.host, off, cudaMemcpyHostToDevice, slot.stream),
                    "descriptor upload");
    PKV_CUDA_RETURN(cudaEventRecord(slot.uploaded, slot.stream), "event");
    kernels::DecodeParams p = SlotParams(slot, 0);
    if (b > 0) {
      if (absl::Status st = kernels::cuda::CanImplement(slot.kernel, p); !st.ok()) return st;
    }
    slot.used = true;
    return id;
  }

  absl::Status RunLayer(int32_t id, int32_t layer, const void* q, const void* k, const void* v, void* out,
                        float* lse, LayerRunInfo* info) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    Slot& slot = slots_[id];
    const auto t0 = std::chrono::steady_clock::now();
    const ModelShape& s = arena_->shape();
    const size_t el = DTypeSize(s.dtype);
    const size_t qb = static_cast<size_t>(slot.batch) * s.num_q_heads * s.head_dim * el;
    const size_t kvb = static_cast<size_t>(slot.batch) * s.num_kv_heads * s.head_dim * el;
    char* io = static_cast<char*>(slot.io_host);
    const size_t k_at = Align16(qb), v_at = k_at + Align16(kvb);
    std::memcpy(io, q, qb);
    std::memcpy(io + k_at, k, kvb);
    std::memcpy(io + v_at, v, kvb);
    bool done = false;
    info->graph_replay = false;
    if (options_.launch_mode == LaunchMode::kGraph && !slot.graph_off) {
      if (absl::Status st = RunLayerGraph(id, slot, layer, lse != nullptr, &info->graph_replay); st.ok()) {
        done = true;
      } else {
        // Once per slot: this slot runs eagerly from now on.
        PKV_LOG(WARNING) << "cuda backend slot " << id << ": CUDA graph replay failed (" << st
                         << "); falling back to eager launches";
        slot.graph_off = true;
        info->graph_replay = false;
        (void)cudaGetLastError();
      }
    }
    if (!done) {
      if (absl::Status st = EnqueueLayer(slot, layer, lse != nullptr, /*capturing=*/false); !st.ok()) return st;
      ++slot.eager_launches;
    }
    // Waits for this slot's stream only; other slots' layers keep running.
    const auto enqueued = std::chrono::steady_clock::now();
    PKV_CUDA_RETURN(cudaStreamSynchronize(slot.stream), "layer");
    const auto synced = std::chrono::steady_clock::now();
    std::memcpy(out, slot.out_host, qb);
    if (lse != nullptr) {
      std::memcpy(lse, static_cast<char*>(slot.out_host) + Align16(qb), slot.batch * s.num_q_heads * 4);
    }
    // Device stages: [h2d_start, h2d_done) the q|k|v upload, [h2d_done, stop) append and
    // attention, [stop, d2h_done) the download.
    auto elapsed = [](cudaEvent_t from, cudaEvent_t to, double* seconds) {
      float ms = 0;
      PKV_CUDA_RETURN(cudaEventElapsedTime(&ms, from, to), "elapsed");
      *seconds = ms * 1e-3;
      return absl::OkStatus();
    };
    if (absl::Status st = elapsed(slot.start, slot.stop, &info->attend_seconds); !st.ok()) return st;
    if (absl::Status st = elapsed(slot.h2d_start, slot.h2d_done, &info->h2d_seconds); !st.ok()) return st;
    if (absl::Status st = elapsed(slot.h2d_done, slot.stop, &info->kernel_seconds); !st.ok()) return st;
    if (absl::Status st = elapsed(slot.stop, slot.d2h_done, &info->d2h_seconds); !st.ok()) return st;
    // Host work: staging and launching before the wait, copying the outputs out after it.
    info->host_seconds = std::chrono::duration<double>(enqueued - t0).count() +
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - synced).count();
    return absl::OkStatus();
  }

  void EndTokenStep(int32_t id) override {
    PKV_CHECK(id >= 0 && id < static_cast<int32_t>(slots_.size()) && slots_[id].used) << "bad slot " << id;
    slots_[id].used = false;
    slots_[id].step_graph = -1;  // the next token step updates its graph first
  }

 private:
  // Most nodes of a layer's captured chain: h2d_start event, upload, h2d_done event, append,
  // start event, <= 2 attention launches, stop event, download, d2h_done event.
  static constexpr int kMaxChain = 10;
  static constexpr size_t kMaxGraphsPerSlot = 64;
  static constexpr int kMaxKernelNodes = 3;  // append + <= 2 attention launches
  struct GraphEntry {
    int32_t bucket = -1;  // batch-size bucket (next power of two)
    KernelId kernel = KernelId::kPerRequest;
    int32_t chain_len = 0;
    bool lse = false;
    cudaGraph_t graph = nullptr;  // instantiated from; its nodes address the exec's nodes
    cudaGraphExec_t exec = nullptr;
    std::array<cudaGraphNode_t, kMaxChain> chain{};
  };
  // A kernel node of the current token step's capture whose arguments change per layer.
  struct StepKernel {
    int32_t chain_index = 0;
    int32_t arity = 0;
    cudaKernelNodeParams params{};  // from the step's capture (its argument pointers stay valid)
  };

  // One descriptor slot: everything a layer-step touches besides the arena's pages, so layers
  // of different slots run concurrently (the engine calls RunLayer of one slot at a time).
  struct Slot {
    bool used = false;
    cudaStream_t stream = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;  // bracket the attention launch(es)
    // With start/stop they time a layer's stages: upload, append + attention, download.
    cudaEvent_t h2d_start = nullptr, h2d_done = nullptr, d2h_done = nullptr;
    cudaEvent_t uploaded = nullptr;               // the descriptor upload read `host`
    void* host = nullptr;        // pinned descriptor
    void* device = nullptr;      // its device twin
    void* io_host = nullptr;     // pinned q | k | v  [B, Hq, d] | [B, Hkv, d] | [B, Hkv, d]
    void* io_device = nullptr;   // its device twin
    void* out_host = nullptr;    // pinned out | lse  [B, Hq, d] | [B, Hq] fp32
    void* out_device = nullptr;  // its device twin
    void* workspace = nullptr;   // partial states + fused-merge counters (zeroed once)
    // Graph replay (LaunchMode::kGraph): executable graphs of this slot, the entry and capture of
    // the open token step, and argument storage for the per-layer patches.
    std::vector<GraphEntry> graphs;  // capacity reserved at Create
    int32_t step_graph = -1;         // entry of the open token step; -1: not updated yet
    cudaGraph_t step_capture = nullptr;  // capture of this step when the entry was only updated
    std::array<StepKernel, kMaxKernelNodes> step_kernels{};
    int32_t num_step_kernels = 0;
    kvpool::cuda::AppendKvParams graph_append{};
    kernels::DecodeParams graph_decode{};
    bool graph_off = false;          // a graph failed: eager from now on
    int64_t graph_launches = 0, eager_launches = 0, graph_instantiations = 0;
    KernelId kernel = KernelId::kPerRequest;
    int32_t batch = 0;
    int32_t num_splits = 1;
    int32_t num_partials = 0;
    int32_t num_tasks = 0;
    size_t off_indptr = 0, off_last = 0, off_row_splits = 0, off_partial_offset = 0, off_slots = 0,
           off_indices = 0, off_tasks = 0;
  };

  kernels::DecodeParams BaseParams(int32_t layer) const {
    const ModelShape& s = arena_->shape();
    kernels::DecodeParams p;
    p.dtype = s.dtype;
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = s.page_size;
    p.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    p.kv = arena_->layer_data(layer);
    p.num_pages = arena_->num_pages();
    return p;
  }

  kernels::DecodeParams SlotParams(const Slot& slot, int32_t layer) const {
    kernels::DecodeParams p = BaseParams(layer);
    char* d = static_cast<char*>(slot.device);
    p.batch = slot.batch;
    p.q = slot.io_device;
    p.out = slot.out_device;
    p.page_indptr = reinterpret_cast<const int32_t*>(d + slot.off_indptr);
    p.page_indices = reinterpret_cast<const int32_t*>(d + slot.off_indices);
    p.last_page_len = reinterpret_cast<const int32_t*>(d + slot.off_last);
    p.num_splits = slot.num_splits;
    if (slot.kernel == KernelId::kWorkQueue) {
      p.tasks = reinterpret_cast<const DecodeTask*>(d + slot.off_tasks);
      p.num_tasks = slot.num_tasks;
      p.row_splits = reinterpret_cast<const int32_t*>(d + slot.off_row_splits);
      p.partial_offset = reinterpret_cast<const int32_t*>(d + slot.off_partial_offset);
      p.num_partials = slot.num_partials;
    }
    return p;
  }

  // Enqueues one layer on the slot's stream: q|k|v upload (already in slot.io_host), append,
  // attention between the timing events, out (and lse) download. `capturing`: the stream is
  // being captured, so the timing events become event-record nodes.
  absl::Status EnqueueLayer(Slot& slot, int32_t layer, bool has_lse, bool capturing) {
    const ModelShape& s = arena_->shape();
    const size_t el = DTypeSize(s.dtype);
    const size_t qb = static_cast<size_t>(slot.batch) * s.num_q_heads * s.head_dim * el;
    const size_t kvb = static_cast<size_t>(slot.batch) * s.num_kv_heads * s.head_dim * el;
    char* dio = static_cast<char*>(slot.io_device);
    const size_t k_at = Align16(qb), v_at = k_at + Align16(kvb);
    const unsigned flags = capturing ? cudaEventRecordExternal : cudaEventRecordDefault;
    PKV_CUDA_RETURN(cudaEventRecordWithFlags(slot.h2d_start, slot.stream, flags), "event");
    PKV_CUDA_RETURN(cudaMemcpyAsync(dio, slot.io_host, v_at + kvb, cudaMemcpyHostToDevice, slot.stream),
                    "q|k|v upload");
    PKV_CUDA_RETURN(cudaEventRecordWithFlags(slot.h2d_done, slot.stream, flags), "event");
    const kvpool::cuda::AppendKvParams ap = AppendParams(slot, layer);
    PKV_CUDA_RETURN(kvpool::cuda::LaunchAppendKv(ap, slot.stream), "append");
    const kernels::DecodeParams p = LayerParams(slot, layer, has_lse);
    PKV_CUDA_RETURN(cudaEventRecordWithFlags(slot.start, slot.stream, flags), "event");
    if (absl::Status st = kernels::cuda::Launch(slot.kernel, p, slot.workspace, slot.stream); !st.ok()) return st;
    PKV_CUDA_RETURN(cudaEventRecordWithFlags(slot.stop, slot.stream, flags), "event");
    const size_t down = has_lse ? Align16(qb) + static_cast<size_t>(slot.batch) * s.num_q_heads * 4 : qb;
    PKV_CUDA_RETURN(cudaMemcpyAsync(slot.out_host, slot.out_device, down, cudaMemcpyDeviceToHost, slot.stream),
                    "out download");
    PKV_CUDA_RETURN(cudaEventRecordWithFlags(slot.d2h_done, slot.stream, flags), "event");
    return absl::OkStatus();
  }

  kvpool::cuda::AppendKvParams AppendParams(const Slot& slot, int32_t layer) {
    const ModelShape& s = arena_->shape();
    const size_t el = DTypeSize(s.dtype);
    const size_t qb = static_cast<size_t>(slot.batch) * s.num_q_heads * s.head_dim * el;
    const size_t kvb = static_cast<size_t>(slot.batch) * s.num_kv_heads * s.head_dim * el;
    char* dio = static_cast<char*>(slot.io_device);
    kvpool::cuda::AppendKvParams ap;
    ap.arena = arena_->layer_data(0);
    ap.layer_stride = arena_->num_pages() * arena_->page_elems();
    ap.num_layers = 1;
    ap.first_layer = layer;
    ap.num_kv_heads = s.num_kv_heads;
    ap.page_size = s.page_size;
    ap.head_dim = s.head_dim;
    ap.num_tokens = slot.batch;
    ap.slots = reinterpret_cast<const int32_t*>(static_cast<char*>(slot.device) + slot.off_slots);
    ap.k = dio + Align16(qb);
    ap.v = dio + Align16(qb) + Align16(kvb);
    return ap;
  }

  kernels::DecodeParams LayerParams(const Slot& slot, int32_t layer, bool has_lse) const {
    const ModelShape& s = arena_->shape();
    const size_t qb = static_cast<size_t>(slot.batch) * s.num_q_heads * s.head_dim * DTypeSize(s.dtype);
    kernels::DecodeParams p = SlotParams(slot, layer);
    char* dout = static_cast<char*>(slot.out_device);
    p.q = slot.io_device;
    p.out = dout;
    p.lse = has_lse ? reinterpret_cast<float*>(dout + Align16(qb)) : nullptr;
    return p;
  }

  static int32_t BatchBucket(int32_t b) {
    int32_t bucket = 1;
    while (bucket < b) bucket *= 2;
    return bucket;
  }

  // Walks a captured graph's single chain (stream capture of one stream is linear).
  static absl::Status Chain(cudaGraph_t graph, std::array<cudaGraphNode_t, kMaxChain>& chain, int32_t* len) {
    size_t n = 1;
    cudaGraphNode_t node = nullptr;
    PKV_CUDA_RETURN(cudaGraphGetRootNodes(graph, &node, &n), "graph roots");
    if (n != 1) return absl::InternalError("cuda backend: captured layer is not one chain");
    *len = 0;
    while (node != nullptr) {
      if (*len >= kMaxChain) return absl::InternalError("cuda backend: captured layer has too many nodes");
      chain[(*len)++] = node;
      size_t deps = 1;
      cudaGraphNode_t next = nullptr;
      PKV_CUDA_RETURN(cudaGraphNodeGetDependentNodes(node, &next, nullptr, &deps), "graph dependents");
      if (deps > 1) return absl::InternalError("cuda backend: captured layer branches");
      node = deps == 1 ? next : nullptr;
    }
    return absl::OkStatus();
  }

  // LaunchMode::kGraph: a token step's first layer captures its launch sequence and updates (or
  // instantiates, the first time for its bucket and arm) the slot's executable graph; later
  // layers patch the layer's arguments into the kernel nodes. Then one graph launch. `*replayed`:
  // the layer only patched and launched (no capture).
  absl::Status RunLayerGraph(int32_t id, Slot& slot, int32_t layer, bool has_lse, bool* replayed) {
    *replayed = false;
    if (slot.step_graph >= 0 && slot.graphs[slot.step_graph].lse != has_lse) slot.step_graph = -1;
    if (slot.step_graph < 0) {
      if (slot.step_capture != nullptr) {
        cudaGraphDestroy(slot.step_capture);
        slot.step_capture = nullptr;
      }
      PKV_CUDA_RETURN(cudaStreamBeginCapture(slot.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
      const absl::Status enq = EnqueueLayer(slot, layer, has_lse, /*capturing=*/true);
      cudaGraph_t captured = nullptr;
      const cudaError_t end = cudaStreamEndCapture(slot.stream, &captured);
      if (!enq.ok() || end != cudaSuccess) {
        if (captured != nullptr) cudaGraphDestroy(captured);
        return enq.ok() ? CudaStatus(end, "end capture") : enq;
      }
      std::array<cudaGraphNode_t, kMaxChain> chain{};
      int32_t len = 0;
      if (absl::Status st = Chain(captured, chain, &len); !st.ok()) {
        cudaGraphDestroy(captured);
        return st;
      }
      const int32_t bucket = BatchBucket(slot.batch);
      int32_t entry = -1;
      for (int32_t i = 0; i < static_cast<int32_t>(slot.graphs.size()); ++i) {
        const GraphEntry& g = slot.graphs[i];
        if (g.bucket == bucket && g.kernel == slot.kernel && g.chain_len == len && g.lse == has_lse) entry = i;
      }
      if (entry < 0) {
        if (slot.graphs.size() == slot.graphs.capacity()) {
          cudaGraphDestroy(captured);
          return absl::ResourceExhaustedError("cuda backend: graph cache of the slot is full");
        }
        GraphEntry g;
        g.bucket = bucket;
        g.kernel = slot.kernel;
        g.chain_len = len;
        g.lse = has_lse;
        g.graph = captured;
        g.chain = chain;
        if (cudaError_t e = cudaGraphInstantiate(&g.exec, captured, 0); e != cudaSuccess) {
          cudaGraphDestroy(captured);
          return CudaStatus(e, "graph instantiate");
        }
        slot.graphs.push_back(g);
        ++slot.graph_instantiations;
        entry = static_cast<int32_t>(slot.graphs.size()) - 1;
        PKV_LOG(INFO) << "cuda backend slot " << id << ": captured a CUDA graph for " << KernelName(slot.kernel)
                      << " batch bucket " << bucket << " (" << len << " nodes)";
      } else {
        GraphEntry& g = slot.graphs[entry];
        cudaGraphExecUpdateResultInfo info{};
        if (cudaGraphExecUpdate(g.exec, captured, &info) == cudaSuccess) {
          slot.step_capture = captured;  // keeps the argument storage read below alive
        } else {
          // Not updatable (e.g. the route switched kernel template between steps): instantiate
          // this step's capture in its place.
          (void)cudaGetLastError();
          cudaGraphExecDestroy(g.exec);
          cudaGraphDestroy(g.graph);
          g.exec = nullptr;
          g.graph = captured;
          g.chain = chain;
          if (cudaError_t e = cudaGraphInstantiate(&g.exec, captured, 0); e != cudaSuccess) {
            cudaGraphDestroy(captured);
            g.graph = nullptr;
            g.bucket = -1;  // unusable entry
            return CudaStatus(e, "graph instantiate");
          }
          ++slot.graph_instantiations;
        }
      }
      // The kernel nodes whose arguments depend on the layer: the append (first kernel) and the
      // attention launch(es). Arguments are (DecodeParams) for kPerRequest and (DecodeParams,
      // Workspace) for the other routes and the merge (kernels/cuda/internal/route_kernels.cuh).
      slot.num_step_kernels = 0;
      for (int32_t i = 0; i < len; ++i) {
        cudaGraphNodeType type;
        PKV_CUDA_RETURN(cudaGraphNodeGetType(chain[i], &type), "node type");
        if (type != cudaGraphNodeTypeKernel) continue;
        if (slot.num_step_kernels >= kMaxKernelNodes) return absl::InternalError("cuda backend: too many kernels");
        StepKernel& k = slot.step_kernels[slot.num_step_kernels];
        k.chain_index = i;
        k.arity = slot.num_step_kernels == 0 ? 1 : (slot.kernel == KernelId::kPerRequest ? 1 : 2);
        PKV_CUDA_RETURN(cudaGraphKernelNodeGetParams(chain[i], &k.params), "kernel node params");
        ++slot.num_step_kernels;
      }
      if (slot.num_step_kernels < 2) return absl::InternalError("cuda backend: captured layer lacks its kernels");
      slot.step_graph = entry;
    } else {
      *replayed = true;
      const GraphEntry& g = slot.graphs[slot.step_graph];
      slot.graph_append = AppendParams(slot, layer);
      slot.graph_decode = LayerParams(slot, layer, has_lse);
      for (int32_t k = 0; k < slot.num_step_kernels; ++k) {
        const StepKernel& sk = slot.step_kernels[k];
        void* args[2] = {nullptr, nullptr};
        args[0] = k == 0 ? static_cast<void*>(&slot.graph_append) : static_cast<void*>(&slot.graph_decode);
        if (sk.arity == 2) args[1] = sk.params.kernelParams[1];
        cudaKernelNodeParams params = sk.params;
        params.kernelParams = args;
        params.extra = nullptr;
        PKV_CUDA_RETURN(cudaGraphExecKernelNodeSetParams(g.exec, g.chain[sk.chain_index], &params),
                        "kernel node update");
      }
    }
    PKV_CUDA_RETURN(cudaGraphLaunch(slot.graphs[slot.step_graph].exec, slot.stream), "graph launch");
    ++slot.graph_launches;
    return absl::OkStatus();
  }

  std::unique_ptr<kvpool::DeviceKvArena> arena_;
  CudaBackendOptions options_;
  scheduler::DeviceInfo info_;
  std::vector<Slot> slots_;
  int64_t indices_capacity_ = 0, tasks_capacity_ = 0;
  size_t descriptor_bytes_ = 0;
  size_t q_bytes_ = 0, kv_bytes_ = 0, out_bytes_ = 0;
  size_t workspace_bytes_ = 0;
  int grid_ = 0;
};

}  // namespace

absl::StatusOr<LaunchMode> ParseLaunchMode(std::string_view name) {
  if (name == "eager") return LaunchMode::kEager;
  if (name == "graph") return LaunchMode::kGraph;
  return absl::InvalidArgumentError(absl::StrCat("launch_mode: '", std::string(name), "' is not eager or graph"));
}

bool CudaDeviceAvailable() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear: no driver (35) or no device (100) means "no GPU"
    return false;
  }
  return n > 0;
}

absl::StatusOr<ExecutionBackendPtr> CreateCudaBackend(const ModelShape& shape, const CudaBackendOptions& options) {
  if (!CudaDeviceAvailable()) return absl::FailedPreconditionError("no CUDA device is available");
  kvpool::DeviceKvArena::Options ao;
  ao.num_pages = options.num_pages;
  ao.free_memory_fraction = options.num_pages > 0 ? 0 : options.free_memory_fraction;
  auto arena = kvpool::DeviceKvArena::Create(shape, ao);
  if (!arena.ok()) return arena.status();
  auto backend = std::make_unique<CudaBackend>(std::move(*arena), options);
  if (absl::Status s = backend->Init(); !s.ok()) return s;
  return ExecutionBackendPtr(std::move(backend));
}

}  // namespace pkv::engine
