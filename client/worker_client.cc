#include "client/worker_client.h"

#include <algorithm>
#include <atomic>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/kv_chunk_wire.h"
#include "common/shared_memory_ring.h"
#include "common/status_macros.h"
#include "common/thread_priority.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "pkv/v1/worker.grpc.pb.h"

namespace pkv::client {
namespace {

// Request metadata key naming the router (see worker.proto, Routers).
constexpr char kRouterIdKey[] = "x-pkv-router-id";

// The client's one grpc::Status -> absl::Status mapping (codes share their numbering).
absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// Reads the PEM file of ClientOptions field `field` (named in errors).
absl::StatusOr<std::string> ReadPemFile(const char* field, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, "=", path, ": cannot read the file: ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  std::string pem = std::move(text).str();
  if (pem.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, "=", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

// Channel credentials from the TLS options: plaintext when none is set.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const ClientOptions& options) {
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("tls_cert_file and tls_key_file must be given together");
  }
  if (options.tls_ca_file.empty() && options.tls_cert_file.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  if (!options.tls_ca_file.empty()) {
    PKV_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile("tls_ca_file", options.tls_ca_file));
  }
  if (!options.tls_cert_file.empty()) {
    PKV_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPemFile("tls_cert_file", options.tls_cert_file));
    PKV_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPemFile("tls_key_file", options.tls_key_file));
  }
  return grpc::SslCredentials(ssl);
}

v1::DType WireDType(DType dtype) { return dtype == DType::kF16 ? v1::DTYPE_FP16 : v1::DTYPE_BF16; }

void SetTensor(v1::Tensor* t, DType dtype, std::initializer_list<int64_t> shape, std::string data) {
  t->set_dtype(WireDType(dtype));
  for (int64_t s : shape) t->add_shape(s);
  t->set_data(std::move(data));
}

// Request metadata key naming a StepStream's shared memory (see worker.proto, Shared memory).
constexpr char kSharedMemoryKey[] = "x-pkv-shared-memory";

int64_t Align64(int64_t n) { return (n + 63) & ~int64_t{63}; }

// A POSIX shared-memory object this client created and mapped, for one StepStream. The worker
// unlinks the name when it maps the object; the client unlinks it too after the stream's first
// response or on destruction (for a stream the worker never mapped).
class SharedRegion final {
 public:
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Create(int64_t bytes) {
    static std::atomic<uint64_t> counter{0};
    const uint64_t nonce = std::chrono::steady_clock::now().time_since_epoch().count() ^
                           reinterpret_cast<uintptr_t>(&counter);
    const std::string name = absl::StrCat("/pkv-", getpid(), "-", counter.fetch_add(1), "-", nonce % 1000000007);
    const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("shared memory: cannot create ", name, ": ", std::strerror(errno)));
    }
    if (ftruncate(fd, bytes) != 0) {
      const int err = errno;
      close(fd);
      shm_unlink(name.c_str());
      return absl::ResourceExhaustedError(
          absl::StrCat("shared memory: cannot size ", name, " to ", bytes, " bytes: ", std::strerror(err)));
    }
    void* base = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    close(fd);
    if (base == MAP_FAILED) {
      shm_unlink(name.c_str());
      return absl::ResourceExhaustedError(absl::StrCat("shared memory: cannot map ", name, ": ", std::strerror(err)));
    }
    return std::unique_ptr<SharedRegion>(new SharedRegion(name, static_cast<uint8_t*>(base), bytes));
  }
  ~SharedRegion() {
    Unlink();
    munmap(base_, static_cast<size_t>(size_));
  }
  void Unlink() {
    if (linked_) shm_unlink(name_.c_str());
    linked_ = false;
  }
  uint8_t* base() const { return base_; }
  const std::string& name() const { return name_; }

 private:
  SharedRegion(std::string name, uint8_t* base, int64_t size) : name_(std::move(name)), base_(base), size_(size) {}
  const std::string name_;
  uint8_t* const base_;
  const int64_t size_;
  bool linked_ = true;
};

// Where a request's tensors lie in its slot of a StepStream's shared memory.
struct SlotLayout {
  int64_t q = 0, k = 0, v = 0, out = 0;  // offsets within the slot
  int64_t bytes = 0;                     // the slot's size
  int32_t max_rows = 0;
  int64_t base = 0;                      // offset of the first slot in the region

  static SlotLayout For(const ModelShape& shape, int32_t max_rows) {
    SlotLayout l;
    const int64_t row_q = int64_t{shape.num_q_heads} * shape.head_dim * static_cast<int64_t>(DTypeSize(shape.dtype));
    const int64_t row_kv = int64_t{shape.num_kv_heads} * shape.head_dim * static_cast<int64_t>(DTypeSize(shape.dtype));
    l.max_rows = max_rows;
    l.k = Align64(row_q * max_rows);
    l.v = l.k + Align64(row_kv * max_rows);
    l.out = l.v + Align64(row_kv * max_rows);
    l.bytes = l.out + Align64(row_q * max_rows);
    return l;
  }
};

