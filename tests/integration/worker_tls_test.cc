// TLS, mutual TLS and the health-only port: the real server (service::WorkerServer, as pkv-worker
// builds it) on 127.0.0.1:0 with certificates made by the openssl command line at test time,
// driven through the client library and, for the health port, raw gRPC calls.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include "client/kv_data.h"
#include "client/worker_client.h"
#include "engine/engine_factory.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "pkv/v1/worker.grpc.pb.h"
#include "service/worker_server.h"
#include "tests/integration/test_certs.h"

namespace pkv {
namespace {

using testing_certs::TestCerts;

constexpr uint64_t kDataSeed = 20260623;

ModelShape TestShape() {
  ModelShape s;
  s.num_layers = 2;
  s.num_q_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 16;
  s.dtype = DType::kF16;
  return s;
}

std::unique_ptr<engine::Engine> TestEngine() {
  engine::EngineConfig config;
  config.shape = TestShape();
  config.num_pages = 256;
  config.backend = "cpu";
  config.cpu_threads = 1;
  config.max_batch = 8;
  auto engine = engine::BuildEngine(config);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

// One unary call through the generic stub: raw request bytes in, raw response bytes out.
grpc::Status RawUnaryCall(const std::string& target, const std::string& method,
                          const std::string& request, std::string* response) {
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::CompletionQueue cq;
  auto call = generic.PrepareUnaryCall(&ctx, method, request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  call->Finish(&response_buffer, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  response->clear();
  std::vector<grpc::Slice> slices;
  if (status.ok() && response_buffer.Dump(&slices).ok()) {
    for (const auto& s : slices) response->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return status;
}

// grpc.health.v1.Health/Check of `service` on a plaintext `target`: the ServingStatus number
// (1 SERVING, 2 NOT_SERVING), or -1 with the RPC failed (*status says why).
int HealthCheck(const std::string& target, const std::string& service, grpc::Status* status) {
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0A);  // HealthCheckRequest.service: field 1, length-delimited
    request.push_back(static_cast<char>(service.size()));
    request.append(service);
  }
  std::string response;
  *status = RawUnaryCall(target, "/grpc.health.v1.Health/Check", request, &response);
  if (!status->ok()) return -1;
  if (response.empty()) return 0;  // UNKNOWN is encoded as no bytes
  return response.size() == 2 && response[0] == 0x08 ? response[1] : -1;
}

class WorkerTlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!testing_certs::HaveOpenssl()) return;
    certs_ = new TestCerts(testing_certs::MakeTestCerts(&certs_ok_));
  }
  static void TearDownTestSuite() {
    if (certs_ != nullptr) testing_certs::RemoveTestCerts(*certs_);
    delete certs_;
    certs_ = nullptr;
  }

  void SetUp() override {
    if (!testing_certs::HaveOpenssl()) {
      GTEST_SKIP() << "the openssl command line is not installed (scripts/setup.sh installs it): "
                      "cannot make test certificates, TLS tests skipped";
    }
    ASSERT_TRUE(certs_ok_) << "could not make the test certificates";
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(2));
  }

  const TestCerts& certs() const { return *certs_; }

  // TLS on 127.0.0.1:0 plus the health-only port on another 127.0.0.1:0.
  service::ServerOptions TlsOptions(bool require_client_cert) const {
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.max_message_bytes = 8 << 20;
    options.tls_cert_file = certs().server_crt;
    options.tls_key_file = certs().server_key;
    if (require_client_cert) options.tls_client_ca_file = certs().ca_crt;
    options.health_listen_address = "127.0.0.1:0";
    return options;
  }

  void StartWorker(const service::ServerOptions& options) {
    auto server = service::WorkerServer::Start(options, TestEngine());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_GT(server_->port(), 0);
  }

  // Client options for the TLS port: the test CA, plus the client certificate when asked.
  client::ClientOptions TlsClient(bool with_cert) const {
    client::ClientOptions options;
    options.target = server_->address();
    options.connect_timeout = absl::Seconds(3);
    options.rpc_timeout = absl::Seconds(10);
    options.tls_ca_file = certs().ca_crt;
    if (with_cert) {
      options.tls_cert_file = certs().client_crt;
      options.tls_key_file = certs().client_key;
    }
    return options;
  }

