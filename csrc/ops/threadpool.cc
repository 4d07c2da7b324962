#include "threadpool.h"

#include <algorithm>

namespace pyrt {

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
void ThreadPool::drain() {
  for (;;) {
    size_t i;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (next_ >= n_tasks_) return;
      i = next_++;
    }
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lk(mu_);
    if (++finished_ == n_tasks_) done_.notify_all();
  }
}

void ThreadPool::worker_loop(int index) {
  unsigned long seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || (generation_ != seen && index < active_workers_); });
      if (stop_) return;
      seen = generation_;
    }
    drain();
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
    active_workers_ = helpers;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  drain();
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return finished_ == n_tasks_; });
    active_workers_ = 0;
    fn_ = nullptr;
    err = error_;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace pyrt
