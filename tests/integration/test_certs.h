// tests/integration/test_certs.h — throwaway PKI for the TLS tests, made with the openssl command
// line at test time: a CA, a server certificate for 127.0.0.1 and localhost, a client
// certificate, and a second CA with its own server and client certificates (trusted by nobody,
// or by what a certificate rotation switches to).
// Header-only; used by one test binary at a time, from its main thread.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace pkv::testing_certs {

// Whether the openssl command line is on PATH.
inline bool HaveOpenssl() { return std::system("command -v openssl >/dev/null 2>&1") == 0; }

struct TestCerts {
  std::string dir;
  std::string ca_crt;          // signs server.crt and client.crt
  std::string server_crt;      // SAN IP:127.0.0.1, DNS:localhost
  std::string server_key;
  std::string client_crt;      // signed by ca_crt
  std::string client_key;
  std::string other_ca_crt;    // an unrelated CA
  std::string other_client_crt;  // signed by other_ca_crt
  std::string other_client_key;
  std::string client_b_crt;    // a second client signed by ca_crt, another identity (CN)
  std::string client_b_key;
  std::string other_server_crt;  // signed by other_ca_crt; SAN IP:127.0.0.1, DNS:localhost
  std::string other_server_key;
};

// Makes the certificates in a fresh directory under the test temp dir. On failure, a gtest
// failure names the command and `ok` is false.
inline TestCerts MakeTestCerts(bool* ok) {
  *ok = false;
  TestCerts c;
  static int made = 0;
  c.dir = ::testing::TempDir() + "pkv_tls_" + std::to_string(::getpid()) + "_" +
          std::to_string(made++);
  const std::string d = c.dir + "/";
  c.ca_crt = d + "ca.crt";
  c.server_crt = d + "server.crt";
  c.server_key = d + "server.key";
  c.client_crt = d + "client.crt";
  c.client_key = d + "client.key";
  c.other_ca_crt = d + "other_ca.crt";
  c.other_client_crt = d + "other_client.crt";
  c.other_client_key = d + "other_client.key";
  c.client_b_crt = d + "client_b.crt";
  c.client_b_key = d + "client_b.key";
  c.other_server_crt = d + "other_server.crt";
  c.other_server_key = d + "other_server.key";
  if (std::system(("mkdir -p '" + c.dir + "'").c_str()) != 0) {
    ADD_FAILURE() << "cannot create " << c.dir;
    return c;
  }
  std::ofstream(d + "server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                     "basicConstraints=CA:FALSE\n"
                                     "keyUsage=digitalSignature,keyEncipherment\n"
                                     "extendedKeyUsage=serverAuth\n";
  std::ofstream(d + "client.ext") << "basicConstraints=CA:FALSE\n"
                                     "keyUsage=digitalSignature,keyEncipherment\n"
                                     "extendedKeyUsage=clientAuth\n";
  const std::string key = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string log = " >>'" + d + "openssl.log' 2>&1";
  auto ca = [&](const std::string& name) {
    return "openssl req -x509" + key + " -keyout '" + d + name + ".key' -out '" + d + name +
           ".crt' -days 2 -subj /CN=pkv-test-" + name + log;
  };
  auto leaf = [&](const std::string& name, const std::string& cn, const std::string& ca_name,
                  const std::string& ext) {
    return "openssl req" + key + " -keyout '" + d + name + ".key' -out '" + d + name +
           ".csr' -subj /CN=" + cn + log + " && openssl x509 -req -in '" + d + name +
           ".csr' -CA '" + d + ca_name + ".crt' -CAkey '" + d + ca_name +
           ".key' -CAcreateserial -days 2 -out '" + d + name + ".crt' -extfile '" + d + ext +
           "'" + log;
  };
  for (const std::string& cmd :
       {ca("ca"), ca("other_ca"), leaf("server", "localhost", "ca", "server.ext"),
        leaf("client", "pkv-test-client", "ca", "client.ext"),
        leaf("client_b", "pkv-test-client-b", "ca", "client.ext"),
        leaf("other_client", "pkv-test-other-client", "other_ca", "client.ext"),
        leaf("other_server", "localhost", "other_ca", "server.ext")}) {
    if (std::system(cmd.c_str()) != 0) {
      ADD_FAILURE() << "failed: " << cmd << " (see " << d << "openssl.log)";
      return c;
    }
  }
  *ok = true;
  return c;
}

// Deletes the directory MakeTestCerts made.
inline void RemoveTestCerts(const TestCerts& certs) {
  if (!certs.dir.empty()) (void)std::system(("rm -rf '" + certs.dir + "'").c_str());
}

}  // namespace pkv::testing_certs
