"""pyruntime._atomic: what an atomic write refuses to replace, and that no temporary file
outlives a write, even one killed by SIGTERM."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _graphs import random_tensors, tiny_graph
from pyruntime._atomic import atomic_path, atomic_write_bytes, check_target
from pyruntime.modelfile import write_model

REPO = str(Path(__file__).resolve().parent.parent)


def temps(d: Path) -> list:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


def test_replaces_a_regular_file(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    atomic_write_bytes(dest, b"new", inputs=[tmp_path / "does-not-exist"])
    assert dest.read_bytes() == b"new" and temps(tmp_path) == []


def test_refuses_a_device_node(tmp_path):
    dev = tmp_path / "null"
    try:  # a private /dev/null, so that a regression replaces nothing of the system's
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(ValueError, match="character device"):
        atomic_write_bytes(dev, b"x")
    graph = tiny_graph()
    with pytest.raises(ValueError, match="not a regular file"):
        write_model(dev, graph, random_tensors(graph), "{}", {})
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and temps(tmp_path) == []


def test_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        atomic_write_bytes(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and temps(tmp_path) == []


def test_refuses_a_symlink_and_a_directory(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"keep")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        atomic_write_bytes(link, b"x")
    assert link.is_symlink() and target.read_bytes() == b"keep"
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="directory"):
        atomic_write_bytes(tmp_path / "d", b"x")
    assert temps(tmp_path) == []


def test_refuses_to_overwrite_an_input(tmp_path):
    src = tmp_path / "ck.safetensors"
    src.write_bytes(b"source")
    os.link(src, tmp_path / "hard.safetensors")
    for spelling in (src, tmp_path / "." / "ck.safetensors", tmp_path / "hard.safetensors"):
        with pytest.raises(ValueError, match="is the input"):
            atomic_write_bytes(spelling, b"x", inputs=[src])
    graph = tiny_graph()
    with pytest.raises(ValueError, match="is the input"):
        write_model(src, graph, random_tensors(graph), "{}", {}, inputs=[str(src)])
    assert src.read_bytes() == b"source" and temps(tmp_path) == []
    check_target(tmp_path / "other.pyrt", [src])  # a different file is fine


def test_no_handler_is_left_installed_and_threads_can_write(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_path(tmp_path / "a") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not before  # armed during the write
        with atomic_path(tmp_path / "b") as tmp2:  # nested writes share it
            tmp2.write_bytes(b"2")
        tmp.write_bytes(b"1")
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []
    t = threading.Thread(target=lambda: _try(errors, atomic_write_bytes, tmp_path / "c", b"3"))
    t.start()
    t.join()
    assert errors == [] and (tmp_path / "c").read_bytes() == b"3"


def _try(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- the test reports whatever the thread raised
        errors.append(e)


# The child writes part of the file into the temporary, says so, and waits to be killed.
SLOW_ATOMIC = """
import sys, time, signal
from pyruntime._atomic import atomic_path
{setup}
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 4_000_000)
    print("writing", flush=True)
    while True:
        time.sleep(0.05)
"""

SLOW_MODEL = """
import sys, time
import safetensors.numpy
sys.path.insert(0, {tests!r})
from _graphs import random_tensors, tiny_graph
from pyruntime.modelfile import write_model

def slow_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial" * 100_000)
    print("writing", flush=True)
    while True:
        time.sleep(0.05)

safetensors.numpy.save_file = slow_save
graph = tiny_graph()
write_model(sys.argv[1], graph, random_tensors(graph), "{{}}", {{}})
"""


def _kill_mid_write(tmp_path, code):
    dest = tmp_path / "out.pyrt"
    dest.write_bytes(b"previous")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    with subprocess.Popen([sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env) as p:
        try:
            line = p.stdout.readline()
            assert line == b"writing\n", p.stderr.read().decode()
            assert len(temps(tmp_path)) == 1  # the write is really in progress
            p.send_signal(signal.SIGTERM)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    assert dest.read_bytes() == b"previous"
    return rc


@pytest.mark.parametrize("code", [SLOW_ATOMIC.format(setup=""),
                                  SLOW_MODEL.format(tests=str(Path(__file__).resolve().parent))],
                         ids=["atomic_path", "write_model"])
def test_sigterm_mid_write_leaves_no_temporary(tmp_path, code):
    assert _kill_mid_write(tmp_path, code) == -signal.SIGTERM  # still dies of SIGTERM
    assert temps(tmp_path) == []


def test_sigterm_defers_to_the_programs_own_handler(tmp_path):
    setup = "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(7))"
    assert _kill_mid_write(tmp_path, SLOW_ATOMIC.format(setup=setup)) == 7  # its exit, its code
    assert temps(tmp_path) == []


def test_convert_refuses_to_overwrite_its_checkpoint_before_any_work(tmp_path):
    import pyruntime

    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"checkpoint")
    with pytest.raises(ValueError, match="is the input"):  # raised before torch is even imported
        pyruntime.convert("vit_tiny_patch16_224", ck, checkpoint=ck)
    policy = tmp_path / "p.json"
    policy.write_bytes(b"{}")
    with pytest.raises(ValueError, match="is the input"):
        pyruntime.convert("vit_tiny_patch16_224", str(policy), policy=str(policy))
    assert ck.read_bytes() == b"checkpoint" and policy.read_bytes() == b"{}"
