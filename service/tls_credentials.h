// service/tls_credentials.h — server credentials of the API port that follow rotated files.
//
// ApiCredentials turns the TLS options of pkv-worker into the API port's credentials: plaintext,
// TLS or mutual TLS, with every file read and checked at start-up so that a bad one fails it.
// WatchedTlsCredentials hands gRPC a certificate provider that reads the certificate chain, key
// and client CA bundle from their files now and again every `reload_seconds`: new connections use
// what the files hold at their handshake (a rotated Kubernetes Secret needs no restart; its
// files change together, as one symlink swap), open connections keep their session. Mutual TLS
// keeps requiring a client certificate and verifying it against the current CA bundle.
// Thread-safety: the functions read files or build a new object; the credentials are gRPC's.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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

// The TLS files of the API port, as pkv-worker's flags (and error messages) name them.
struct ApiTlsFiles {
  std::string cert_file;       // --tls_cert_file: PEM certificate chain; empty: plaintext
  std::string key_file;        // --tls_key_file: its PEM private key (both or neither)
  std::string client_ca_file;  // --tls_client_ca_file: require client certificates it signed
  int reload_seconds = 30;     // --tls_reload_s: the files are read again this often (>= 1)
};

// The API port's credentials from `files`: plaintext when no certificate and key are given,
// else TLS (mutual TLS with a client CA bundle) through WatchedTlsCredentials; *mode says which:
// "plaintext", "TLS" or "mutual TLS". The files are read and checked now: INVALID_ARGUMENT naming
// the flag for a file that is missing, unreadable or not PEM, a key that does not belong to the
// certificate, a certificate without a key (or the reverse), a client CA without TLS, or a
// reload period under 1 s.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ApiCredentials(const ApiTlsFiles& files,
                                                                        std::string* mode);

}  // namespace pkv::service