// A ring's message slot: room for a request of max_rows rows and a few thousand open / free ids,
// and for a response with the log-sum-exp of max_rows rows (common/shared_memory_ring.h).
int64_t RingMessageBytes(const ModelShape& shape, int32_t max_rows) {
  const int64_t lse = int64_t{4} * max_rows * shape.num_q_heads + 1024;
  const int64_t request = int64_t{10} * (2 * int64_t{max_rows} + 4096) + 1024;
  return (2 * std::max(lse, request) + 4095) / 4096 * 4096;
}

// The whole region of a StepStream: the ring (when asked for) and `slots` tensor slots.
int64_t RegionBytes(const SlotLayout& l, int32_t slots) { return l.base + l.bytes * slots; }

void SetSharedTensor(v1::Tensor* t, DType dtype, std::initializer_list<int64_t> shape, uint64_t offset) {
  t->set_dtype(WireDType(dtype));
  for (int64_t s : shape) t->add_shape(s);
  t->mutable_shm()->set_offset(offset);
}

// A request's ids, rows and deltas (everything but its tensors and want_lse).
v1::StepRequest RequestHead(const StepArgs& a, uint64_t incarnation) {
  v1::StepRequest r;
  r.set_expected_incarnation(incarnation);
  r.set_token_step_id(a.token_step_id);
  r.set_layer(a.layer);
  r.mutable_rows()->Add(a.rows.begin(), a.rows.end());
  r.mutable_open()->Add(a.open.begin(), a.open.end());
  r.mutable_free()->Add(a.free.begin(), a.free.end());
  return r;
}

// `a`'s tensors are copied, or moved when `a` is an rvalue.
template <typename Args>
v1::StepRequest ToRequest(Args&& a, const ModelShape& shape, uint64_t incarnation) {
  v1::StepRequest r = RequestHead(a, incarnation);
  const int64_t b = static_cast<int64_t>(a.rows.size());
  SetTensor(r.mutable_q(), shape.dtype, {b, shape.num_q_heads, shape.head_dim}, std::forward<Args>(a).q);
  SetTensor(r.mutable_k(), shape.dtype, {b, shape.num_kv_heads, shape.head_dim}, std::forward<Args>(a).k);
  SetTensor(r.mutable_v(), shape.dtype, {b, shape.num_kv_heads, shape.head_dim}, std::forward<Args>(a).v);
  r.set_want_lse(a.want_lse);
  return r;
}

// A request whose tensors are copied into shared memory at `slot` (offset `slot_offset` of the
// region), with the outputs asked for in the same slot.
v1::StepRequest ToSharedRequest(const StepArgs& a, const ModelShape& shape, uint64_t incarnation, const SlotLayout& l,
                                uint8_t* slot, uint64_t slot_offset) {
  v1::StepRequest r = RequestHead(a, incarnation);
  const int64_t b = static_cast<int64_t>(a.rows.size());
  // A size that does not match the shape goes as it is, for the worker to refuse by name.
  auto put = [&](v1::Tensor* t, std::initializer_list<int64_t> dims, const std::string& data, int64_t at) {
    int64_t want = static_cast<int64_t>(DTypeSize(shape.dtype));
    for (int64_t d : dims) want *= d;
    if (static_cast<int64_t>(data.size()) != want) {
      SetTensor(t, shape.dtype, dims, data);
      return;
    }
    std::memcpy(slot + at, data.data(), data.size());
    SetSharedTensor(t, shape.dtype, dims, slot_offset + at);
  };
  put(r.mutable_q(), {b, shape.num_q_heads, shape.head_dim}, a.q, l.q);
  put(r.mutable_k(), {b, shape.num_kv_heads, shape.head_dim}, a.k, l.k);
  put(r.mutable_v(), {b, shape.num_kv_heads, shape.head_dim}, a.v, l.v);
  r.mutable_out_shm()->set_offset(slot_offset + l.out);
  r.set_want_lse(a.want_lse);
  return r;
}

using Clock = std::chrono::steady_clock;

int64_t UnixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch()).count();
}

// When a request's send began and how long handing it to gRPC took (StepResult's client side).
struct SendStamp {
  Clock::time_point start;
  int64_t start_unix_nanos = 0;
  double seconds = 0;
};

