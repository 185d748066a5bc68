// service/step_stream.h — StepStream, the decode path, served from completion queues that the
// worker's own threads poll.
//
// gRPC's callback API hands each completed read or write to one of gRPC's own threads before
// the reactor sees it; on the decode path that costs a thread wake-up per message each way.
// StepStreamServer instead owns `threads` completion queues, each polled by one thread: after an
// event the thread keeps polling without sleeping for `spin` (the next layer-step's request
// arrives within it while a token step is being decoded), then blocks until the next event. A
// stream lives on one queue. Its messages are answered as the callback reactor did: the
// request read is parsed and run on the decode executor (WorkerService::executor(), bounded:
// RESOURCE_EXHAUSTED when full), which then starts the write; every status goes in
// StepResponse.status, in order.
//
// Life cycle: construct before grpc::ServerBuilder::BuildAndStart (it adds the queues), Start
// after it, Stop after grpc::Server::Shutdown and after the executor ran its last task: Stop waits
// for every stream to end, then shuts the queues down and joins the threads.
// Thread-safety: Start and Stop from one thread; a stream's events are handled on its queue's
// thread, one operation in flight at a time, and its engine work on an executor thread in between.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "service/worker_service.h"

namespace pkv::service {

class StepStreamCall;

class StepStreamServer final {
 public:
  // Adds max(1, threads) completion queues to `builder`. `service` (not owned) must outlive this.
  StepStreamServer(grpc::ServerBuilder& builder, WorkerService& service, int threads, std::chrono::microseconds spin);
  StepStreamServer(const StepStreamServer&) = delete;
  StepStreamServer& operator=(const StepStreamServer&) = delete;
  // Stops (see Stop).
  ~StepStreamServer();

  // The server is started: listen for streams on every queue and start the threads.
  void Start();
  // The server is shut down (its streams cancelled or ended): waits for every stream to end, shuts
  // the queues down and joins the threads. Also right after construction when the server did not
  // start. Idempotent.
  void Stop();

  // Streams open now, plus one waiting call per queue while listening.
  int64_t live_calls() const { return live_.load(); }

 private:
  friend class StepStreamCall;

  void Listen(grpc::ServerCompletionQueue* cq);
  void Poll(grpc::ServerCompletionQueue* cq);
  void CallEnded();

  WorkerService& service_;
  const std::chrono::microseconds spin_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues_;
  std::vector<std::thread> threads_;
  std::atomic<int64_t> live_{0};
  std::mutex mu_;
  std::condition_variable ended_;
  bool started_ = false, stopped_ = false;
};

}  // namespace pkv::service
