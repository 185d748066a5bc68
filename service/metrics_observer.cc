#include "service/metrics_observer.h"

#include <algorithm>
#include <cmath>

#include "common/thread_priority.h"
#include "service/process_stats.h"

namespace pkv::service {

void MetricsObserver::OnTokenStepPlanned(const engine::TokenStepEvent& e) {
  m_->decisions(e.kernel, e.max_row_splits).Increment();
}

void MetricsObserver::OnLayerStep(const engine::LayerStepEvent& e) {
  if (e.replayed) {
    m_->step_replays().Increment();
    return;
  }
  m_->step_duration(e.kernel).Observe(e.step_seconds);
  m_->launches_per_step().Observe(e.launches);
  // The attention's device time is sampled (one layer-step in --attention_timing_interval per
  // descriptor slot on CUDA): the histogram and the cost-model counters see the timed ones.
  if (!e.attention_timed) return;
  m_->step_attend(e.kernel).Observe(e.attend_seconds);
  if (e.predicted_seconds > 0 && e.attend_seconds > 0) {
    m_->predicted_seconds(e.kernel).Increment(e.predicted_seconds);
    m_->measured_seconds(e.kernel).Increment(e.attend_seconds);
    m_->prediction_error().Observe(std::fabs(e.attend_seconds - e.predicted_seconds) / e.attend_seconds);
  }
}

void MetricsObserver::OnTokenStepCompleted(int32_t rows) {
  m_->decode_tokens().Increment(rows);
  m_->token_steps_completed().Increment();
}

void MetricsObserver::OnTokenStepAborted(int32_t) { m_->token_steps_aborted().Increment(); }

void MetricsObserver::OnPromptCommitted(int64_t bytes, double seconds) {
  m_->ingest_bytes().Increment(static_cast<double>(bytes));
  m_->ingest_duration().Observe(seconds);
}

PoolSampler::PoolSampler(const engine::Engine* engine, WorkerMetrics* metrics, std::function<bool()> ready,
                         std::chrono::milliseconds period)
    : engine_(engine), m_(metrics), ready_(std::move(ready)), period_(period) {
  SampleNow();
  thread_ = std::thread([this] {
    NameThisThread("pkv-metrics");
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, period_, [this] { return stop_; })) {
      lock.unlock();
      SampleNow();
      lock.lock();
    }
  });
}

PoolSampler::~PoolSampler() { Stop(); }

void PoolSampler::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void PoolSampler::SampleNow() {
  // The process first: Info() below waits for the engine lock, and these must not wait with it.
  if (absl::StatusOr<ProcessStats> p = ReadProcessStats(); p.ok()) {
    m_->process_start_time().Set(p->start_time_seconds);
    m_->process_resident_memory().Set(static_cast<double>(p->resident_bytes));
    m_->process_virtual_memory().Set(static_cast<double>(p->virtual_bytes));
    m_->process_open_fds().Set(static_cast<double>(p->open_fds));
    m_->process_max_fds().Set(static_cast<double>(p->max_fds));
  }
  const engine::EngineInfo info = engine_->Info();
  const double page_size = info.shape.page_size;
  m_->pool_capacity_pages().Set(static_cast<double>(info.pager.total_pages));
  m_->pool_pages_used().Set(static_cast<double>(info.pager.used_pages));
  m_->pool_pages_free().Set(static_cast<double>(info.pager.free_pages));
  // Disjoint token slots: stored tokens, the unwritten tail of held pages, free pages. (Pages are
  // never shared between sequences by the engine, so held pages x page size = reserved tokens.)
  const double reserved_unused = static_cast<double>(info.pager.reserved_tokens - info.pager.used_tokens);
  m_->pool_capacity_tokens().Set(static_cast<double>(info.pager.total_pages) * page_size);
  m_->pool_tokens_used().Set(static_cast<double>(info.pager.used_tokens));
  m_->pool_tokens_reserved_unused().Set(reserved_unused);
  m_->pool_tokens_free().Set(static_cast<double>(info.pager.free_pages) * page_size);
  // Free token slots: free pages plus the unused tail of every reserved page.
  const double free_slots = static_cast<double>(info.pager.free_pages) * page_size + reserved_unused;
  const double growth = std::max<int64_t>(1, info.active_sequences);
  m_->steps_until_full().Set(std::floor(free_slots / growth));
  m_->sequences_active().Set(static_cast<double>(info.active_sequences));
  m_->sequences_writing().Set(static_cast<double>(info.writing_sequences));
  m_->open_token_steps().Set(static_cast<double>(info.open_token_steps));
  m_->ready().Set(ready_ && ready_() ? 1.0 : 0.0);
}

}  // namespace pkv::service
