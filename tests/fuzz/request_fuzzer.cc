#include "tests/fuzz/request_fuzzer.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/engine_factory.h"
#include "tests/support/small_model.h"

namespace pkv::fuzz {
namespace {

constexpr int64_t kPoolPages = 32;
constexpr int32_t kMaxBatch = 8;
constexpr uint64_t kScatterSeed = 77;
// What the fuzzer itself keeps bounded so every iteration stays cheap: open token steps of
// valid traffic, open WriteKV streams, sequences, prompt length, ids in a mutated list.
constexpr size_t kValidOpenTokenSteps = 3;
constexpr size_t kMaxStreams = 4;
constexpr size_t kMaxSequences = 48;
constexpr int64_t kMaxPromptTokens = 80;
constexpr int64_t kLongListMax = 4 * kMaxBatch + 4;
// Outputs of the most recent layer-steps, compared with their replays.
constexpr size_t kKeptOutputs = 64;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int32_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kInt32Min = std::numeric_limits<int32_t>::min();

// The codes pkv/v1/worker.proto documents (plus OK).
bool IsDocumentedCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnavailable:
      return true;
    default:
      return false;
  }
}

template <typename Ids>
std::string IdList(const Ids& ids) {
  constexpr int kShown = 12;
  std::vector<uint64_t> shown;
  for (auto it = ids.begin(); it != ids.end() && static_cast<int>(shown.size()) < kShown; ++it) {
    shown.push_back(*it);
  }
  std::string s = absl::StrCat("[", absl::StrJoin(shown, ","));
  if (ids.size() > kShown) absl::StrAppend(&s, ",... (", ids.size(), " ids)");
  return s + "]";
}

std::string Describe(const v1::Tensor& t) {
  return absl::StrCat("{dtype=", static_cast<int>(t.dtype()), " shape=[", absl::StrJoin(t.shape(), ","),
                      "] data=", t.data().size(), "B}");
}

std::string Describe(const v1::StepRequest& r) {
  return absl::StrCat("StepRequest{token_step_id=", r.token_step_id(), " layer=", r.layer(),
                      " rows=", IdList(r.rows()), " open=", IdList(r.open()), " free=", IdList(r.free()),
                      " q=", Describe(r.q()), " k=", Describe(r.k()), " v=", Describe(r.v()),
                      " want_lse=", r.want_lse(), "}");
}

std::string Describe(const v1::WriteKVRequest& r) {
  switch (r.payload_case()) {
    case v1::WriteKVRequest::kHeader:
      return absl::StrCat("WriteKVRequest{header{sequence_id=", r.header().sequence_id(),
                          " num_tokens=", r.header().num_tokens(), "}}");
    case v1::WriteKVRequest::kChunk: {
      const v1::KVChunk& c = r.chunk();
      return absl::StrCat("WriteKVRequest{chunk{layer=", c.layer(), " token_offset=", c.token_offset(),
                          " num_tokens=", c.num_tokens(), " k=", Describe(c.k()), " v=", Describe(c.v()),
                          "}}");
    }
    case v1::WriteKVRequest::PAYLOAD_NOT_SET:
      break;
  }
  return "WriteKVRequest{}";
}

std::string Describe(const v1::ReleaseRequest& r) {
  return absl::StrCat("ReleaseRequest{sequence_ids=", IdList(r.sequence_ids()), "}");
}

absl::Status Violation(absl::string_view what, absl::string_view problem) {
  return absl::InternalError(absl::StrCat(problem, "\n  request: ", what));
}

void SetTensor(v1::Tensor* t, const ModelShape& shape, std::initializer_list<int64_t> dims, std::string data) {
  t->Clear();
  t->set_dtype(shape.dtype == DType::kF16 ? v1::DTYPE_FP16 : v1::DTYPE_BF16);
  for (int64_t d : dims) t->add_shape(d);
  t->set_data(std::move(data));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Set-up and the public entry points

absl::StatusOr<std::unique_ptr<RequestFuzzer>> RequestFuzzer::Create(const Options& options) {
  engine::EngineConfig config;
  config.shape = testing_support::SmallTestShape();
  config.num_pages = kPoolPages;
  config.backend = "cpu";
  config.cpu_threads = 1;
  config.max_batch = kMaxBatch;
  config.scatter_seed = kScatterSeed;
  PKV_ASSIGN_OR_RETURN(std::unique_ptr<engine::Engine> engine, engine::BuildEngine(config));
  std::unique_ptr<RequestFuzzer> fuzzer(new RequestFuzzer(options, std::move(engine)));
  // Two committed prompts (20 and 16 tokens), so that the first token steps have rows.
  PKV_RETURN_IF_ERROR(fuzzer->WritePrompt(20));
  PKV_RETURN_IF_ERROR(fuzzer->WritePrompt(16));
  return fuzzer;
}

RequestFuzzer::RequestFuzzer(const Options& options, std::unique_ptr<engine::Engine> engine)
    : options_(options),
      engine_(std::move(engine)),
      shape_(engine_->shape()),
      total_pages_(engine_->Info().pager.total_pages),
      max_batch_(engine_->Info().max_batch),
      gen_(engine_->shape(), options.seed),
      rng_(options.seed) {}

RequestFuzzer::~RequestFuzzer() {
  // Streams first: an uncommitted PromptSession releases its sequence in the engine.
  streams_.clear();
}

absl::Status RequestFuzzer::WritePrompt(int64_t tokens) {
  streams_.push_back(std::make_unique<Stream>());
  streams_.back()->session = std::make_unique<service::PromptSession>(*engine_);
  const size_t index = streams_.size() - 1;
  v1::WriteKVRequest header;
  header.mutable_header()->set_sequence_id(FreshSeq());
  header.mutable_header()->set_num_tokens(tokens);
  PKV_RETURN_IF_ERROR(SendWriteKv(index, header, Expect::kOk));
  for (int32_t layer = 0; layer < shape_.num_layers; ++layer) {
    v1::WriteKVRequest chunk;
    chunk.mutable_chunk()->set_layer(layer);
    chunk.mutable_chunk()->set_token_offset(0);
    chunk.mutable_chunk()->set_num_tokens(tokens);
    FillChunkTensors(chunk.mutable_chunk(), streams_[index]->seq);
    PKV_RETURN_IF_ERROR(SendWriteKv(index, chunk, Expect::kOk));
  }
  PKV_RETURN_IF_ERROR(SendCommit(index, Expect::kOk));
  streams_.erase(streams_.begin() + index);
  return absl::OkStatus();
}

absl::Status RequestFuzzer::Iterate() {
  PKV_RETURN_IF_ERROR(Housekeeping());
  const uint64_t r = Below(100);
  if (r < 30) return ValidStep();
  if (r < 42) return ValidStreamMessage();
  if (r < 45) return ValidRelease();
  if (r < 62) return MutatedStep();
  if (r < 74) return MutatedStreamMessage();
  if (r < 78) return MutatedRelease();
  return RawBytes();
}

absl::Status RequestFuzzer::Feed(MessageKind kind, std::string_view bytes) {
  switch (kind) {
    case MessageKind::kStep: {
      v1::StepRequest request;
      if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) break;
      return SendStep(request, Expect::kAny);
    }
    case MessageKind::kWriteKv: {
      v1::WriteKVRequest request;
      if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) break;
      return SendWriteKv(CurrentStream(), request, Expect::kAny);
    }
    case MessageKind::kRelease: {
      v1::ReleaseRequest request;
      if (!request.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) break;
      return SendRelease(request, Expect::kAny);
    }
  }
  ++stats_.unparsable;
  return absl::OkStatus();
}

