#!/usr/bin/env bash
# pyruntime on x86-64 CPUs without AVX-512 (and without AVX at all): the installed package must
# import and dispatch correctly on every x86-64 CPU, not only on the build machine. It once died
# with SIGILL on import on every CPU without AVX-512 (the AVX-512 file's table initialiser ran
# before the CPU check), and only an older CPU can show that. This script:
#
#   1. builds pyruntime._core and the C++ tests from scratch (Release, as shipped; unstripped so
#      that objdump can name every function) in build-x86compat/ (git-ignored by build-*/);
#   2. runs tools/check_isa_symbols.py: its self-test (the checks must fail on a known-bad pair
#      of files), then both checks on this build -- no weak/COMDAT function of an ISA-flagged
#      object shared with generic code, no VEX/EVEX instruction in generic code of _core or
#      test_kernels;
#   3. runs Python under qemu-user on two emulated CPUs, with the freshly built package staged
#      in build-x86compat/stage (never the editable install of the repository):
#        -cpu Haswell  (AVX2 + FMA, no AVX-512): pyruntime.isa() must be "avx2", no warning;
#        -cpu Nehalem  (SSE4.2, no AVX): pyruntime.isa() must be "ref", and importing must warn
#                      about the scalar fallback once -- and not when PYRUNTIME_ISA is set;
#      then the torch-free Python tests (cut, below) on both;
#   4. checks that the logits of the same models (tools/cross_isa_check.py: two random graphs
#      and, when torch + timm import natively, the shipped reference ViT converted to W8A8) are
#      bit-identical (--tol 0) under both emulated CPUs to the native run, every ISA against
#      every ISA.
#
#   bash tools/x86_compat_test.sh          (tools/test.sh runs it)
#
# Cuts, to stay within ~6 minutes on a 2-core machine (qemu runs Python ~20-50x slower):
#   - Haswell runs tests/test_kernels.py, test_modelfile.py and test_runtime.py, without
#     test_integer_linear_vit_shapes_all_isas_and_threads for the two large ViT shapes
#     (197x384->1536 and 197x768->3072: 40 of the 50 native seconds of these files, nearly all
#     in the scalar reference; the 197x192->576 shape still runs, 8 and 4 bits).
#   - Nehalem (ref only) runs tests/test_kernels.py with the same cut: every kernel there runs
#     on ref alone, which the Haswell run already covered; it checks dispatch and that ref's code
#     needs no AVX.
#   - The cross-ISA check uses 16 images per model (cross_isa_check.py's default is 256): its
#     time under qemu is mostly the scalar reference running the converted reference ViT.
#   - The C++ kernel tests (tests/cpp) run natively only (PYRUNTIME_TEST_QUICK=1: without the two
#     largest ViT shapes, ~10 s instead of ~50 s; tools/test.sh runs them in full): under qemu
#     they would take ~5 minutes.
#   X86_COMPAT_FULL=1 removes the first two cuts (several more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/build-x86compat
BUILD=$W/build
STAGE=$W/stage
JOBS=$(nproc)
# The interpreter binary itself: a pyenv shim is a shell script, which qemu cannot run.
HOST_PY=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')

STEP_NAME=x86_compat_test STEP_WIDTH=44
# shellcheck source=tools/_steps.sh
source "$ROOT/tools/_steps.sh"

[ "$(uname -m)" = x86_64 ] || { echo "x86_compat_test: not an x86_64 host; skipped"; exit 0; }

# --------------------------------------------------------------------------------------------
section "host tools"
missing=()
command -v qemu-x86_64-static >/dev/null || missing+=(qemu-user-static)
command -v objdump >/dev/null && command -v readelf >/dev/null || missing+=(binutils)
apt_install_missing "${missing[@]}"
QEMU=$(command -v qemu-x86_64-static)
command -v cmake >/dev/null || "$HOST_PY" -m pip install -q cmake
"$HOST_PY" -c "import pybind11, numpy, safetensors, pytest" 2>/dev/null \
  || "$HOST_PY" -m pip install -q pybind11 numpy safetensors pytest
echo "python: $HOST_PY ($("$HOST_PY" --version))"
echo "qemu:   $("$QEMU" --version | head -1)"
phase_done "host tools"

