#include "kernels/reference/paged_decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace pkv::kernels::reference {
namespace {

// One (row, KV head): online softmax over the row's pages for the G query heads of the group.
void AttendRowHead(const DecodeParams& p, int32_t b, int32_t kvh) {
  const int32_t d = p.head_dim;
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const auto* q = static_cast<const uint16_t*>(p.q);
  const auto* kv = static_cast<const uint16_t*>(p.kv);
  auto* out = static_cast<uint16_t*>(p.out);

  // Per query head of the group: q in fp32, running max, running sum, accumulator.
  std::vector<float> qf(static_cast<size_t>(group) * d);
  std::vector<float> m(group, -std::numeric_limits<float>::infinity());
  std::vector<float> l(group, 0.f);
  std::vector<float> acc(static_cast<size_t>(group) * d, 0.f);
  std::vector<float> kf(d), vf(d);
  for (int32_t g = 0; g < group; ++g) {
    const int64_t q_off = (static_cast<int64_t>(b) * p.num_q_heads + kvh * group + g) * d;
    for (int32_t i = 0; i < d; ++i) qf[g * d + i] = ToFloat(p.dtype, q[q_off + i]);
  }

  const int32_t first = p.page_indptr[b];
  const int32_t last = p.page_indptr[b + 1];
  for (int32_t pi = first; pi < last; ++pi) {
    const int64_t page = p.page_indices[pi];
    const int32_t tokens = (pi == last - 1) ? p.last_page_len[b] : p.page_size;
    for (int32_t t = 0; t < tokens; ++t) {
      const int64_t k_off = KvOffset(p, page, 0, kvh, t);
      const int64_t v_off = KvOffset(p, page, 1, kvh, t);
      for (int32_t i = 0; i < d; ++i) {
        kf[i] = ToFloat(p.dtype, kv[k_off + i]);
        vf[i] = ToFloat(p.dtype, kv[v_off + i]);
      }
      for (int32_t g = 0; g < group; ++g) {
        float s = 0.f;
        for (int32_t i = 0; i < d; ++i) s += qf[g * d + i] * kf[i];
        s *= p.sm_scale;
        // Online softmax: rescale the state when the max grows.
        const float m_new = std::max(m[g], s);
        const float scale_old = std::exp(m[g] - m_new);  // exp(-inf) = 0 on the first token
        const float w = std::exp(s - m_new);
        l[g] = l[g] * scale_old + w;
        float* a = &acc[g * d];
        for (int32_t i = 0; i < d; ++i) a[i] = a[i] * scale_old + w * vf[i];
        m[g] = m_new;
      }
    }
  }

  for (int32_t g = 0; g < group; ++g) {
    const int32_t h = kvh * group + g;
    const int64_t o_off = (static_cast<int64_t>(b) * p.num_q_heads + h) * d;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int32_t i = 0; i < d; ++i) out[o_off + i] = FromFloat(p.dtype, acc[g * d + i] * inv);
    if (p.lse != nullptr) {
      p.lse[static_cast<int64_t>(b) * p.num_q_heads + h] =
          l[g] > 0.f ? m[g] + std::log(l[g]) : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace

absl::Status CanImplement(const DecodeParams& p) {
  if (p.batch < 0) return absl::InvalidArgumentError("batch must be >= 0");
  if (p.num_q_heads < 1 || p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError("num_q_heads must be a positive multiple of num_kv_heads");
  }
  if (p.head_dim < 1 || p.page_size < 1) {
    return absl::InvalidArgumentError("head_dim and page_size must be positive");
  }
  if (p.batch == 0) return absl::OkStatus();
  if (p.q == nullptr || p.kv == nullptr || p.out == nullptr || p.page_indptr == nullptr ||
      p.page_indices == nullptr || p.last_page_len == nullptr) {
    return absl::InvalidArgumentError("q, kv, out and the page table must be set");
  }
  if (p.page_indptr[0] != 0) return absl::InvalidArgumentError("page_indptr[0] must be 0");
  for (int32_t b = 0; b < p.batch; ++b) {
    const int32_t pages = p.page_indptr[b + 1] - p.page_indptr[b];
    if (pages < 0) return absl::InvalidArgumentError(absl::StrCat("page_indptr decreases at row ", b));
    if (pages > 0 && (p.last_page_len[b] < 1 || p.last_page_len[b] > p.page_size)) {
      return absl::InvalidArgumentError(absl::StrCat("last_page_len[", b, "] out of [1, page_size]"));
    }
    for (int32_t i = p.page_indptr[b]; i < p.page_indptr[b + 1]; ++i) {
      if (p.page_indices[i] < 0 || p.page_indices[i] >= p.num_pages) {
        return absl::InvalidArgumentError(absl::StrCat("page_indices[", i, "] = ", p.page_indices[i],
                                                       " out of [0, ", p.num_pages, ")"));
      }
    }
  }
  return absl::OkStatus();
}

size_t WorkspaceBytes(const DecodeParams&) { return 0; }

absl::Status Launch(const DecodeParams& p, void*, void*, int num_threads) {
  const int64_t items = static_cast<int64_t>(p.batch) * p.num_kv_heads;
  if (items == 0) return absl::OkStatus();
  const int threads = static_cast<int>(std::clamp<int64_t>(num_threads, 1, items));
  if (threads == 1) {
    for (int64_t it = 0; it < items; ++it) {
      AttendRowHead(p, static_cast<int32_t>(it / p.num_kv_heads), static_cast<int32_t>(it % p.num_kv_heads));
    }
    return absl::OkStatus();
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&p, t, threads, items] {
      for (int64_t it = t; it < items; it += threads) {
        AttendRowHead(p, static_cast<int32_t>(it / p.num_kv_heads), static_cast<int32_t>(it % p.num_kv_heads));
      }
    });
  }
  for (auto& th : pool) th.join();
  return absl::OkStatus();
}

}  // namespace pkv::kernels::reference
