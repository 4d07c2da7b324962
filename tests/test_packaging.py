"""Packaging: the type stub against the compiled module, the sdist's contents, and the
artefacts tools/build_wheels.sh leaves in dist/.

The sdist test builds an sdist (under a second) and checks what is in it. The dist/ tests run
when tools/build_wheels.sh has left artefacts there (tools/test.sh runs it before pytest) and
skip otherwise, or when they are older than the sources that make them (a stale dist/ from an
earlier build_wheels.sh would fail them for what it lacks, not for what is wrong); under CI
(``CI`` set, as CI services do) they never skip: a missing dist/ fails, and a present one is
checked whatever its age. They check the wheels' metadata and contents, and -- the release
path a user without a
wheel for their platform takes -- the sdist rebuilt into a wheel with the system compiler,
installed into a fresh virtual environment with numpy, safetensors and pytest only, and the
repository's torch-free tests run against that installation. The sdist carries no tests (it
is lean: sources, the reference model, docs' text), so the tests come from this checkout; the
run's working directory is outside it and pyruntime is checked to come from the environment.
"""
from __future__ import annotations

import ast
import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Tuple

import pytest

import pyruntime
from pyruntime import _core

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist"
STUB = Path(pyruntime.__file__).parent / "_core.pyi"
NAME = "pyruntime-vit"
# What tools/build_wheels.sh ships (the README's Install table): a wheel for every CPython the
# project supports, on both architectures.
SUPPORTED_PYTHONS = ["cp39", "cp310", "cp311", "cp312", "cp313"]
ARCHES = ["x86_64", "aarch64"]

# The torch-free tests the rebuilt wheel must pass: the runtime, model files, the command
# line, kernels on every ISA this CPU has (the largest ViT shape cut, as in
# tools/arm64_python_test.sh: the scalar reference on it is most of test_kernels.py's time).
REBUILD_TESTS = ["test_runtime.py", "test_modelfile.py", "test_cli.py", "test_kernels.py", "test_bops.py"]
REBUILD_DESELECT = [f"tests/test_kernels.py::test_integer_linear_vit_shapes_all_isas_and_threads[{b}-197-768-3072]"
                    for b in (8, 4)]


# ---------------------------------------------------------------------------------------------
# The type stub


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _stub_params(fn: ast.FunctionDef) -> list:
    a = fn.args
    return [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg != "self"]


def _top_level(tree: ast.Module) -> dict:
    return {n.name: n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}


def _public(names) -> set:
    return {n for n in names if not n.startswith("_")}


def _doc_params(doc: str, name: str) -> list:
    """Parameter names from the signature pybind11 writes as a docstring's first line."""
    line = next(ln for ln in doc.splitlines() if ln.startswith(name + "("))
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "''", line)  # default strings may hold , ( )
    inner, depth, params, cur = line[len(name) + 1:], 0, [], ""
    for ch in inner:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur)
            cur = ""
        else:
            cur += ch
    params.append(cur)
    names = [re.split(r"[:=]", p)[0].strip() for p in params if p.strip()]
    return [n for n in names if n not in ("self", "/", "*")]


def test_stub_names_the_module_functions_and_classes():
    stub = _top_level(_stub())
    assert set(stub) == _public(dir(_core)), (
        f"in the module only: {sorted(_public(dir(_core)) - set(stub))}; "
        f"in the stub only: {sorted(set(stub) - _public(dir(_core)))}")


