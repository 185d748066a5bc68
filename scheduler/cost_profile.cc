#include "scheduler/cost_profile.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <variant>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pkv::scheduler {
namespace {

// A minimal JSON reader for profiles: objects, strings, numbers, true/false/null and arrays
// (skipped). Nested object keys are flattened with '.' ("shape.head_dim").
class FlatJsonReader {
 public:
  using Value = std::variant<double, std::string>;

  explicit FlatJsonReader(const std::string& text) : s_(text) {}

  absl::Status Parse(std::map<std::string, Value>* out) {
    out_ = out;
    SkipWs();
    if (!ParseValue("")) return Error();
    SkipWs();
    if (pos_ != s_.size()) return absl::InvalidArgumentError(absl::StrCat("profile JSON: trailing text at offset ", pos_));
    return absl::OkStatus();
  }

 private:
  absl::Status Error() const {
    return absl::InvalidArgumentError(absl::StrCat("profile JSON: syntax error at offset ", pos_));
  }
  void SkipWs() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool Consume(char c) {
    SkipWs();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ParseString(std::string* out) {
    if (!Consume('"')) return false;
    out->clear();
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\' && pos_ + 1 < s_.size()) ++pos_;  // keep escaped char verbatim
      out->push_back(s_[pos_++]);
    }
    if (pos_ >= s_.size()) return false;
    ++pos_;
    return true;
  }
  bool ParseValue(const std::string& key) {
    SkipWs();
    if (pos_ >= s_.size()) return false;
    const char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      if (Consume('}')) return true;
      do {
        std::string name;
        if (!ParseString(&name) || !Consume(':')) return false;
        if (!ParseValue(key.empty() ? name : key + "." + name)) return false;
      } while (Consume(','));
      return Consume('}');
    }
    if (c == '[') {  // arrays are not used by profiles: parse and drop
      ++pos_;
      if (Consume(']')) return true;
      do {
        if (!ParseValue(key + "[]")) return false;
      } while (Consume(','));
      return Consume(']');
    }
    if (c == '"') {
      std::string v;
      if (!ParseString(&v)) return false;
      (*out_)[key] = v;
      return true;
    }
    for (const char* lit : {"true", "false", "null"}) {
      const std::string l(lit);
      if (s_.compare(pos_, l.size(), l) == 0) {
        pos_ += l.size();
        if (l != "null") (*out_)[key] = l == "true" ? 1.0 : 0.0;
        return true;
      }
    }
    const char* begin = s_.c_str() + pos_;
    char* end = nullptr;
    const double v = std::strtod(begin, &end);
    if (end == begin) return false;
    pos_ += static_cast<size_t>(end - begin);
    (*out_)[key] = v;
    return true;
  }

  const std::string& s_;
  size_t pos_ = 0;
  std::map<std::string, Value>* out_ = nullptr;
};

}  // namespace

absl::Status CostProfile::Matches(const ModelShape& shape) const {
  if (num_q_heads == 0) return absl::OkStatus();
  if (num_q_heads != shape.num_q_heads || num_kv_heads != shape.num_kv_heads ||
      head_dim != shape.head_dim || page_size != shape.page_size || dtype != DTypeName(shape.dtype)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "calibration profile is for hq=", num_q_heads, " hkv=", num_kv_heads, " d=", head_dim,
        " page=", page_size, " ", dtype, ", the worker serves ", shape.DebugString()));
  }
  return absl::OkStatus();
}

CostProfile DefaultCostProfile() { return CostProfile{}; }

