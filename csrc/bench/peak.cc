// Register-resident peak loops for int8 dot products and fp32 FMA.
//
// The loops are inline assembly, not intrinsics: with intrinsics the compiler sees that the
// multiplies of loop-invariant registers give the same value every iteration and hoists or
// merges them (leaving a loop of adds), and it is free to change the instruction mix. In asm
// the count of each instruction per iteration is exact, so ops = iterations * ops_per_iter.
//
// This file is compiled for the architecture's baseline (no -mavx2): the x86 loops carry
// target("avx2,fma") and the ARM dotprod loop enables the extension for its own assembly; each
// is called only when cpu_features() says the CPU (and OS) supports it.
#include "peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu/cpu.h"

namespace pyrt {
namespace {

// One call runs `iters` (> 0) iterations and writes a reduction of the accumulators to `out`,
// so the work has a visible result.
using LoopFn = void (*)(uint64_t iters, void* out);

struct PeakLoop {
  LoopFn fn = nullptr;
  double ops_per_iter = 0;  // int8: 2 per MAC; fp32: 2 per FMA lane
};

// Keeps the loops' results observable (belt and braces: asm volatile is never removed).
// Atomic because every thread of a multi-threaded measurement writes it.
std::atomic<int64_t> g_sink{0};

// GNU inline asm: GCC and Clang (the only compilers the build supports).
#if defined(__x86_64__) && defined(__GNUC__)

// ymm15 = a (u8), ymm14 = b (s8), ymm13 = ones (i16). Per chain: t = maddubs(a, b) (32 MACs,
// i16 pairs); t = maddwd(t, ones) (i32); acc += t. The three temporaries rotate; register
// renaming removes the false dependencies, so the only carried dependency is the 1-cycle add.
#define PYRT_I8_CHAIN(acc, t)                     \
  "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #t "\n\t"  \
  "vpmaddwd %%ymm13, %%ymm" #t ", %%ymm" #t "\n\t" \
  "vpaddd %%ymm" #t ", %%ymm" #acc ", %%ymm" #acc "\n\t"

constexpr int kAvx2I8Chains = 10;

__attribute__((target("avx2,fma"))) void int8_loop_avx2(uint64_t iters, void* out) {
  alignas(32) static const uint8_t a[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  alignas(32) static const int8_t b[32] = {-3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1,
                                           -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1};
  alignas(32) static const int16_t ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  __asm__ volatile(
      "vmovdqu (%[a]), %%ymm15\n\t"
      "vmovdqu (%[b]), %%ymm14\n\t"
      "vmovdqu (%[ones]), %%ymm13\n\t"
      "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
      "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
      "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
      "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
      "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
      ".p2align 5\n"
      "1:\n\t"
      PYRT_I8_CHAIN(0, 10) PYRT_I8_CHAIN(1, 11) PYRT_I8_CHAIN(2, 12)
      PYRT_I8_CHAIN(3, 10) PYRT_I8_CHAIN(4, 11) PYRT_I8_CHAIN(5, 12)
      PYRT_I8_CHAIN(6, 10) PYRT_I8_CHAIN(7, 11) PYRT_I8_CHAIN(8, 12)
      PYRT_I8_CHAIN(9, 10)
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vpaddd %%ymm1, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm2, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm3, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm4, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm5, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm6, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm7, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm8, %%ymm0, %%ymm0\n\t"
      "vpaddd %%ymm9, %%ymm0, %%ymm0\n\t"
      "vmovdqu %%ymm0, (%[out])\n\t"
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [a] "r"(a), [b] "r"(b), [ones] "r"(ones), [out] "r"(out)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef PYRT_I8_CHAIN

// zmm15 = a (u8), zmm14 = b (s8): vpdpbusd is 64 MACs into its own accumulator; 12 chains
// cover its latency at one or two per cycle.
#define PYRT_VNNI(acc) "vpdpbusd %%zmm14, %%zmm15, %%zmm" #acc "\n\t"

constexpr int kVnniChains = 12;

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_loop_avx512vnni(uint64_t iters, void* out) {
  alignas(64) static const int8_t in[128] = {
      1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
      1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
      -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1,
      -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1};
  __asm__ volatile(
      "vmovdqu64 (%[in]), %%zmm15\n\t"
      "vmovdqu64 64(%[in]), %%zmm14\n\t"
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\t" "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"
      "vpxord %%zmm2, %%zmm2, %%zmm2\n\t" "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"
      "vpxord %%zmm4, %%zmm4, %%zmm4\n\t" "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"
      "vpxord %%zmm6, %%zmm6, %%zmm6\n\t" "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"
      "vpxord %%zmm8, %%zmm8, %%zmm8\n\t" "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"
      "vpxord %%zmm10, %%zmm10, %%zmm10\n\t" "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"
      ".p2align 5\n"
      "1:\n\t"
      PYRT_VNNI(0) PYRT_VNNI(1) PYRT_VNNI(2) PYRT_VNNI(3) PYRT_VNNI(4) PYRT_VNNI(5)
      PYRT_VNNI(6) PYRT_VNNI(7) PYRT_VNNI(8) PYRT_VNNI(9) PYRT_VNNI(10) PYRT_VNNI(11)
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vpaddd %%zmm1, %%zmm0, %%zmm0\n\t" "vpaddd %%zmm3, %%zmm2, %%zmm2\n\t"
      "vpaddd %%zmm5, %%zmm4, %%zmm4\n\t" "vpaddd %%zmm7, %%zmm6, %%zmm6\n\t"
      "vpaddd %%zmm9, %%zmm8, %%zmm8\n\t" "vpaddd %%zmm11, %%zmm10, %%zmm10\n\t"
      "vpaddd %%zmm2, %%zmm0, %%zmm0\n\t" "vpaddd %%zmm6, %%zmm4, %%zmm4\n\t"
      "vpaddd %%zmm10, %%zmm8, %%zmm8\n\t" "vpaddd %%zmm4, %%zmm0, %%zmm0\n\t"
      "vpaddd %%zmm8, %%zmm0, %%zmm0\n\t"
      "vmovdqu %%ymm0, (%[out])\n\t"  // out holds 32 bytes
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [in] "r"(in), [out] "r"(out)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm14", "xmm15");
}
#undef PYRT_VNNI

// ymm15 * ymm14 into 12 accumulators: FMA latency 4-5 at 2 per cycle needs at least 8-10
// chains in flight. The values grow slowly and stay normal (denormals would slow it down).
#define PYRT_F32_FMA(acc) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #acc "\n\t"

constexpr int kAvx2F32Chains = 12;

__attribute__((target("avx2,fma"))) void f32_loop_avx2(uint64_t iters, void* out) {
  alignas(32) static const float in[24] = {0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,
                                           1e-6f, 1e-6f, 1e-6f, 1e-6f, 1e-6f, 1e-6f, 1e-6f, 1e-6f,
                                           1.0f,  1.0f,  1.0f,  1.0f,  1.0f,  1.0f,  1.0f,  1.0f};
  __asm__ volatile(
      "vmovups (%[in]), %%ymm15\n\t"
      "vmovups 32(%[in]), %%ymm14\n\t"
      "vmovups 64(%[in]), %%ymm0\n\t"
      "vmovaps %%ymm0, %%ymm1\n\t"
      "vmovaps %%ymm0, %%ymm2\n\t"
      "vmovaps %%ymm0, %%ymm3\n\t"
      "vmovaps %%ymm0, %%ymm4\n\t"
      "vmovaps %%ymm0, %%ymm5\n\t"
      "vmovaps %%ymm0, %%ymm6\n\t"
      "vmovaps %%ymm0, %%ymm7\n\t"
      "vmovaps %%ymm0, %%ymm8\n\t"
      "vmovaps %%ymm0, %%ymm9\n\t"
      "vmovaps %%ymm0, %%ymm10\n\t"
      "vmovaps %%ymm0, %%ymm11\n\t"
      ".p2align 5\n"
      "1:\n\t"
      PYRT_F32_FMA(0) PYRT_F32_FMA(1) PYRT_F32_FMA(2) PYRT_F32_FMA(3)
      PYRT_F32_FMA(4) PYRT_F32_FMA(5) PYRT_F32_FMA(6) PYRT_F32_FMA(7)
      PYRT_F32_FMA(8) PYRT_F32_FMA(9) PYRT_F32_FMA(10) PYRT_F32_FMA(11)
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vaddps %%ymm1, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm2, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm3, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm4, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm5, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm6, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm7, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm8, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm9, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm10, %%ymm0, %%ymm0\n\t"
      "vaddps %%ymm11, %%ymm0, %%ymm0\n\t"
      "vmovups %%ymm0, (%[out])\n\t"
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [in] "r"(in), [out] "r"(out)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef PYRT_F32_FMA

PeakLoop best_int8_loop() {
  if (cpu_features().avx512vnni) return {&int8_loop_avx512vnni, kVnniChains * 64 * 2.0};
  if (cpu_features().avx2) return {&int8_loop_avx2, kAvx2I8Chains * 32 * 2.0};
  return {};
}

PeakLoop best_f32_loop() {
  if (cpu_features().avx2) return {&f32_loop_avx2, kAvx2F32Chains * 8 * 2.0};
  return {};
}

#elif defined(__aarch64__) && defined(__GNUC__)

// v30, v31: inputs; v0..v15: accumulators. SDOT: 4 lanes x 4 MACs = 16 MACs per instruction.
// The target attribute makes the compiler tell the assembler (`.arch ...+dotprod`) that this
// function may use SDOT, whatever -march the file was compiled with.
#if defined(__clang__)
#define PYRT_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
// binutils accepts SDOT only with an ARMv8.2 base (".arch armv8-a+dotprod" is rejected).
#define PYRT_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define PYRT_SDOT(acc) "sdot v" #acc ".4s, v30.16b, v31.16b\n\t"

constexpr int kSdotChains = 16;

PYRT_TARGET_DOTPROD void int8_loop_neondot(uint64_t iters, void* out) {
  alignas(16) static const int8_t in[32] = {1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16,
                                            -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1};
  __asm__ volatile(
      "ld1 {v30.16b, v31.16b}, [%[in]]\n\t"
      "movi v0.4s, #0\n\t" "movi v1.4s, #0\n\t" "movi v2.4s, #0\n\t" "movi v3.4s, #0\n\t"
      "movi v4.4s, #0\n\t" "movi v5.4s, #0\n\t" "movi v6.4s, #0\n\t" "movi v7.4s, #0\n\t"
      "movi v8.4s, #0\n\t" "movi v9.4s, #0\n\t" "movi v10.4s, #0\n\t" "movi v11.4s, #0\n\t"
      "movi v12.4s, #0\n\t" "movi v13.4s, #0\n\t" "movi v14.4s, #0\n\t" "movi v15.4s, #0\n\t"
      "1:\n\t"
      PYRT_SDOT(0) PYRT_SDOT(1) PYRT_SDOT(2) PYRT_SDOT(3)
      PYRT_SDOT(4) PYRT_SDOT(5) PYRT_SDOT(6) PYRT_SDOT(7)
      PYRT_SDOT(8) PYRT_SDOT(9) PYRT_SDOT(10) PYRT_SDOT(11)
      PYRT_SDOT(12) PYRT_SDOT(13) PYRT_SDOT(14) PYRT_SDOT(15)
      "subs %[n], %[n], #1\n\t"
      "b.ne 1b\n\t"
      "add v0.4s, v0.4s, v1.4s\n\t" "add v2.4s, v2.4s, v3.4s\n\t"
      "add v4.4s, v4.4s, v5.4s\n\t" "add v6.4s, v6.4s, v7.4s\n\t"
      "add v8.4s, v8.4s, v9.4s\n\t" "add v10.4s, v10.4s, v11.4s\n\t"
      "add v12.4s, v12.4s, v13.4s\n\t" "add v14.4s, v14.4s, v15.4s\n\t"
      "add v0.4s, v0.4s, v2.4s\n\t" "add v4.4s, v4.4s, v6.4s\n\t"
      "add v8.4s, v8.4s, v10.4s\n\t" "add v12.4s, v12.4s, v14.4s\n\t"
      "add v0.4s, v0.4s, v4.4s\n\t" "add v8.4s, v8.4s, v12.4s\n\t"
      "add v0.4s, v0.4s, v8.4s\n\t"
      "st1 {v0.4s}, [%[out]]\n\t"
      : [n] "+r"(iters)
      : [in] "r"(in), [out] "r"(out)
      : "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10",
        "v11", "v12", "v13", "v14", "v15", "v30", "v31");
}
#undef PYRT_SDOT
#undef PYRT_TARGET_DOTPROD

// Without dotprod: SMULL/SMULL2 (8 MACs each, i16 products) then SADALP into i32 accumulators.
#define PYRT_SMULL_PAIR(acc_lo, acc_hi, t_lo, t_hi)     \
  "smull v" #t_lo ".8h, v30.8b, v31.8b\n\t"             \
  "smull2 v" #t_hi ".8h, v30.16b, v31.16b\n\t"          \
  "sadalp v" #acc_lo ".4s, v" #t_lo ".8h\n\t"           \
  "sadalp v" #acc_hi ".4s, v" #t_hi ".8h\n\t"

constexpr int kSmullPerIter = 16;

void int8_loop_neon(uint64_t iters, void* out) {
  alignas(16) static const int8_t in[32] = {1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16,
                                            -3, 1, 2, -1, 3, -2, 1, 1, -3, 1, 2, -1, 3, -2, 1, 1};
  __asm__ volatile(
      "ld1 {v30.16b, v31.16b}, [%[in]]\n\t"
      "movi v0.4s, #0\n\t" "movi v1.4s, #0\n\t" "movi v2.4s, #0\n\t" "movi v3.4s, #0\n\t"
      "movi v4.4s, #0\n\t" "movi v5.4s, #0\n\t" "movi v6.4s, #0\n\t" "movi v7.4s, #0\n\t"
      "movi v8.4s, #0\n\t" "movi v9.4s, #0\n\t" "movi v10.4s, #0\n\t" "movi v11.4s, #0\n\t"
      "movi v12.4s, #0\n\t" "movi v13.4s, #0\n\t" "movi v14.4s, #0\n\t" "movi v15.4s, #0\n\t"
      "1:\n\t"
      PYRT_SMULL_PAIR(0, 1, 16, 17) PYRT_SMULL_PAIR(2, 3, 18, 19)
      PYRT_SMULL_PAIR(4, 5, 20, 21) PYRT_SMULL_PAIR(6, 7, 22, 23)
      PYRT_SMULL_PAIR(8, 9, 16, 17) PYRT_SMULL_PAIR(10, 11, 18, 19)
      PYRT_SMULL_PAIR(12, 13, 20, 21) PYRT_SMULL_PAIR(14, 15, 22, 23)
      "subs %[n], %[n], #1\n\t"
      "b.ne 1b\n\t"
      "add v0.4s, v0.4s, v1.4s\n\t" "add v2.4s, v2.4s, v3.4s\n\t"
      "add v4.4s, v4.4s, v5.4s\n\t" "add v6.4s, v6.4s, v7.4s\n\t"
      "add v8.4s, v8.4s, v9.4s\n\t" "add v10.4s, v10.4s, v11.4s\n\t"
      "add v12.4s, v12.4s, v13.4s\n\t" "add v14.4s, v14.4s, v15.4s\n\t"
      "add v0.4s, v0.4s, v2.4s\n\t" "add v4.4s, v4.4s, v6.4s\n\t"
      "add v8.4s, v8.4s, v10.4s\n\t" "add v12.4s, v12.4s, v14.4s\n\t"
      "add v0.4s, v0.4s, v4.4s\n\t" "add v8.4s, v8.4s, v12.4s\n\t"
      "add v0.4s, v0.4s, v8.4s\n\t"
      "st1 {v0.4s}, [%[out]]\n\t"
      : [n] "+r"(iters)
      : [in] "r"(in), [out] "r"(out)
      : "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10",
        "v11", "v12", "v13", "v14", "v15", "v16", "v17", "v18", "v19", "v20", "v21", "v22",
        "v23", "v30", "v31");
}
#undef PYRT_SMULL_PAIR

#define PYRT_FMLA(acc) "fmla v" #acc ".4s, v30.4s, v31.4s\n\t"

constexpr int kFmlaChains = 16;

void f32_loop_neon(uint64_t iters, void* out) {
  alignas(16) static const float in[12] = {0.5f, 0.5f, 0.5f, 0.5f, 1e-6f, 1e-6f, 1e-6f, 1e-6f,
                                           1.0f, 1.0f, 1.0f, 1.0f};
  __asm__ volatile(
      "ld1 {v30.4s, v31.4s}, [%[in]]\n\t"
      "ldr q0, [%[in], #32]\n\t"
      "mov v1.16b, v0.16b\n\t" "mov v2.16b, v0.16b\n\t" "mov v3.16b, v0.16b\n\t"
      "mov v4.16b, v0.16b\n\t" "mov v5.16b, v0.16b\n\t" "mov v6.16b, v0.16b\n\t"
      "mov v7.16b, v0.16b\n\t" "mov v8.16b, v0.16b\n\t" "mov v9.16b, v0.16b\n\t"
      "mov v10.16b, v0.16b\n\t" "mov v11.16b, v0.16b\n\t" "mov v12.16b, v0.16b\n\t"
      "mov v13.16b, v0.16b\n\t" "mov v14.16b, v0.16b\n\t" "mov v15.16b, v0.16b\n\t"
      "1:\n\t"
      PYRT_FMLA(0) PYRT_FMLA(1) PYRT_FMLA(2) PYRT_FMLA(3)
      PYRT_FMLA(4) PYRT_FMLA(5) PYRT_FMLA(6) PYRT_FMLA(7)
      PYRT_FMLA(8) PYRT_FMLA(9) PYRT_FMLA(10) PYRT_FMLA(11)
      PYRT_FMLA(12) PYRT_FMLA(13) PYRT_FMLA(14) PYRT_FMLA(15)
      "subs %[n], %[n], #1\n\t"
      "b.ne 1b\n\t"
      "fadd v0.4s, v0.4s, v1.4s\n\t" "fadd v2.4s, v2.4s, v3.4s\n\t"
      "fadd v4.4s, v4.4s, v5.4s\n\t" "fadd v6.4s, v6.4s, v7.4s\n\t"
      "fadd v8.4s, v8.4s, v9.4s\n\t" "fadd v10.4s, v10.4s, v11.4s\n\t"
      "fadd v12.4s, v12.4s, v13.4s\n\t" "fadd v14.4s, v14.4s, v15.4s\n\t"
      "fadd v0.4s, v0.4s, v2.4s\n\t" "fadd v4.4s, v4.4s, v6.4s\n\t"
      "fadd v8.4s, v8.4s, v10.4s\n\t" "fadd v12.4s, v12.4s, v14.4s\n\t"
      "fadd v0.4s, v0.4s, v4.4s\n\t" "fadd v8.4s, v8.4s, v12.4s\n\t"
      "fadd v0.4s, v0.4s, v8.4s\n\t"
      "st1 {v0.4s}, [%[out]]\n\t"
      : [n] "+r"(iters)
      : [in] "r"(in), [out] "r"(out)
      : "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10",
        "v11", "v12", "v13", "v14", "v15", "v30", "v31");
}
#undef PYRT_FMLA

PeakLoop best_int8_loop() {
  const CpuFeatures& f = cpu_features();
  if (f.neon && f.dotprod) return {&int8_loop_neondot, kSdotChains * 16 * 2.0};
  if (f.neon) return {&int8_loop_neon, kSmullPerIter * 8 * 2.0};
  return {};
}

PeakLoop best_f32_loop() {
  if (cpu_features().neon) return {&f32_loop_neon, kFmlaChains * 4 * 2.0};
  return {};
}

#else

PeakLoop best_int8_loop() { return {}; }
PeakLoop best_f32_loop() { return {}; }

#endif

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Iterations per timed chunk: doubled until a chunk takes >= 1 ms, which also warms the core
// up (clock ramp, caches of the loop itself).
uint64_t calibrate(LoopFn fn, void* out) {
  uint64_t iters = 1024;
  for (;;) {
    const Clock::time_point t0 = Clock::now();
    fn(iters, out);
    if (seconds_since(t0) >= 1e-3 || iters >= (uint64_t{1} << 40)) return iters;
    iters *= 2;
  }
}

// Per-thread: calibrate, warm up, wait for every thread, then run chunks for `seconds` and
// return ops per second.
double run_one(const PeakLoop& loop, double seconds, std::atomic<int>* ready, int threads) {
  alignas(32) int64_t out[4] = {0, 0, 0, 0};
  const uint64_t chunk = calibrate(loop.fn, out);
  const Clock::time_point warm0 = Clock::now();
  const double warmup = std::min(0.05, 0.2 * seconds);
  while (seconds_since(warm0) < warmup) loop.fn(chunk, out);

  ready->fetch_add(1);
  while (ready->load() < threads) std::this_thread::yield();

  uint64_t chunks = 0;
  const Clock::time_point t0 = Clock::now();
  double elapsed = 0;
  do {
    loop.fn(chunk, out);
    ++chunks;
    elapsed = seconds_since(t0);
  } while (elapsed < seconds);
  g_sink.fetch_xor(out[0] ^ out[1] ^ out[2] ^ out[3], std::memory_order_relaxed);
  return static_cast<double>(chunks) * static_cast<double>(chunk) * loop.ops_per_iter / elapsed;
}

double measure(const PeakLoop& loop, int threads, double seconds) {
  if (threads < 1 || threads > 1024)
    throw std::invalid_argument("threads must be in 1..1024, got " + std::to_string(threads));
  if (!std::isfinite(seconds) || seconds <= 0 || seconds > 60)
    throw std::invalid_argument("seconds must be in (0, 60], got " + std::to_string(seconds));
  if (!loop.fn) return 0.0;

  std::atomic<int> ready{0};
  std::vector<double> rate(threads, 0.0);
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (int t = 1; t < threads; ++t)
      pool.emplace_back([&, t] { rate[t] = run_one(loop, seconds, &ready, threads); });
  } catch (...) {
    // Release the threads already waiting at the start line, then report the failure.
    ready.fetch_add(threads);
    for (std::thread& th : pool) th.join();
    throw;
  }
  rate[0] = run_one(loop, seconds, &ready, threads);
  for (std::thread& th : pool) th.join();

  double total = 0;
  for (double r : rate) total += r;
  return total * 1e-9;
}

}  // namespace

double int8_peak_gops(int threads, double seconds) {
  return measure(best_int8_loop(), threads, seconds);
}

double fp32_peak_gflops(int threads, double seconds) {
  return measure(best_f32_loop(), threads, seconds);
}

}  // namespace pyrt