  static TestCerts* certs_;
  static bool certs_ok_;
  std::unique_ptr<service::WorkerServer> server_;
};

TestCerts* WorkerTlsTest::certs_ = nullptr;
bool WorkerTlsTest::certs_ok_ = false;

// Writes a short prompt and runs one token step over every layer (layer 0 unary, the rest on a
// StepStream), checking layer 0 against the double-precision reference.
void WriteAndStep(client::WorkerClient& client) {
  const ModelShape s = TestShape();
  client::KvDataGen gen(s, kDataSeed);
  constexpr uint64_t kSeq = 7;
  constexpr int64_t kLen = 40;
  ASSERT_TRUE(client
                  .WritePrompt(kSeq, kLen, /*chunk_tokens=*/16,
                               [&](int32_t layer, int64_t off, int64_t n, std::string* k,
                                   std::string* v) { gen.AppendKv(kSeq, layer, off, n, k, v); })
                  .ok());
  auto make_step = [&](int32_t layer) {
    client::StepArgs a;
    a.token_step_id = 1;
    a.layer = layer;
    a.rows = {kSeq};
    gen.AppendQ(kSeq, layer, kLen, &a.q);
    gen.AppendKv(kSeq, layer, kLen, 1, &a.k, &a.v);
    return a;
  };
  auto first = client.Step(make_step(0));
  ASSERT_TRUE(first.ok()) << first.status();
  const size_t row_bytes = static_cast<size_t>(s.num_q_heads) * s.head_dim * 2;
  ASSERT_EQ(first->out.size(), row_bytes);
  std::vector<double> k = gen.History(client::DataKind::kK, kSeq, 0, kLen + 1);
  std::vector<double> v = gen.History(client::DataKind::kV, kSeq, 0, kLen + 1);
  std::vector<double> out, lse;
  client::ReferenceDecode(s, gen.Query(kSeq, 0, kLen), k, v, kLen + 1, &out, &lse);
  EXPECT_LE(client::MaxRelativeError(s, first->out.data(), out), client::Tolerance(s));

  auto stream = client.OpenStepStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  for (int32_t layer = 1; layer < s.num_layers; ++layer) {
    auto r = (*stream)->Step(make_step(layer));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->out.size(), row_bytes);
  }
  EXPECT_TRUE((*stream)->Finish().ok());
  const uint64_t ids[] = {kSeq};
  EXPECT_TRUE(client.Release(ids).ok());
}

TEST_F(WorkerTlsTest, TlsClientDescribesAndSteps) {
  StartWorker(TlsOptions(/*require_client_cert=*/false));
  EXPECT_EQ(server_->security_mode(), "TLS");
  auto client = client::WorkerClient::Connect(TlsClient(/*with_cert=*/false));
  ASSERT_TRUE(client.ok()) << client.status();
  auto info = (*client)->Describe();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->shape.DebugString(), TestShape().DebugString());
  EXPECT_TRUE(info->serving);
  WriteAndStep(**client);
  // The API port serves health too (over TLS).
  auto healthy = (*client)->CheckHealth("pkv.v1.PersistentKV");
  ASSERT_TRUE(healthy.ok()) << healthy.status();
  EXPECT_TRUE(*healthy);
}

TEST_F(WorkerTlsTest, ServerCertificateNamesLocalhostToo) {
  StartWorker(TlsOptions(/*require_client_cert=*/false));
  client::ClientOptions options = TlsClient(/*with_cert=*/false);
  options.target = "localhost:" + std::to_string(server_->port());
  auto client = client::WorkerClient::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
}

TEST_F(WorkerTlsTest, PlaintextClientToTheTlsPortFails) {
  StartWorker(TlsOptions(/*require_client_cert=*/false));
  client::ClientOptions options;
  options.target = server_->address();
  options.connect_timeout = absl::Seconds(2);
  options.rpc_timeout = absl::Seconds(5);
  auto client = client::WorkerClient::Connect(options);
  EXPECT_FALSE(client.ok());
}

