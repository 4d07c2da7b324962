// The ISAs, in one place: name, whether this build compiled it, the CPU features it needs, and
// its kernel table. Dispatch (cpu.cc), the list of known names and the error messages all read
// this array; CMakeLists.txt's pyrt_isa() calls are the build side (source file, flags, and the
// PYRT_BUILD_* macro tested here).
//
// Order: from the most portable ("ref") to the best; the last usable one is the default.
// `supported` is asked first, and `table` only after it said yes: a table's kernels may use
// instructions this CPU lacks (see kernels/isa_kernels.h for why no ISA code runs on the way).
#pragma once

#include "../kernels/kernels.h"
#include "cpu.h"

namespace pyrt {

struct IsaInfo {
  const char* name;
  bool built;                                // compiled into this build (PYRT_BUILD_* macro)
  bool (*supported)(const CpuFeatures& f);   // the CPU and OS can run it
  const KernelTable* (*table)();             // ref_kernels() and friends (kernels.h)
};

#ifdef PYRT_BUILD_AVX2
inline constexpr bool kBuiltAvx2 = true;
#else
inline constexpr bool kBuiltAvx2 = false;
#endif
#ifdef PYRT_BUILD_AVX512VNNI
inline constexpr bool kBuiltAvx512Vnni = true;
#else
inline constexpr bool kBuiltAvx512Vnni = false;
#endif
#ifdef PYRT_BUILD_NEON
inline constexpr bool kBuiltNeon = true;
#else
inline constexpr bool kBuiltNeon = false;
#endif

inline constexpr IsaInfo kIsas[] = {
    {"ref", true, [](const CpuFeatures&) { return true; }, ref_kernels},
    {"avx2", kBuiltAvx2, [](const CpuFeatures& f) { return f.avx2; }, avx2_kernels},
    {"avx512vnni", kBuiltAvx512Vnni, [](const CpuFeatures& f) { return f.avx512vnni; }, avx512vnni_kernels},
    {"neon", kBuiltNeon, [](const CpuFeatures& f) { return f.neon; }, neon_kernels},
    {"neondot", kBuiltNeon, [](const CpuFeatures& f) { return f.neon && f.dotprod; }, neondot_kernels},
};

}  // namespace pyrt