absl::Status RequestFuzzer::CommitStream() {
  if (streams_.empty()) return absl::OkStatus();
  return SendCommit(streams_.size() - 1, Expect::kAny);
}

absl::Status RequestFuzzer::FeedRecords(std::span<const uint8_t> data) {
  size_t at = 0;
  while (at < data.size()) {
    const uint8_t op = data[at++];
    size_t size = 0;
    if (at + 2 <= data.size()) {
      size = data[at] | (static_cast<size_t>(data[at + 1]) << 8);
      at += 2;
    }
    size = std::min(size, data.size() - at);
    const std::string_view bytes(reinterpret_cast<const char*>(data.data() + at), size);
    at += size;
    switch (op % 4) {
      case 0:
        PKV_RETURN_IF_ERROR(Feed(MessageKind::kStep, bytes));
        break;
      case 1:
        PKV_RETURN_IF_ERROR(Feed(MessageKind::kWriteKv, bytes));
        break;
      case 2:
        PKV_RETURN_IF_ERROR(Feed(MessageKind::kRelease, bytes));
        break;
      default:
        PKV_RETURN_IF_ERROR(CommitStream());
        break;
    }
  }
  return absl::OkStatus();
}

absl::Status RequestFuzzer::Finish() {
  while (!streams_.empty()) PKV_RETURN_IF_ERROR(AbortStream(streams_.size() - 1));
  // Token steps left open run their remaining layers (one without rows holds a backend slot
  // that no Release can free).
  while (!open_steps_.empty()) {
    const uint64_t id = open_steps_.begin()->first;
    const TokenStepModel& ts = open_steps_.begin()->second;
    v1::StepRequest request;
    request.set_token_step_id(id);
    request.set_layer(static_cast<int32_t>(std::find(ts.layer_done.begin(), ts.layer_done.end(), false) -
                                           ts.layer_done.begin()));
    for (uint64_t row : ts.rows) request.add_rows(row);
    FillStepTensors(&request);
    PKV_RETURN_IF_ERROR(SendStep(request, Expect::kOk));
  }
  v1::ReleaseRequest all;
  for (const auto& [id, seq] : ready_) all.add_sequence_ids(id);
  PKV_RETURN_IF_ERROR(SendRelease(all, Expect::kOk));
  const engine::EngineInfo info = engine_->Info();
  if (info.pager.free_pages != info.pager.total_pages || info.pager.num_sequences != 0 ||
      info.pager.used_tokens != 0 || info.open_token_steps != 0) {
    return absl::InternalError(absl::StrCat(
        "after releasing everything the pool is not all free: ", info.pager.free_pages, " of ",
        info.pager.total_pages, " pages free, ", info.pager.num_sequences, " sequences, ",
        info.pager.used_tokens, " tokens, ", info.open_token_steps, " open token steps"));
  }
  return engine_->CheckConsistency();
}

std::string RequestFuzzer::KnownCrashOf(const v1::WriteKVRequest& request) const {
  // None known. The last one, a WriteKV header whose num_tokens near INT64_MAX overflowed the
  // pager's page count, is fixed (BlockPager::PagesForTokens cannot overflow);
  // request_fuzz_known_defects_test keeps its reproducer as a regression test, and the fuzzer
  // sends such headers like any other.
  (void)request;
  return "";
}

// ---------------------------------------------------------------------------------------------
// Sending and checking

uint64_t RequestFuzzer::Fingerprint() {
  if (!fingerprint_valid_) {
    fingerprint_ = engine_->StateFingerprint();
    fingerprint_valid_ = true;
  }
  return fingerprint_;
}

absl::Status RequestFuzzer::CheckOutcome(const absl::Status& status, Expect expect,
                                         uint64_t fingerprint_before, const std::string& what) {
  ++stats_.requests;
  ++stats_.codes[static_cast<int>(status.code())];
  if (status.ok()) ++stats_.ok;
  if (!IsDocumentedCode(status.code())) {
    return Violation(what, absl::StrCat("status code outside the documented set: ", status.ToString()));
  }
  if (!status.ok() && status.message().empty()) {
    return Violation(what, absl::StrCat("non-OK status without a message: ", status.ToString()));
  }
  if (expect == Expect::kOk && !status.ok()) {
    return Violation(what, absl::StrCat("a request the model holds valid was refused: ", status.ToString()));
  }
  if (expect == Expect::kNotOk && status.ok()) {
    return Violation(what, "a request the model holds invalid was accepted");
  }
  fingerprint_valid_ = false;
  if (!status.ok() && Fingerprint() != fingerprint_before) {
    return Violation(what, absl::StrCat("refused (", status.ToString(), ") but the engine state changed"));
  }
  if (absl::Status c = engine_->CheckConsistency(); !c.ok()) {
    return Violation(what, absl::StrCat("engine inconsistent after the request (", status.ToString(), "): ",
                                        c.ToString()));
  }
  return absl::OkStatus();
}