@pytest.mark.parametrize("cls", ["QuantizedWeights", "Executor"])
def test_stub_names_each_class_member(cls):
    body = _top_level(_stub())[cls].body
    members = {n.name for n in body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert members == _public(dir(getattr(_core, cls)))


def test_stub_parameters_match_the_bindings():
    """Every function's parameter names, in order, as pybind11 documents them."""
    stub = _top_level(_stub())
    checked = 0
    for name, node in stub.items():
        if isinstance(node, ast.FunctionDef):
            assert _stub_params(node) == _doc_params(getattr(_core, name).__doc__, name), name
            checked += 1
        else:
            for m in node.body:
                if isinstance(m, ast.FunctionDef) and not m.name.startswith("_") and not m.decorator_list:
                    doc = getattr(getattr(_core, name), m.name).__doc__
                    assert _stub_params(m) == _doc_params(doc, m.name), f"{name}.{m.name}"
                    checked += 1
    assert checked >= 20


def test_doc_params_reads_pybind11_signatures():
    assert _doc_params("linear(x: numpy.ndarray[numpy.float32], qw: Q, bias: typing.Optional[A] = None) -> A\n",
                       "linear") == ["x", "qw", "bias"]
    assert _doc_params("run(self: E, x: Dict[str, int], isa: str = 'a,b') -> dict", "run") == ["x", "isa"]


# ---------------------------------------------------------------------------------------------
# The sdist, built here


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    pytest.importorskip("scikit_build_core")
    out = tmp_path_factory.mktemp("sdist")
    # The backend reads pyproject.toml from the working directory: a child process, so that
    # this one's stays where it is.
    r = subprocess.run([sys.executable, "-c", "import sys; from scikit_build_core.build import build_sdist; "
                        "print(build_sdist(sys.argv[1]))", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / r.stdout.strip().splitlines()[-1]


def _members(path: Path) -> list:
    with tarfile.open(path) as t:
        return [m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile()]


def test_sdist_is_named_for_the_distribution(sdist):
    assert sdist.name == f"pyruntime_vit-{pyruntime.__version__}.tar.gz"
    with tarfile.open(sdist) as t:
        info = t.extractfile(f"{sdist.name[:-7]}/PKG-INFO").read().decode()
    meta = email.parser.Parser().parsestr(info)
    assert meta["Name"] == NAME
    assert meta["Version"] == pyruntime.__version__


def test_sdist_holds_the_sources_and_the_reference_model(sdist):
    files = set(_members(sdist))
    for f in ["pyproject.toml", "CMakeLists.txt", "README.md", "cmake/aarch64-linux-gnu.cmake",
              "csrc/bindings/module.cc", "csrc/kernels/neondot.cc", "csrc/runtime_limits.h",
              "pyruntime/__init__.py", "pyruntime/py.typed", "pyruntime/_core.pyi",
              "pyruntime/data/reference/fmnist_vit.safetensors", "pyruntime/data/reference/card.json",
              "docs/model_format.md"]:
        assert f in files, f
    # Every tracked source file, when this is a git checkout.
    r = subprocess.run(["git", "ls-files", "csrc", "pyruntime", "cmake"], cwd=REPO, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout:
        assert set(r.stdout.split()) <= files, sorted(set(r.stdout.split()) - files)


def test_sdist_leaves_out_results_plots_tests_and_builds(sdist):
    files = _members(sdist)
    unwanted = [f for f in files
                if f.split("/")[0] in ("results", "bench", "tests", "tools", "build", "dist")
                or f.startswith("build-")
                or f.endswith((".png", ".so", ".pyc", ".npz", ".npy", ".pyrt"))
                or (f.endswith(".json") and not f.startswith("pyruntime/data/reference/"))]
    assert not unwanted, unwanted
    # Lean: the reference model (~5 MB) is nearly all of it.
    assert sum(1 for _ in files) < 100


# ---------------------------------------------------------------------------------------------
# dist/, as tools/build_wheels.sh left it


# What the artefacts are built from: a change to any of these after the last build makes dist/ stale.
WHEEL_SOURCES = ("pyruntime", "csrc", "CMakeLists.txt", "pyproject.toml", "tools/build_wheels.sh")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _newest_source(repo: Path = REPO) -> Tuple[float, Path]:
    """(mtime, path) of the newest file among WHEEL_SOURCES (bytecode and local builds of the
    extension left out: they are not what a wheel is built from)."""
    newest = (0.0, repo)
    for name in WHEEL_SOURCES:
        top = repo / name
        for f in (top.rglob("*") if top.is_dir() else [top]):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".so":
                newest = max(newest, (f.stat().st_mtime, f))
    return newest


def _dist(pattern: str, dist: Path = DIST, repo: Path = REPO) -> list:
    """The artefacts matching ``pattern``. Outside CI: skipped when there are none or when dist/
    is older than the newest source. Under CI: none is a failure, and they are checked whatever
    their age (CI builds them first; a wrong wheel list must fail there, never skip)."""
    found = sorted(dist.glob(pattern)) if dist.is_dir() else []
    if _in_ci():
        if not found:
            pytest.fail(f"CI: no {pattern} in {dist}; tools/build_wheels.sh must run before the tests")
        return found
    if not found:
        pytest.skip(f"no {pattern} in {dist}: run tools/build_wheels.sh first")
    built = min(f.stat().st_mtime for f in dist.glob("pyruntime_vit-*"))
    when, newest = _newest_source(repo)
    if built < when:
        pytest.skip(f"{dist} is stale: built before {newest.relative_to(repo)} last changed; rerun "
                    f"tools/build_wheels.sh (under CI=true this check never skips)")
    return found


def _wheel_tags(whl: Path) -> tuple:
    # name-version-python-abi-platform.whl
    _, _, py, abi, plat = whl.name[:-4].split("-")
    return py, abi, plat


def _wheel_arch(plat: str) -> str:
    # manylinux2014_aarch64.manylinux_2_17_aarch64 -> aarch64
    return plat.rsplit("_2_17_", 1)[1]


def test_dist_has_one_wheel_per_supported_python_and_architecture():
    found = sorted((_wheel_tags(w)[0], _wheel_arch(_wheel_tags(w)[2])) for w in _dist("pyruntime_vit-*.whl"))
    expected = sorted((py, arch) for py in SUPPORTED_PYTHONS for arch in ARCHES)
    extra = list((Counter(found) - Counter(expected)).elements())
    assert found == expected, f"missing: {sorted(set(expected) - set(found))}; unexpected or doubled: {extra}"


def test_wheels_are_pyruntime_vit_with_types_model_and_one_extension():
    for whl in _dist("pyruntime_vit-*.whl"):
        py, abi, plat = _wheel_tags(whl)
        assert "manylinux_2_17_" in plat, whl.name
        assert abi == py, whl.name
        arch = _wheel_arch(plat)
        with zipfile.ZipFile(whl) as z:
            names = z.namelist()
            meta = email.parser.Parser().parsestr(
                z.read(f"pyruntime_vit-{pyruntime.__version__}.dist-info/METADATA").decode())
            cores = [n for n in names if re.fullmatch(r"pyruntime/_core\..*\.so", n)]
            assert len(cores) == 1, (whl.name, cores)
            elf_machine = int.from_bytes(z.read(cores[0])[18:20], "little")
        assert meta["Name"] == NAME
        assert meta["Version"] == pyruntime.__version__
        requires = meta.get_all("Requires-Dist")
        assert {r.split(">")[0].split(";")[0].strip() for r in requires if "extra ==" not in r} \
            == {"numpy", "safetensors"}, requires
        assert all("extra ==" in r for r in requires if r.startswith(("torch", "timm"))), requires
        for f in ("pyruntime/py.typed", "pyruntime/_core.pyi", "pyruntime/data/reference/fmnist_vit.safetensors"):
            assert f in names, (whl.name, f)
        assert f".cpython-{py[2:]}-{arch}-linux-gnu.so" in cores[0], (whl.name, cores[0])
        assert elf_machine == {"x86_64": 62, "aarch64": 183}[arch], (whl.name, elf_machine)
        assert not [n for n in names if n.startswith(("tests/", "results/", "bench/")) or n.endswith(".png")]


def _pip(py: Path, *args, cwd: Path) -> None:
    r = subprocess.run([str(py), "-m", "pip", "--disable-pip-version-check", *args],
                       cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"pip {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_sdist_rebuilds_into_a_wheel_that_passes_the_torch_free_tests(tmp_path):
    sdist = _dist("pyruntime_vit-*.tar.gz")[-1]
    pytest.importorskip("scikit_build_core")
    pytest.importorskip("pybind11")
    # The build: this interpreter's scikit-build-core and pybind11, the system compiler.
    _pip(Path(sys.executable), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
         str(sdist), cwd=tmp_path)
    (whl,) = (tmp_path / "wheel").glob("pyruntime_vit-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    _pip(py, "install", "-q", str(whl), "pytest", cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYRUNTIME_"))}
    where = subprocess.run([str(py), "-c", "import pyruntime, sys; print(pyruntime.__file__); "
                            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    file, heavy = where.stdout.split("\n")[:2]
    assert file.startswith(str(env_dir)), file
    assert heavy == "[]", heavy
    args = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
            "--rootdir", str(REPO), "--basetemp", str(tmp_path / "pt"), "-m", "not torch and not slow"]
    for d in REBUILD_DESELECT:
        args += ["--deselect", d]  # node ids are relative to the rootdir
    args += [str(REPO / "tests" / t) for t in REBUILD_TESTS]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert re.search(r"\d+ passed", r.stdout), r.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# When the dist/ tests run


def _tree(tmp_path: Path, source_age: float, dist_age: float) -> Tuple[Path, Path]:
    """A repository with one wheel source and a dist/ with one wheel, each ``age`` seconds old."""
    repo, now = tmp_path / "repo", 1_700_000_000.0
    (repo / "pyruntime").mkdir(parents=True)
    (repo / "dist").mkdir()
    src = repo / "pyruntime" / "runtime.py"
    whl = repo / "dist" / "pyruntime_vit-0-cp311-cp311-x.whl"
    for f, age in ((src, source_age), (whl, dist_age)):
        f.write_text("x")
        os.utime(f, (now - age, now - age))
    cache = repo / "pyruntime" / "__pycache__" / "runtime.cpython-311.pyc"   # newer, but not a source
    cache.parent.mkdir()
    cache.write_text("x")
    return repo, repo / "dist"


@pytest.mark.parametrize("ci", ["", "false"])
def test_a_stale_or_missing_dist_skips_outside_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    repo, dist = _tree(tmp_path, source_age=10, dist_age=100)
    with pytest.raises(pytest.skip.Exception, match="stale: built before pyruntime/runtime.py"):
        _dist("pyruntime_vit-*.whl", dist, repo)
    with pytest.raises(pytest.skip.Exception, match="no pyruntime_vit-\\*.tar.gz"):
        _dist("pyruntime_vit-*.tar.gz", dist, repo)
    repo, dist = _tree(tmp_path / "fresh", source_age=100, dist_age=10)
    assert [f.name for f in _dist("pyruntime_vit-*.whl", dist, repo)] == ["pyruntime_vit-0-cp311-cp311-x.whl"]


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_dist_is_checked_whatever_its_age_and_missing_fails(tmp_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    repo, dist = _tree(tmp_path, source_age=10, dist_age=100)
    assert len(_dist("pyruntime_vit-*.whl", dist, repo)) == 1     # stale, still checked
    with pytest.raises(pytest.fail.Exception, match="CI: no pyruntime_vit-"):
        _dist("pyruntime_vit-*.tar.gz", dist, repo)