TEST_F(WorkerTlsTest, ClientThatDoesNotTrustTheServerCaFails) {
  StartWorker(TlsOptions(/*require_client_cert=*/false));
  client::ClientOptions options = TlsClient(/*with_cert=*/false);
  options.tls_ca_file = certs().other_ca_crt;
  options.connect_timeout = absl::Seconds(2);
  EXPECT_FALSE(client::WorkerClient::Connect(options).ok());
}

TEST_F(WorkerTlsTest, MutualTlsRefusesClientsWithoutATrustedCertificate) {
  StartWorker(TlsOptions(/*require_client_cert=*/true));
  EXPECT_EQ(server_->security_mode(), "mutual TLS");

  client::ClientOptions no_cert = TlsClient(/*with_cert=*/false);
  no_cert.connect_timeout = absl::Seconds(2);
  no_cert.rpc_timeout = absl::Seconds(5);
  auto refused = client::WorkerClient::Connect(no_cert);
  EXPECT_FALSE(refused.ok()) << "a client without a certificate was let in";

  client::ClientOptions wrong_ca = TlsClient(/*with_cert=*/false);
  wrong_ca.tls_cert_file = certs().other_client_crt;
  wrong_ca.tls_key_file = certs().other_client_key;
  wrong_ca.connect_timeout = absl::Seconds(2);
  wrong_ca.rpc_timeout = absl::Seconds(5);
  EXPECT_FALSE(client::WorkerClient::Connect(wrong_ca).ok())
      << "a client certificate from an untrusted CA was accepted";

  auto client = client::WorkerClient::Connect(TlsClient(/*with_cert=*/true));
  ASSERT_TRUE(client.ok()) << client.status();
  WriteAndStep(**client);
}

// Under mutual TLS the router is the client certificate's identity: another certificate is
// another router, and a declared x-pkv-router-id cannot borrow someone else's identity.
TEST_F(WorkerTlsTest, MutualTlsRoutersAreTheirCertificates) {
  StartWorker(TlsOptions(/*require_client_cert=*/true));
  auto alice = client::WorkerClient::Connect(TlsClient(/*with_cert=*/true));
  ASSERT_TRUE(alice.ok()) << alice.status();
  const ModelShape s = TestShape();
  client::KvDataGen gen(s, kDataSeed);
  ASSERT_TRUE((*alice)
                  ->WritePrompt(21, 8, /*chunk_tokens=*/8,
                                [&](int32_t layer, int64_t off, int64_t n, std::string* k, std::string* v) {
                                  gen.AppendKv(21, layer, off, n, k, v);
                                })
                  .ok());
  client::ClientOptions b = TlsClient(/*with_cert=*/false);
  b.tls_cert_file = certs().client_b_crt;
  b.tls_key_file = certs().client_b_key;
  b.router_id = "pkv-test-client";  // claims alice's identity: the certificate wins
  auto bob = client::WorkerClient::Connect(b);
  ASSERT_TRUE(bob.ok()) << bob.status();
  const uint64_t ids[] = {21};
  const absl::StatusOr<int64_t> denied = (*bob)->Release(ids);
  EXPECT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied) << denied.status();
  client::StepArgs step;
  step.token_step_id = 3;
  step.layer = 0;
  step.rows = {21};
  gen.AppendQ(21, 0, 8, &step.q);
  gen.AppendKv(21, 0, 8, 1, &step.k, &step.v);
  EXPECT_EQ((*bob)->Step(step).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE((*alice)->Step(step).ok());
  EXPECT_TRUE((*alice)->Release(ids).ok());
}