absl::Status RequestFuzzer::CheckModel(const std::string& what) const {
  const engine::EngineInfo info = engine_->Info();
  int64_t tokens = 0;
  for (const auto& [id, seq] : ready_) tokens += seq.tokens;
  for (const auto& [id, t] : writing_) tokens += t;
  const int64_t want_free = PredictedFreePages();
  if (info.active_sequences != static_cast<int64_t>(ready_.size()) ||
      info.writing_sequences != static_cast<int64_t>(writing_.size()) ||
      info.open_token_steps != static_cast<int64_t>(open_steps_.size()) ||
      info.pager.used_tokens != tokens || info.pager.free_pages != want_free) {
    return Violation(what, absl::StrCat(
        "engine and the model of accepted requests disagree: engine active/writing/open steps/tokens/"
        "free pages = ", info.active_sequences, "/", info.writing_sequences, "/", info.open_token_steps, "/",
        info.pager.used_tokens, "/", info.pager.free_pages, ", model ", ready_.size(), "/", writing_.size(),
        "/", open_steps_.size(), "/", tokens, "/", want_free));
  }
  return absl::OkStatus();
}

absl::Status RequestFuzzer::SendStep(const v1::StepRequest& request, Expect expect,
                                     v1::StepResponse* response_out) {
  last_kind_ = MessageKind::kStep;
  last_request_ = request.SerializeAsString();
  const std::string what = Describe(request);
  last_description_ = what;
  const uint64_t before = Fingerprint();
  v1::StepResponse response;
  const absl::Status status = service::RunStep(*engine_, request, &response);
  PKV_RETURN_IF_ERROR(CheckOutcome(status, expect, before, what));
  if (!status.ok()) {
    if (response.ByteSizeLong() != 0) return Violation(what, "a refused step filled its response");
    return CheckModel(what);
  }
  ++stats_.steps_ok;
  const int64_t b = request.rows_size();
  const int64_t out_bytes = b * shape_.num_q_heads * shape_.head_dim * static_cast<int64_t>(DTypeSize(shape_.dtype));
  const v1::Tensor& out = response.out();
  if (response.token_step_id() != request.token_step_id() || response.layer() != request.layer() ||
      out.shape_size() != 3 || out.shape(0) != b || out.shape(1) != shape_.num_q_heads ||
      out.shape(2) != shape_.head_dim || static_cast<int64_t>(out.data().size()) != out_bytes) {
    return Violation(what, absl::StrCat("accepted step answered ids ", response.token_step_id(), "/",
                                        response.layer(), " out ", Describe(out)));
  }
  if (response.has_lse() &&
      (!request.want_lse() || static_cast<int64_t>(response.lse().data().size()) !=
                                  b * shape_.num_q_heads * static_cast<int64_t>(sizeof(float)))) {
    return Violation(what, absl::StrCat("accepted step answered lse ", Describe(response.lse())));
  }
  if (request.open_size() > max_batch_ || request.free_size() > max_batch_) ++stats_.long_deltas_ok;
  // A replay answers the first execution's outputs.
  const std::pair<uint64_t, int32_t> key(request.token_step_id(), request.layer());
  if (response.replayed()) {
    auto first = outputs_.find(key);
    if (first != outputs_.end() && first->second != out.data()) {
      return Violation(what, "a replayed layer-step answered other outputs than its first execution");
    }
  } else {
    outputs_[key] = out.data();
    output_order_.push_back(key);
    if (output_order_.size() > kKeptOutputs) {
      outputs_.erase(output_order_.front());
      output_order_.pop_front();
    }
    PKV_RETURN_IF_ERROR(ApplyStep(request, what));
  }
  if (response_out != nullptr) *response_out = std::move(response);
  return CheckModel(what);
}

absl::Status RequestFuzzer::SendWriteKv(size_t index, const v1::WriteKVRequest& request, Expect expect) {
  last_kind_ = MessageKind::kWriteKv;
  last_request_ = request.SerializeAsString();
  const std::string what = Describe(request);
  last_description_ = what;
  if (!options_.run_known_crashes && !KnownCrashOf(request).empty()) {
    if (stats_.known_crashes++ == 0) first_known_crash_ = what;
    return absl::OkStatus();
  }
  Stream& stream = *streams_[index];
  const uint64_t before = Fingerprint();
  const absl::Status status = stream.session->OnMessage(request);
  PKV_RETURN_IF_ERROR(CheckOutcome(status, expect, before, what));
  if (status.ok()) {
    if (stream.committed) return Violation(what, "a committed WriteKV stream accepted another message");
    if (request.payload_case() == v1::WriteKVRequest::kHeader) {
      if (stream.begun) return Violation(what, "a WriteKV stream accepted a second header");
      if (request.header().num_tokens() > total_pages_ * shape_.page_size) {
        return Violation(what, "accepted a prompt larger than the whole pool");
      }
      stream.begun = true;
      stream.seq = request.header().sequence_id();
      stream.tokens = request.header().num_tokens();
      stream.written.assign(shape_.num_layers, std::vector<bool>(stream.tokens, false));
      stream.covered.assign(shape_.num_layers, 0);
      writing_[stream.seq] = stream.tokens;
    } else {
      const v1::KVChunk& c = request.chunk();
      if (!stream.begun || c.layer() < 0 || c.layer() >= shape_.num_layers || c.num_tokens() < 1 ||
          c.token_offset() < 0 || c.token_offset() > stream.tokens - c.num_tokens()) {
        return Violation(what, absl::StrCat("accepted a chunk outside the prompt of ", stream.tokens, " tokens"));
      }
      for (int64_t t = c.token_offset(); t < c.token_offset() + c.num_tokens(); ++t) {
        if (!stream.written[c.layer()][t]) {
          stream.written[c.layer()][t] = true;
          ++stream.covered[c.layer()];
        }
      }
    }
  }
  PKV_RETURN_IF_ERROR(CheckModel(what));
  // The service ends a stream at its first error (the session is aborted); sometimes keep
  // sending on it anyway: the handlers promise that a refused message changed nothing.
  if (!status.ok() && Chance(0.75)) return AbortStream(index);
  return absl::OkStatus();
}

absl::Status RequestFuzzer::SendCommit(size_t index, Expect expect) {
  Stream& stream = *streams_[index];
  const std::string what = absl::StrCat("Commit of the WriteKV stream of sequence ", stream.seq,
                                        stream.begun ? "" : " (no header accepted)");
  const uint64_t before = Fingerprint();
  v1::WriteKVResponse response;
  const absl::Status status = stream.session->Commit(&response);
  PKV_RETURN_IF_ERROR(CheckOutcome(status, expect, before, what));
  bool complete = stream.begun && !stream.committed;
  for (int64_t c : stream.covered) complete = complete && c == stream.tokens;
  if (status.ok()) {
    if (!complete) return Violation(what, "Commit accepted an incomplete or finished prompt");
    if (response.sequence_id() != stream.seq || response.num_tokens() != stream.tokens) {
      return Violation(what, absl::StrCat("Commit answered sequence ", response.sequence_id(), " of ",
                                          response.num_tokens(), " tokens"));
    }
    stream.committed = true;
    writing_.erase(stream.seq);
    ready_[stream.seq] = SeqModel{stream.tokens, 0};
    ++stats_.prompts_committed;
  } else if (complete) {
    return Violation(what, absl::StrCat("Commit of a complete prompt was refused: ", status.ToString()));
  }
  PKV_RETURN_IF_ERROR(CheckModel(what));
  if (!status.ok() && Chance(0.75)) return AbortStream(index);
  return absl::OkStatus();
}

