#!/usr/bin/env bash
# The Python side of pyruntime on emulated arm64: builds an arm64 Python 3.11 sysroot
# (Debian bookworm packages + PyPI aarch64 wheels), cross-builds pyruntime._core for it, runs
# the torch-free Python tests under qemu-user on two emulated CPUs, and checks that arm64 and
# x86 give the same answers on the same model files (tools/cross_isa_check.py).
#
#   bash tools/arm64_python_test.sh
#
# Everything it downloads or builds lies under build-arm64-py/ (git-ignored by build-*/), and a
# second run reuses it: the Debian packages and wheels are fetched once (delete
# build-arm64-py/sysroot or build-arm64-py/site-packages to fetch again; ARM64_PY_REFRESH=1
# re-reads the Debian package lists), the builds are incremental. The host's apt state is
# not touched: arm64 packages are resolved with a private apt directory
# (build-arm64-py/apt), and only the host tools (g++-aarch64-linux-gnu, qemu-user-static)
# are apt-get installed when missing.
#
# Knobs (environment):
#   ARM64_PY_FULL=1      run the Python tests without the cuts below (~5 more minutes)
#   ARM64_PY_PYTEST=...  extra pytest arguments for both emulated runs (e.g. "-x -v")
#   ARM64_PY_JOBS=N      build jobs (default: nproc)
#   ARM64_PY_XISA_CPUS   emulated CPUs for the cross-ISA check (default: max)
#
# Cut to keep the emulated run short (qemu runs the scalar "ref" kernels ~20-50x slower than
# native): test_kernels.py::test_integer_linear_vit_shapes_all_isas_and_threads for the
# largest shape (197x768 -> 3072, 8 and 4 bits): ~270 s of the ~330 s test_kernels.py takes,
# almost all of it in the scalar reference. The two smaller ViT shapes still run. The
# cortex-a57 run (no dotprod: only ref and neon) runs test_kernels.py only. The cross-ISA check
# runs under -cpu max only; with the shipped reference model present it converts and checks it
# too (~2 more minutes under qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/build-arm64-py
SYSROOT=$W/sysroot
SITE=$W/site-packages
JOBS=${ARM64_PY_JOBS:-$(nproc)}
HOST_PY=${PYTHON:-python3}
SUFFIX=.cpython-311-aarch64-linux-gnu.so

STEP_NAME=arm64_python_test STEP_WIDTH=44
# shellcheck source=tools/_steps.sh
source "$ROOT/tools/_steps.sh"
# shellcheck source=tools/_arm64_sysroot.sh
source "$ROOT/tools/_arm64_sysroot.sh"

# --------------------------------------------------------------------------------------------
section "host tools"
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
apt_install_missing "${missing[@]}"
QEMU=$(command -v qemu-aarch64-static)
command -v cmake >/dev/null || $HOST_PY -m pip install -q cmake
gen() {  # the generator for a fresh build dir: Ninja when there is one (an existing dir keeps its own)
  if command -v ninja >/dev/null && [ ! -f "$1/CMakeCache.txt" ]; then echo "-G Ninja"; fi
}
$HOST_PY -c "import pybind11, numpy, safetensors" 2>/dev/null || $HOST_PY -m pip install -q pybind11 numpy safetensors
PYBIND11_DIR=$($HOST_PY -m pybind11 --cmakedir)
echo "cross compiler: $(aarch64-linux-gnu-g++ --version | head -1)"
echo "qemu:           $($QEMU --version | head -1)"
echo "cmake:          $(cmake --version | head -1); pybind11 $($HOST_PY -c 'import pybind11; print(pybind11.__version__)')"
phase_done "host tools"

# --------------------------------------------------------------------------------------------
section "arm64 sysroot: Debian bookworm python3.11 (private apt dir, dpkg -x)"
arm64_sysroot "$W" 3.11
PY_WRAP=$W/bin/python3.11
phase_done "sysroot (apt, dpkg -x)"

# --------------------------------------------------------------------------------------------
section "arm64 wheels: numpy, safetensors, pytest (pip download, aarch64 manylinux)"
# Pin to the host's versions so that both sides of the cross-ISA check run the same numpy.
pins=()
for p in numpy safetensors pytest; do
  v=$($HOST_PY -c "import importlib.metadata as m; print(m.version('$p'))" 2>/dev/null || true)
  pins+=("$p${v:+==$v}")
