"""The thread pool under Python threads, fork, interpreter exit and huge thread counts.

Each failure mode here was seen on real use: several threads sharing a model, multiprocessing
forking while a thread was inside run(), an interpreter exiting while daemon threads ran,
and one call with an absurd num_threads slowing every later call. Tests that could hang or
kill the interpreter run in a subprocess or child with a timeout. Torch-free.
"""
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import pyruntime
from pyruntime import _core
from pyruntime.modelfile import write_model

from _graphs import FP32, W8A8, random_tensors, tiny_graph

# Big enough that every GEMM and the attention split into several pool tasks (small models
# run single-threaded below threadpool.h's kMinTask* sizes), small enough to run in ~1 ms.
ARCH = dict(img_size=[16, 16], patch_size=[4, 4], in_chans=3, embed_dim=64, num_heads=2,
            mlp_hidden=128, depth=2, num_classes=10)
BATCH = 8
TIMEOUT = 60  # seconds before a child or subprocess counts as hung
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
MAX_THREADS = _core.limits()["max_threads"]


def write(tmp_path, name, layer_params, seed):
    graph = tiny_graph(**ARCH)
    for layer in graph["layers"]:
        graph["layers"][layer] = dict(layer_params)
    path = tmp_path / name
    write_model(path, graph, random_tensors(graph, seed=seed), "{}", {"source": "test"})
    return path


def images(seed=1):
    return np.random.default_rng(seed).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return [write(d, "fp32.pyrt", FP32, 3), write(d, "w8a8.pyrt", W8A8, 4)]


def python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS_DIR, env.get("PYTHONPATH", "")])
    return env


def run_python(code, timeout=TIMEOUT):
    """Runs ``code`` in a fresh interpreter; a hang fails the test instead of stalling it."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=python_env())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"subprocess hung for {timeout}s; stderr: {e.stderr!r}")


class Looper:
    """A thread that calls run() until stopped, so that other events land mid-call."""

    def __init__(self, model, threads=2):
        self.model, self.threads, self.calls, self.error = model, threads, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        x = images(9)
        try:
            while not self._stop.is_set():
                self.model.run(x, num_threads=self.threads)
                self.calls += 1
        except BaseException as e:  # reported by stop(): a thread's exception is otherwise lost
            self.error = e

    def __enter__(self):
        self._thread.start()
        while self.calls == 0 and self.error is None:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the looping thread hung"
        assert self.error is None, self.error


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_python_threads_sharing_models_get_single_threaded_bits(model_paths, threads):
    models = [pyruntime.load(p) for p in model_paths]
    inputs = [images(seed) for seed in range(3)]
    want = {(m, i): models[m].run(inputs[i], num_threads=1).logits for m in range(2) for i in range(3)}
    errors = []

    def worker(k):
        try:
            for step in range(12):
                m, i = (k + step) % 2, (k * 7 + step) % 3
                got = models[m].run(inputs[i], num_threads=threads).logits
                if not np.array_equal(got, want[m, i]):
                    errors.append(f"thread {k} step {step}: model {m} input {i} differs")
        except Exception as e:
            errors.append(f"thread {k}: {e!r}")

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in pool), "a thread hung"
    assert errors == []


def wait_child(pid, timeout=TIMEOUT):
    """The child's exit status; kills it and fails if it has not exited within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung (killed after {timeout}s)")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running: the point
@pytest.mark.parametrize("same_model", [False, True], ids=["other-model", "same-model"])
def test_fork_while_another_thread_is_inside_run(model_paths, same_model):
    busy = pyruntime.load(model_paths[0])
    # The child runs another model (the pool both share was inherited mid-call), or the very
    # model the parent's thread was inside (its executor's lock was inherited held too).
    other = busy if same_model else pyruntime.load(model_paths[1])
    x = images(2)
    want = other.run(x, num_threads=1).logits
    with Looper(busy):
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ok = np.array_equal(other.run(x, num_threads=2).logits, want)
                    ok = ok and np.array_equal(other.run(x, num_threads=3).logits, want)
                    code = 0 if ok else 3
                finally:
                    os._exit(code)
            assert wait_child(pid) == 0
            time.sleep(0.0005 * (_ % 4))  # vary where in the looper's call the fork lands


_FORKED = {}


def _run_inherited(seed):
    return _FORKED["model"].run(images(seed), num_threads=2).logits


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_multiprocessing_fork_while_another_thread_is_inside_run(model_paths):
    busy = pyruntime.load(model_paths[0])
    _FORKED["model"] = pyruntime.load(model_paths[1])
    want = [_run_inherited(seed) for seed in range(6)]
    try:
        with Looper(busy):
            for _ in range(3):
                with multiprocessing.get_context("fork").Pool(2) as procs:
                    got = procs.map_async(_run_inherited, range(6)).get(TIMEOUT)
                assert all(np.array_equal(g, w) for g, w in zip(got, want))
    except multiprocessing.TimeoutError:
        pytest.fail("a forked multiprocessing worker hung")
    finally:
        _FORKED.clear()


