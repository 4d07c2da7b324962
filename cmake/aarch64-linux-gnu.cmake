# Cross-compiling for 64-bit ARM Linux with Debian's GNU toolchain, tests run under qemu-user.
#
#   apt-get install g++-aarch64-linux-gnu qemu-user-static
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DPYRUNTIME_BUILD_PYTHON=OFF -DPYRUNTIME_BUILD_TESTS=ON [-DPYRUNTIME_QEMU_CPU=cortex-a57]
#
# ctest runs every test through CMAKE_CROSSCOMPILING_EMULATOR. PYRUNTIME_QEMU_CPU picks the
# emulated core, which decides the HWCAP bits the run-time dispatch sees:
#   max          everything qemu implements (dotprod, i8mm, ...)
#   neoverse-n1  ARMv8.2 with dotprod, no i8mm
#   cortex-a57   baseline ARMv8.0: no dotprod, so the "neondot" table must not be offered
# tools/arm64_test.sh builds once and runs the tests under each of these.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(PYRUNTIME_CROSS_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${PYRUNTIME_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${PYRUNTIME_CROSS_TRIPLE}-g++)

# Debian's multiarch cross sysroot.
set(PYRUNTIME_CROSS_ROOT /usr/${PYRUNTIME_CROSS_TRIPLE} CACHE PATH "Target sysroot (headers, libs)")
set(CMAKE_FIND_ROOT_PATH ${PYRUNTIME_CROSS_ROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)   # build tools come from the host
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)    # target libraries from the sysroot only
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(PYRUNTIME_QEMU_CPU max CACHE STRING
    "qemu -cpu model for running target binaries (max, neoverse-n1, cortex-a57, ...)")
find_program(PYRUNTIME_QEMU NAMES qemu-aarch64-static qemu-aarch64)
if(PYRUNTIME_QEMU)
  # -L: where qemu finds the target's dynamic loader and shared libraries.
  set(CMAKE_CROSSCOMPILING_EMULATOR
      ${PYRUNTIME_QEMU} -L ${PYRUNTIME_CROSS_ROOT} -cpu ${PYRUNTIME_QEMU_CPU})
endif()
