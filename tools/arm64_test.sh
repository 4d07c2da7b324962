#!/usr/bin/env bash
# C++ kernel tests for 64-bit ARM on an x86 machine: cross-compile with Debian's aarch64 GNU
# toolchain (cmake/aarch64-linux-gnu.cmake) and run ctest under qemu-user, once per emulated
# CPU, so that run-time dispatch (HWCAP) sees different hardware:
#   max          every extension qemu implements      -> ref, neon, neondot
#   neoverse-n1  ARMv8.2 + dotprod, no i8mm            -> ref, neon, neondot
#   cortex-a57   ARMv8.0, no dotprod (Raspberry Pi 4-like) -> ref, neon: neondot must be refused
# The test binary checks the list it gets against PYRUNTIME_EXPECT_ISAS and compares every
# available ISA's kernels against the scalar reference.
#
# Usage: tools/arm64_test.sh [--asan] [CPU ...]
#   --asan   AddressSanitizer + UBSan build (build-arm64-asan/), quick shapes only
#   CPU      qemu -cpu models to run (default: max neoverse-n1 cortex-a57)
# The first CPU runs every shape; the others skip the two largest ViT GEMMs (they run the same
# instructions, and emulation is slow) unless PYRUNTIME_TEST_QUICK is set by the caller, which
# then applies to all. Exits non-zero if any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

asan=0
cpus=()
for arg in "$@"; do
  case "$arg" in
    --asan) asan=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "arm64_test.sh: unknown option $arg" >&2; exit 2 ;;
    *) cpus+=("$arg") ;;
  esac
done
((${#cpus[@]})) || cpus=(max neoverse-n1 cortex-a57)

# --- tools: install only what is missing, so a prepared machine never touches apt.
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi

# --- build once; the emulated CPU only changes how ctest launches the binary.
build=build-arm64
cmake_args=(-DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
            -DPYRUNTIME_BUILD_TESTS=ON -DPYRUNTIME_BUILD_PYTHON=OFF)
if ((asan)); then
  build=build-arm64-asan
  cmake_args+=(-DPYRUNTIME_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)
  # LeakSanitizer needs ptrace-like thread control that qemu-user does not provide.
  export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export PYRUNTIME_TEST_QUICK="${PYRUNTIME_TEST_QUICK:-1}"
fi
generator=()
if command -v ninja >/dev/null && [ ! -f "$build/CMakeCache.txt" ]; then generator=(-G Ninja); fi

echo "== configure $build (aarch64 cross)"
cmake -S . -B "$build" ${generator[@]+"${generator[@]}"} "${cmake_args[@]}" -DPYRUNTIME_QEMU_CPU="${cpus[0]}" >/dev/null
echo "== build test_kernels"
cmake --build "$build" --target test_kernels -j "$(nproc)"

expected_isas() {  # what dispatch must offer on each emulated model (qemu 7.2's list)
  case "$1" in
    max|neoverse-n1|cortex-a76) echo "ref,neon,neondot" ;;
    cortex-a35|cortex-a53|cortex-a57|cortex-a72) echo "ref,neon" ;;
    *) echo "" ;;  # unknown model: run without checking dispatch
  esac
}

failed=()
first=1
for cpu in "${cpus[@]}"; do
  expect=$(expected_isas "$cpu")
  echo "== ctest under qemu -cpu $cpu${expect:+ (expecting ISAs $expect)}"
  cmake -S . -B "$build" -DPYRUNTIME_QEMU_CPU="$cpu" >/dev/null
  run_env=()
  [ -n "$expect" ] && run_env+=(PYRUNTIME_EXPECT_ISAS="$expect")
  if [ -z "${PYRUNTIME_TEST_QUICK:-}" ] && ((!first)); then run_env+=(PYRUNTIME_TEST_QUICK=1); fi
  if ! (cd "$build" && env ${run_env[@]+"${run_env[@]}"} ctest --output-on-failure); then failed+=("$cpu"); fi
  first=0
done

if ((${#failed[@]})); then
  echo "arm64 kernel tests FAILED under: ${failed[*]}" >&2
  exit 1
fi
echo "arm64 kernel tests passed under: ${cpus[*]}"
