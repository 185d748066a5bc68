// client/payload_pool.h — pre-generated q/K/V rows that a replay sends again and again.
//
// Generating every element of every request with KvDataGen costs the client about as much as
// the worker spends on a small layer-step, so the load generator would measure itself. A
// PayloadPool generates `rows` rows of each kind (q [Hq, d], K and V [Hkv, d]) once and maps
// every (kind, sequence, layer, token) to one of them through a seeded hash: a step's request is
// a copy of B rows per tensor, a prompt chunk a copy of n rows. The data stays a pure function of
// (seed, rows, kind, sequence, layer, token), so a check rebuilds any sequence's history from the
// same rows — the bytes actually sent — as doubles for the independent double-precision
// reference (ReferenceDecode). Two positions share a row with probability 1 / rows.
// With rows = 0 every element is generated on demand by the KvDataGen (no pool).
// Thread-safety: immutable after construction; const methods may be called from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "client/kv_data.h"
#include "common/model_shape.h"

namespace pkv::client {

class PayloadPool final {
 public:
  // Generates the rows from `gen` (which must outlive the pool when rows is 0). `seed` keys the
  // position -> row hash.
  PayloadPool(const KvDataGen& gen, uint64_t seed, int64_t rows);

  // Appends the query of (seq, layer) at position `token`, [Hq, d] dtype bytes.
  void AppendQ(uint64_t seq, int32_t layer, int64_t token, std::string* q) const;
  // Appends K and V of tokens [token, token + n) of one layer, [n, Hkv, d] dtype bytes each.
  void AppendKv(uint64_t seq, int32_t layer, int64_t token, int64_t n, std::string* k,
                std::string* v) const;

  // What AppendKv sent for tokens [0, len) of one layer, as doubles, [len, Hkv, d].
  std::vector<double> History(DataKind t, uint64_t seq, int32_t layer, int64_t len) const;
  // What AppendQ sent, as doubles, [Hq, d].
  std::vector<double> Query(uint64_t seq, int32_t layer, int64_t token) const;

  int64_t rows() const { return rows_; }
  // Bytes the pool holds (its rows and its dtype table).
  int64_t bytes() const;

 private:
  // The pool row of one position.
  int64_t RowOf(DataKind t, uint64_t seq, int32_t layer, int64_t token) const;
  const std::string& Table(DataKind t) const;
  // Appends `n` rows' doubles of `table` (rows of `row_elems` elements) to *out.
  void AppendValues(const std::string& table, int64_t row, int64_t row_elems, std::vector<double>* out) const;

  const KvDataGen& gen_;
  const ModelShape shape_;
  const uint64_t seed_;
  const int64_t rows_;
  std::string q_, k_, v_;        // [rows, Hq, d], [rows, Hkv, d], [rows, Hkv, d] dtype bytes
  std::vector<double> value_;    // [65536] dtype bits -> value
};

}  // namespace pkv::client
