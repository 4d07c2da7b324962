// A small fork-join pool; the calling thread takes a share of the tasks itself.
//
// The caller takes tasks from the front of the range and the helpers from the back, so with
// ops that number their tasks in row order (parallel_tiles: all of a row block's panels
// before the next block) each thread keeps working on the same rows from op to op, and finds
// them in its own cache. Measured on deit_tiny at two threads: 3% faster in quiet phases of
// this host, ~12% when its second CPU is slowed. Balancing stays dynamic.
//
// Waiting is spin-then-sleep. A forward pass is a chain of ~100 short parallel ops a few
// microseconds apart, and waking a thread sleeping on a condition variable costs tens of
// microseconds (more in a VM): sleeping between ops cost ~20% of a deit_tiny forward at two
// threads. So a worker polls for the next call for a short while (kSpin, with a pause hint)
// before it sleeps, and the caller polls for completion the same way. Once a pass ends,
// nothing spins for longer than that.
#pragma once

#include <cstddef>
#include <functional>

namespace pyrt {

// Smallest task worth dispatching, in float elements of an element-wise op and in MACs of an
// fp32 or an int8 GEMM: a few microseconds of work, against ~1-2 us to hand a task to another
// thread. Below it a small model (17 tokens, width 128) ran slower on two threads than on one.
constexpr size_t kMinTaskElems = size_t(1) << 13;
constexpr size_t kMinTaskMacsF32 = size_t(1) << 17;
constexpr size_t kMinTaskMacsInt = size_t(1) << 19;

// How many tasks `work` units are worth on `threads` threads: four per thread for balance,
// none smaller than `min_work`, at least one.
size_t task_count(size_t work, size_t min_work, int threads);

// The global pool is created on first use and never destroyed; see threadpool.cc for why, and
// for what happens to it at interpreter exit and in a fork()ed child.
class ThreadPool {
 public:
  static ThreadPool& global();
  ~ThreadPool();

  // Calls fn(i) for every i in [0, n_tasks) on at most `threads` threads (the caller included,
  // at most kMaxThreads) and returns when all have finished. Concurrent callers are
  // serialised. An exception thrown by a task is rethrown here after the others finish; a
  // worker thread the OS refuses to start is a std::runtime_error, and the pool stays usable.
  void run(size_t n_tasks, int threads, const std::function<void(size_t)>& fn);

 private:
  struct Worker;
  struct State;

  ThreadPool();
  static void shutdown(State& s);
  static void at_exit();
  static void in_forked_child();
  static void ensure_workers(State& s, int n);
  static void worker_loop(State& s, Worker& w, int index);
  static void drain(State& s, bool from_front);  // the caller: true, helpers: false

  // Replaced, never freed, in a fork()ed child: its locks may have been copied held.
  State* state_;
};

}  // namespace pyrt
