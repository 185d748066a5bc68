// Tests of the engine factory (engine/engine_factory.h): configurations it refuses with the
// setting named, how the KV pool is sized from the one setting given, and --backend=cuda without
// a usable GPU. CPU only; no server.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/engine_factory.h"
#include "gtest/gtest.h"
#include "tests/support/small_model.h"

namespace pkv::engine {
namespace {

ModelShape SmallShape() { return testing_support::SmallTestShape(); }

TEST(EngineFactoryTest, RejectsBadConfigurations) {
  EngineConfig c;
  c.shape = SmallShape();
  c.backend = "tpu";
  c.num_pages = 4;
  EXPECT_EQ(BuildEngine(c).status().code(), absl::StatusCode::kInvalidArgument);
  c.backend = "cpu";
  c.shape.head_dim = 100;
  EXPECT_EQ(BuildEngine(c).status().code(), absl::StatusCode::kInvalidArgument);
  c.shape = SmallShape();
  c.num_pages = 0;
  c.kv_pool_bytes = 10;
  EXPECT_EQ(ResolvePoolSize(c, /*cuda=*/false).status().code(), absl::StatusCode::kInvalidArgument);
  c.kv_pool_bytes = 10 * SmallShape().page_bytes_all_layers() + 5;
  EXPECT_EQ(ResolvePoolSize(c, /*cuda=*/false)->pages, 10);
  EXPECT_TRUE(BuildEngine(c).ok());
  for (const int32_t interval : {0, -1, 1025}) {
    c.attention_timing_interval = interval;
    const absl::Status s = BuildEngine(c).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << interval;
    EXPECT_NE(s.message().find("attention_timing_interval"), std::string_view::npos) << s;
  }
  c.attention_timing_interval = 1024;
  EXPECT_TRUE(BuildEngine(c).ok());
}

// The pool is sized by at most one setting, and the one set is the size used on both backends.
TEST(EngineFactoryTest, PoolSizeComesFromTheOneSettingGiven) {
  EngineConfig c;
  c.shape = SmallShape();
  const int64_t page_bytes = SmallShape().page_bytes_all_layers();
  for (const bool cuda : {false, true}) {
    SCOPED_TRACE(cuda ? "cuda" : "cpu");
    c = EngineConfig{};
    c.shape = SmallShape();
    c.num_pages = 7;
    auto size = ResolvePoolSize(c, cuda);
    ASSERT_TRUE(size.ok()) << size.status();
    EXPECT_EQ(size->pages, 7);
    EXPECT_EQ(size->gpu_memory_fraction, 0);
    EXPECT_EQ(size->origin, "--num_pages=7");

    c.num_pages = 0;
    c.kv_pool_bytes = 9 * page_bytes + 1;  // bytes apply on the GPU too, not a fraction
    size = ResolvePoolSize(c, cuda);
    ASSERT_TRUE(size.ok()) << size.status();
    EXPECT_EQ(size->pages, 9);
    EXPECT_EQ(size->gpu_memory_fraction, 0);
  }
  // Nothing set: each backend's default.
  c = EngineConfig{};
  c.shape = SmallShape();
  EXPECT_EQ(ResolvePoolSize(c, false)->pages, kDefaultCpuPoolBytes / page_bytes);
  EXPECT_EQ(ResolvePoolSize(c, true)->pages, 0);
  EXPECT_EQ(ResolvePoolSize(c, true)->gpu_memory_fraction, kDefaultGpuMemoryFraction);
  // A fraction sizes only the CUDA backend's pool.
  c.gpu_memory_fraction = 0.5;
  EXPECT_EQ(ResolvePoolSize(c, true)->gpu_memory_fraction, 0.5);
  const absl::Status on_cpu = ResolvePoolSize(c, false).status();
  EXPECT_EQ(on_cpu.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(on_cpu.message().find("--gpu_memory_fraction=0.5"), std::string_view::npos) << on_cpu;
  EXPECT_NE(on_cpu.message().find("cpu backend"), std::string_view::npos) << on_cpu;
}

TEST(EngineFactoryTest, TwoPoolSizesOrAnOutOfRangeOneAreRejected) {
  struct Case {
    int64_t num_pages;
    int64_t kv_pool_bytes;
    double gpu_memory_fraction;
    std::vector<std::string> named;  // what the message must name
  };
  const std::vector<Case> cases = {
      {64, int64_t{1} << 30, 0, {"--num_pages=64", "--kv_pool_bytes=1073741824"}},
      {64, 0, 0.5, {"--num_pages=64", "--gpu_memory_fraction=0.5"}},
      {0, int64_t{1} << 30, 0.5, {"--kv_pool_bytes=1073741824", "--gpu_memory_fraction=0.5"}},
      {64, int64_t{1} << 30, 0.5, {"--num_pages=64", "--kv_pool_bytes", "--gpu_memory_fraction"}},
      {-1, 0, 0, {"--num_pages"}},
      {0, -1, 0, {"--kv_pool_bytes"}},
      {0, 0, 1.5, {"--gpu_memory_fraction"}},
      {0, 0, -0.1, {"--gpu_memory_fraction"}},
  };
  for (const Case& k : cases) {
    EngineConfig c;
    c.shape = SmallShape();
    c.backend = "cpu";
    c.num_pages = k.num_pages;
    c.kv_pool_bytes = k.kv_pool_bytes;
    c.gpu_memory_fraction = k.gpu_memory_fraction;
    for (const bool cuda : {false, true}) {
      const absl::Status s = ResolvePoolSize(c, cuda).status();
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      for (const std::string& name : k.named) EXPECT_NE(s.message().find(name), std::string_view::npos) << s;
    }
    EXPECT_EQ(BuildEngine(c).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// --backend=cuda never falls back to the CPU: without a usable GPU (or without CUDA compiled in)
// the engine is not built, and the message names the flag.
TEST(EngineFactoryTest, CudaBackendWithoutAGpuFailsAndNamesTheFlag) {
  EngineConfig c;
  c.shape = SmallShape();
  c.backend = "cuda";
  c.num_pages = 16;
  const auto engine = BuildEngine(c);
  if (engine.ok()) GTEST_SKIP() << "a GPU is usable here: " << (*engine)->Info().device;
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition) << engine.status();
  EXPECT_NE(engine.status().message().find("--backend=cuda"), std::string_view::npos) << engine.status();
  EXPECT_NE(engine.status().message().find("--backend=cpu"), std::string_view::npos) << engine.status();
}

}  // namespace
}  // namespace pkv::engine