# Two causes of "terminate called without an active exception" at exit: the pool's static
# destructor (now never run), and Python ending a daemon thread that re-takes the GIL with
# pthread_exit, whose unwinding through py::gil_scoped_release's noexcept destructor called
# std::terminate (pybind11 issue #2215; the bindings now use without_gil, csrc/bindings/gil.h).
def test_interpreter_exit_while_daemon_threads_run(model_paths):
    code = f"""
        import threading, time
        import numpy as np, pyruntime
        models = [pyruntime.load(p) for p in {[str(p) for p in model_paths]!r}]
        x = np.random.default_rng(0).standard_normal(({BATCH}, 3, 16, 16)).astype(np.float32)
        def loop(model, threads):
            while True:
                model.run(x, num_threads=threads)
        for k in range(4):
            threading.Thread(target=loop, args=(models[k % 2], 2 + k % 2), daemon=True).start()
        time.sleep(0.2)
    """
    for attempt in range(5):
        r = run_python(code)
        assert r.returncode == 0 and "terminate" not in r.stderr, (attempt, r.returncode, r.stderr)


def thread_count():
    return len(os.listdir("/proc/self/task"))


def test_huge_thread_counts_are_capped_and_leave_later_calls_alone():
    # In a fresh process: the pool's threads are process-wide, and counting them needs a
    # process whose pool nobody else has grown.
    r = run_python(f"""
        import os, time
        import numpy as np
        from pyruntime import _core

        def tasks():
            return {{t: open(f"/proc/self/task/{{t}}/status").read() for t in os.listdir("/proc/self/task")}}

        def switches(status):
            line = [l for l in status.splitlines() if l.startswith("voluntary_ctxt_switches")][0]
            return int(line.split()[1])

        rng = np.random.default_rng(0)
        a = rng.standard_normal((512, 64)).astype(np.float32)
        b = rng.standard_normal((64, 1024)).astype(np.float32)
        want = _core.gemm_f32(a, b, None, 1, None)
        base = len(tasks())
        assert np.array_equal(_core.gemm_f32(a, b, None, 200, None), want)
        after_200 = len(tasks())
        assert after_200 - base >= 100, (base, after_200)  # the big call really used its threads
        assert after_200 - base <= 199, (base, after_200)

        # A call the bindings let through with more threads than the cap: refused with a
        # ValueError, or clamped by the pool; never an OS thread per asked-for thread.
        try:
            assert np.array_equal(_core.gemm_f32(a, b, None, 10**6, None), want)
        except ValueError as e:
            assert "num_threads" in str(e), e
        assert len(tasks()) - base <= {MAX_THREADS} - 1, (base, len(tasks()))

        # Later two-thread calls, each after the workers fell asleep, must wake one worker,
        # not all of them: count the threads that woke up at all.
        time.sleep(0.05)
        before = {{t: switches(s) for t, s in tasks().items()}}
        for _ in range(30):
            assert np.array_equal(_core.gemm_f32(a, b, None, 2, None), want)
            time.sleep(0.003)  # longer than the pool's spin: its workers go to sleep
        after = {{t: switches(s) for t, s in tasks().items()}}
        woken = sum(1 for t in before if t in after and after[t] != before[t])
        assert woken <= 4, f"{{woken}} of {{len(before)}} threads woke for two-thread calls"
        print("ok", base, after_200, woken)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok"), r.stdout


def test_thread_creation_failure_is_an_exception_and_the_pool_survives():
    # An address-space limit makes the next thread's stack allocation fail, as a process at
    # its thread limit would ("Resource temporarily unavailable").
    r = run_python("""
        import resource
        import numpy as np
        from pyruntime import _core

        rng = np.random.default_rng(0)
        a = rng.standard_normal((512, 64)).astype(np.float32)
        b = rng.standard_normal((64, 1024)).astype(np.float32)
        want = _core.gemm_f32(a, b, None, 1, None)
        assert np.array_equal(_core.gemm_f32(a, b, None, 2, None), want)  # starts one worker
        vm = [l for l in open("/proc/self/status") if l.startswith("VmSize")][0]
        limit = int(vm.split()[1]) * 1024 + (96 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        try:
            _core.gemm_f32(a, b, None, 200, None)
            raise SystemExit("200 threads started under a 96 MB address-space margin")
        except RuntimeError as e:
            assert "thread" in str(e), e
        assert np.array_equal(_core.gemm_f32(a, b, None, 2, None), want)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert np.array_equal(_core.gemm_f32(a, b, None, 3, None), want)
        print("ok")
    """)
    assert r.returncode == 0 and "terminate" not in r.stderr, (r.returncode, r.stderr)
    assert r.stdout.startswith("ok"), r.stdout