TEST_F(WorkerTlsTest, HealthPortFollowsTheServingStatusAndServesNothingElse) {
  StartWorker(TlsOptions(/*require_client_cert=*/true));
  ASSERT_GT(server_->health_port(), 0);
  ASSERT_NE(server_->health_port(), server_->port());
  const std::string health = server_->health_address();
  EXPECT_EQ(health, "127.0.0.1:" + std::to_string(server_->health_port()));

  grpc::Status status;
  EXPECT_EQ(HealthCheck(health, "", &status), 1) << status.error_message();
  EXPECT_EQ(HealthCheck(health, "pkv.v1.PersistentKV", &status), 1) << status.error_message();

  // No API on the health port: plaintext, no client certificate, and still UNIMPLEMENTED.
  auto channel = grpc::CreateChannel(health, grpc::InsecureChannelCredentials());
  auto stub = v1::PersistentKV::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  v1::DescribeResponse response;
  status = stub->Describe(&ctx, v1::DescribeRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  // ... and no reflection either.
  std::string raw;
  status = RawUnaryCall(health, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                        "", &raw);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();

  server_->BeginDrain();
  EXPECT_EQ(HealthCheck(health, "", &status), 2) << status.error_message();
  EXPECT_EQ(HealthCheck(health, "pkv.v1.PersistentKV", &status), 2) << status.error_message();

  // Shutdown stops the health port as well.
  server_->Shutdown(absl::Seconds(1));
  EXPECT_EQ(HealthCheck(health, "", &status), -1);
  EXPECT_FALSE(status.ok());
}

TEST_F(WorkerTlsTest, BadTlsOptionsAreInvalidArgumentNamingTheFlag) {
  auto start = [](const service::ServerOptions& options) {
    return service::WorkerServer::Start(options, TestEngine()).status();
  };
  service::ServerOptions options = TlsOptions(/*require_client_cert=*/false);
  options.tls_key_file.clear();
  absl::Status s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("--tls_key_file"), absl::string_view::npos) << s;

  options = TlsOptions(false);
  options.tls_cert_file.clear();
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;

  options = TlsOptions(false);
  options.tls_cert_file = certs().dir + "/missing.crt";
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("--tls_cert_file=" + certs().dir + "/missing.crt"),
            absl::string_view::npos)
      << s;

  options = TlsOptions(true);
  options.tls_client_ca_file = certs().dir + "/server.ext";  // readable, not PEM
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("--tls_client_ca_file"), absl::string_view::npos) << s;

  options = service::ServerOptions();
  options.listen_address = "127.0.0.1:0";
  options.tls_client_ca_file = certs().ca_crt;  // mTLS without TLS
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;

  // A certificate with the wrong key.
  options = TlsOptions(false);
  options.tls_key_file = certs().client_key;
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("does not belong to"), absl::string_view::npos) << s;

  options = TlsOptions(false);
  options.tls_reload_seconds = 0;
  s = start(options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("--tls_reload_s"), absl::string_view::npos) << s;
}

// A mounted Kubernetes Secret: tls.crt, tls.key and ca.crt are links through ..data to a
// versioned directory, and an update swaps ..data in one rename.
class SecretVolume {
 public:
  explicit SecretVolume(const std::string& dir) : dir_(dir) {
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    for (const char* name : {"tls.crt", "tls.key", "ca.crt"}) {
      std::filesystem::create_symlink(std::string("..data/") + name, dir_ + "/" + name);
    }
  }
  std::string path(const char* name) const { return dir_ + "/" + name; }
  void Publish(const std::string& crt, const std::string& key, const std::string& ca) {
    const std::string version = "v" + std::to_string(++versions_);
    std::filesystem::create_directory(dir_ + "/" + version);
    std::filesystem::copy_file(crt, dir_ + "/" + version + "/tls.crt");
    std::filesystem::copy_file(key, dir_ + "/" + version + "/tls.key");
    std::filesystem::copy_file(ca, dir_ + "/" + version + "/ca.crt");
    std::filesystem::create_symlink(version, dir_ + "/..data_tmp");
    std::filesystem::rename(dir_ + "/..data_tmp", dir_ + "/..data");
  }

 private:
  const std::string dir_;
  int versions_ = 0;
};