done
plats=(--platform manylinux2014_aarch64)
for m in $(seq 17 36); do plats+=(--platform "manylinux_2_${m}_aarch64"); done  # bookworm: glibc 2.36
if [ "$(cat "$SITE/.stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf "$W/wheels" "$SITE"; mkdir -p "$W/wheels" "$SITE"
  $HOST_PY -m pip download -q --only-binary=:all: "${plats[@]}" --python-version 3.11 \
    --implementation cp --abi cp311 --abi abi3 --abi none -d "$W/wheels" "${pins[@]}"
  for whl in "$W/wheels"/*.whl; do $HOST_PY -m zipfile -e "$whl" "$SITE"; done  # a wheel is a zip
  echo "${pins[*]}" > "$SITE/.stamp"
fi
ls "$W/wheels" | sed 's/^/  /'

phase_done "wheels (pip download, unzip)"

# --------------------------------------------------------------------------------------------
section "cross-build pyruntime._core for arm64 (CMake, cmake/aarch64-linux-gnu.cmake)"
# Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>: expose only that
# multiarch directory of the sysroot to the compiler (not the sysroot's libc headers).
mkdir -p "$W/pyinc"
ln -sfn "$SYSROOT/usr/include/aarch64-linux-gnu" "$W/pyinc/aarch64-linux-gnu"
# shellcheck disable=SC2046
cmake -S . -B "$W/build" $(gen "$W/build") -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
  -DPYRUNTIME_BUILD_PYTHON=ON -DPYRUNTIME_BUILD_TESTS=OFF \
  -DPython_EXECUTABLE="$PY_WRAP" -DPython_INCLUDE_DIR="$SYSROOT/usr/include/python3.11" \
  -DCMAKE_CXX_FLAGS="-isystem $W/pyinc" -Dpybind11_DIR="$PYBIND11_DIR" >"$W/cmake-arm64.log" 2>&1 \
  || { cat "$W/cmake-arm64.log"; die "CMake configure (arm64) failed"; }
grep -E "Found Python|PYTHON_MODULE_EXTENSION" "$W/cmake-arm64.log" | sed 's/^/  /' || true
cmake --build "$W/build" -j "$JOBS" || die "arm64 build failed"
SO=$W/build/_core$SUFFIX
[ -f "$SO" ] || die "no $SO (extension suffix: $(grep PYTHON_MODULE_EXTENSION "$W/build/CMakeCache.txt"))"
file "$SO" | grep -q "ARM aarch64" || die "$SO is not an aarch64 object: $(file "$SO")"
echo "built $(basename "$SO"): $(file -b "$SO" | cut -d, -f1-2)"

# The staged package: pyruntime's Python files (not the x86 _core*.so, not caches) + the
# arm64 extension.
stage_package() {  # stage_package DIR SO
  rm -rf "$1"; mkdir -p "$1"
  tar -C "$ROOT" --exclude='_core*.so' --exclude=__pycache__ --exclude='*.pyc' -cf - pyruntime | tar -C "$1" -xf -
  cp "$2" "$1/pyruntime/"
}
STAGE=$W/stage
stage_package "$STAGE" "$SO"
phase_done "arm64 build + staging"

# The host side of the cross-ISA check builds x86 _core from the same sources, so that both
# sides run the same code (the editable install's _core may be older than the tree).
section "host build of pyruntime._core (x86, same sources) for the cross-ISA check"
# shellcheck disable=SC2046
cmake -S . -B "$W/build-host" $(gen "$W/build-host") -DCMAKE_BUILD_TYPE=Release -DPYRUNTIME_BUILD_PYTHON=ON \
  -DPYRUNTIME_BUILD_TESTS=OFF -DPython_EXECUTABLE="$(command -v "$HOST_PY")" \
  -Dpybind11_DIR="$PYBIND11_DIR" >"$W/cmake-host.log" 2>&1 \
  || { cat "$W/cmake-host.log"; die "CMake configure (host) failed"; }
cmake --build "$W/build-host" -j "$JOBS" || die "host build failed"
HOST_SO=$(ls "$W/build-host"/_core.cpython-*.so | head -1)
STAGE_HOST=$W/stage-host
stage_package "$STAGE_HOST" "$HOST_SO"
phase_done "host build + staging"

# --------------------------------------------------------------------------------------------
# Run the arm64 interpreter: run_arm CPU ARGS...  (cwd: the staged package, so that neither
# the repository's pyruntime nor its x86 _core can be imported; -P: no script dir / cwd on
# sys.path either.)
run_arm() {
  local cpu=$1; shift
  (cd "$STAGE" && env QEMU_CPU="$cpu" QEMU_LD_PREFIX="$SYSROOT" PYTHONHOME="$SYSROOT/usr" \
     PYTHONPATH="$W/shim:$STAGE:$SITE" PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$W/pycache" \
     PYRT_ARM64_PYTHON="$PY_WRAP" "$PY_WRAP" -P "$@")
}
# The host interpreter without site-packages' .pth hooks (the editable install's import hook
# would pick the repository's pyruntime whatever PYTHONPATH says); its site-packages by path.
HOST_SITE=$($HOST_PY -c "import site, os; print(os.pathsep.join(site.getsitepackages()))")
run_host() {
  (cd "$STAGE_HOST" && env PYTHONPATH="$STAGE_HOST:$HOST_SITE" "$HOST_PY" -S -P "$@")
}

section "arm64 interpreter and ISA dispatch"
probe='import platform, sys, numpy, pyruntime
print(platform.machine(), sys.version.split()[0], "numpy", numpy.__version__, "pyruntime from", pyruntime.__file__)
print("isa", pyruntime.isa(), "available", pyruntime.available_isas())
assert pyruntime.__file__.startswith(sys.argv[1]), "pyruntime imported from the wrong place"
assert pyruntime._core.__file__.endswith("aarch64-linux-gnu.so"), pyruntime._core.__file__
assert pyruntime.isa() == sys.argv[2], (pyruntime.isa(), sys.argv[2])'
echo "-- qemu -cpu max (dotprod, i8mm): expect neondot"
run_arm max -c "$probe" "$STAGE" neondot
echo "-- qemu -cpu cortex-a57 (ARMv8.0, no dotprod): expect neon"
run_arm cortex-a57 -c "$probe" "$STAGE" neon
phase_done "interpreter + ISA probe"

# --------------------------------------------------------------------------------------------
# The torch-free Python tests. All of them import on arm64 (numpy, safetensors, pytest only;
# test_numpy_ref falls back to math.erf without scipy), so no file is deselected.
TESTS=(tests/test_kernels.py tests/test_runtime.py tests/test_modelfile.py tests/test_bops.py
       tests/test_policy.py tests/test_numpy_ref.py tests/test_thresholds.py tests/test_latency.py tests/test_cli.py)
CUTS=()
if [ -z "${ARM64_PY_FULL:-}" ]; then
  CUTS=(--deselect "tests/test_kernels.py::test_integer_linear_vit_shapes_all_isas_and_threads[8-197-768-3072]"
        --deselect "tests/test_kernels.py::test_integer_linear_vit_shapes_all_isas_and_threads[4-197-768-3072]")
fi
# shellcheck disable=SC2206
EXTRA=(${ARM64_PY_PYTEST:-})
pytest_arm() {  # pytest_arm CPU TESTS...
  local cpu=$1; shift
  local files=(); for t in "$@"; do files+=("$ROOT/$t"); done
  run_arm "$cpu" -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -p no:cacheprovider \
    --basetemp "$W/tmp-$cpu" -q -ra --durations=8 "${CUTS[@]}" "${EXTRA[@]}" "${files[@]}"
}
last_match() { grep -E "$1" "$2" 2>/dev/null | tail -1 | tr -d '=' || true; }  # never fails
RESULTS=()
status=0
section "Python tests on arm64, qemu -cpu max (ISAs: ref, neon, neondot)"
if ((${#CUTS[@]})); then echo "(cut: test_integer_linear_vit_shapes_all_isas_and_threads[{8,4}-197-768-3072]; ARM64_PY_FULL=1 runs them)"; fi
if pytest_arm max "${TESTS[@]}" 2>&1 | tee "$W/pytest-max.log"; then r=passed; else r=FAILED; status=1; fi
RESULTS+=("pytest -cpu max:        $r: $(last_match '(passed|failed|errors?|deselected|no tests ran).* in [0-9.]+s' "$W/pytest-max.log")")
phase_done "pytest, -cpu max (${#TESTS[@]} files)"

section "Python tests on arm64, qemu -cpu cortex-a57 (ISAs: ref, neon): test_kernels.py"
if pytest_arm cortex-a57 tests/test_kernels.py 2>&1 | tee "$W/pytest-a57.log"; then r=passed; else r=FAILED; status=1; fi
RESULTS+=("pytest -cpu cortex-a57: $r: $(last_match '(passed|failed|errors?|deselected|no tests ran).* in [0-9.]+s' "$W/pytest-a57.log")")
phase_done "pytest, -cpu cortex-a57 (test_kernels.py)"

# --------------------------------------------------------------------------------------------
section "cross-ISA agreement: x86 host writes models + expected outputs"
XDIR=$W/cross-isa
rm -rf "$XDIR"
run_host -c 'import pyruntime, sys; assert pyruntime.__file__.startswith(sys.argv[1]), pyruntime.__file__; print("host pyruntime from", pyruntime.__file__, "isa", pyruntime.isa())' "$STAGE_HOST"
run_host "$ROOT/tools/cross_isa_check.py" write "$XDIR"
phase_done "cross-ISA: host write"

# -cpu max runs every arm64 ISA (ref, neon, neondot); the neon code is the same instructions on
# cortex-a57, so a second emulated CPU only adds time (ARM64_PY_XISA_CPUS="max cortex-a57").
for cpu in ${ARM64_PY_XISA_CPUS:-max}; do
  section "cross-ISA agreement: arm64 (qemu -cpu $cpu) checks against x86"
  if ! run_arm "$cpu" "$ROOT/tools/cross_isa_check.py" check "$XDIR" 2>&1 | tee "$W/cross-isa-$cpu.log"; then
    status=1
  fi
  RESULTS+=("cross-ISA -cpu $cpu: $(last_match '^cross-isa check (passed|FAILED)' "$W/cross-isa-$cpu.log")")
  RESULTS+=("  $(last_match '^cross-isa max relative' "$W/cross-isa-$cpu.log")")
  phase_done "cross-ISA: arm64 check (-cpu $cpu)"
done

# --------------------------------------------------------------------------------------------
section "summary"
printf '%s\n' "${RESULTS[@]}"
print_timings
[ $status -eq 0 ] || die "see the sections above (logs in $W/*.log)"
echo "arm64_python_test: all passed"