absl::Status RequestFuzzer::SendRelease(const v1::ReleaseRequest& request, Expect expect) {
  last_kind_ = MessageKind::kRelease;
  last_request_ = request.SerializeAsString();
  const std::string what = Describe(request);
  last_description_ = what;
  const uint64_t before = Fingerprint();
  v1::ReleaseResponse response;
  const absl::Status status = service::RunRelease(*engine_, request, &response);
  PKV_RETURN_IF_ERROR(CheckOutcome(status, expect, before, what));
  if (status.ok()) {
    const std::vector<uint64_t> ids(request.sequence_ids().begin(), request.sequence_ids().end());
    PKV_RETURN_IF_ERROR(ApplyRelease(ids, what));
    if (response.released() != request.sequence_ids_size() || response.free_pages() != PredictedFreePages()) {
      return Violation(what, absl::StrCat("Release answered released=", response.released(),
                                          " free_pages=", response.free_pages()));
    }
  }
  return CheckModel(what);
}

absl::Status RequestFuzzer::AbortStream(size_t index) {
  Stream& stream = *streams_[index];
  stream.session->Abort();
  if (stream.begun && !stream.committed) writing_.erase(stream.seq);
  const std::string what = absl::StrCat("Abort of the WriteKV stream of sequence ", stream.seq);
  streams_.erase(streams_.begin() + index);
  fingerprint_valid_ = false;
  if (absl::Status c = engine_->CheckConsistency(); !c.ok()) {
    return Violation(what, absl::StrCat("engine inconsistent after an abort: ", c.ToString()));
  }
  return CheckModel(what);
}

size_t RequestFuzzer::CurrentStream() {
  if (streams_.empty() || streams_.back()->committed) {
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->session = std::make_unique<service::PromptSession>(*engine_);
  }
  return streams_.size() - 1;
}

// ---------------------------------------------------------------------------------------------
// The model of accepted requests

int64_t RequestFuzzer::PagesFor(int64_t tokens) const {
  return (tokens + shape_.page_size - 1) / shape_.page_size;
}

int64_t RequestFuzzer::PredictedFreePages() const {
  int64_t used = 0;
  for (const auto& [id, seq] : ready_) used += PagesFor(seq.tokens);
  for (const auto& [id, t] : writing_) used += PagesFor(t);
  return total_pages_ - used;
}

absl::Status RequestFuzzer::ApplyStep(const v1::StepRequest& request, const std::string& what) {
  const uint64_t id = request.token_step_id();
  if (request.layer() < 0 || request.layer() >= shape_.num_layers) {
    return Violation(what, "accepted a layer out of range");
  }
  if (request.layer() == 0) {
    used_token_steps_.insert(id);
    for (uint64_t f : request.free()) {
      auto it = ready_.find(f);
      if (it == ready_.end() || it->second.token_step != 0) {
        return Violation(what, absl::StrCat("accepted free of sequence ", f, ", which the model holds unknown or in a token step"));
      }
      ready_.erase(it);
    }
    for (uint64_t o : request.open()) {
      if (ready_.contains(o) || writing_.contains(o)) {
        return Violation(what, absl::StrCat("accepted open of sequence ", o, ", which exists"));
      }
      ready_[o] = SeqModel{};
    }
    TokenStepModel ts;
    ts.rows.assign(request.rows().begin(), request.rows().end());
    ts.layer_done.assign(shape_.num_layers, false);
    for (uint64_t row : ts.rows) {
      auto it = ready_.find(row);
      if (it == ready_.end() || it->second.token_step != 0) {
        return Violation(what, absl::StrCat("accepted row ", row, ", which the model holds unknown or busy"));
      }
      ++it->second.tokens;
      it->second.token_step = id;
    }
    if (ts.rows.empty()) {
      // Only deltas: the engine completes every layer at once and holds no open token step.
      retained_.emplace_back(id, std::move(ts.rows));
      while (static_cast<int32_t>(retained_.size()) > engine::EngineOptions{}.retained_token_steps) {
        retained_.pop_front();
      }
      return absl::OkStatus();
    }
    open_steps_[id] = std::move(ts);
  }
  auto it = open_steps_.find(id);
  if (it == open_steps_.end() || it->second.layer_done[request.layer()]) {
    return Violation(what, "accepted a layer of a token step the model holds not open or done");
  }
  TokenStepModel& ts = it->second;
  ts.layer_done[request.layer()] = true;
  if (++ts.layers_done == shape_.num_layers) {
    for (uint64_t row : ts.rows) {
      auto s = ready_.find(row);
      if (s != ready_.end() && s->second.token_step == id) s->second.token_step = 0;
    }
    retained_.emplace_back(id, std::move(ts.rows));
    while (static_cast<int32_t>(retained_.size()) > engine::EngineOptions{}.retained_token_steps) {
      retained_.pop_front();
    }
    open_steps_.erase(it);
  }
  return absl::OkStatus();
}

absl::Status RequestFuzzer::ApplyRelease(const std::vector<uint64_t>& ids, const std::string& what) {
  for (uint64_t id : ids) {
    auto it = ready_.find(id);
    if (it == ready_.end()) {
      return Violation(what, absl::StrCat("released sequence ", id, ", which the model holds unknown or writing"));
    }
    if (it->second.token_step != 0) AbortTokenStepModel(it->second.token_step);
    ready_.erase(id);
  }
  return absl::OkStatus();
}

void RequestFuzzer::AbortTokenStepModel(uint64_t id) {
  auto it = open_steps_.find(id);
  if (it == open_steps_.end()) return;
  for (uint64_t row : it->second.rows) {
    auto s = ready_.find(row);
    if (s == ready_.end() || s->second.token_step != id) continue;
    --s->second.tokens;
    s->second.token_step = 0;
  }
  open_steps_.erase(it);
}