# --------------------------------------------------------------------------------------------
section "fresh Release build (unstripped) in $BUILD"
rm -rf "$BUILD"; mkdir -p "$W"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
# CMAKE_STRIP=true: pybind11 strips a Release module's local symbols, and without them objdump
# would attribute file-local ISA functions to whatever global symbol precedes them.
cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPYRUNTIME_BUILD_PYTHON=ON \
  -DPYRUNTIME_BUILD_TESTS=ON -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DCMAKE_STRIP="$(type -P true)" \
  -DPython_EXECUTABLE="$HOST_PY" -Dpybind11_DIR="$("$HOST_PY" -m pybind11 --cmakedir)" \
  >"$W/cmake.log" 2>&1 || { cat "$W/cmake.log"; die "CMake configure failed"; }
cmake --build "$BUILD" -j "$JOBS" >"$W/build.log" 2>&1 || { tail -50 "$W/build.log"; die "build failed"; }
SO=$(ls "$BUILD"/_core.cpython-*.so | head -1)
echo "built $(basename "$SO") and test_kernels"
phase_done "fresh Release build"

# --------------------------------------------------------------------------------------------
section "static checks: ISA symbols shared with generic code, VEX in generic code"
"$HOST_PY" tools/check_isa_symbols.py --self-test
# bench/peak.cc measures the machine's peak with loops compiled by target("avx2,fma") and
# target("avx512f,...") attributes, called only after the CPU check: the one allowed exception.
"$HOST_PY" tools/check_isa_symbols.py --build-dir "$BUILD" --binary "$SO" --binary "$BUILD/test_kernels" \
  --allow-vex '::(int8|f32)_loop_(avx2|avx512vnni)\('
phase_done "static checks"

section "C++ kernel tests (native, this build)"
PYRUNTIME_TEST_QUICK=1 "$BUILD/test_kernels" | tail -2
phase_done "C++ kernel tests (native)"

# --------------------------------------------------------------------------------------------
# The staged package: pyruntime's Python files + this build's extension, nothing else.
rm -rf "$STAGE"; mkdir -p "$STAGE"
tar -C "$ROOT" --exclude='_core*.so' --exclude=__pycache__ --exclude='*.pyc' -cf - pyruntime | tar -C "$STAGE" -xf -
cp "$SO" "$STAGE/pyruntime/"
# -S: no site module, so no .pth hooks -- the system python3 has an editable install of the
# repository whose import finder would win over PYTHONPATH. Its site-packages come by path.
HOST_SITE=$("$HOST_PY" -c "import site, os; print(os.pathsep.join(site.getsitepackages()))")
export PYTHONPATH="$STAGE:$HOST_SITE" PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$W/pycache"
# An interpreter for one emulated CPU, also what the tests' subprocesses get as sys.executable
# (qemu-user lets exec run natively, so a child must go through qemu again).
mkdir -p "$W/bin"
for cpu in Haswell Nehalem; do
  cat > "$W/bin/python-$cpu" <<EOF
#!/bin/sh
exec "$QEMU" -cpu $cpu "$HOST_PY" -S "\$@"
EOF
  chmod +x "$W/bin/python-$cpu"
done
run_native() { (cd "$STAGE" && "$HOST_PY" -S -P "$@"); }
run_cpu() {  # run_cpu CPU ARGS...: qemu's warnings about host features TCG lacks are dropped
  local cpu=$1; shift
  (cd "$STAGE" && "$W/bin/python-$cpu" -P "$@") 2> >(grep -v "TCG doesn't support requested feature" >&2)
}

section "import and dispatch under qemu"
probe='import sys, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import pyruntime
fallback = [str(x.message) for x in w if "scalar reference" in str(x.message)]
print("pyruntime from", pyruntime.__file__, "isa", pyruntime.isa(), "available", pyruntime.available_isas(),
      "fallback warnings", len(fallback))
