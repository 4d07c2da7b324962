#include "threadpool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#include "../runtime_limits.h"

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

// One condition variable per worker, so that a call wakes only the workers it uses: with
// one shared by all, a call on two threads after one on 200 woke all 199 sleeping workers to
// find nothing for them, and every later call in the process was ~50x slower.
struct ThreadPool::Worker {
  std::condition_variable wake;
};

struct ThreadPool::State {
  std::mutex call_mu;  // one run() at a time
  std::mutex mu;
  std::condition_variable done;
  // Grown by run() under both locks; never shrinks, and a deque never moves its elements, so
  // each worker keeps a reference to its own.
  std::deque<Worker> workers;
  const std::function<void(size_t)>* fn = nullptr;
  size_t n_tasks = 0, next = 0, end = 0;  // untaken tasks: [next, end)
  // Written under mu; atomic so that the spinning reads outside it are well defined.
  std::atomic<size_t> finished{0};
  std::atomic<int> active_workers{0};  // workers allowed to take part in the current call
  std::atomic<unsigned long> generation{0};
  std::atomic<bool> stop{false};  // workers leave; run() works alone
  std::exception_ptr error;
};

namespace {
ThreadPool* g_pool = nullptr;
}  // namespace

// The pool is leaked on purpose. At interpreter exit, Python daemon threads can still be
// inside run() while static destructors run; destroying the pool under them aborted the
// process ("terminate called without an active exception"). Instead the exit handler only
// tells the workers to leave (joining none, so a call in flight cannot hang the exit) and
// later calls run on their caller alone.
ThreadPool& ThreadPool::global() {
  static ThreadPool* pool = [] {
    g_pool = new ThreadPool;
    std::atexit(at_exit);
    pthread_atfork(nullptr, nullptr, in_forked_child);
    return g_pool;
  }();
  return *pool;
}

ThreadPool::ThreadPool() : state_(new State) {}

// Only a pool other than global() is ever destroyed. Its detached workers may still be
// leaving and reading the state, so the state is left to them.
ThreadPool::~ThreadPool() { shutdown(*state_); }

void ThreadPool::shutdown(State& s) {
  std::lock_guard<std::mutex> lk(s.mu);
  s.stop = true;
  for (auto& w : s.workers) w.wake.notify_one();
}

void ThreadPool::at_exit() { shutdown(*g_pool->state_); }

// fork() copies only the calling thread: the child has none of the workers, and the locks may
// have been copied held by a thread that does not exist there, so unlocking them is undefined
// behaviour. The child starts from a fresh state (no workers; run() starts new ones) and
// leaks the old one, whose held mutexes and condition variables must not be destroyed.
void ThreadPool::in_forked_child() {
  if (g_pool) g_pool->state_ = new State;
}

// Starts workers until there are n. A thread the OS refuses (out of threads or of address
// space for its stack) is reported to the caller; the workers started so far stay usable.
void ThreadPool::ensure_workers(State& s, int n) {
  while (static_cast<int>(s.workers.size()) < n) {
    const int index = static_cast<int>(s.workers.size());
    Worker* w;
    {
      std::lock_guard<std::mutex> lk(s.mu);
      w = &s.workers.emplace_back();
    }
    try {
      std::thread([&s, w, index] { worker_loop(s, *w, index); }).detach();
    } catch (const std::system_error& e) {
      std::lock_guard<std::mutex> lk(s.mu);
      s.workers.pop_back();
      throw std::runtime_error("thread pool: could not start worker thread " + std::to_string(index + 1) +
                               " of the " + std::to_string(n) + " this call needs: " + e.what());
    }
  }
}

// Takes tasks until none are left. Called with mu unlocked.
void ThreadPool::drain(State& s, bool from_front) {
  for (;;) {
    size_t i;
    {
      std::lock_guard<std::mutex> lk(s.mu);
      if (s.next >= s.end) return;
      i = from_front ? s.next++ : --s.end;
    }
    try {
      (*s.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(s.mu);
      if (!s.error) s.error = std::current_exception();
    }
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.finished.fetch_add(1) + 1 == s.n_tasks) s.done.notify_all();
  }
}

void ThreadPool::worker_loop(State& s, Worker& w, int index) {
  unsigned long seen = 0;
  const auto called = [&] { return s.stop || (s.generation != seen && index < s.active_workers); };
  for (;;) {
    if (!spin_until(called)) {
      std::unique_lock<std::mutex> lk(s.mu);
      w.wake.wait(lk, called);
    }
    if (s.stop) return;
    seen = s.generation;
    drain(s, false);
  }
}

void ThreadPool::run(size_t n_tasks, int threads, const std::function<void(size_t)>& fn) {
  if (n_tasks == 0) return;
  State& s = *state_;
  std::lock_guard<std::mutex> call(s.call_mu);
  // The bindings refuse more than kMaxThreads; this keeps any other caller from asking the
  // OS for a thread per asked-for thread.
  const int most = std::min(threads, kMaxThreads);
  const int helpers = static_cast<int>(std::min<size_t>(most > 1 ? most - 1 : 0, n_tasks - 1));
  if (helpers == 0 || s.stop) {
    for (size_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  ensure_workers(s, helpers);
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.fn = &fn;
    s.n_tasks = n_tasks;
    s.next = s.finished = 0;
    s.end = n_tasks;
    s.active_workers = helpers;
    s.error = nullptr;
    ++s.generation;
  }
  for (int i = 0; i < helpers; ++i) s.workers[i].wake.notify_one();
  drain(s, true);
  std::exception_ptr err;
  {
    const auto all_done = [&] { return s.finished == s.n_tasks; };
    spin_until(all_done);
    std::unique_lock<std::mutex> lk(s.mu);
    s.done.wait(lk, all_done);
    s.active_workers = 0;
    s.fn = nullptr;
    err = s.error;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace pyrt
