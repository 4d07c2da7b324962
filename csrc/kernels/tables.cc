// The kernel tables, assembled from the functions each ISA file exports, and the few generic
// helpers ISA files call (isa_kernels.h).
// This file is compiled for the baseline ISA and the tables are constant data (no initialiser
// runs), so asking for a table never executes an ISA's instructions: only calling through it
// does, and dispatch (cpu/) hands a table out only after the CPU check.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "isa_kernels.h"

namespace pyrt {
namespace {

// One table: `base`'s kernels, with `gemms`' integer GEMMs (an ISA that adds only integer
// instructions reuses its base's float kernels, which are bit-identical on every ISA anyway).
#define PYRT_TABLE(name, base, gemms)                                                         \
  KernelTable {                                                                               \
    name, base::quantize_rows, base::absmax, gemms::qd8_f32_qc8w_gemm, gemms::qd8_f32_qb4w_gemm, \
        base::f32_gemm, base::layernorm, base::softmax, base::softmax_q8, base::gelu, base::add, \
        base::scale_add, base::swiglu, base::quick_gelu, base::rope                              \
  }

constexpr KernelTable kRef = PYRT_TABLE("ref", ref, ref);
#ifdef PYRT_BUILD_AVX2
constexpr KernelTable kAvx2 = PYRT_TABLE("avx2", avx2, avx2);
#endif
#ifdef PYRT_BUILD_AVX512VNNI
constexpr KernelTable kAvx512Vnni = PYRT_TABLE("avx512vnni", avx2, avx512vnni);
#endif
#ifdef PYRT_BUILD_NEON
constexpr KernelTable kNeon = PYRT_TABLE("neon", neon, neon);
constexpr KernelTable kNeonDot = PYRT_TABLE("neondot", neon, neondot);
#endif

#undef PYRT_TABLE

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

}  // namespace

const KernelTable* ref_kernels() { return &kRef; }

const KernelTable* avx2_kernels() {
#ifdef PYRT_BUILD_AVX2
  return &kAvx2;
#else
  return nullptr;
#endif
}

const KernelTable* avx512vnni_kernels() {
#ifdef PYRT_BUILD_AVX512VNNI
  return &kAvx512Vnni;
#else
  return nullptr;
#endif
}

const KernelTable* neon_kernels() {
#ifdef PYRT_BUILD_NEON
  return &kNeon;
#else
  return nullptr;
#endif
}

const KernelTable* neondot_kernels() {
#ifdef PYRT_BUILD_NEON
  return &kNeonDot;
#else
  return nullptr;
#endif
}

void* thread_scratch(size_t bytes) {
  constexpr size_t kAlign = 64;
  thread_local std::unique_ptr<void, FreeDeleter> buf;
  thread_local size_t size = 0;
  if (size < bytes) {
    const size_t want = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, want);
    if (!p) throw std::bad_alloc();
    buf.reset(p);
    size = want;
  }
  return buf.get();
}

float absmax_finish(uint32_t abs_bits, size_t n, const float* x) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    abs_bits = std::max(abs_bits, bits & 0x7FFFFFFFu);
  }
  if (abs_bits > 0x7F800000u) return std::numeric_limits<float>::quiet_NaN();
  float f;
  std::memcpy(&f, &abs_bits, sizeof f);
  return f;
}

void softmax_q8_poison_row(size_t Kp, int8_t* q, float* scale) {
  std::memset(q, 0, Kp);
  *scale = std::numeric_limits<float>::quiet_NaN();
}

}  // namespace pyrt
