#include "client/kv_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/dtype.h"

namespace pkv::client {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

uint64_t Mix(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Standard-normal quantiles at (i + 0.5) / 65536, by bisection on the CDF (computed once).
const std::vector<double>& NormalQuantiles() {
  static const std::vector<double> table = [] {
    std::vector<double> q(65536);
    for (int i = 0; i < 32768; ++i) {
      const double p = (i + 0.5) / 65536.0;
      double lo = -10.0, hi = 0.0;
      for (int it = 0; it < 45; ++it) {
        const double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
      }
      q[i] = 0.5 * (lo + hi);
      q[65535 - i] = -q[i];
    }
    return q;
  }();
  return table;
}

// Appends `n` elements of the row with key `key` (elements 0..n-1 of its stream) as raw dtype
// bits through `raw` (the quantile table): one SplitMix64 output per four elements, written
// straight into the string's storage (little-endian, as on the wire).
template <typename Table, typename Put>
void ForEachRowElement(uint64_t key, int64_t n, const Table& table, Put put) {
  int64_t i = 0;
  for (uint64_t word_index = 1; i < n; ++word_index) {
    const uint64_t word = Mix(key + word_index * kGamma);
    for (int lane = 0; lane < 4 && i < n; ++lane, ++i) put(i, table[(word >> (16 * lane)) & 0xFFFFu]);
  }
}

void AppendRawRow(std::string* out, uint64_t key, int64_t n, const std::vector<uint16_t>& raw) {
  const size_t at = out->size();
  out->resize(at + 2 * static_cast<size_t>(n));
  char* dst = out->data() + at;
  ForEachRowElement(key, n, raw, [dst](int64_t i, uint16_t bits) {
    dst[2 * i] = static_cast<char>(bits & 0xFF);
    dst[2 * i + 1] = static_cast<char>(bits >> 8);
  });
}

}  // namespace

KvDataGen::KvDataGen(const ModelShape& shape, uint64_t seed) : shape_(shape), seed_(seed) {
  const std::vector<double>& q = NormalQuantiles();
  raw_.resize(q.size());
  value_.resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    raw_[i] = FromFloat(shape_.dtype, static_cast<float>(q[i]));
    value_[i] = ToFloat(shape_.dtype, raw_[i]);
  }
}

uint64_t KvDataGen::RowKey(DataKind t, uint64_t seq, int32_t layer, int64_t token) const {
  uint64_t key = Mix(seed_ ^ (static_cast<uint64_t>(t) << 60));
  key = Mix(key ^ seq);
  return Mix(key ^ (static_cast<uint64_t>(layer) << 40) ^ static_cast<uint64_t>(token));
}

uint32_t KvDataGen::BitsAt(uint64_t key, int64_t index) {
  // The (index / 4)-th output of a SplitMix64 stream from the row's key (random access: output
  // n is Mix(key + (n + 1) * gamma)); each output gives four 16-bit lanes.
  const uint64_t word = Mix(key + (static_cast<uint64_t>(index / 4) + 1) * kGamma);
  return static_cast<uint32_t>(word >> (16 * (index % 4))) & 0xFFFFu;
}

uint32_t KvDataGen::Bits(DataKind t, uint64_t seq, int32_t layer, int64_t token, int64_t index) const {
  return BitsAt(RowKey(t, seq, layer, token), index);
}

uint16_t KvDataGen::Raw(DataKind t, uint64_t seq, int32_t layer, int64_t token, int32_t head,
                        int32_t dim) const {
  return raw_[Bits(t, seq, layer, token, static_cast<int64_t>(head) * shape_.head_dim + dim)];
}

double KvDataGen::Value(DataKind t, uint64_t seq, int32_t layer, int64_t token, int32_t head,
                        int32_t dim) const {
  return value_[Bits(t, seq, layer, token, static_cast<int64_t>(head) * shape_.head_dim + dim)];
}

void KvDataGen::AppendKv(uint64_t seq, int32_t layer, int64_t token, int64_t n, std::string* k,
                         std::string* v) const {
  const int64_t row = static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim;
  k->reserve(k->size() + 2 * n * row);
  v->reserve(v->size() + 2 * n * row);
  for (int64_t t = token; t < token + n; ++t) {
    AppendRawRow(k, RowKey(DataKind::kK, seq, layer, t), row, raw_);
    AppendRawRow(v, RowKey(DataKind::kV, seq, layer, t), row, raw_);
  }
}

