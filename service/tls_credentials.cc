#include "service/tls_credentials.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace pkv::service {
namespace {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};

std::unique_ptr<BIO, BioFree> MemoryBio(absl::string_view pem) {
  return std::unique_ptr<BIO, BioFree>(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Reads the PEM file given to option `flag` (named in errors as the pkv-worker flag).
absl::StatusOr<std::string> ReadPemFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": cannot read the file: ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": read error"));
  }
  std::string pem = std::move(text).str();
  if (pem.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

}  // namespace

absl::Status CheckKeyMatchesCertificate(absl::string_view cert_chain_pem, absl::string_view key_pem) {
  auto cert_bio = MemoryBio(cert_chain_pem);
  auto key_bio = MemoryBio(key_pem);
  if (cert_bio == nullptr || key_bio == nullptr) return absl::ResourceExhaustedError("OpenSSL: out of memory");
  std::unique_ptr<X509, X509Free> cert(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return absl::InvalidArgumentError("the certificate file holds no PEM certificate");
  std::unique_ptr<EVP_PKEY, PkeyFree> key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) return absl::InvalidArgumentError("the key file holds no unencrypted PEM private key");
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    return absl::InvalidArgumentError("the private key does not belong to the (first) certificate");
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> WatchedTlsCredentials(const std::string& cert_file,
                                                               const std::string& key_file,
                                                               const std::string& client_ca_file,
                                                               int reload_seconds) {
  const unsigned int interval = static_cast<unsigned int>(std::max(1, reload_seconds));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      key_file, cert_file, client_ca_file, interval);
  grpc::experimental::TlsServerCredentialsOptions tls(provider);
  tls.watch_identity_key_cert_pairs();
  if (client_ca_file.empty()) {
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ApiCredentials(const ApiTlsFiles& files,
                                                                        std::string* mode) {
  const bool has_cert = !files.cert_file.empty();
  const bool has_key = !files.key_file.empty();
  if (has_cert != has_key) {
    return absl::InvalidArgumentError(
        "--tls_cert_file and --tls_key_file must be given together (TLS needs both the "
        "certificate and its private key)");
  }
  if (!has_cert) {
    if (!files.client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs TLS: give --tls_cert_file and --tls_key_file too");
    }
    *mode = "plaintext";
    return grpc::InsecureServerCredentials();
  }
  // The files are checked now, so that a bad one fails start-up; gRPC then reads them again
  // every reload_seconds (a rotated certificate needs no restart).
  if (files.reload_seconds < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_reload_s must be at least 1, got ", files.reload_seconds));
  }
  absl::StatusOr<std::string> cert = ReadPemFile("tls_cert_file", files.cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("tls_key_file", files.key_file);
  if (!key.ok()) return key.status();
  if (absl::Status match = CheckKeyMatchesCertificate(*cert, *key); !match.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert_file=", files.cert_file, ", --tls_key_file=",
                                                   files.key_file, ": ", match.message()));
  }
  if (files.client_ca_file.empty()) {
    *mode = "TLS";
  } else {
    absl::StatusOr<std::string> ca = ReadPemFile("tls_client_ca_file", files.client_ca_file);
    if (!ca.ok()) return ca.status();
    *mode = "mutual TLS";
  }
  return WatchedTlsCredentials(files.cert_file, files.key_file, files.client_ca_file,
                               files.reload_seconds);
}

}  // namespace pkv::service
