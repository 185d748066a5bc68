// client/kv_data.h — reproducible activations and the client's own attention reference.
//
// The router-side tools never store the K,V they send: every element is a function of
// (seed, kind, sequence, layer, token, head, dim) through a counter-based hash (SplitMix64 with
// random access: 16 bits per element), mapped through a 65536-entry table of standard-normal
// quantiles and rounded to the model dtype. Generation costs a few ns per element, so a replay
// can rebuild long histories for its checks. The client can therefore rebuild
// any sequence's history later and check an output against ReferenceDecode, a plain
// double-precision softmax written independently of the worker's kernels.
// Thread-safety: const methods and pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/model_shape.h"

namespace pkv::client {

enum class DataKind : uint8_t { kQ = 1, kK = 2, kV = 3 };

class KvDataGen final {
 public:
  KvDataGen(const ModelShape& shape, uint64_t seed);

  // The element (a standard normal, rounded to the model dtype), as a double.
  double Value(DataKind t, uint64_t seq, int32_t layer, int64_t token, int32_t head, int32_t dim) const;
  // Its raw dtype bits.
  uint16_t Raw(DataKind t, uint64_t seq, int32_t layer, int64_t token, int32_t head, int32_t dim) const;

  // Appends K and V of tokens [token, token + n) of one layer, [n, Hkv, d] dtype bytes.
  void AppendKv(uint64_t seq, int32_t layer, int64_t token, int64_t n, std::string* k,
                std::string* v) const;
  // Appends the query of (seq, layer) at position `token`, [Hq, d] dtype bytes.
  void AppendQ(uint64_t seq, int32_t layer, int64_t token, std::string* q) const;

  // K or V history of a layer as doubles, [len, Hkv, d].
  std::vector<double> History(DataKind t, uint64_t seq, int32_t layer, int64_t len) const;
  // q as doubles, [Hq, d].
  std::vector<double> Query(uint64_t seq, int32_t layer, int64_t token) const;

  const ModelShape& shape() const { return shape_; }

 private:
  // The key of one row (kind, seq, layer, token) and 16 random bits of its element `index`.
  uint64_t RowKey(DataKind t, uint64_t seq, int32_t layer, int64_t token) const;
  static uint32_t BitsAt(uint64_t key, int64_t index);
  uint32_t Bits(DataKind t, uint64_t seq, int32_t layer, int64_t token, int64_t index) const;

  ModelShape shape_;
  uint64_t seed_;
  std::vector<uint16_t> raw_;   // [65536] normal quantile rounded to the dtype (raw bits)
  std::vector<double> value_;   // [65536] the same as a double
};

// Decode attention of one row in double precision: for each query head h (KV head h / G),
// out[h] = softmax(q[h] . k[t] / sqrt(d)) . v[t] over t < len; lse[h] = log sum exp of the
// scaled scores. q [Hq, d], k and v [len, Hkv, d]; out [Hq, d], lse [Hq] (may be null).
void ReferenceDecode(const ModelShape& shape, const std::vector<double>& q,
                     const std::vector<double>& k, const std::vector<double>& v, int64_t len,
                     std::vector<double>* out, std::vector<double>* lse);

// Largest error of `got` (one row's [Hq, d] dtype bytes) against `want` [Hq, d], each head
// relative to that head's largest |want| (at least 1e-3).
double MaxRelativeError(const ModelShape& shape, const char* got, const std::vector<double>& want);

// The tolerance MaxRelativeError must stay under for the dtype (fp16 1e-2, bf16 3e-2).
double Tolerance(const ModelShape& shape);

}  // namespace pkv::client