// The outputs [B, Hq, d] of a response read from shared memory at `base` + out.shm.offset.
absl::Status ReadSharedOutputs(const v1::StepResponse& r, const ModelShape& shape, const uint8_t* base,
                               std::string* out) {
  if (!r.out().has_shm()) return absl::OkStatus();
  if (base == nullptr) return absl::InternalError("StepResponse: outputs in shared memory on a stream without it");
  const size_t bytes = static_cast<size_t>(r.out().shape_size() > 0 ? r.out().shape(0) : 0) * shape.num_q_heads *
                       shape.head_dim * DTypeSize(shape.dtype);
  out->assign(reinterpret_cast<const char*>(base + r.out().shm().offset()), bytes);
  return absl::OkStatus();
}

SendStamp StartSend() {
  SendStamp s;
  s.start = Clock::now();
  s.start_unix_nanos = UnixNanos();
  return s;
}

void EndSend(SendStamp* s) { s->seconds = std::chrono::duration<double>(Clock::now() - s->start).count(); }

// Converts a response read at `read_at` for a request sent as `sent`.
StepResult FromResponse(v1::StepResponse&& r, const SendStamp& sent, Clock::time_point read_at) {
  StepResult out;
  out.token_step_id = r.token_step_id();
  out.layer = r.layer();
  out.out = std::move(*r.mutable_out()->mutable_data());
  const std::string& lse = r.lse().data();
  out.lse.resize(lse.size() / sizeof(float));
  if (!out.lse.empty()) std::memcpy(out.lse.data(), lse.data(), out.lse.size() * sizeof(float));
  out.kernel = r.kernel();
  out.replayed = r.replayed();
  out.attend_seconds = r.attend_seconds();
  out.server_seconds = r.server_seconds();
  out.queue_seconds = r.queue_seconds();
  out.validate_seconds = r.validate_seconds();
  out.host_seconds = r.host_seconds();
  out.h2d_seconds = r.h2d_seconds();
  out.kernel_seconds = r.kernel_seconds();
  out.d2h_seconds = r.d2h_seconds();
  out.serialize_seconds = r.serialize_seconds();
  out.received_unix_nanos = r.received_unix_nanos();
  out.answered_unix_nanos = r.answered_unix_nanos();
  out.attention_skipped = r.attention_skipped();
  out.attention_timed = !r.attention_untimed();
  out.send_start = sent.start;
  out.send_start_unix_nanos = sent.start_unix_nanos;
  out.send_seconds = sent.seconds;
  out.read_at = read_at;
  out.convert_seconds = std::chrono::duration<double>(Clock::now() - read_at).count();
  return out;
}

// WriteKV with ByteBuffer messages (the generated stub's own factory, with ByteBuffer in place of
// the request and response types), so that chunks go out as slices (client/kv_chunk_wire.h)
// rather than through protobuf's two copies.
class GrpcPromptWriter final : public PromptWriter {
 public:
  GrpcPromptWriter(grpc::ChannelInterface* channel, ModelShape shape, const std::string& router_id,
                   uint64_t incarnation, std::shared_ptr<ChunkBufferPool> buffers)
      : shape_(shape), incarnation_(incarnation), buffers_(std::move(buffers)) {
    if (!router_id.empty()) ctx_.AddMetadata(kRouterIdKey, router_id);
    static const grpc::internal::RpcMethod kWriteKv("/pkv.v1.PersistentKV/WriteKV",
                                                    grpc::internal::RpcMethod::CLIENT_STREAMING);
    writer_.reset(grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(channel, kWriteKv, &ctx_, &response_));
  }
  ~GrpcPromptWriter() override {
    if (!finished_) {
      ctx_.TryCancel();
      writer_->Finish().IgnoreError();
    }
  }

  absl::Status WriteHeader(uint64_t seq, int64_t num_tokens) {
    v1::WriteKVRequest req;
    req.mutable_header()->set_sequence_id(seq);
    req.mutable_header()->set_num_tokens(num_tokens);
    req.mutable_header()->set_expected_incarnation(incarnation_);
    grpc::ByteBuffer message;
    bool own = false;
    if (!grpc::SerializationTraits<v1::WriteKVRequest>::Serialize(req, &message, &own).ok()) {
      return absl::InternalError("WriteKV: cannot serialise the header");
    }
    if (!writer_->Write(message)) return Broken();
    return absl::OkStatus();
  }

  absl::Status WriteChunk(int32_t layer, int64_t token_offset, int64_t n, std::string_view k,
                          std::string_view v) override {
    return Send(layer, token_offset, n, Copied(k), Copied(v));
  }

  absl::Status WriteSharedChunk(int32_t layer, int64_t token_offset, int64_t n, SharedBytes k,
                                SharedBytes v) override {
    return Send(layer, token_offset, n, BorrowedSlice(std::move(k)), BorrowedSlice(std::move(v)));
  }

