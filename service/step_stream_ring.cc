// The worker's side of a StepStream's shared-memory ring (service/step_stream_ring.h).
#include "service/step_stream_ring.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/shared_memory_ring.h"
#include "common/thread_priority.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/rpc_wire.h"
#include "service/worker_service.h"

namespace pkv::service {
namespace {

std::atomic<int> g_rings{0};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::Status BadRing(const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("metadata ", kSharedMemoryRingKey, ": ", why));
}

}  // namespace

absl::StatusOr<std::unique_ptr<StepStreamRing>> StepStreamRing::Start(WorkerService& service, CallContext call,
                                                                      std::chrono::microseconds spin) {
  const SharedMemoryRegion* region = call.shared_memory.get();
  if (region == nullptr) {
    return BadRing(absl::StrCat("a ring lives in the stream's shared memory: name it with ", kSharedMemoryKey));
  }
  if (region->size() < kRingHeaderBytes) return BadRing("the region is smaller than the ring header (4096 bytes)");
  absl::StatusOr<std::span<uint8_t>> head = region->Slice(0, kRingHeaderBytes, "ring header");
  if (!head.ok()) return head.status();
  RingHeader h;
  std::memcpy(static_cast<void*>(&h), head->data(), offsetof(RingHeader, request_seq));
  if (h.magic != kRingMagic || h.version != kRingVersion) {
    return BadRing(absl::StrCat("the region does not start with a ring header of version ", kRingVersion));
  }
  if (h.slots < 1 || h.message_bytes < 1024 || h.message_bytes % 64 != 0 ||
      kRingHeaderBytes + uint64_t{h.slots} * h.message_bytes > region->size()) {
    return BadRing(absl::StrCat(h.slots, " message slots of ", h.message_bytes, " bytes do not fit the region of ",
                                region->size(), " bytes (slots >= 1, bytes a multiple of 64 and >= 1024)"));
  }
  if (g_rings.fetch_add(1) >= kMaxRings) {
    g_rings.fetch_sub(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("metadata ", kSharedMemoryRingKey, ": the worker serves ", kMaxRings, " rings, the most it takes"));
  }
  std::unique_ptr<StepStreamRing> ring(new StepStreamRing(service, std::move(call), spin));
  ring->thread_ = std::thread([r = ring.get()] {
    NameThisThread("pkv-ring");
    r->Run();
  });
  return ring;
}

StepStreamRing::StepStreamRing(WorkerService& service, CallContext call, std::chrono::microseconds spin)
    : service_(service), call_(std::move(call)), spin_(spin) {}

StepStreamRing::~StepStreamRing() { Stop(); }

void StepStreamRing::Stop() {
  if (joined_) return;
  stop_.store(true);
  // Wake the thread if it sleeps on the ring (a broken region reads as zeros: harmless).
  FutexWakeAll(&reinterpret_cast<RingHeader*>(call_.shared_memory->base())->request_seq);
  thread_.join();
  joined_ = true;
  g_rings.fetch_sub(1);
}

absl::Status StepStreamRing::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

void StepStreamRing::Run() {
  const SharedMemoryRegion& region = *call_.shared_memory;
  uint8_t* const base = region.base();
  auto* h = reinterpret_cast<RingHeader*>(base);
  const uint32_t slots = h->slots;
  const uint64_t message_bytes = h->message_bytes;  // as checked by Start (the router cannot change them now)
  const uint64_t half = message_bytes / 2;
  const uint64_t request_room = half - sizeof(RingMessage);
  const int64_t spin_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(spin_).count();
  const RpcStats& stats = service_.stats();
  std::string request_bytes;
  v1::StepRequest request;
  v1::StepResponse response;
  uint32_t next = 0;  // the next request to answer

  auto stopped = [&] { return stop_.load(std::memory_order_relaxed) || region.broken(); };
  while (!stopped()) {
    const uint32_t seen = RingWait(&h->request_seq, &h->worker_waiting, next, spin_ns, 50'000'000, stopped, NowNs);
    while (next != seen && !stopped()) {
      const auto received = std::chrono::steady_clock::now();
      uint8_t* slot = base + kRingHeaderBytes + (next % slots) * message_bytes;
      RingMessage m;
      std::memcpy(&m, slot, sizeof(m));
      request.Clear();
      response.Clear();
      absl::Status status;
      if (m.request_bytes > request_room) {
        status = absl::InvalidArgumentError(absl::StrCat("request: ", m.request_bytes, " bytes, more than the ",
                                                         request_room, " a message slot of the ring holds"));
      } else {
        // A copy first: the router could change the bytes while they are parsed.
        request_bytes.assign(reinterpret_cast<const char*>(slot + sizeof(RingMessage)), m.request_bytes);
        if (!request.ParseFromString(request_bytes)) {
          if (stats.metrics() != nullptr) stats.metrics()->malformed(RpcMethod::kStepStream).Increment();
          status = absl::InvalidArgumentError("request: cannot parse the message as pkv.v1.StepRequest");
        } else if (!request.has_out_shm()) {
          // Checked first, so that a layer never runs whose outputs the slot could not hold.
          status = absl::InvalidArgumentError(
              "out_shm: a request through the ring asks for its outputs in shared memory");
        } else if (const uint64_t lse = uint64_t{4} * request.rows_size() * service_.engine().shape().num_q_heads;
                   request.want_lse() && lse + 1024 > half) {
          status = absl::InvalidArgumentError(absl::StrCat("want_lse: ", lse, " bytes of log-sum-exp do not fit the ",
                                                           half, " bytes of a response in the ring's message slot"));
        } else {
          stats.Started(RpcMethod::kStepStream, received);
          status = RunStep(service_.engine(), request, &response, call_);
        }
      }
      if (!status.ok()) response.Clear();
      response.set_token_step_id(request.token_step_id());
      response.set_layer(request.layer());
      response.set_incarnation(call_.incarnation);
      ToRequestStatus(status, response.mutable_status());
      SetServerTimes(received, received, &response);
      if (response.ByteSizeLong() > half) {
        const size_t size = response.ByteSizeLong();
        response.Clear();
        status = absl::ResourceExhaustedError(absl::StrCat(
            "response: ", size, " bytes, more than the ", half,
            " a message slot of the ring holds: ask for the outputs in shared memory (out_shm)"));
        response.set_token_step_id(request.token_step_id());
        response.set_layer(request.layer());
        response.set_incarnation(call_.incarnation);
        ToRequestStatus(status, response.mutable_status());
        SetServerTimes(received, received, &response);
      }
      m.response_bytes = static_cast<uint32_t>(response.ByteSizeLong());
      response.SerializeWithCachedSizesToArray(slot + half);
      std::memcpy(slot + offsetof(RingMessage, response_bytes), &m.response_bytes, sizeof(m.response_bytes));
      stats.Count(RpcMethod::kStepStream, ToGrpcStatus(status));
      stats.Answered(RpcMethod::kStepStream, received);
      if (region.broken()) break;
      ++next;
      RingPublish(&h->response_seq, &h->router_waiting, next);
    }
  }
  if (region.broken()) {
    std::lock_guard<std::mutex> lock(mu_);
    failure_ = region.CheckIntact();
    PKV_LOG(WARNING) << "StepStream ring stopped: " << failure_.message();
    return;  // the region reads as zeros: nothing to tell the router through it
  }
  h->closed.store(1, std::memory_order_seq_cst);
  FutexWakeAll(&h->response_seq);
}

}  // namespace pkv::service
