// client/worker_client.h — the router/prefill side's C++ client of the PersistentKV worker.
//
// WorkerClient wraps the gRPC stub of API v1 in domain terms (no gRPC or proto types in this
// header): Describe, WriteKV of a prompt in chunks (PromptWriter, or WritePrompt for a whole
// prompt), Step (unary), StepStream (StepStreamSession: one response per request, in order),
// Release, and the standard health check. Tensors are raw little-endian bytes; the client adds
// the shapes from Describe. Errors come back as absl statuses with the worker's code and message.
// Thread-safety: WorkerClient methods are thread-safe; a PromptWriter or StepStreamSession is
// used by one thread at a time (Cancel may be called from any thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/shared_bytes.h"
#include "common/channel_args.h"
#include "common/model_shape.h"

namespace pkv::client {

// What Describe reports.
struct WorkerInfo {
  ModelShape shape;
  std::string backend;
  std::string device;
  int64_t total_pages = 0;
  int64_t free_pages = 0;
  int64_t used_pages = 0;
  int64_t page_bytes = 0;
  int64_t num_sequences = 0;
  int64_t used_tokens = 0;
  int32_t max_batch = 0;
  int64_t max_message_bytes = 0;
  int64_t active_sequences = 0;
  int64_t writing_sequences = 0;
  int64_t open_token_steps = 0;
  bool serving = false;
  uint64_t incarnation = 0;  // the worker run that answered (see worker.proto)
  int64_t shared_memory_max_bytes = 0;  // largest shared memory of a StepStream; 0: off
};

// One layer of one token step (see StepRequest in proto/pkv/v1/worker.proto).
struct StepArgs {
  uint64_t token_step_id = 0;
  int32_t layer = 0;
  std::vector<uint64_t> rows;
  std::vector<uint64_t> open;  // layer 0 only
  std::vector<uint64_t> free;  // layer 0 only
  std::string q;               // [B, Hq, d] model dtype bytes
  std::string k;               // [B, Hkv, d]
  std::string v;               // [B, Hkv, d]
  bool want_lse = false;
};

struct StepResult {
  uint64_t token_step_id = 0;
  int32_t layer = 0;
  std::string out;         // [B, Hq, d] model dtype bytes
  std::vector<float> lse;  // [B, Hq] when asked
  std::string kernel;
  bool replayed = false;
  double attend_seconds = 0.0;  // the attention's device time, when attention_timed
  bool attention_timed = true;  // attend_seconds was measured (the worker samples it on CUDA)
  double server_seconds = 0.0;  // the worker held the request this long (see worker.proto)
  double queue_seconds = 0.0;   // of which waiting for an engine thread
  // The rest of server_seconds by stage (StepResponse fields 20-27 of worker.proto).
  double validate_seconds = 0.0;
  double host_seconds = 0.0;
  double h2d_seconds = 0.0;
  double kernel_seconds = 0.0;
  double d2h_seconds = 0.0;
  double serialize_seconds = 0.0;
  int64_t received_unix_nanos = 0;  // worker's wall clock: request read, response handed back
  int64_t answered_unix_nanos = 0;
  bool attention_skipped = false;   // the worker runs --attention=skip: `out` and `lse` are zeros
  // This client's side of the layer-step, filled by the client library.
  std::chrono::steady_clock::time_point send_start;  // the client began building the message
  int64_t send_start_unix_nanos = 0;  // the same moment on the wall clock
  double send_seconds = 0.0;  // until the message was built and written to the channel (unary: built)
  std::chrono::steady_clock::time_point read_at;  // when the response had been read
  double convert_seconds = 0.0;   // response message -> this struct
};

struct ClientOptions {
  std::string target;                         // host:port
  int64_t max_message_bytes = 256LL << 20;    // receive/send limit of the channel
  absl::Duration connect_timeout = absl::Seconds(10);
  absl::Duration rpc_timeout = absl::Seconds(120);  // deadline of unary calls
  // TLS: PEM CA bundle that signed the worker's certificate. Setting it (or a client
  // certificate) turns TLS on; empty with TLS on: gRPC's default roots. Files are read by
  // Connect (INVALID_ARGUMENT when unreadable).
  std::string tls_ca_file;
  // PEM client certificate chain and private key for workers that require client certificates
  // (mutual TLS). Both or neither.
  std::string tls_cert_file;
  std::string tls_key_file;
  // The router id sent as request metadata (x-pkv-router-id) on every call; the worker's
  // sequences and token steps belong to it (ignored by a worker serving mutual TLS, which takes
  // the client certificate's identity). Empty: the anonymous router.
  std::string router_id;
  // Connect reads the worker's incarnation and every later request carries it, so a worker that
  // restarted answers FAILED_PRECONDITION instead of serving another incarnation's state.
  bool pin_incarnation = true;
  // A TCP connection of this client's own. By default gRPC lets clients of the same target and
  // options share one connection (HTTP/2 streams on it); senders of bulk prompt KV on several
  // threads go faster each on its own (pkv-ingest-bench measures both).
  bool own_connection = false;
  // WriteKV streams go over this many TCP connections of their own (taken in turn), apart from
  // the connection of decode steps: bulk prompt KV queued in one HTTP/2 connection would hold
  // every decode message behind it (the transport is ordered), so decode latency would follow
  // the prompt traffic. 0: WriteKV shares the decode connection.
  int32_t ingest_connections = 1;
  // StepStreams are opened in turn over this many TCP connections of their own: each HTTP/2
  // connection carries its streams' messages one after another (one transport, one socket), so
  // micro-batches in flight at once wait for each other's bytes on a shared one. 0: StepStreams
  // share the connection of unary calls.
  int32_t decode_connections = 0;
  // StepStreams pass q, k, v and the outputs through a POSIX shared-memory region of their own
  // instead of in the messages (see Shared memory in proto/pkv/v1/worker.proto), which spares the
  // transport most of a layer-step's bytes. Only for a client on the worker's host (or sharing its
  // /dev/shm) running as the same user; Connect refuses it (FAILED_PRECONDITION) when the worker
  // has shared memory off. Unary Step and WriteKV are unchanged.
  bool shared_memory = false;
  // With shared_memory: requests one StepStream may have in flight (Send before Receive), each in
  // a slot of the region sized for the worker's max_batch rows (q, k, v and out). A Send beyond
  // that gets FAILED_PRECONDITION; a request of more rows goes in the message.
  int32_t shared_memory_slots = 8;
  // With shared_memory: the requests and responses themselves go through a ring in the region
  // (common/shared_memory_ring.h) that the worker and this client poll, so a layer-step sends no
  // gRPC message at all; the StepStream stays open as the session. Every request must fit the
  // worker's max_batch rows. A Receive polls for its response for shared_memory_spin_us, then
  // sleeps on a futex.
  bool shared_memory_ring = false;
  int32_t shared_memory_spin_us = 1000;
  // Extra gRPC core channel arguments of every channel (HTTP/2 windows and frame sizes, TCP read
  // sizes, ...). Message size limits are max_message_bytes only (Connect refuses them here with
  // INVALID_ARGUMENT).
  std::vector<ChannelArg> channel_args;
};

// A WriteKV stream in progress. Destroying it without Finish cancels the stream (the worker
// then releases the prompt).
class PromptWriter {
 public:
  virtual ~PromptWriter() = default;
  // Sends K,V of tokens [token_offset, token_offset + n) of `layer` ([n, Hkv, d] bytes each).
  // A non-OK result means the stream broke; Finish then gives the worker's status.
  virtual absl::Status WriteChunk(int32_t layer, int64_t token_offset, int64_t n,
                                  std::string_view k, std::string_view v) = 0;
  // WriteChunk without copying: the bytes go to gRPC where they lie, and their owners are held
  // until gRPC no longer needs them (which may be after this returns).
  virtual absl::Status WriteSharedChunk(int32_t layer, int64_t token_offset, int64_t n, SharedBytes k,
                                        SharedBytes v) = 0;
  // Half-closes and waits for the worker's answer: OK once the sequence is steppable.
  virtual absl::Status Finish() = 0;
  // Cancels the stream (the worker leaves nothing behind).
  virtual void Cancel() = 0;
};

// A StepStream. Destroying it without Finish cancels the stream.
class StepStreamSession {
 public:
  virtual ~StepStreamSession() = default;
  // Sends one request and waits for its response. A per-message error comes back as the
  // worker's status and the stream stays usable; UNAVAILABLE/CANCELLED etc. with the RPC status
  // when the stream itself ended.
  virtual absl::StatusOr<StepResult> Step(const StepArgs& args) = 0;
  // The two halves of Step, so that a caller can prepare its next request while the worker runs
  // this one: Send writes one request (its tensors are moved into the message); Receive waits for
  // the oldest unanswered response. Responses come in request order; each carries its request's
  // send timings (StepResult::send_seconds, sent_at).
  virtual absl::Status Send(StepArgs&& args) = 0;
  virtual absl::StatusOr<StepResult> Receive() = 0;
  // Half-closes and returns the stream's final status.
  virtual absl::Status Finish() = 0;
  // Cancels the stream.
  virtual void Cancel() = 0;
};

// Produces K and V ([n, Hkv, d] model dtype bytes, appended to *k and *v) of prompt tokens
// [token_offset, token_offset + n) of one layer.
using ChunkFiller = std::function<void(int32_t layer, int64_t token_offset, int64_t n,
                                       std::string* k, std::string* v)>;

class WorkerClient final {
 public:
  // Creates the channel (plaintext, or TLS per the tls_* options) and the ingest and decode
  // connections of their own, and waits up to connect_timeout for all of them (UNAVAILABLE naming
  // the one that did not connect; INVALID_ARGUMENT for unusable TLS options).
  static absl::StatusOr<std::unique_ptr<WorkerClient>> Connect(const ClientOptions& options);
  ~WorkerClient();

  absl::StatusOr<WorkerInfo> Describe();
  // Unary Step.
  absl::StatusOr<StepResult> Step(const StepArgs& args);
  // Opens a StepStream.
  absl::StatusOr<std::unique_ptr<StepStreamSession>> OpenStepStream();
  // Opens a WriteKV stream and sends its header.
  absl::StatusOr<std::unique_ptr<PromptWriter>> BeginWriteKV(uint64_t sequence_id, int64_t num_tokens);
  // Writes a whole prompt: for every layer, chunks of at most `chunk_tokens` tokens from `fill`.
  absl::Status WritePrompt(uint64_t sequence_id, int64_t num_tokens, int64_t chunk_tokens,
                           const ChunkFiller& fill);
  // Frees sequences; returns the worker's free pages afterwards.
  absl::StatusOr<int64_t> Release(std::span<const uint64_t> sequence_ids);
  // grpc.health.v1 Check for `service` ("" = the whole server): true when SERVING.
  absl::StatusOr<bool> CheckHealth(const std::string& service = "");

  // The shape of the last successful Describe (Connect calls Describe once).
  const ModelShape& shape() const { return shape_; }

  struct Impl;

 private:
  explicit WorkerClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  ModelShape shape_;
};

}  // namespace pkv::client
