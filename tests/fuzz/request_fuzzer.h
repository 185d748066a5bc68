// tests/fuzz/request_fuzzer.h — a stateful, seeded fuzzer of the worker's request handling:
// wire decoding (pkv.v1 messages parsed from bytes), the proto checks of service/proto_convert,
// the blocking handlers of service/handlers (RunStep, PromptSession, RunRelease) and the engine's
// validation, on a real engine with the CPU backend and the tests' small model.
//
// Every request is one of: valid traffic made from a model of the engine's state (token steps
// over all layers, WriteKV streams, releases), a valid request with mutated fields (ids, layers,
// token counts at the int64 extremes, offsets, shapes, dtypes, data lengths, row/open/free lists
// with duplicates, overlaps and long runs), or raw bytes (random, or a serialized valid request
// with flipped, inserted, deleted or spliced bytes) parsed as StepRequest, WriteKVRequest or
// ReleaseRequest (bytes that do not parse are dropped, as gRPC drops them). After each request
// the fuzzer checks what the API promises:
//   * the status is OK or one of the documented codes, and a non-OK status has a message;
//   * a non-OK request leaves Engine::StateFingerprint unchanged (all-or-nothing);
//   * Engine::CheckConsistency is OK;
//   * Engine::Info agrees with the fuzzer's model of the accepted requests (sequences, tokens,
//     free pages, open token steps), and requests the model knows to be valid succeed;
//   * an accepted step answers out [B, Hq, d] (and lse [B, Hq] only when asked), and a replayed
//     layer-step the outputs of its first execution.
// Finish completes or releases everything and checks that the pool is all free again.
//
// Inputs that hit a known defect which would abort the process are recognised by
// KnownCrashOf and, unless Options::run_known_crashes, counted and not sent.
// Thread-safety: none; a fuzzer and its engine belong to one thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/kv_data.h"
#include "engine/engine.h"
#include "pkv/v1/worker.pb.h"
#include "service/handlers.h"

namespace pkv::fuzz {

// Which request a byte string is parsed as.
enum class MessageKind : uint8_t { kStep = 0, kWriteKv = 1, kRelease = 2 };

// Counters printed at the end of a run.
struct FuzzStats {
  int64_t requests = 0;          // requests handed to a handler
  int64_t ok = 0;                // of which answered OK
  int64_t unparsable = 0;        // byte strings that did not parse
  int64_t steps_ok = 0;          // layer-steps answered OK (replays included)
  int64_t prompts_committed = 0;
  int64_t known_crashes = 0;     // inputs recognised by KnownCrashOf (sent only when asked)
  int64_t long_deltas_ok = 0;    // accepted steps with an open or free list longer than max_batch
  std::map<int, int64_t> codes;  // absl status code -> count
};

class RequestFuzzer {
 public:
  struct Options {
    uint64_t seed = 1;
    // Send inputs of known defects that abort the process (libFuzzer; a reproducer in a child).
    bool run_known_crashes = false;
  };

  // A fresh engine (CPU backend, small model, small pool) with two committed prompts.
  static absl::StatusOr<std::unique_ptr<RequestFuzzer>> Create(const Options& options);
  ~RequestFuzzer();
  RequestFuzzer(const RequestFuzzer&) = delete;
  RequestFuzzer& operator=(const RequestFuzzer&) = delete;

  // One seeded request (valid, mutated or raw). A non-OK status describes the first broken
  // invariant and the request that broke it.
  absl::Status Iterate();

  // Parses `bytes` as a message of `kind` and sends it: a step, a release, or the next message
  // of the current WriteKV stream (one is begun when none is open). Unparsable bytes count and
  // are OK.
  absl::Status Feed(MessageKind kind, std::string_view bytes);
  // Half-closes the current WriteKV stream (PromptSession::Commit), if one is open.
  absl::Status CommitStream();
  // Interprets `data` as records [op: 1 byte][size: 2 bytes little-endian][bytes] (the libFuzzer
  // input): op % 4 selects Feed(kStep), Feed(kWriteKv), Feed(kRelease) or CommitStream.
  absl::Status FeedRecords(std::span<const uint8_t> data);

  // Aborts open WriteKV streams, runs the layers left of open token steps, releases every
  // sequence and checks that the pool is all free.
  absl::Status Finish();

  // Non-empty (naming the defect) when sending `request` would abort the process in the current
  // engine: a WriteKV header whose num_tokens overflows the pager's page count.
  std::string KnownCrashOf(const v1::WriteKVRequest& request) const;

  const FuzzStats& stats() const { return stats_; }
  const engine::Engine& engine() const { return *engine_; }
  // The first input KnownCrashOf recognised (description), for the report.
  const std::string& first_known_crash() const { return first_known_crash_; }
  // The last message sent (serialized) and its kind: with the seed, the reproducer of a failure.
  MessageKind last_kind() const { return last_kind_; }
  const std::string& last_request() const { return last_request_; }
  const std::string& last_description() const { return last_description_; }

 private:
  enum class Expect { kAny, kOk, kNotOk };