uint64_t RequestFuzzer::FreshTokenStep() {
  // Mutated bytes may have begun a token step with an id the counter has not reached yet; the
  // engine remembers completed ids, so a reused one would be refused.
  while (used_token_steps_.contains(next_token_step_)) ++next_token_step_;
  return next_token_step_++;
}

uint64_t RequestFuzzer::FreshSeq() {
  // Mutated bytes may have created a sequence with an id the counter has not reached yet.
  while (ready_.contains(next_seq_) || writing_.contains(next_seq_)) ++next_seq_;
  return next_seq_++;
}

std::vector<uint64_t> RequestFuzzer::ReadySeqs(bool unlocked_only) const {
  std::vector<uint64_t> ids;
  for (const auto& [id, seq] : ready_) {
    if (!unlocked_only || seq.token_step == 0) ids.push_back(id);
  }
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Valid requests

void RequestFuzzer::FillStepTensors(v1::StepRequest* request) {
  std::string q, k, v;
  for (uint64_t row : request->rows()) {
    auto it = ready_.find(row);
    const int64_t position = it == ready_.end() ? 0 : it->second.tokens;
    gen_.AppendQ(row, request->layer(), position, &q);
    gen_.AppendKv(row, request->layer(), position, 1, &k, &v);
  }
  const int64_t b = request->rows_size();
  SetTensor(request->mutable_q(), shape_, {b, shape_.num_q_heads, shape_.head_dim}, std::move(q));
  SetTensor(request->mutable_k(), shape_, {b, shape_.num_kv_heads, shape_.head_dim}, std::move(k));
  SetTensor(request->mutable_v(), shape_, {b, shape_.num_kv_heads, shape_.head_dim}, std::move(v));
}

void RequestFuzzer::FillChunkTensors(v1::KVChunk* chunk, uint64_t seq) {
  const int64_t n = chunk->num_tokens();
  // The data's token positions only need to be plausible (the offset may be mutated to extremes).
  const int64_t position = chunk->token_offset() >= 0 && chunk->token_offset() <= kMaxPromptTokens ? chunk->token_offset() : 0;
  std::string k, v;
  gen_.AppendKv(seq, chunk->layer(), position, n, &k, &v);
  SetTensor(chunk->mutable_k(), shape_, {n, shape_.num_kv_heads, shape_.head_dim}, std::move(k));
  SetTensor(chunk->mutable_v(), shape_, {n, shape_.num_kv_heads, shape_.head_dim}, std::move(v));
}

bool RequestFuzzer::MakeLayerZero(v1::StepRequest* request) {
  if (open_steps_.size() >= kValidOpenTokenSteps) return false;
  std::vector<uint64_t> candidates = ReadySeqs(/*unlocked_only=*/true);
  std::shuffle(candidates.begin(), candidates.end(), rng_);
  int64_t available = PredictedFreePages();
  std::vector<uint64_t> free;
  if (Chance(0.2)) {
    for (uint64_t n = 1 + Below(2); n > 0 && !candidates.empty(); --n) {
      free.push_back(candidates.back());
      available += PagesFor(ready_[candidates.back()].tokens);
      candidates.pop_back();
    }
  }
  std::vector<uint64_t> open;
  if (Chance(0.2)) {
    for (uint64_t n = 1 + Below(2); n > 0; --n) open.push_back(FreshSeq());
  }
  // Rows: opened sequences (mostly), then existing ones, while their new pages fit.
  std::vector<uint64_t> rows;
  for (uint64_t o : open) {
    if (Chance(0.8) && available >= 1) {
      rows.push_back(o);
      available -= 1;
    }
  }
  const size_t want = Below(max_batch_ + 1);
  for (uint64_t id : candidates) {
    if (rows.size() >= want) break;
    const int64_t t = ready_[id].tokens;
    const int64_t need = PagesFor(t + 1) - PagesFor(t);
    if (need > available) continue;
    available -= need;
    rows.push_back(id);
  }
  std::shuffle(rows.begin(), rows.end(), rng_);
  request->Clear();
  request->set_token_step_id(FreshTokenStep());
  request->set_layer(0);
  for (uint64_t id : rows) request->add_rows(id);
  for (uint64_t id : open) request->add_open(id);
  for (uint64_t id : free) request->add_free(id);
  request->set_want_lse(Chance(0.3));
  FillStepTensors(request);
  return true;
}

bool RequestFuzzer::MakeLaterLayer(v1::StepRequest* request) {
  if (open_steps_.empty()) return false;
  auto it = open_steps_.begin();
  std::advance(it, Below(open_steps_.size()));
  const TokenStepModel& ts = it->second;
  std::vector<int32_t> left;
  for (int32_t l = 0; l < shape_.num_layers; ++l) {
    if (!ts.layer_done[l]) left.push_back(l);
  }
  request->Clear();
  request->set_token_step_id(it->first);
  // Layers run in order: a valid later layer is the first one not yet run.
  request->set_layer(left.front());
  for (uint64_t id : ts.rows) request->add_rows(id);
  request->set_want_lse(Chance(0.3));
  FillStepTensors(request);
  return true;
}

bool RequestFuzzer::MakeRetry(v1::StepRequest* request) {
  std::vector<std::pair<uint64_t, const std::vector<uint64_t>*>> done;  // token step, rows
  std::vector<int32_t> layers;
  for (const auto& [id, rows] : retained_) {
    done.emplace_back(id, &rows);
    layers.push_back(static_cast<int32_t>(Below(shape_.num_layers)));
  }
  for (const auto& [id, ts] : open_steps_) {
    for (int32_t l = 0; l < shape_.num_layers; ++l) {
      if (!ts.layer_done[l]) continue;
      done.emplace_back(id, &ts.rows);
      layers.push_back(l);
    }
  }
  if (done.empty()) return false;
  const size_t pick = Below(done.size());
  request->Clear();
  request->set_token_step_id(done[pick].first);
  request->set_layer(layers[pick]);
  for (uint64_t id : *done[pick].second) request->add_rows(id);
  request->set_want_lse(Chance(0.3));
  FillStepTensors(request);
  return true;
}

bool RequestFuzzer::MakeHeader(v1::WriteKVRequest* request) {
  const int64_t max_tokens = std::min(PredictedFreePages() * shape_.page_size, kMaxPromptTokens);
  if (max_tokens < 1) return false;
  request->Clear();
  request->mutable_header()->set_sequence_id(FreshSeq());
  request->mutable_header()->set_num_tokens(1 + static_cast<int64_t>(Below(max_tokens)));
  return true;
}

bool RequestFuzzer::MakeChunk(const Stream& stream, v1::WriteKVRequest* request) {
  if (!stream.begun || stream.committed) return false;
  std::vector<int32_t> open_layers;
  for (int32_t l = 0; l < shape_.num_layers; ++l) {
    if (stream.covered[l] < stream.tokens) open_layers.push_back(l);
  }
  const int32_t layer = open_layers.empty() || Chance(0.05) ? static_cast<int32_t>(Below(shape_.num_layers))
                                                            : open_layers[Below(open_layers.size())];
  const std::vector<bool>& written = stream.written[layer];
  int64_t offset = std::find(written.begin(), written.end(), false) - written.begin();
  if (offset == stream.tokens || Chance(0.2)) offset = static_cast<int64_t>(Below(stream.tokens));
  const int64_t n = 1 + static_cast<int64_t>(Below(std::min<int64_t>(stream.tokens - offset, 40)));
  request->Clear();
  v1::KVChunk* c = request->mutable_chunk();
  c->set_layer(layer);
  c->set_token_offset(offset);
  c->set_num_tokens(n);
  FillChunkTensors(c, stream.seq);
  return true;
}

bool RequestFuzzer::MakeRelease(v1::ReleaseRequest* request) {
  std::vector<uint64_t> ids = ReadySeqs(/*unlocked_only=*/Chance(0.7));
  if (ids.empty()) return false;
  std::shuffle(ids.begin(), ids.end(), rng_);
  request->Clear();
  for (size_t i = 0, n = 1 + Below(std::min<size_t>(ids.size(), 3)); i < n; ++i) {
    request->add_sequence_ids(ids[i]);
  }
  return true;
}

absl::Status RequestFuzzer::ValidStep() {
  v1::StepRequest request;
  const uint64_t r = Below(10);
  if (r < 5 && MakeLaterLayer(&request)) return SendStep(request, Expect::kOk);
  if (r < 9 && MakeLayerZero(&request)) return SendStep(request, Expect::kOk);
  if (MakeRetry(&request)) {
    v1::StepResponse response;
    PKV_RETURN_IF_ERROR(SendStep(request, Expect::kOk, &response));
    if (!response.replayed()) return Violation(Describe(request), "a retried layer-step was not replayed");
    return absl::OkStatus();
  }
  if (MakeLaterLayer(&request)) return SendStep(request, Expect::kOk);
  return absl::OkStatus();
}

absl::Status RequestFuzzer::ValidStreamMessage() {
  if (streams_.empty() || (streams_.size() < kMaxStreams && Chance(0.15))) {
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->session = std::make_unique<service::PromptSession>(*engine_);
  }
  const size_t index = Below(streams_.size());
  Stream& stream = *streams_[index];
  if (stream.committed) {
    // One more message on a committed stream must be refused; then the stream is done.
    const Stream* done = &stream;
    if (Chance(0.5)) {
      v1::WriteKVRequest late;
      if (!MakeChunk(stream, &late) && !MakeHeader(&late)) late.mutable_header()->set_num_tokens(1);
      PKV_RETURN_IF_ERROR(SendWriteKv(index, late, Expect::kNotOk));
    }
    // SendWriteKv may have dropped it already.
    auto it = std::find_if(streams_.begin(), streams_.end(), [&](const auto& s) { return s.get() == done; });
    if (it != streams_.end()) streams_.erase(it);
    return absl::OkStatus();
  }
  if (!stream.begun) {
    v1::WriteKVRequest header;
    if (!MakeHeader(&header)) return AbortStream(index);
    return SendWriteKv(index, header, Expect::kOk);
  }
  if (Chance(0.03)) return AbortStream(index);  // the client cut the stream
  bool complete = true;
  for (int64_t c : stream.covered) complete = complete && c == stream.tokens;
  if (complete && Chance(0.8)) return SendCommit(index, Expect::kOk);
  v1::WriteKVRequest chunk;
  if (!MakeChunk(stream, &chunk)) return absl::OkStatus();
  return SendWriteKv(index, chunk, Expect::kOk);
}

absl::Status RequestFuzzer::ValidRelease() {
  v1::ReleaseRequest request;
  if (!MakeRelease(&request)) return absl::OkStatus();
  return SendRelease(request, Expect::kOk);
}

absl::Status RequestFuzzer::Housekeeping() {
  while (streams_.size() > kMaxStreams) {
    // Drop the stream with the least written, keeping the prompts that are getting somewhere.
    size_t least = 0;
    int64_t least_written = std::numeric_limits<int64_t>::max();
    for (size_t i = 0; i < streams_.size(); ++i) {
      int64_t written = streams_[i]->begun ? 1 : 0;
      for (int64_t c : streams_[i]->covered) written += c;
      if (written < least_written) {
        least = i;
        least_written = written;
      }
    }
    PKV_RETURN_IF_ERROR(AbortStream(least));
  }
  if (ready_.size() + writing_.size() <= kMaxSequences && PredictedFreePages() >= 3) return absl::OkStatus();
  // Too many sequences or too few free pages: release half of the steppable sequences.
  std::vector<uint64_t> ids = ReadySeqs(/*unlocked_only=*/false);
  std::shuffle(ids.begin(), ids.end(), rng_);
  ids.resize((ids.size() + 1) / 2);
  if (ids.empty()) return absl::OkStatus();
  v1::ReleaseRequest request;
  for (uint64_t id : ids) request.add_sequence_ids(id);
  return SendRelease(request, Expect::kOk);
}

// ---------------------------------------------------------------------------------------------
// Mutated requests

int64_t RequestFuzzer::ExtremeInt64(int64_t near) {
  const int64_t page = shape_.page_size;
  const int64_t values[] = {kInt64Max,      kInt64Min,     kInt64Max - (page - 2), kInt64Max - (page - 1),
                            kInt64Max - page, -1,          0,                      1,
                            near,           near + 1,      near - 1,               kInt32Max,
                            int64_t{kInt32Max} + 1,        kInt32Min,              int64_t{1} << 40,
                            static_cast<int64_t>(rng_())};
  return values[Below(std::size(values))];
}

uint64_t RequestFuzzer::InterestingSeqId() {
  switch (Below(7)) {
    case 0: {
      std::vector<uint64_t> ids = ReadySeqs(/*unlocked_only=*/false);
      if (!ids.empty()) return ids[Below(ids.size())];
      break;
    }
    case 1:
      if (!writing_.empty()) {
        auto it = writing_.begin();
        std::advance(it, Below(writing_.size()));
        return it->first;
      }
      break;
    case 2:
      return 0;
    case 3:
      return std::numeric_limits<uint64_t>::max();
    case 4:
      return rng_();
    case 5:
      return next_seq_ > 1 ? Below(next_seq_) : 0;  // likely released before
    default:
      break;
  }
  return FreshSeq();
}

void RequestFuzzer::MutateIdList(google::protobuf::RepeatedField<uint64_t>* ids) {
  switch (Below(7)) {
    case 0:
      ids->Add(InterestingSeqId());
      break;
    case 1:
      if (!ids->empty()) ids->Add(ids->Get(static_cast<int>(Below(ids->size()))));
      break;
    case 2:
      if (!ids->empty()) {
        const int at = static_cast<int>(Below(ids->size()));
        ids->erase(ids->begin() + at);
      }
      break;
    case 3:
      if (!ids->empty()) ids->Set(static_cast<int>(Below(ids->size())), InterestingSeqId());
      break;
    case 4: {
      // A long run (bounded to keep the engine small): fresh ids, repeats or existing ones.
      const int64_t n = kMaxBatch + 1 + static_cast<int64_t>(Below(kLongListMax - kMaxBatch));
      const uint64_t style = Below(3);
      const uint64_t repeated = InterestingSeqId();
      for (int64_t i = 0; i < n; ++i) {
        ids->Add(style == 0 ? FreshSeq() : style == 1 ? repeated : InterestingSeqId());
      }
      break;
    }
    case 5:
      ids->Clear();
      break;
    default:
      if (ids->size() >= 2) std::swap(ids->at(0), ids->at(ids->size() - 1));
      break;
  }
}

void RequestFuzzer::MutateTensor(v1::Tensor* tensor) {
  switch (Below(10)) {
    case 0: {
      const int dtypes[] = {v1::DTYPE_UNSPECIFIED, v1::DTYPE_FP16, v1::DTYPE_BF16, v1::DTYPE_FP32, 99, -1};
      tensor->set_dtype(static_cast<v1::DType>(dtypes[Below(std::size(dtypes))]));
      break;
    }
    case 1:
      tensor->add_shape(Chance(0.5) ? 1 : ExtremeInt64(2));
      break;
    case 2:
      if (tensor->shape_size() > 0) tensor->mutable_shape()->RemoveLast();
      break;
    case 3:
      if (tensor->shape_size() > 0) {
        tensor->set_shape(static_cast<int>(Below(tensor->shape_size())), ExtremeInt64(tensor->shape(0)));
      }
      break;
    case 4:
      tensor->mutable_data()->resize(tensor->data().size() - std::min<size_t>(tensor->data().size(), 1 + Below(2)));
      break;
    case 5:
      tensor->mutable_data()->append(1 + Below(2), '\x3c');
      break;
    case 6:
      tensor->clear_data();
      break;
    case 7: {
      // The right length, but non-finite or garbage elements (inf, NaN, -0, max).
      const uint16_t patterns[] = {0x7c00, 0x7e00, 0xfc00, 0x8000, 0x7bff, 0xffff};
      std::string* data = tensor->mutable_data();
      for (size_t i = 0; i + 1 < data->size(); i += 2) {
        const uint16_t p = Chance(0.5) ? patterns[Below(std::size(patterns))] : static_cast<uint16_t>(rng_());
        std::memcpy(data->data() + i, &p, 2);
      }
      break;
    }
    case 8:
      tensor->clear_shape();
      break;
    default:
      tensor->Clear();
      break;
  }
}

void RequestFuzzer::MutateStep(v1::StepRequest* request) {
  switch (Below(12)) {
    case 0: {
      std::vector<uint64_t> ids = {0, 1, std::numeric_limits<uint64_t>::max(), FreshTokenStep(), rng_()};
      for (const auto& [id, ts] : open_steps_) ids.push_back(id);
      for (const auto& [id, rows] : retained_) ids.push_back(id);
      request->set_token_step_id(ids[Below(ids.size())]);
      break;
    }
    case 1: {
      const int32_t layers[] = {-1, shape_.num_layers, shape_.num_layers + 1, kInt32Max, kInt32Min,
                                static_cast<int32_t>(Below(shape_.num_layers))};
      request->set_layer(layers[Below(std::size(layers))]);
      break;
    }
    case 2:
    case 3:
      MutateIdList(request->mutable_rows());
      break;
    case 4:
      MutateIdList(request->mutable_open());
      break;
    case 5:
      MutateIdList(request->mutable_free());
      break;
    case 6:
      MutateTensor(request->mutable_q());
      break;
    case 7:
      MutateTensor(request->mutable_k());
      break;
    case 8:
      MutateTensor(request->mutable_v());
      break;
    case 9:
      request->set_want_lse(!request->want_lse());
      break;
    case 10:
      // Overlapping deltas: a row also opened or freed.
      if (request->rows_size() > 0) {
        const uint64_t row = request->rows(static_cast<int>(Below(request->rows_size())));
        if (Chance(0.5)) request->add_open(row);
        else request->add_free(row);
      }
      break;
    default:
      request->clear_rows();
      break;
  }
}

void RequestFuzzer::MutateHeader(v1::WriteKVHeader* header) {
  if (Chance(0.4)) header->set_sequence_id(InterestingSeqId());
  if (Chance(0.7)) header->set_num_tokens(ExtremeInt64(PredictedFreePages() * shape_.page_size));
}

void RequestFuzzer::MutateChunk(v1::KVChunk* chunk, int64_t prompt_tokens) {
  switch (Below(7)) {
    case 0: {
      const int32_t layers[] = {-1, shape_.num_layers, kInt32Max, kInt32Min,
                                static_cast<int32_t>(Below(shape_.num_layers))};
      chunk->set_layer(layers[Below(std::size(layers))]);
      break;
    }
    case 1:
      // One past the last offset that fits, wrapping like the wire's int64 when num_tokens is extreme.
      chunk->set_token_offset(Chance(0.5) ? static_cast<int64_t>(static_cast<uint64_t>(prompt_tokens) -
                                                                 static_cast<uint64_t>(chunk->num_tokens()) + 1)
                                          : ExtremeInt64(prompt_tokens));
      break;
    case 2:
    case 3: {
      chunk->set_num_tokens(ExtremeInt64(prompt_tokens));
      // Half the time with matching tensors, so that the range check (not the shape) decides.
      const int64_t n = chunk->num_tokens();
      if (n >= 1 && n <= kMaxPromptTokens && Chance(0.5)) FillChunkTensors(chunk, 0);
      break;
    }
    case 4:
      MutateTensor(chunk->mutable_k());
      break;
    case 5:
      MutateTensor(chunk->mutable_v());
      break;
    default:
      chunk->set_token_offset(ExtremeInt64(prompt_tokens));
      chunk->set_num_tokens(ExtremeInt64(prompt_tokens));
      break;
  }
}

void RequestFuzzer::MutateBytes(std::string* bytes) {
  switch (Below(8)) {
    case 0:
      if (!bytes->empty()) (*bytes)[Below(bytes->size())] ^= static_cast<char>(1u << Below(8));
      break;
    case 1: {
      const char values[] = {'\x00', '\xff', '\x7f', '\x80', static_cast<char>(rng_())};
      if (!bytes->empty()) (*bytes)[Below(bytes->size())] = values[Below(std::size(values))];
      break;
    }
    case 2: {
      std::string insert(1 + Below(8), '\0');
      for (char& c : insert) c = static_cast<char>(rng_());
      bytes->insert(Below(bytes->size() + 1), insert);
      break;
    }
    case 3:
      if (!bytes->empty()) {
        const size_t at = Below(bytes->size());
        bytes->erase(at, 1 + Below(std::min<size_t>(bytes->size() - at, 16)));
      }
      break;
    case 4:
      bytes->resize(Below(bytes->size() + 1));
      break;
    case 5:
      if (!bytes->empty() && bytes->size() < 64 * 1024) {
        // Repeat a slice: fields appear twice (repeated fields grow, messages merge).
        const size_t at = Below(bytes->size());
        bytes->append(bytes->substr(at, 1 + Below(std::min<size_t>(bytes->size() - at, 64))));
      }
      break;
    case 6:
      if (bytes->size() < 64 * 1024) bytes->append(*bytes);  // the message merged with itself
      break;
    default:
      // A ten-byte varint at a random place: the largest values a field can carry.
      bytes->insert(Below(bytes->size() + 1), std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 10));
      break;
  }
}

