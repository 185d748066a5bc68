// kernels/reference/paged_decode.h — the CPU paged decode attention: the executable specification.
//
// Implements the contract of kernels/decode_attention.h on host memory, written for reading:
// for each (row, KV head) it walks the row's pages in page-table order and keeps, for each of the
// G query heads of the group, an fp32 online-softmax state (running max m, running sum l,
// accumulator acc[d]); each K,V token is loaded once for all G heads. The output is acc / l
// rounded to the model dtype; lse = m + log(l). A row of length 0 yields zeros and lse = -inf.
// Thread-safe: Launch touches only the buffers in its params; the optional thread count splits
// rows across std::threads that Launch joins before returning.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "kernels/decode_attention.h"

namespace pkv::kernels::reference {

// OK when every pointer is set, shapes are positive, Hq % Hkv == 0 and page ids/lengths are in
// range (it reads the host page table). Names the offending field otherwise.
absl::Status CanImplement(const DecodeParams& params);

// The reference needs no workspace.
size_t WorkspaceBytes(const DecodeParams& params);

// Runs the attention on the host. `num_threads` > 1 splits (row, KV head) pairs across threads.
// `workspace` and `stream` are unused (kept for the shared contract).
absl::Status Launch(const DecodeParams& params, void* workspace, void* stream, int num_threads = 1);

}  // namespace pkv::kernels::reference
