// CPU feature detection and kernel-table selection.
//
// An ISA is usable only if it was compiled into this build *and* the running CPU (and OS)
// supports it. x86: CPUID for AVX2/FMA (and AVX-512) plus XCR0, because the OS must save the
// ymm (and zmm, opmask) state before such code may run. ARM: the kernel's HWCAP bits, never
// the ID registers directly.
#pragma once

#include <string>
#include <vector>

#include "../kernels/kernels.h"

namespace pyrt {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA + OS-enabled ymm state
  bool avx512vnni = false;  // AVX-512 F/BW/VL/VNNI + OS-enabled zmm and opmask state
  bool neon = false;        // AArch64 Advanced SIMD
  bool dotprod = false;     // SDOT/UDOT (ARMv8.2 dotprod)
  bool i8mm = false;        // SMMLA (reported only; no kernel uses it yet)
};

const CpuFeatures& cpu_features();

// Names of the ISAs usable here, from the most portable ("ref") to the best.
std::vector<std::string> available_isas();

// Every ISA name this library knows, comma-separated, whether built here or not (for messages).
std::string known_isas();

// The table for `name`; throws std::invalid_argument naming the problem when the ISA is
// unknown, not built, or not supported by this CPU.
const KernelTable* kernels_for(const std::string& name);

// The table used when a caller names none: PYRUNTIME_ISA if set (an unusable value is an
// error, raised on first use), else the best available.
const KernelTable* default_kernels();

// Physical cores available to this process (affinity mask and SMT siblings accounted for).
int physical_cores();

}  // namespace pyrt