  // WriteChunk with the bytes produced by `fill` straight into the buffers gRPC sends.
  absl::Status WriteFilled(int32_t layer, int64_t token_offset, int64_t n, const ChunkFiller& fill) {
    std::unique_ptr<std::string> k = buffers_->Take(), v = buffers_->Take();
    fill(layer, token_offset, n, k.get(), v.get());
    return Send(layer, token_offset, n, buffers_->Wrap(std::move(k)), buffers_->Wrap(std::move(v)));
  }

  absl::Status Finish() override {
    if (finished_) return final_;
    writer_->WritesDone();
    finished_ = true;
    final_ = FromGrpc(writer_->Finish());
    return final_;
  }

  void Cancel() override { ctx_.TryCancel(); }

 private:
  grpc::Slice Copied(std::string_view bytes) {
    std::unique_ptr<std::string> b = buffers_->Take();
    b->assign(bytes.data(), bytes.size());
    return buffers_->Wrap(std::move(b));
  }

  absl::Status Send(int32_t layer, int64_t token_offset, int64_t n, grpc::Slice k, grpc::Slice v) {
    if (finished_) return absl::FailedPreconditionError("WriteKV stream already finished");
    const ChunkFields fields{.wire_dtype = WireDType(shape_.dtype),
                             .layer = layer,
                             .token_offset = token_offset,
                             .num_tokens = n,
                             .num_kv_heads = shape_.num_kv_heads,
                             .head_dim = shape_.head_dim};
    if (!writer_->Write(ChunkMessage(fields, std::move(k), std::move(v)))) return Broken();
    return absl::OkStatus();
  }

  // The stream broke: its final status says why.
  absl::Status Broken() {
    finished_ = true;
    final_ = FromGrpc(writer_->Finish());
    if (final_.ok()) final_ = absl::UnavailableError("WriteKV stream closed by the worker");
    return final_;
  }

  const ModelShape shape_;
  const uint64_t incarnation_;
  const std::shared_ptr<ChunkBufferPool> buffers_;
  grpc::ClientContext ctx_;
  grpc::ByteBuffer response_;  // a WriteKVResponse; its fields are not needed here
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> writer_;
  bool finished_ = false;
  absl::Status final_;
};

// Shared memory of a StepStream (ClientOptions::shared_memory): the region, where its tensor
// slots lie, and whether requests go through its ring.
struct SharedSession {
  std::unique_ptr<SharedRegion> region;
  SlotLayout layout;
  int32_t slots = 0;
  bool ring = false;
  int64_t message_bytes = 0;  // of a ring's message slot
  int64_t spin_ns = 0;        // a Receive's polling before it sleeps
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

class GrpcStepStream final : public StepStreamSession {
 public:
  GrpcStepStream(v1::PersistentKV::Stub* stub, ModelShape shape, const std::string& router_id, uint64_t incarnation,
                 SharedSession shared = {})
      : shape_(shape), incarnation_(incarnation), shared_(std::move(shared)) {
    if (!router_id.empty()) ctx_.AddMetadata(kRouterIdKey, router_id);
    if (shared_.region != nullptr) ctx_.AddMetadata(kSharedMemoryKey, shared_.region->name());
    if (shared_.ring) {
      ctx_.AddMetadata(kSharedMemoryRingKey, "1");
      ring_ = reinterpret_cast<RingHeader*>(shared_.region->base());
      ring_->magic = kRingMagic;
      ring_->version = kRingVersion;
      ring_->slots = static_cast<uint32_t>(shared_.slots);
      ring_->message_bytes = static_cast<uint32_t>(shared_.message_bytes);
    }
    stream_ = stub->StepStream(&ctx_);
    if (ring_ != nullptr) {
      // The worker sends no message on a ring's stream: a Read returns only when the stream ends.
      reader_ = std::thread([this] {
        NameThisThread("pkv-ring-end");
        v1::StepResponse ignored;
        while (stream_->Read(&ignored)) {
        }
        ended_.store(true);
        FutexWakeAll(&ring_->response_seq);
      });
    }
  }
  ~GrpcStepStream() override {
    if (!finished_) {
      ctx_.TryCancel();
      if (reader_.joinable()) reader_.join();
      stream_->Finish().IgnoreError();
    }
  }

  absl::StatusOr<StepResult> Step(const StepArgs& args) override {
    PKV_RETURN_IF_ERROR(Write(args));
    return Receive();
  }

  absl::Status Send(StepArgs&& args) override { return Write(std::move(args)); }