  // The model of what the engine holds, built from the requests it accepted.
  struct SeqModel {
    int64_t tokens = 0;
    uint64_t token_step = 0;  // open token step whose rows include it; 0: none
  };
  struct TokenStepModel {
    std::vector<uint64_t> rows;
    std::vector<bool> layer_done;
    int32_t layers_done = 0;
  };
  // One WriteKV stream.
  struct Stream {
    std::unique_ptr<service::PromptSession> session;
    uint64_t seq = 0;      // valid once begun
    int64_t tokens = 0;
    bool begun = false;     // a header was accepted
    bool committed = false;
    std::vector<std::vector<bool>> written;  // [layer][token]
    std::vector<int64_t> covered;            // [layer]
  };

  RequestFuzzer(const Options& options, std::unique_ptr<engine::Engine> engine);

  // Writes a whole prompt of `tokens` tokens through one stream and commits it.
  absl::Status WritePrompt(int64_t tokens);

  // Sending, with the invariant checks and the model update. A WriteKV message or commit goes
  // to streams_[index]; after a refusal the stream is mostly aborted, as the service does.
  absl::Status SendStep(const v1::StepRequest& request, Expect expect,
                        v1::StepResponse* response_out = nullptr);
  absl::Status SendWriteKv(size_t index, const v1::WriteKVRequest& request, Expect expect);
  absl::Status SendCommit(size_t index, Expect expect);
  absl::Status SendRelease(const v1::ReleaseRequest& request, Expect expect);
  // Status code and message, fingerprint, consistency; `what` describes the request.
  absl::Status CheckOutcome(const absl::Status& status, Expect expect, uint64_t fingerprint_before,
                            const std::string& what);
  // Engine::Info against the model.
  absl::Status CheckModel(const std::string& what) const;
  uint64_t Fingerprint();
  // Aborts streams_[index] as the service does after an error or a cut, and drops it.
  absl::Status AbortStream(size_t index);
  // The newest stream that is not committed (a new one when there is none).
  size_t CurrentStream();

  // Model updates from accepted requests; a non-OK status when the engine accepted something
  // the model cannot (a violation).
  absl::Status ApplyStep(const v1::StepRequest& request, const std::string& what);
  absl::Status ApplyRelease(const std::vector<uint64_t>& ids, const std::string& what);
  void AbortTokenStepModel(uint64_t id);
  int64_t PredictedFreePages() const;
  int64_t PagesFor(int64_t tokens) const;

  // Generators of valid requests from the model; false when the state allows none.
  bool MakeLayerZero(v1::StepRequest* request);
  bool MakeLaterLayer(v1::StepRequest* request);
  bool MakeRetry(v1::StepRequest* request);
  bool MakeHeader(v1::WriteKVRequest* request);
  bool MakeChunk(const Stream& stream, v1::WriteKVRequest* request);
  bool MakeRelease(v1::ReleaseRequest* request);
  void FillStepTensors(v1::StepRequest* request);
  void FillChunkTensors(v1::KVChunk* chunk, uint64_t seq);

  // Actions of Iterate.
  absl::Status ValidStep();
  absl::Status ValidStreamMessage();
  absl::Status ValidRelease();
  absl::Status MutatedStep();
  absl::Status MutatedStreamMessage();
  absl::Status MutatedRelease();
  absl::Status RawBytes();
  absl::Status Housekeeping();

  // Mutators.
  void MutateStep(v1::StepRequest* request);
  void MutateHeader(v1::WriteKVHeader* header);
  void MutateChunk(v1::KVChunk* chunk, int64_t prompt_tokens);
  void MutateTensor(v1::Tensor* tensor);
  void MutateIdList(google::protobuf::RepeatedField<uint64_t>* ids);
  void MutateBytes(std::string* bytes);
  int64_t ExtremeInt64(int64_t near);
  uint64_t InterestingSeqId();

  // Random helpers.
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  std::vector<uint64_t> ReadySeqs(bool unlocked_only) const;
  // A sequence id the engine does not hold (as far as the model knows).
  // A token step id the engine has never seen.
  uint64_t FreshTokenStep();
  uint64_t FreshSeq();

  Options options_;
  std::unique_ptr<engine::Engine> engine_;
  ModelShape shape_;
  int64_t total_pages_ = 0;
  int32_t max_batch_ = 0;
  client::KvDataGen gen_;
  std::mt19937_64 rng_;
  FuzzStats stats_;

  bool fingerprint_valid_ = false;
  uint64_t fingerprint_ = 0;

  std::map<uint64_t, SeqModel> ready_;            // steppable sequences
  std::map<uint64_t, int64_t> writing_;            // sequence -> prompt tokens
  std::map<uint64_t, TokenStepModel> open_steps_;  // open token steps by id
  std::deque<std::pair<uint64_t, std::vector<uint64_t>>> retained_;  // completed: id, rows
  std::vector<std::unique_ptr<Stream>> streams_;   // open WriteKV streams, oldest first
  MessageKind last_kind_ = MessageKind::kStep;
  std::string last_request_;
  std::string last_description_;
  std::map<std::pair<uint64_t, int32_t>, std::string> outputs_;  // (token step, layer) -> out
  std::deque<std::pair<uint64_t, int32_t>> output_order_;
  std::string first_known_crash_;
  uint64_t next_seq_ = 100;
  uint64_t next_token_step_ = 1;
  absl::flat_hash_set<uint64_t> used_token_steps_;  // every token step the engine began
};

}  // namespace pkv::fuzz
