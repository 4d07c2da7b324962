// Internal to csrc/kernels/neon*.cc: small helpers both AArch64 kernel files use.
//
// Everything here is `static` or in an anonymous namespace on purpose. neondot.cc is compiled
// with -march=armv8.2-a+dotprod; an `inline` (external-linkage) helper instantiated in both
// files would be one COMDAT symbol, and the linker may keep the dotprod-compiled copy for
// neon.cc's callers too -- an illegal instruction on a CPU without dotprod (see the ODR note
// in ruy's path.h). Internal linkage gives each file its own copy, built with its own flags.
// The neondot table (tables.cc) reuses neon.cc's non-GEMM kernels as functions, not by
// calling into this header.
#pragma once

#if !defined(__aarch64__)
#error "neon_common.h is for AArch64 builds only"
#endif

#include <arm_neon.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

// Put on the functions the kernel table points at: everything they call (tiles, the unroll
// lambdas, helpers) is inlined into them at -O2 as well as -O3, so accumulator arrays indexed
// by compile-time constants stay in registers.
#define PYRT_NEON_FLATTEN __attribute__((flatten))

namespace pyrt {
namespace {

// Calls f(std::integral_constant<int, 0>) ... f(integral_constant<int, N-1>): a loop unrolled
// at compile time, so lane indices are immediates and accumulator arrays indexed by them
// live in registers.
template <typename F, int... I>
inline __attribute__((always_inline)) void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline __attribute__((always_inline)) void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// Row blocking of a GEMM: tile(integral_constant<int, MR>, m) for each full block of MR rows
// starting at row m, then tile(integral_constant<int, M % MR>, m) once for the rest.
template <int MR, typename F>
inline __attribute__((always_inline)) void for_row_tiles(size_t M, F&& tile) {
  size_t m = 0;
  for (; m + MR <= M; m += MR) tile(std::integral_constant<int, MR>{}, m);
  const size_t rest = M - m;
  unroll<MR - 1>([&](auto r) {
    constexpr int R = decltype(r)::value + 1;
    if (rest == R) tile(std::integral_constant<int, R>{}, m);
  });
}

// 4 bytes of `p` (any alignment) replicated into every 32-bit lane.
inline int8x16_t load_dup4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// Loads 4*NQ floats of a panel-padded vector, or, when only `n` < 4*NQ are valid (the last
// panel of a layer whose N is not a multiple of 16), the valid ones and zeros. p == nullptr
// (no bias) gives zeros.
template <int NQ>
inline void load_cols(const float* p, size_t n, float32x4_t* v) {
  if (!p) {
    unroll<NQ>([&](auto q) { v[q] = vdupq_n_f32(0.0f); });
  } else if (n >= 4 * NQ) {
    unroll<NQ>([&](auto q) { v[q] = vld1q_f32(p + 4 * q); });
  } else {
    float tmp[4 * NQ] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    unroll<NQ>([&](auto q) { v[q] = vld1q_f32(tmp + 4 * q); });
  }
}

// Stores the first min(n, 4*NQ) columns of v.
template <int NQ>
inline void store_cols(float* p, size_t n, const float32x4_t* v) {
  if (n >= 4 * NQ) {
    unroll<NQ>([&](auto q) { vst1q_f32(p + 4 * q, v[q]); });
  } else {
    float tmp[4 * NQ];
    unroll<NQ>([&](auto q) { vst1q_f32(tmp + 4 * q, v[q]); });
    std::memcpy(p, tmp, n * sizeof(float));
  }
}

// The float epilogue of qc8w, in the contract's order (kernels.h): float(acc) * (a_scale *
// w_scale); the caller adds bias only when there is one (+0.0 would turn -0.0 into +0.0).
// Plain multiplies: neon*.cc turn fp-contract off so a following add is never fused into them.
inline float32x4_t qc8w_epilogue(int32x4_t acc, float a_scale, float32x4_t w_scale) {
  return vmulq_f32(vcvtq_f32_s32(acc), vmulq_f32(vdupq_n_f32(a_scale), w_scale));
}

}  // namespace
}  // namespace pyrt