  absl::StatusOr<StepResult> Receive() override {
    if (finished_) return final_.ok() ? absl::FailedPreconditionError("StepStream already finished") : final_;
    v1::StepResponse response;
    if (ring_ != nullptr) {
      if (sent_.empty()) return absl::FailedPreconditionError("StepStream: Receive without a request in flight");
      const uint32_t seen = RingWait(
          &ring_->response_seq, &ring_->router_waiting, answered_, shared_.spin_ns, 20'000'000,
          [this] { return ended_.load() || ring_->closed.load() != 0; }, NowNs);
      if (seen == answered_) return Ended();
      const uint8_t* slot = MessageSlot(answered_);
      RingMessage m;
      std::memcpy(&m, slot, sizeof(m));
      if (m.response_bytes > shared_.message_bytes / 2 ||
          !response.ParseFromArray(slot + shared_.message_bytes / 2, static_cast<int>(m.response_bytes))) {
        return absl::InternalError("StepStream: unreadable response in the shared-memory ring");
      }
      ++answered_;
    } else if (!stream_->Read(&response)) {
      return Ended();
    }
    const Clock::time_point read_at = Clock::now();
    if (shared_.region != nullptr) shared_.region->Unlink();  // the worker mapped it when the stream began
    SendStamp sent;
    if (!sent_.empty()) {
      sent = sent_.front();
      sent_.pop_front();
    }
    if (response.status().code() != 0) {
      return absl::Status(static_cast<absl::StatusCode>(response.status().code()),
                          response.status().message());
    }
    std::string shared_out;
    PKV_RETURN_IF_ERROR(ReadSharedOutputs(response, shape_,
                                          shared_.region != nullptr ? shared_.region->base() : nullptr, &shared_out));
    StepResult result = FromResponse(std::move(response), sent, read_at);
    if (!shared_out.empty()) result.out = std::move(shared_out);
    return result;
  }

  absl::Status Finish() override {
    if (finished_) return final_;
    stream_->WritesDone();
    return Close();
  }

  void Cancel() override { ctx_.TryCancel(); }

 private:
  uint8_t* MessageSlot(uint32_t n) const {
    return shared_.region->base() + kRingHeaderBytes + static_cast<uint64_t>(n % shared_.slots) * shared_.message_bytes;
  }

  // Writes one request: through the ring, or in a message with its tensors in the next
  // shared-memory slot when the stream has them and the rows fit, else all in the message
  // (tensors moved when `args` is an rvalue).
  template <typename Args>
  absl::Status Write(Args&& args) {
    if (finished_) return absl::FailedPreconditionError("StepStream already finished");
    SendStamp sent = StartSend();
    const bool fits = static_cast<int64_t>(args.rows.size()) <= shared_.layout.max_rows;
    if (shared_.region != nullptr && (fits || ring_ != nullptr)) {
      if (!fits) {
        return absl::InvalidArgumentError(absl::StrCat("rows: ", args.rows.size(), " rows, more than the worker's max_batch (",
                                                       shared_.layout.max_rows, ")"));
      }
      if (static_cast<int32_t>(sent_.size()) >= shared_.slots) {
        return absl::FailedPreconditionError(absl::StrCat(
            "StepStream: ", sent_.size(), " requests in flight already, the most its shared memory holds "
            "(ClientOptions::shared_memory_slots); Receive first"));
      }
      const uint64_t offset = shared_.layout.base + static_cast<uint64_t>(next_slot_) * shared_.layout.bytes;
      next_slot_ = (next_slot_ + 1) % shared_.slots;
      const v1::StepRequest request =
          ToSharedRequest(args, shape_, incarnation_, shared_.layout, shared_.region->base() + offset, offset);
      if (ring_ != nullptr) {
        const size_t size = request.ByteSizeLong();
        const size_t room = shared_.message_bytes / 2 - sizeof(RingMessage);
        if (size > room) {
          return absl::InvalidArgumentError(absl::StrCat("StepStream: a request of ", size,
                                                         " bytes (rows, open, free) exceeds a ring message slot's ", room));
        }
        uint8_t* slot = MessageSlot(requested_);
        request.SerializeWithCachedSizesToArray(slot + sizeof(RingMessage));
        const uint32_t bytes = static_cast<uint32_t>(size);
        std::memcpy(slot + offsetof(RingMessage, request_bytes), &bytes, sizeof(bytes));
        ++requested_;
        RingPublish(&ring_->request_seq, &ring_->worker_waiting, requested_);
        EndSend(&sent);
        sent_.push_back(sent);
        return absl::OkStatus();
      }
      if (!stream_->Write(request)) return Ended();
    } else if (!stream_->Write(ToRequest(std::forward<Args>(args), shape_, incarnation_))) {
      return Ended();
    }
    EndSend(&sent);
    sent_.push_back(sent);
    return absl::OkStatus();
  }