TEST_F(WorkerTlsTest, RotatedCertificateAndClientCaServeNewConnectionsWithoutARestart) {
  SecretVolume secret(certs().dir + "/secret");
  secret.Publish(certs().server_crt, certs().server_key, certs().ca_crt);
  service::ServerOptions options = TlsOptions(/*require_client_cert=*/true);
  options.tls_cert_file = secret.path("tls.crt");
  options.tls_key_file = secret.path("tls.key");
  options.tls_client_ca_file = secret.path("ca.crt");
  options.tls_reload_seconds = 1;
  StartWorker(options);

  // Before: the first CA's world. A client of the second CA is refused.
  auto old_client = client::WorkerClient::Connect(TlsClient(/*with_cert=*/true));
  ASSERT_TRUE(old_client.ok()) << old_client.status();
  client::ClientOptions rotated = TlsClient(/*with_cert=*/false);
  rotated.tls_ca_file = certs().other_ca_crt;
  rotated.tls_cert_file = certs().other_client_crt;
  rotated.tls_key_file = certs().other_client_key;
  rotated.connect_timeout = absl::Seconds(2);
  rotated.rpc_timeout = absl::Seconds(5);
  EXPECT_FALSE(client::WorkerClient::Connect(rotated).ok());

  // The Secret moves to the second CA: server certificate, key and client CA bundle at once.
  secret.Publish(certs().other_server_crt, certs().other_server_key, certs().other_ca_crt);
  absl::StatusOr<std::unique_ptr<client::WorkerClient>> new_client;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  do {
    new_client = client::WorkerClient::Connect(rotated);
    if (!new_client.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (!new_client.ok() && absl::Now() < deadline);
  ASSERT_TRUE(new_client.ok()) << "the rotated certificate was not served: " << new_client.status();
  WriteAndStep(**new_client);

  // New connections of the first CA's clients are refused now (they do not trust the new server
  // certificate, and the server no longer trusts their client certificate)...
  client::ClientOptions stale = TlsClient(/*with_cert=*/true);
  stale.connect_timeout = absl::Seconds(2);
  stale.rpc_timeout = absl::Seconds(5);
  EXPECT_FALSE(client::WorkerClient::Connect(stale).ok());
  client::ClientOptions stale_cert = rotated;
  stale_cert.tls_cert_file = certs().client_crt;
  stale_cert.tls_key_file = certs().client_key;
  EXPECT_FALSE(client::WorkerClient::Connect(stale_cert).ok())
      << "a client certificate of the CA rotated out was accepted";
  // ... a client certificate is still required ...
  client::ClientOptions no_cert = rotated;
  no_cert.tls_cert_file.clear();
  no_cert.tls_key_file.clear();
  EXPECT_FALSE(client::WorkerClient::Connect(no_cert).ok()) << "a client without a certificate was let in";
  // ... and a connection opened before the rotation keeps its session.
  auto info = (*old_client)->Describe();
  EXPECT_TRUE(info.ok()) << info.status();
}

TEST_F(WorkerTlsTest, BadClientTlsOptionsAreInvalidArgument) {
  StartWorker(TlsOptions(/*require_client_cert=*/false));
  client::ClientOptions options = TlsClient(/*with_cert=*/true);
  options.tls_key_file.clear();
  auto client = client::WorkerClient::Connect(options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << client.status();

  options = TlsClient(/*with_cert=*/false);
  options.tls_ca_file = certs().dir + "/missing.crt";
  client = client::WorkerClient::Connect(options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << client.status();
  EXPECT_NE(client.status().message().find("tls_ca_file"), absl::string_view::npos);
}

// Plaintext servers: no certificates needed, so these never skip.
TEST(WorkerHealthPortTest, PlaintextServerCanHaveAHealthPortToo) {
  service::ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.health_listen_address = "127.0.0.1:0";
  auto started = service::WorkerServer::Start(options, TestEngine());
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<service::WorkerServer> server = *std::move(started);
  EXPECT_EQ(server->security_mode(), "plaintext");
  grpc::Status status;
  EXPECT_EQ(HealthCheck(server->health_address(), "", &status), 1) << status.error_message();
  EXPECT_EQ(HealthCheck(server->address(), "", &status), 1) << status.error_message();
  // Reflection is on the API port only (its builder plugin is global to gRPC: the health port
  // drops it).
  const std::string reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
  std::string raw;
  status = RawUnaryCall(server->address(), reflection, "", &raw);
  EXPECT_NE(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  status = RawUnaryCall(server->health_address(), reflection, "", &raw);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  EXPECT_NE(status.error_message().find("serves only grpc.health.v1"), std::string::npos)
      << status.error_message();
}

TEST(WorkerHealthPortTest, NoHealthPortUnlessAsked) {
  service::ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  auto started = service::WorkerServer::Start(options, TestEngine());
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<service::WorkerServer> server = *std::move(started);
  EXPECT_EQ(server->health_port(), 0);
  EXPECT_EQ(server->health_address(), "");
}

}  // namespace
}  // namespace pkv
