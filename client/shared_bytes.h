// client/shared_bytes.h — bytes handed to the client together with what keeps them alive.
// Thread-safety: a plain value; the owner's reference count is thread-safe.
#pragma once

#include <memory>
#include <string_view>

namespace pkv::client {

// Bytes that stay valid and unchanged for as long as `owner` is held. The client holds the owner
// until the transport no longer needs the bytes, so they are sent without a copy.
struct SharedBytes {
  std::shared_ptr<const void> owner;
  std::string_view bytes;
};

}  // namespace pkv::client
