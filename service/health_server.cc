#include "service/health_server.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/security/server_credentials.h"

namespace pkv::service {
namespace {

// The health-only server's answer to every method but grpc.health.v1's: UNIMPLEMENTED, saying
// where the API is. (gRPC also needs one callback service to start a server at all: the default
// health service is added later and does not count.)
class HealthPortFallback final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    class Refuse final : public grpc::ServerGenericBidiReactor {
     public:
      explicit Refuse(const std::string& method) {
        Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                            absl::StrCat(method, ": this port serves only grpc.health.v1; the API "
                                                 "is on the --listen port")));
      }
      void OnDone() override { delete this; }
    };
    return new Refuse(ctx->method());
  }
};

// Drops the builder plugins (reflection registers itself globally for every ServerBuilder), so
// the health-only server serves grpc.health.v1 and nothing else.
class NoPluginsOption final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->clear();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<HealthOnlyServer>> HealthOnlyServer::Start(const std::string& address) {
  std::unique_ptr<HealthOnlyServer> health(new HealthOnlyServer());
  grpc::EnableDefaultHealthCheckService(true);  // process-wide; WorkerServer::Start sets it too
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<NoPluginsOption>());
  health->fallback_ = std::make_unique<HealthPortFallback>();
  builder.RegisterCallbackGenericService(health->fallback_.get());
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &health->port_);
  health->server_ = builder.BuildAndStart();
  if (health->server_ == nullptr || health->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("--health_listen: cannot listen on ", address));
  }
  return health;
}

void HealthOnlyServer::Stop() {
  server_->Shutdown(absl::ToChronoTime(absl::Now()));
  server_->Wait();
}

}  // namespace pkv::service
