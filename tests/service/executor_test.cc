// Tests of service/executor.h: bounded admission, draining on shutdown.
#include "service/executor.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <random>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "common/thread_priority.h"
#include "gtest/gtest.h"

namespace pkv::service {
namespace {

// A gate the test opens to let blocked tasks finish.
class Gate {
 public:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return open_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST(BoundedExecutorTest, RunsEveryAcceptedTask) {
  std::atomic<int> ran{0};
  {
    BoundedExecutor executor(2, 1000);
    for (int i = 0; i < 500; ++i) ASSERT_TRUE(executor.TrySubmit([&ran] { ran.fetch_add(1); }));
  }  // the destructor drains the queue
  EXPECT_EQ(ran.load(), 500);
}

// Polling workers: no task is lost whether it arrives while a worker polls, after it went to
// sleep, or while every worker is busy; tasks submitted from inside tasks run too.
TEST(BoundedExecutorTest, PollingWorkersLoseNoTask) {
  for (int spin_us : {1, 50, 2000}) {
    std::atomic<int> ran{0}, nested{0};
    {
      BoundedExecutor executor(2, 100000, std::chrono::microseconds(spin_us));
      std::mt19937 rng(spin_us);
      for (int i = 0; i < 3000; ++i) {
        if (rng() % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        ASSERT_TRUE(executor.TrySubmit([&ran, &nested, &executor, i] {
          ran.fetch_add(1);
          if (i % 5 == 0) executor.SubmitAlways([&nested] { nested.fetch_add(1); });
        }));
        if (i % 500 == 0) {
          // Wait for quiescence: the next task finds sleeping workers.
          while (executor.queued() > 0 || executor.running() > 0) std::this_thread::yield();
          std::this_thread::sleep_for(std::chrono::microseconds(2 * spin_us + 100));
        }
      }
    }  // the destructor drains the queue
    EXPECT_EQ(ran.load(), 3000) << "spin " << spin_us;
    EXPECT_EQ(nested.load(), 600) << "spin " << spin_us;
  }
}

TEST(BoundedExecutorTest, RefusesWhenTheQueueIsFull) {
  BoundedExecutor executor(1, 2);
  Gate gate;
  std::atomic<int> ran{0};
  std::atomic<bool> started{false};
  ASSERT_TRUE(executor.TrySubmit([&] {
    started.store(true);
    gate.Wait();
    ran.fetch_add(1);
  }));
  while (!started.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(executor.running(), 1);
  EXPECT_TRUE(executor.TrySubmit([&] { ran.fetch_add(1); }));
  EXPECT_TRUE(executor.TrySubmit([&] { ran.fetch_add(1); }));
  EXPECT_EQ(executor.queued(), 2);
  EXPECT_FALSE(executor.TrySubmit([&] { ran.fetch_add(100); })) << "a third waiting task must be refused";
  executor.SubmitAlways([&] { ran.fetch_add(1); });  // cleanups are never refused
  EXPECT_EQ(executor.queued(), 3);
  gate.Open();
  executor.Shutdown();
  EXPECT_EQ(ran.load(), 4);
}

TEST(BoundedExecutorTest, UncountedTasksTakeNoSlotFromBoundedWork) {
  BoundedExecutor executor(1, 1);
  Gate gate;
  std::atomic<int> ran{0};
  std::atomic<bool> started{false};
  ASSERT_TRUE(executor.TrySubmit([&] {
    started.store(true);
    gate.Wait();
    ran.fetch_add(1);
  }));
  while (!started.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  executor.SubmitUncounted([&] { ran.fetch_add(10); });
  executor.SubmitUncounted([&] { ran.fetch_add(10); });
  EXPECT_TRUE(executor.TrySubmit([&] { ran.fetch_add(1); })) << "the uncounted tasks took the only slot";
  EXPECT_FALSE(executor.TrySubmit([&] { ran.fetch_add(100); }));
  EXPECT_EQ(executor.queued(), 3);
  gate.Open();
  executor.Shutdown();
  EXPECT_EQ(ran.load(), 22);
}

TEST(BoundedExecutorTest, AfterShutdownTrySubmitFailsAndSubmitAlwaysRunsInline) {
  BoundedExecutor executor(2, 4);
  executor.Shutdown();
  executor.Shutdown();  // idempotent
  EXPECT_FALSE(executor.TrySubmit([] {}));
  bool ran = false;
  executor.SubmitAlways([&ran] { ran = true; });
  EXPECT_TRUE(ran);
}

TEST(BoundedExecutorTest, MoveOnlyTasks) {
  BoundedExecutor executor(1, 4);
  auto value = std::make_unique<int>(7);
  std::atomic<int> seen{0};
  ASSERT_TRUE(executor.TrySubmit([v = std::move(value), &seen] { seen.store(*v); }));
  executor.Shutdown();
  EXPECT_EQ(seen.load(), 7);
}

// Workers started with a nice value run at it (the ingest executor's: decode goes first on a
// contended core); the thread that made the executor keeps its own.
TEST(BoundedExecutorTest, WorkersRunAtTheirNiceValue) {
  auto nice_of_this_thread = [] {
    errno = 0;
    return getpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)));
  };
  const int before = nice_of_this_thread();
  if (before >= 7) GTEST_SKIP() << "the test already runs at nice " << before;
  std::atomic<int> seen{-100};
  {
    BoundedExecutor executor(2, 8, std::chrono::microseconds(0), 1, 7);
    Gate done;
    ASSERT_TRUE(executor.TrySubmit([&] {
      seen = nice_of_this_thread();
      done.Open();
    }));
    done.Wait();
  }
  EXPECT_EQ(seen.load(), 7);
  EXPECT_EQ(nice_of_this_thread(), before);
  EXPECT_EQ(SetThisThreadNice(20).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SetThisThreadNice(-1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SetThisThreadNice(0).ok());
}

// Workers carry the executor's name (what `top -H` and /proc/<pid>/task/*/comm show), cut to
// Linux's 15 bytes; the thread that made the executor keeps its own.
TEST(BoundedExecutorTest, WorkersCarryTheExecutorsName) {
  auto name_of_this_thread = [] {
    char name[16] = {};
    pthread_getname_np(pthread_self(), name, sizeof(name));
    return std::string(name);
  };
  const std::string before = name_of_this_thread();
  std::string seen;
  {
    BoundedExecutor executor(1, 8, std::chrono::microseconds(0), 1, 0, "pkv-ingest-with-a-long-name");
    Gate done;
    ASSERT_TRUE(executor.TrySubmit([&] {
      seen = name_of_this_thread();
      done.Open();
    }));
    done.Wait();
  }
  EXPECT_EQ(seen, "pkv-ingest-with");
  EXPECT_EQ(name_of_this_thread(), before);
}

}  // namespace
}  // namespace pkv::service