absl::Status RequestFuzzer::MutatedStep() {
  v1::StepRequest request;
  const uint64_t r = Below(3);
  if (!(r == 0 && MakeLaterLayer(&request)) && !(r == 1 && MakeRetry(&request)) && !MakeLayerZero(&request)) {
    request.set_token_step_id(FreshTokenStep());
    FillStepTensors(&request);
  }
  for (uint64_t n = 1 + Below(3); n > 0; --n) MutateStep(&request);
  // Half the time the tensors match the (mutated) rows, so that the engine's checks decide.
  if (Chance(0.5) && request.rows_size() <= 4 * kMaxBatch) FillStepTensors(&request);
  return SendStep(request, Expect::kAny);
}

absl::Status RequestFuzzer::MutatedStreamMessage() {
  const uint64_t r = Below(10);
  if (r < 5) {
    // A mutated header on a new stream.
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->session = std::make_unique<service::PromptSession>(*engine_);
    const size_t index = streams_.size() - 1;
    v1::WriteKVRequest request;
    if (!MakeHeader(&request)) request.mutable_header()->set_sequence_id(FreshSeq());
    MutateHeader(request.mutable_header());
    return SendWriteKv(index, request, Expect::kAny);  // a refused header leaves an empty stream
  }
  std::vector<size_t> begun;
  for (size_t i = 0; i < streams_.size(); ++i) {
    if (streams_[i]->begun && !streams_[i]->committed) begun.push_back(i);
  }
  if (r < 7 && !begun.empty()) {
    const size_t index = begun[Below(begun.size())];
    v1::WriteKVRequest request;
    MakeChunk(*streams_[index], &request);
    for (uint64_t n = 1 + Below(2); n > 0; --n) MutateChunk(request.mutable_chunk(), streams_[index]->tokens);
    return SendWriteKv(index, request, Expect::kAny);
  }
  // Out of order: a chunk or an empty message before any header, a second header, an early
  // commit.
  streams_.push_back(std::make_unique<Stream>());
  streams_.back()->session = std::make_unique<service::PromptSession>(*engine_);
  size_t index = streams_.size() - 1;
  if (!begun.empty() && Chance(0.4)) index = begun[Below(begun.size())];
  switch (Below(4)) {
    case 0: {
      v1::WriteKVRequest request;
      request.mutable_chunk()->set_num_tokens(1);
      FillChunkTensors(request.mutable_chunk(), 0);
      return SendWriteKv(index, request, streams_[index]->begun ? Expect::kAny : Expect::kNotOk);
    }
    case 1:
      return SendWriteKv(index, v1::WriteKVRequest{}, Expect::kNotOk);
    case 2: {
      v1::WriteKVRequest request;
      request.mutable_header()->set_sequence_id(FreshSeq());
      request.mutable_header()->set_num_tokens(1);
      return SendWriteKv(index, request, streams_[index]->begun ? Expect::kNotOk : Expect::kAny);
    }
    default:
      return SendCommit(index, Expect::kAny);
  }
}

