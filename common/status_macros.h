// common/status_macros.h — early-return helpers for absl::Status / absl::StatusOr.
//
// Every fallible public function in PersistentKV returns absl::Status or absl::StatusOr<T>;
// these macros keep call sites short. Thread-safe: pure macros.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define PKV_STATUS_CONCAT_INNER(a, b) a##b
#define PKV_STATUS_CONCAT(a, b) PKV_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define PKV_RETURN_IF_ERROR(expr)                    \
  do {                                               \
    ::absl::Status pkv_status_ = (expr);             \
    if (!pkv_status_.ok()) return pkv_status_;       \
  } while (0)

// `lhs = value of expr` when expr (an absl::StatusOr) is OK, else returns its status.
#define PKV_ASSIGN_OR_RETURN(lhs, expr) \
  PKV_ASSIGN_OR_RETURN_IMPL(PKV_STATUS_CONCAT(pkv_statusor_, __LINE__), lhs, expr)
#define PKV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
