// Tables of the ISAs this build does not compile return nullptr, so dispatch code can ask
// for every table on every target without #ifdefs of its own.
#include "kernels.h"

namespace pyrt {
#ifndef PYRT_BUILD_AVX2
const KernelTable* avx2_kernels() { return nullptr; }
#endif
#ifndef PYRT_BUILD_AVX512VNNI
const KernelTable* avx512vnni_kernels() { return nullptr; }
#endif
#ifndef PYRT_BUILD_NEON
const KernelTable* neon_kernels() { return nullptr; }
const KernelTable* neondot_kernels() { return nullptr; }
#endif
}  // namespace pyrt