absl::Status RequestFuzzer::MutatedRelease() {
  v1::ReleaseRequest request;
  MakeRelease(&request);
  for (uint64_t n = 1 + Below(2); n > 0; --n) MutateIdList(request.mutable_sequence_ids());
  return SendRelease(request, Expect::kAny);
}

absl::Status RequestFuzzer::RawBytes() {
  const auto kind = static_cast<MessageKind>(Below(3));
  std::string bytes;
  if (Chance(0.25)) {
    bytes.resize(Below(97));
    for (char& c : bytes) c = static_cast<char>(rng_());
    return Feed(kind, bytes);
  }
  switch (kind) {
    case MessageKind::kStep: {
      v1::StepRequest request;
      if (!MakeLaterLayer(&request) && !MakeLayerZero(&request)) request.set_token_step_id(1);
      bytes = request.SerializeAsString();
      break;
    }
    case MessageKind::kWriteKv: {
      v1::WriteKVRequest request;
      const size_t index = CurrentStream();
      if (!MakeChunk(*streams_[index], &request) && !MakeHeader(&request)) request.mutable_header();
      bytes = request.SerializeAsString();
      break;
    }
    case MessageKind::kRelease: {
      v1::ReleaseRequest request;
      MakeRelease(&request);
      bytes = request.SerializeAsString();
      break;
    }
  }
  for (uint64_t n = 1 + Below(4); n > 0; --n) MutateBytes(&bytes);
  return Feed(kind, bytes);
}

}  // namespace pkv::fuzz