  // After the half-close (or the stream's end): waits for the end and keeps its status.
  absl::Status Close() {
    finished_ = true;
    if (reader_.joinable()) reader_.join();
    final_ = FromGrpc(stream_->Finish());
    return final_;
  }

  // A read or write failed, or the worker closed the ring: the stream's final status, UNAVAILABLE
  // when that is OK.
  absl::Status Ended() {
    if (ring_ != nullptr && !ended_.load()) stream_->WritesDone();
    Close().IgnoreError();
    if (final_.ok()) final_ = absl::UnavailableError("StepStream closed by the worker");
    return final_;
  }

  const ModelShape shape_;
  const uint64_t incarnation_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream_;
  std::deque<SendStamp> sent_;  // of requests not yet answered, oldest first
  bool finished_ = false;
  absl::Status final_;
  // Shared memory: tensor slots taken in turn (responses come in request order, so the oldest
  // unanswered request's slot is the next to be reused).
  SharedSession shared_;
  int32_t next_slot_ = 0;
  // The ring: requests written and responses read so far; the thread that notices the stream's end.
  RingHeader* ring_ = nullptr;
  uint32_t requested_ = 0, answered_ = 0;
  std::atomic<bool> ended_{false};
  std::thread reader_;
};

}  // namespace

// Connections of one role's own (WriteKV, StepStream), taken in turn; none: the shared stub.
struct OwnConnections {
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<v1::PersistentKV::Stub>> stubs;
  std::atomic<uint64_t> next{0};

  // Opens `count` channels, each on a TCP connection of its own: a local subchannel pool, and a
  // role argument that keeps gRPC from treating it as the same channel as another one. Each is
  // connected before Open returns (gRPC retries a failed attempt with backoff until `deadline`),
  // so that the first call on it does not fail on a transient connect error; UNAVAILABLE naming
  // the connection when one cannot connect by then.
  absl::Status Open(int32_t count, const std::string& role, const std::string& target,
                    const std::shared_ptr<grpc::ChannelCredentials>& credentials, const grpc::ChannelArguments& args,
                    absl::Time deadline) {
    for (int32_t i = 0; i < count; ++i) {
      grpc::ChannelArguments own = args;
      own.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      own.SetString("pkv.connection_role", absl::StrCat(role, "-", i));
      channels.push_back(grpc::CreateCustomChannel(target, credentials, own));
      stubs.push_back(v1::PersistentKV::NewStub(channels.back()));
    }
    for (size_t i = 0; i < channels.size(); ++i) {
      if (!channels[i]->WaitForConnected(absl::ToChronoTime(deadline))) {
        return absl::UnavailableError(absl::StrCat("cannot open ", role, " connection ", i, " of ", channels.size(),
                                                   " to ", target, " (the main connection is up)"));
      }
    }
    return absl::OkStatus();
  }

  v1::PersistentKV::Stub* Take(v1::PersistentKV::Stub* shared) {
    if (stubs.empty()) return shared;
    return stubs[next.fetch_add(1, std::memory_order_relaxed) % stubs.size()].get();
  }
  grpc::ChannelInterface* TakeChannel(grpc::ChannelInterface* shared) {
    if (channels.empty()) return shared;
    return channels[next.fetch_add(1, std::memory_order_relaxed) % channels.size()].get();
  }
};

struct WorkerClient::Impl {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::PersistentKV::Stub> stub;
  OwnConnections ingest;  // options.ingest_connections
  OwnConnections decode;  // options.decode_connections
  // Buffers of the prompt chunks this client fills or copies, shared by its WriteKV streams.
  std::shared_ptr<ChunkBufferPool> chunk_buffers = ChunkBufferPool::Create();

  grpc::ChannelInterface* IngestChannel() { return ingest.TakeChannel(channel.get()); }
  v1::PersistentKV::Stub* DecodeStub() { return decode.Take(stub.get()); }

  uint64_t incarnation = 0;  // pinned by Connect (options.pin_incarnation); 0: none
  int32_t max_batch = 0;     // the worker's, from Connect's Describe (sizes shared-memory slots)

  // Where a StepStream's tensor slots lie in its shared memory: after the ring, when there is one.
  SlotLayout Layout(const ModelShape& shape) const {
    SlotLayout l = SlotLayout::For(shape, max_batch);
    if (options.shared_memory_ring) {
      l.base = static_cast<int64_t>(kRingHeaderBytes) +
               RingMessageBytes(shape, max_batch) * options.shared_memory_slots;
    }
    return l;
  }

  // Deadline and router id of a unary call.
  void SetDeadline(grpc::ClientContext* ctx) const {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + options.rpc_timeout));
    if (!options.router_id.empty()) ctx->AddMetadata(kRouterIdKey, options.router_id);
  }
};

