// service/tls_credentials.h — server credentials of the API port that follow rotated files.
//
// WatchedTlsCredentials hands gRPC a certificate provider that reads the certificate chain, key
// and client CA bundle from their files now and again every `reload_seconds`: new connections use
// what the files hold at their handshake (a rotated Kubernetes Secret needs no restart; its
// files change together, as one symlink swap), open connections keep their session. Mutual TLS
// keeps requiring a client certificate and verifying it against the current CA bundle.
// Thread-safety: the functions are pure or build a new object; the credentials are gRPC's.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace grpc {
class ServerCredentials;
}  // namespace grpc

namespace pkv::service {

// OK when `key_pem` is a private key and `cert_chain_pem` starts with a certificate whose public
// key it matches; INVALID_ARGUMENT saying which of them is wrong otherwise.
absl::Status CheckKeyMatchesCertificate(absl::string_view cert_chain_pem, absl::string_view key_pem);

// TLS from `cert_file` and `key_file`; with a non-empty `client_ca_file`, mutual TLS (client
// certificates required and verified against it). The files are read every `reload_seconds`
// (at least 1). Check the files first: a file gRPC cannot use fails handshakes, not this call.
std::shared_ptr<grpc::ServerCredentials> WatchedTlsCredentials(const std::string& cert_file,
                                                               const std::string& key_file,
                                                               const std::string& client_ca_file,
                                                               int reload_seconds);

}  // namespace pkv::service
