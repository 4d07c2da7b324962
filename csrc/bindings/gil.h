// Running C++ work with the GIL released.
//
// Not py::gil_scoped_release: its destructor takes the GIL back, and when the interpreter is
// finalising, a daemon thread that tries to is ended by pthread_exit, whose unwinding through
// that (implicitly noexcept) destructor calls std::terminate -- "terminate called without an
// active exception" at exit while threads are inside Model.run() (pybind11 issue #2215). Here
// the GIL is taken back in normal code, on both the return and the exception path, so the
// forced unwind passes through (pybind11's dispatcher rethrows it).
#pragma once

#include <pybind11/pybind11.h>

#include <optional>
#include <type_traits>
#include <utility>

namespace pyrt {

// The GIL is retaken outside the try block: retaking it may itself end the thread (a forced
// unwind), which a catch (...) here would then swallow ("FATAL: exception not rethrown").
template <typename F>
auto without_gil(F&& f) -> decltype(f()) {
  using R = decltype(f());
  PyThreadState* state = PyEval_SaveThread();
  if constexpr (std::is_void_v<R>) {
    try {
      f();
    } catch (...) {
      PyEval_RestoreThread(state);
      throw;
    }
    PyEval_RestoreThread(state);
  } else {
    std::optional<R> result;
    try {
      result.emplace(f());
    } catch (...) {
      PyEval_RestoreThread(state);
      throw;
    }
    PyEval_RestoreThread(state);
    return std::move(*result);
  }
}

}  // namespace pyrt
