// A small fork-join pool. Workers sleep on a condition variable between calls -- nothing spins
// after run() returns -- and the calling thread takes a share of the tasks itself.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pyrt {

class ThreadPool {
 public:
  static ThreadPool& global();
  ~ThreadPool();

  // Calls fn(i) for every i in [0, n_tasks) on at most `threads` threads (the caller included)
  // and returns when all have finished. Concurrent callers are serialised. An exception
  // thrown by a task is rethrown here after the others finish.
  void run(size_t n_tasks, int threads, const std::function<void(size_t)>& fn);

 private:
  void ensure_workers(int n);
  void worker_loop(int index);
  void drain();

  std::mutex call_mu_;  // one run() at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_tasks_ = 0, next_ = 0, finished_ = 0;
  int active_workers_ = 0;  // workers allowed to take part in the current call
  unsigned long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace pyrt