assert pyruntime.__file__.startswith(sys.argv[1]), "pyruntime imported from the wrong place"
assert pyruntime._core.__file__.startswith(sys.argv[1]), pyruntime._core.__file__
assert pyruntime.isa() == sys.argv[2], (pyruntime.isa(), sys.argv[2])
assert pyruntime.available_isas() == sys.argv[3].split(","), pyruntime.available_isas()
assert len(fallback) == int(sys.argv[4]), fallback'
echo "-- qemu -cpu Haswell: expect avx2, no fallback warning"
run_cpu Haswell -c "$probe" "$STAGE" avx2 ref,avx2 0
echo "-- qemu -cpu Nehalem: expect ref, one fallback warning"
run_cpu Nehalem -c "$probe" "$STAGE" ref ref 1
echo "-- qemu -cpu Nehalem, PYRUNTIME_ISA=ref: chosen explicitly, so no warning"
PYRUNTIME_ISA=ref run_cpu Nehalem -c "$probe" "$STAGE" ref ref 0
echo "-- qemu -cpu Nehalem, PYRUNTIME_ISA=avx2: a clear error, not SIGILL"
out=$(PYRUNTIME_ISA=avx2 run_cpu Nehalem -c "import pyruntime; pyruntime.isa()" 2>&1) && die "PYRUNTIME_ISA=avx2 on Nehalem did not fail"
echo "$out" | grep -q "ISA 'avx2' is not available" || { echo "$out"; die "unexpected error for PYRUNTIME_ISA=avx2 on Nehalem"; }
echo "   $(echo "$out" | tail -1)"
phase_done "import + dispatch probes"

# --------------------------------------------------------------------------------------------
CUTS=()
if [ -z "${X86_COMPAT_FULL:-}" ]; then
  for s in 8-197-384-1536 4-197-384-1536 8-197-768-3072 4-197-768-3072; do
    CUTS+=(--deselect "tests/test_kernels.py::test_integer_linear_vit_shapes_all_isas_and_threads[$s]")
  done
fi
pytest_cpu() {  # pytest_cpu CPU [PYTEST ARGS...] TESTS...
  local cpu=$1; shift
  local files=(); for t in "$@"; do case "$t" in tests/*) files+=("$ROOT/$t") ;; *) files+=("$t") ;; esac; done
  run_cpu "$cpu" -c 'import sys; sys.executable = sys.argv.pop(1); import pytest; raise SystemExit(pytest.main(sys.argv[1:]))' \
    "$W/bin/python-$cpu" -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -p no:cacheprovider \
    --basetemp "$W/tmp-$cpu" -q -ra --durations=5 -m "not torch" "${CUTS[@]}" "${files[@]}"
}
last_match() { grep -E "$1" "$2" 2>/dev/null | tail -1 | tr -d '=' || true; }
RESULTS=()
status=0
section "Python tests under qemu -cpu Haswell (ISAs: ref, avx2)"
if pytest_cpu Haswell tests/test_kernels.py tests/test_modelfile.py tests/test_runtime.py 2>&1 | tee "$W/pytest-haswell.log"; then r=passed; else r=FAILED; status=1; fi
RESULTS+=("pytest -cpu Haswell: $r: $(last_match '(passed|failed|errors?|deselected).* in [0-9.]+s' "$W/pytest-haswell.log")")
phase_done "pytest, -cpu Haswell"

section "Python tests under qemu -cpu Nehalem (ISA: ref): test_kernels.py"
# The import-time fallback warning is by design (checked above); pyproject.toml turns warnings
# into errors, so this run ignores that one warning (its message starts "pyruntime").
if pytest_cpu Nehalem -W "ignore:pyruntime:RuntimeWarning" tests/test_kernels.py 2>&1 | tee "$W/pytest-nehalem.log"; then r=passed; else r=FAILED; status=1; fi
RESULTS+=("pytest -cpu Nehalem: $r: $(last_match '(passed|failed|errors?|deselected).* in [0-9.]+s' "$W/pytest-nehalem.log")")
phase_done "pytest, -cpu Nehalem"

# --------------------------------------------------------------------------------------------
section "logits: native run writes models + expected outputs"
XDIR=$W/cross-isa
rm -rf "$XDIR"
run_native "$ROOT/tools/cross_isa_check.py" write -n 16 "$XDIR"
phase_done "cross-ISA: native write"
for cpu in Haswell Nehalem; do
  section "logits under qemu -cpu $cpu: bit-identical to the native run (--tol 0)"
  if ! run_cpu "$cpu" "$ROOT/tools/cross_isa_check.py" check --tol 0 "$XDIR" 2>&1 | tee "$W/cross-isa-$cpu.log"; then
    status=1
  fi
  RESULTS+=("logits -cpu $cpu: $(last_match '^cross-isa check (passed|FAILED)' "$W/cross-isa-$cpu.log")")
  phase_done "cross-ISA: check under -cpu $cpu"
done

# --------------------------------------------------------------------------------------------
section "summary"
printf '%s\n' "${RESULTS[@]}"
print_timings
[ $status -eq 0 ] || die "see the sections above (logs in $W/*.log)"
echo "x86_compat_test: all passed"
