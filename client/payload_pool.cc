#include "client/payload_pool.h"


#include "common/dtype.h"

namespace pkv::client {
namespace {

uint64_t Mix(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Appends row `row` of `table` (rows of `row_bytes` bytes) to *out.
void AppendRow(const std::string& table, int64_t row, size_t row_bytes, std::string* out) {
  out->append(table.data() + static_cast<size_t>(row) * row_bytes, row_bytes);
}

}  // namespace

PayloadPool::PayloadPool(const KvDataGen& gen, uint64_t seed, int64_t rows)
    : gen_(gen), shape_(gen.shape()), seed_(Mix(seed ^ 0x5041594C4F4144ull)), rows_(rows > 0 ? rows : 0) {
  value_.resize(65536);
  for (uint32_t raw = 0; raw < 65536; ++raw) value_[raw] = ToFloat(shape_.dtype, static_cast<uint16_t>(raw));
  if (rows_ == 0) return;
  const size_t q_row = static_cast<size_t>(shape_.num_q_heads) * shape_.head_dim * DTypeSize(shape_.dtype);
  const size_t kv_row = static_cast<size_t>(shape_.num_kv_heads) * shape_.head_dim * DTypeSize(shape_.dtype);
  q_.reserve(rows_ * q_row);
  k_.reserve(rows_ * kv_row);
  v_.reserve(rows_ * kv_row);
  // Row r is the generator's data of "sequence" r, layer 0, token 0.
  for (int64_t r = 0; r < rows_; ++r) {
    gen.AppendQ(static_cast<uint64_t>(r), 0, 0, &q_);
    gen.AppendKv(static_cast<uint64_t>(r), 0, 0, 1, &k_, &v_);
  }
}

int64_t PayloadPool::bytes() const {
  return static_cast<int64_t>(q_.size() + k_.size() + v_.size() + value_.size() * sizeof(double));
}

int64_t PayloadPool::RowOf(DataKind t, uint64_t seq, int32_t layer, int64_t token) const {
  uint64_t key = Mix(seed_ ^ (static_cast<uint64_t>(t) << 60) ^ seq);
  key = Mix(key ^ (static_cast<uint64_t>(layer) << 40) ^ static_cast<uint64_t>(token));
  return static_cast<int64_t>(key % static_cast<uint64_t>(rows_));
}

const std::string& PayloadPool::Table(DataKind t) const {
  return t == DataKind::kQ ? q_ : (t == DataKind::kK ? k_ : v_);
}

void PayloadPool::AppendQ(uint64_t seq, int32_t layer, int64_t token, std::string* q) const {
  if (rows_ == 0) return gen_.AppendQ(seq, layer, token, q);
  const size_t row_bytes = static_cast<size_t>(shape_.num_q_heads) * shape_.head_dim * DTypeSize(shape_.dtype);
  AppendRow(q_, RowOf(DataKind::kQ, seq, layer, token), row_bytes, q);
}

void PayloadPool::AppendKv(uint64_t seq, int32_t layer, int64_t token, int64_t n, std::string* k,
                           std::string* v) const {
  if (rows_ == 0) return gen_.AppendKv(seq, layer, token, n, k, v);
  const size_t row_bytes = static_cast<size_t>(shape_.num_kv_heads) * shape_.head_dim * DTypeSize(shape_.dtype);
  k->reserve(k->size() + n * row_bytes);
  v->reserve(v->size() + n * row_bytes);
  for (int64_t t = token; t < token + n; ++t) {
    AppendRow(k_, RowOf(DataKind::kK, seq, layer, t), row_bytes, k);
    AppendRow(v_, RowOf(DataKind::kV, seq, layer, t), row_bytes, v);
  }
}

void PayloadPool::AppendValues(const std::string& table, int64_t row, int64_t row_elems,
                               std::vector<double>* out) const {
  const char* src = table.data() + static_cast<size_t>(row) * row_elems * 2;
  for (int64_t i = 0; i < row_elems; ++i) {
    // Little-endian dtype bits, as on the wire.
    const uint32_t raw = static_cast<uint8_t>(src[2 * i]) | static_cast<uint32_t>(static_cast<uint8_t>(src[2 * i + 1])) << 8;
    out->push_back(value_[raw]);
  }
}

std::vector<double> PayloadPool::History(DataKind t, uint64_t seq, int32_t layer, int64_t len) const {
  if (rows_ == 0) return gen_.History(t, seq, layer, len);
  const int64_t row_elems = static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim;
  std::vector<double> out;
  out.reserve(static_cast<size_t>(len * row_elems));
  for (int64_t tok = 0; tok < len; ++tok) AppendValues(Table(t), RowOf(t, seq, layer, tok), row_elems, &out);
  return out;
}

std::vector<double> PayloadPool::Query(uint64_t seq, int32_t layer, int64_t token) const {
  if (rows_ == 0) return gen_.Query(seq, layer, token);
  const int64_t row_elems = static_cast<int64_t>(shape_.num_q_heads) * shape_.head_dim;
  std::vector<double> out;
  out.reserve(static_cast<size_t>(row_elems));
  AppendValues(q_, RowOf(DataKind::kQ, seq, layer, token), row_elems, &out);
  return out;
}

}  // namespace pkv::client
