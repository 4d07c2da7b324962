#include "threadpool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace pyrt {
namespace {

// How long a waiting thread polls before it sleeps: a few times the gap between two ops of a
// forward pass, far below anything a person would notice as a busy core.
constexpr std::chrono::microseconds kSpin{200};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

// Polls for up to kSpin until ready() holds; true if it did.
template <typename Ready>
bool spin_until(Ready&& ready) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (unsigned i = 0;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return ready();
  }
}

}  // namespace

size_t task_count(size_t work, size_t min_work, int threads) {
  if (threads <= 1) return 1;
  const size_t most = 4 * static_cast<size_t>(threads);
  return std::max<size_t>(1, std::min(most, work / std::max<size_t>(min_work, 1)));
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int n) {
  while (static_cast<int>(workers_.size()) < n) {
    const int index = static_cast<int>(workers_.size());
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

// Takes tasks until none are left. Called with mu_ unlocked.
void ThreadPool::drain(bool from_front) {
  for (;;) {
    size_t i;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (next_ >= end_) return;
      i = from_front ? next_++ : --end_;
    }
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lk(mu_);
    if (finished_.fetch_add(1) + 1 == n_tasks_) done_.notify_all();
  }
}

void ThreadPool::worker_loop(int index) {
  unsigned long seen = 0;
  const auto called = [&] { return stop_ || (generation_ != seen && index < active_workers_); };
  for (;;) {
    if (!spin_until(called)) {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, called);
    }
    if (stop_) return;
    seen = generation_;
    drain(false);
  }
}

void ThreadPool::run(size_t n_tasks, int threads, const std::function<void(size_t)>& fn) {
  if (n_tasks == 0) return;
  std::lock_guard<std::mutex> call(call_mu_);
  const int helpers = static_cast<int>(std::min<size_t>(threads > 1 ? threads - 1 : 0, n_tasks - 1));
  if (helpers == 0) {
    for (size_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  ensure_workers(helpers);
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_ = finished_ = 0;
    end_ = n_tasks;
    active_workers_ = helpers;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  drain(true);
  std::exception_ptr err;
  {
    const auto all_done = [&] { return finished_ == n_tasks_; };
    spin_until(all_done);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, all_done);
    active_workers_ = 0;
    fn_ = nullptr;
    err = error_;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace pyrt
