#!/usr/bin/env bash
# The whole test suite: set-up, C++ kernel tests (native, AddressSanitizer+UBSan, emulated
# arm64 on three CPUs), the torch-free Python tests on emulated arm64, then the Python tests.
# `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

jobs=$(nproc)

echo "== C++ kernel tests (native)"
cmake -S . -B build/ctest -G Ninja -DPYRUNTIME_BUILD_TESTS=ON -DPYRUNTIME_BUILD_PYTHON=OFF >/dev/null
ninja -C build/ctest -j "$jobs" test_kernels
ctest --test-dir build/ctest --output-on-failure

echo "== C++ kernel tests (AddressSanitizer + UBSan)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPYRUNTIME_SANITIZE=ON \
  -DPYRUNTIME_BUILD_TESTS=ON -DPYRUNTIME_BUILD_PYTHON=OFF >/dev/null
ninja -C build/asan -j "$jobs" test_kernels
PYRUNTIME_TEST_QUICK=1 ctest --test-dir build/asan --output-on-failure

echo "== C++ kernel tests (arm64 under qemu)"
bash tools/arm64_test.sh

echo "== Python tests on arm64 under qemu, and arm64 vs x86 agreement"
bash tools/arm64_python_test.sh

echo "== x86 without AVX-512: static ISA-symbol check, Python tests under qemu Haswell and Nehalem"
bash tools/x86_compat_test.sh

echo "== Wheels (x86_64 and aarch64 manylinux, sdist) and their install checks"
bash tools/build_wheels.sh

echo "== Python tests"
python3 -m pytest tests -q -p no:cacheprovider