void KvDataGen::AppendQ(uint64_t seq, int32_t layer, int64_t token, std::string* q) const {
  const int64_t row = static_cast<int64_t>(shape_.num_q_heads) * shape_.head_dim;
  AppendRawRow(q, RowKey(DataKind::kQ, seq, layer, token), row, raw_);
}

std::vector<double> KvDataGen::History(DataKind t, uint64_t seq, int32_t layer, int64_t len) const {
  const int64_t row = static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim;
  std::vector<double> out;
  out.reserve(len * row);
  out.resize(static_cast<size_t>(len) * row);
  for (int64_t tok = 0; tok < len; ++tok) {
    double* dst = out.data() + static_cast<size_t>(tok) * row;
    ForEachRowElement(RowKey(t, seq, layer, tok), row, value_, [dst](int64_t i, double x) { dst[i] = x; });
  }
  return out;
}

std::vector<double> KvDataGen::Query(uint64_t seq, int32_t layer, int64_t token) const {
  const int64_t row = static_cast<int64_t>(shape_.num_q_heads) * shape_.head_dim;
  std::vector<double> out;
  out.reserve(row);
  const uint64_t key = RowKey(DataKind::kQ, seq, layer, token);
  for (int64_t i = 0; i < row; ++i) out.push_back(value_[BitsAt(key, i)]);
  return out;
}

void ReferenceDecode(const ModelShape& shape, const std::vector<double>& q,
                     const std::vector<double>& k, const std::vector<double>& v, int64_t len,
                     std::vector<double>* out, std::vector<double>* lse) {
  const int32_t hq = shape.num_q_heads, hkv = shape.num_kv_heads, d = shape.head_dim;
  const int32_t group = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  out->assign(static_cast<size_t>(hq) * d, 0.0);
  if (lse != nullptr) lse->assign(hq, -std::numeric_limits<double>::infinity());
  std::vector<double> scores(len);
  for (int32_t h = 0; h < hq; ++h) {
    const int32_t kvh = h / group;
    const double* qh = &q[static_cast<size_t>(h) * d];
    double max_score = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < len; ++t) {
      const double* kt = &k[(static_cast<size_t>(t) * hkv + kvh) * d];
      double dot = 0.0;
      for (int32_t i = 0; i < d; ++i) dot += qh[i] * kt[i];
      scores[t] = dot * scale;
      max_score = std::max(max_score, scores[t]);
    }
    if (len == 0) continue;
    double sum = 0.0;
    for (int64_t t = 0; t < len; ++t) {
      scores[t] = std::exp(scores[t] - max_score);
      sum += scores[t];
    }
    double* oh = &(*out)[static_cast<size_t>(h) * d];
    for (int64_t t = 0; t < len; ++t) {
      const double* vt = &v[(static_cast<size_t>(t) * hkv + kvh) * d];
      const double p = scores[t] / sum;
      for (int32_t i = 0; i < d; ++i) oh[i] += p * vt[i];
    }
    if (lse != nullptr) (*lse)[h] = max_score + std::log(sum);
  }
}

double MaxRelativeError(const ModelShape& shape, const char* got, const std::vector<double>& want) {
  const int32_t hq = shape.num_q_heads, d = shape.head_dim;
  double worst = 0.0;
  for (int32_t h = 0; h < hq; ++h) {
    double ref_max = 1e-3;
    for (int32_t i = 0; i < d; ++i) ref_max = std::max(ref_max, std::abs(want[h * d + i]));
    for (int32_t i = 0; i < d; ++i) {
      uint16_t raw;
      std::memcpy(&raw, got + 2 * (static_cast<size_t>(h) * d + i), 2);
      const double g = ToFloat(shape.dtype, raw);
      const double err = std::isfinite(g) ? std::abs(g - want[h * d + i]) / ref_max
                                          : std::numeric_limits<double>::infinity();
      worst = std::max(worst, err);
    }
  }
  return worst;
}

double Tolerance(const ModelShape& shape) { return shape.dtype == DType::kF16 ? 1e-2 : 3e-2; }

}  // namespace pkv::client
