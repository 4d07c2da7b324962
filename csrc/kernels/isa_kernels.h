// The kernels each ISA's source file exports: plain functions, one namespace per ISA, and
// nothing else. Internal to csrc/kernels/: callers use the tables (kernels.h).
//
// Why no file builds its own KernelTable: an ISA file is compiled with that ISA's flags, so
// any code in it -- a table's static initialiser, a struct copy, an inline or template helper
// it instantiates -- may use the ISA's instructions, and the table getter runs before anyone
// knows the CPU has them (avx512vnni.cc's table, copied from AVX2's, was one vmovdqu64 that
// killed every import on a CPU without AVX-512). So the tables are constant data assembled in
// tables.cc, which is built for the baseline ISA, and dispatch (cpu/isas.h) asks the CPU first.
// Everything else in an ISA file is in an anonymous namespace: see ISA_ODR below.
//
// ISA_ODR: an inline function or template that an ISA file and generic code both instantiate is
// one weak (COMDAT) symbol after linking, and the linker may keep the ISA-compiled copy for
// everybody. ISA files therefore keep their helpers file-local, take their scratch memory from
// thread_scratch() (generic code, below) instead of instantiating std::vector, and
// tools/check_isa_symbols.py fails the build check if any such shared symbol appears.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

// Declares functions from kernels.h's pointer types, so a signature lives in one place.
#define PYRT_DECLARE_INT_GEMMS                          \
  std::remove_pointer_t<QC8WGemmFn> qd8_f32_qc8w_gemm; \
  std::remove_pointer_t<QB4WGemmFn> qd8_f32_qb4w_gemm;
#define PYRT_DECLARE_ALL_KERNELS                       \
  PYRT_DECLARE_INT_GEMMS                               \
  std::remove_pointer_t<QuantizeRowsFn> quantize_rows; \
  std::remove_pointer_t<AbsMaxFn> absmax;              \
  std::remove_pointer_t<F32GemmFn> f32_gemm;           \
  std::remove_pointer_t<LayerNormFn> layernorm;        \
  std::remove_pointer_t<SoftmaxFn> softmax;            \
  std::remove_pointer_t<SoftmaxQ8Fn> softmax_q8;       \
  std::remove_pointer_t<GeluFn> gelu;                  \
  std::remove_pointer_t<AddFn> add;                    \
  std::remove_pointer_t<ScaleAddFn> scale_add;         \
  std::remove_pointer_t<SwiGluFn> swiglu;              \
  std::remove_pointer_t<QuickGeluFn> quick_gelu;       \
  std::remove_pointer_t<RopeFn> rope;

namespace pyrt {

namespace ref { PYRT_DECLARE_ALL_KERNELS }         // ref.cc, always built
namespace avx2 { PYRT_DECLARE_ALL_KERNELS }        // avx2.cc: -mavx2 -mfma
namespace avx512vnni { PYRT_DECLARE_INT_GEMMS }    // avx512vnni.cc: + AVX-512 F/BW/VL/VNNI
namespace neon { PYRT_DECLARE_ALL_KERNELS }        // neon.cc: AArch64 baseline
namespace neondot { PYRT_DECLARE_INT_GEMMS }       // neondot.cc: -march=armv8.2-a+dotprod

// Per-thread scratch of at least `bytes` bytes, 64-byte aligned, valid until the calling
// thread's next call. It grows to the largest request and is kept for the thread's lifetime,
// so steady-state kernel calls never allocate. One buffer per thread: a kernel must not call
// another kernel that uses it while it holds its own.
void* thread_scratch(size_t bytes);

// The rules every ISA shares for non-finite input (kernels.h), in one place:
// absmax's result: the largest |x| bit pattern (sign bit clear) of `abs_bits` (what a SIMD
// body found, 0 for none) and of the n values at x (its scalar tail), as a float; NaN patterns
// (above +inf's) become the one canonical quiet NaN.
float absmax_finish(uint32_t abs_bits, size_t n, const float* x);
// softmax_q8's row whose max is not finite (a NaN, or +inf: inf - inf): q[0 .. Kp) = 0 and
// *scale = NaN, so the row's attn.v product is NaN.
void softmax_q8_poison_row(size_t Kp, int8_t* q, float* scale);

}  // namespace pyrt

#undef PYRT_DECLARE_ALL_KERNELS
#undef PYRT_DECLARE_INT_GEMMS