absl::StatusOr<std::unique_ptr<WorkerClient>> WorkerClient::Connect(const ClientOptions& options) {
  PKV_RETURN_IF_ERROR(CheckChannelArgs(options.channel_args, "channel_args", "the message size limit is max_message_bytes"));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  if (options.own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  for (const ChannelArg& arg : options.channel_args) {
    if (arg.is_int) {
      args.SetInt(arg.name, static_cast<int>(arg.int_value));
    } else {
      args.SetString(arg.name, arg.string_value);
    }
  }
  PKV_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                       ChannelCredentials(options));
  impl->channel = grpc::CreateCustomChannel(options.target, credentials, args);
  if (!impl->channel->WaitForConnected(absl::ToChronoTime(absl::Now() + options.connect_timeout))) {
    const bool tls = !options.tls_ca_file.empty() || !options.tls_cert_file.empty();
    return absl::UnavailableError(absl::StrCat(
        "cannot connect to ", options.target, " within ", absl::FormatDuration(options.connect_timeout),
        tls ? " over TLS (is the worker up, serving TLS, with a certificate for this name signed by "
              "the CA given? does it require a client certificate?)"
            : " (plaintext channel: is the worker up? if it serves TLS, pass the TLS options)"));
  }
  impl->stub = v1::PersistentKV::NewStub(impl->channel);
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  PKV_RETURN_IF_ERROR(impl->ingest.Open(options.ingest_connections, "ingest", options.target, credentials, args, deadline));
  PKV_RETURN_IF_ERROR(impl->decode.Open(options.decode_connections, "decode", options.target, credentials, args, deadline));
  std::unique_ptr<WorkerClient> client(new WorkerClient(std::move(impl)));
  PKV_ASSIGN_OR_RETURN(const WorkerInfo info, client->Describe());
  if (options.pin_incarnation) client->impl_->incarnation = info.incarnation;
  client->impl_->max_batch = info.max_batch;
  if (options.shared_memory) {
    if (info.shared_memory_max_bytes <= 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shared_memory: the worker at ", options.target, " has shared memory off (--shared_memory_max_bytes=0)"));
    }
    if (options.shared_memory_slots < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("shared_memory_slots must be >= 1, got ", options.shared_memory_slots));
    }
    const int64_t bytes = client->impl_->Layout(info.shape).bytes * options.shared_memory_slots +
                          client->impl_->Layout(info.shape).base;
    if (bytes > info.shared_memory_max_bytes) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shared_memory: ", options.shared_memory_slots, " slots for ", info.max_batch, " rows need ", bytes,
          " bytes per StepStream; the worker takes at most ", info.shared_memory_max_bytes,
          " (fewer shared_memory_slots, or a larger --shared_memory_max_bytes on the worker)"));
    }
  } else if (options.shared_memory_ring) {
    return absl::InvalidArgumentError("shared_memory_ring needs shared_memory");
  }
  return client;
}

WorkerClient::WorkerClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WorkerClient::~WorkerClient() = default;

absl::StatusOr<WorkerInfo> WorkerClient::Describe() {
  grpc::ClientContext ctx;
  impl_->SetDeadline(&ctx);
  v1::DescribeResponse r;
  PKV_RETURN_IF_ERROR(FromGrpc(impl_->stub->Describe(&ctx, v1::DescribeRequest(), &r)));
  WorkerInfo info;
  info.shape.num_layers = r.model().num_layers();
  info.shape.num_q_heads = r.model().num_q_heads();
  info.shape.num_kv_heads = r.model().num_kv_heads();
  info.shape.head_dim = r.model().head_dim();
  info.shape.page_size = r.model().page_size();
  switch (r.model().dtype()) {
    case v1::DTYPE_FP16:
      info.shape.dtype = DType::kF16;
      break;
    case v1::DTYPE_BF16:
      info.shape.dtype = DType::kBF16;
      break;
    default:
      return absl::InternalError(absl::StrCat("Describe: unexpected model dtype ", r.model().dtype()));
  }
  info.backend = r.backend();
  info.device = r.device();
  info.incarnation = r.incarnation();
  info.total_pages = r.pool().total_pages();
  info.free_pages = r.pool().free_pages();
  info.used_pages = r.pool().used_pages();
  info.page_bytes = r.pool().page_bytes();
  info.num_sequences = r.pool().num_sequences();
  info.used_tokens = r.pool().used_tokens();
  info.max_batch = r.limits().max_batch();
  info.max_message_bytes = r.limits().max_message_bytes();
  info.shared_memory_max_bytes = r.limits().shared_memory_max_bytes();
  info.active_sequences = r.active_sequences();
  info.writing_sequences = r.writing_sequences();
  info.open_token_steps = r.open_token_steps();
  info.serving = r.serving();
  shape_ = info.shape;
  return info;
}