absl::StatusOr<CostProfile> ParseCostProfile(const std::string& json) {
  std::map<std::string, FlatJsonReader::Value> kv;
  FlatJsonReader reader(json);
  if (auto s = reader.Parse(&kv); !s.ok()) return s;
  auto num = [&](const std::string& key, double* out) -> absl::Status {
    auto it = kv.find(key);
    if (it == kv.end() || !std::holds_alternative<double>(it->second)) {
      return absl::InvalidArgumentError(absl::StrCat("profile: number '", key, "' missing"));
    }
    *out = std::get<double>(it->second);
    return absl::OkStatus();
  };
  auto str = [&](const std::string& key, std::string* out) -> absl::Status {
    auto it = kv.find(key);
    if (it == kv.end() || !std::holds_alternative<std::string>(it->second)) {
      return absl::InvalidArgumentError(absl::StrCat("profile: string '", key, "' missing"));
    }
    *out = std::get<std::string>(it->second);
    return absl::OkStatus();
  };
  std::string format;
  if (auto s = str("format", &format); !s.ok()) return s;
  if (format != "pkv-calibration-v1") {
    return absl::InvalidArgumentError(absl::StrCat("profile: format '", format, "' is not pkv-calibration-v1"));
  }
  CostProfile p;
  double sms = 0, hq = 0, hkv = 0, d = 0, ps = 0, res = 0;
  for (auto st : {str("gpu", &p.gpu), num("num_sms", &sms), num("shape.num_q_heads", &hq),
                  num("shape.num_kv_heads", &hkv), num("shape.head_dim", &d),
                  num("shape.page_size", &ps), str("shape.dtype", &p.dtype),
                  num("stream_read_gbps", &p.stream_read_gbps), num("cta_read_gbps", &p.cta_read_gbps),
                  num("resident_ctas_per_sm", &res), num("launch_us", &p.launch_us),
                  num("merge_gbps", &p.merge_gbps), num("task_us", &p.task_us)}) {
    if (!st.ok()) return st;
  }
  // Optional terms (profiles written before they existed stay valid).
  if (auto it = kv.find("split_stream_efficiency"); it != kv.end() && std::holds_alternative<double>(it->second)) {
    p.split_stream_efficiency = std::get<double>(it->second);
  }
  if (auto it = kv.find("wq_merge_us"); it != kv.end() && std::holds_alternative<double>(it->second)) {
    p.wq_merge_us = std::get<double>(it->second);
  }
  if (auto it = kv.find("wq_separate_merge_us"); it != kv.end() && std::holds_alternative<double>(it->second)) {
    p.wq_separate_merge_us = std::get<double>(it->second);
  }
  if (auto it = kv.find("ss_separate_merge_delta_us");
      it != kv.end() && std::holds_alternative<double>(it->second)) {
    p.ss_separate_merge_delta_us = std::get<double>(it->second);
  }
  if (p.split_stream_efficiency <= 0 || p.split_stream_efficiency > 1 || p.wq_merge_us < 0 ||
      p.wq_separate_merge_us < 0) {
    return absl::InvalidArgumentError(
        "profile: split_stream_efficiency must be in (0, 1], wq_merge_us and wq_separate_merge_us >= 0");
  }
  if (!(std::fabs(p.ss_separate_merge_delta_us) <= 1000)) {
    return absl::InvalidArgumentError("profile: ss_separate_merge_delta_us must be within [-1000, 1000] us");
  }
  p.num_sms = static_cast<int>(sms);
  p.num_q_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.page_size = static_cast<int>(ps);
  p.resident_ctas_per_sm = static_cast<int>(res);
  if (p.num_sms < 1 || p.resident_ctas_per_sm < 1 || p.stream_read_gbps <= 0 || p.cta_read_gbps <= 0 ||
      p.merge_gbps <= 0 || p.launch_us < 0 || p.task_us < 0) {
    return absl::InvalidArgumentError("profile: num_sms, resident_ctas_per_sm and bandwidths must be positive");
  }
  return p;
}

absl::StatusOr<CostProfile> LoadCostProfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open calibration profile ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto p = ParseCostProfile(ss.str());
  if (!p.ok()) return absl::Status(p.status().code(), absl::StrCat(path, ": ", p.status().message()));
  return p;
}

std::string CostProfileToJson(const CostProfile& p) {
  return absl::StrFormat(
      "{\n  \"format\": \"pkv-calibration-v1\",\n  \"gpu\": \"%s\",\n  \"num_sms\": %d,\n"
      "  \"shape\": {\"num_q_heads\": %d, \"num_kv_heads\": %d, \"head_dim\": %d, \"page_size\": %d, "
      "\"dtype\": \"%s\"},\n  \"stream_read_gbps\": %.2f,\n  \"cta_read_gbps\": %.3f,\n"
      "  \"resident_ctas_per_sm\": %d,\n  \"launch_us\": %.3f,\n  \"merge_gbps\": %.2f,\n"
      "  \"task_us\": %.4f,\n  \"split_stream_efficiency\": %.4f,\n  \"wq_merge_us\": %.3f,\n"
      "  \"wq_separate_merge_us\": %.3f,\n  \"ss_separate_merge_delta_us\": %.3f\n}\n",
      p.gpu, p.num_sms, p.num_q_heads, p.num_kv_heads, p.head_dim, p.page_size, p.dtype,
      p.stream_read_gbps, p.cta_read_gbps, p.resident_ctas_per_sm, p.launch_us, p.merge_gbps, p.task_us,
      p.split_stream_efficiency, p.wq_merge_us, p.wq_separate_merge_us, p.ss_separate_merge_delta_us);
}

}  // namespace pkv::scheduler