absl::StatusOr<StepResult> WorkerClient::Step(const StepArgs& args) {
  grpc::ClientContext ctx;
  impl_->SetDeadline(&ctx);
  v1::StepResponse response;
  SendStamp sent = StartSend();
  const v1::StepRequest request = ToRequest(args, shape_, impl_->incarnation);
  EndSend(&sent);
  PKV_RETURN_IF_ERROR(FromGrpc(impl_->stub->Step(&ctx, request, &response)));
  return FromResponse(std::move(response), sent, Clock::now());
}

absl::StatusOr<std::unique_ptr<StepStreamSession>> WorkerClient::OpenStepStream() {
  if (!impl_->options.shared_memory) {
    return std::make_unique<GrpcStepStream>(impl_->DecodeStub(), shape_, impl_->options.router_id,
                                            impl_->incarnation);
  }
  SharedSession shared;
  shared.layout = impl_->Layout(shape_);
  shared.slots = impl_->options.shared_memory_slots;
  shared.ring = impl_->options.shared_memory_ring;
  shared.message_bytes = RingMessageBytes(shape_, impl_->max_batch);
  shared.spin_ns = int64_t{impl_->options.shared_memory_spin_us} * 1000;
  PKV_ASSIGN_OR_RETURN(shared.region, SharedRegion::Create(RegionBytes(shared.layout, shared.slots)));
  return std::make_unique<GrpcStepStream>(impl_->DecodeStub(), shape_, impl_->options.router_id, impl_->incarnation,
                                          std::move(shared));
}

absl::StatusOr<std::unique_ptr<PromptWriter>> WorkerClient::BeginWriteKV(uint64_t sequence_id,
                                                                         int64_t num_tokens) {
  auto writer =
      std::make_unique<GrpcPromptWriter>(impl_->IngestChannel(), shape_, impl_->options.router_id, impl_->incarnation,
                                         impl_->chunk_buffers);
  PKV_RETURN_IF_ERROR(writer->WriteHeader(sequence_id, num_tokens));
  return writer;
}

absl::Status WorkerClient::WritePrompt(uint64_t sequence_id, int64_t num_tokens,
                                       int64_t chunk_tokens, const ChunkFiller& fill) {
  if (chunk_tokens < 1) return absl::InvalidArgumentError("chunk_tokens must be >= 1");
  GrpcPromptWriter writer(impl_->IngestChannel(), shape_, impl_->options.router_id, impl_->incarnation,
                          impl_->chunk_buffers);
  PKV_RETURN_IF_ERROR(writer.WriteHeader(sequence_id, num_tokens));
  for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int64_t off = 0; off < num_tokens; off += chunk_tokens) {
      const int64_t n = std::min(chunk_tokens, num_tokens - off);
      absl::Status s = writer.WriteFilled(layer, off, n, fill);
      if (!s.ok()) return s;  // the stream's final status (e.g. the worker's RESOURCE_EXHAUSTED)
    }
  }
  return writer.Finish();
}

absl::StatusOr<int64_t> WorkerClient::Release(std::span<const uint64_t> sequence_ids) {
  grpc::ClientContext ctx;
  impl_->SetDeadline(&ctx);
  v1::ReleaseRequest req;
  req.mutable_sequence_ids()->Add(sequence_ids.begin(), sequence_ids.end());
  req.set_expected_incarnation(impl_->incarnation);
  v1::ReleaseResponse resp;
  PKV_RETURN_IF_ERROR(FromGrpc(impl_->stub->Release(&ctx, req, &resp)));
  return resp.free_pages();
}

absl::StatusOr<bool> WorkerClient::CheckHealth(const std::string& service) {
  // grpc.health.v1.Health/Check through the generic stub, so the client needs no generated
  // health code. HealthCheckRequest is {string service = 1}; HealthCheckResponse is
  // {ServingStatus status = 1} with SERVING = 1.
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0A);  // field 1, length-delimited
    request.push_back(static_cast<char>(service.size()));  // services names are < 128 bytes
    request.append(service);
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::GenericStub generic(impl_->channel);
  grpc::ClientContext ctx;
  impl_->SetDeadline(&ctx);
  grpc::CompletionQueue cq;
  auto call = generic.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  call->Finish(&response_buffer, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  PKV_RETURN_IF_ERROR(FromGrpc(status));
  std::vector<grpc::Slice> slices;
  if (!response_buffer.Dump(&slices).ok()) return absl::InternalError("health: unreadable response");
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // Default (UNKNOWN = 0) is encoded as no bytes.
  return bytes.size() == 2 && bytes[0] == 0x08 && bytes[1] == 0x01;
}

}  // namespace pkv::client
