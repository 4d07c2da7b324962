// AVX-512 VNNI int8 GEMMs (x86_64 builds only). This file alone is compiled with the AVX-512
// F/BW/VL/VNNI flags; dispatch enables its table only when the CPU has them and the OS saves
// the zmm and opmask state. Its table (tables.cc) is AVX2's with the two integer GEMMs replaced:
// the float kernels are bit-identical on every ISA anyway, and on Zen 4 (which splits a zmm
// op into two ymm halves) zmm float code has the same throughput as ymm (measured: a 12 x 32
// zmm fp32 GEMM tile ran 5% slower than AVX2's 6 x 16, which is at ~95% of the FMA peak, and a
// zmm GELU was no faster).
//
// vpdpbusd multiplies unsigned by signed bytes and adds the four products of each 32-bit lane
// into an int32 accumulator, without intermediate saturation: 64 MACs per instruction, about
// twice the MACs per cycle of the AVX2 kernels. The integer results are exact, so this table
// returns the same bits as ref (the float epilogues are those of kernels.h).
//
// qd8_f32_qc8w_gemm: both operands are signed. The weights are made unsigned as they are
//   loaded (w ^ 0x80 = w + 128, one vpxord per 64 weight bytes, shared by every row of the
//   tile) so that the activations can be the signed operand, broadcast straight from memory
//   into vpdpbusd. The offset is undone per row: acc - 128 * sum_k a[k], exact in int32.
// qd8_f32_qb4w_gemm: the stored nibbles (q + 8, in [0, 15]) are already unsigned, so they feed
//   vpdpbusd as they are, and the +8 offset is undone per block with the activation sums.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "isa_kernels.h"
#include "packed_layout.h"

// GCC 12 warns inside its own AVX-512 headers (_mm512_cvtepi32_ps and friends pass an
// _mm512_undefined_ps() operand that the unmasked builtin never reads): a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pyrt {
namespace {

inline __m512i bcast_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// Lanes [0, n) of a 16-lane store, n <= 16.
inline __mmask16 first_lanes(size_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// sum of the Kp int8 values of each of M rows (Kp a multiple of 4), as vpdpbusd with ones.
void row_sums(size_t M, size_t Kp, const int8_t* a, size_t a_stride, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (size_t m = 0; m < M; ++m) {
    const int8_t* ar = a + m * a_stride;
    __m512i s = _mm512_setzero_si512();
    size_t k = 0;
    for (; k + 64 <= Kp; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(ar + k));
    if (k < Kp) {
      const __mmask16 tail = first_lanes((Kp - k) / 4);
      s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi32(tail, ar + k));
    }
    out[m] = _mm512_reduce_add_epi32(s);
  }
}

// ---------------------------------------------------------------------------------------------
// qd8_f32_qc8w_gemm
//
// Micro-tile of MR rows x NP panels (16 channels each): MR*NP zmm accumulators, NP weight
// registers. 8 x 3 leaves 5 of the 32 registers free and issues 24 vpdpbusd per 3 weight loads.

constexpr int kQC8MR = 8;
constexpr int kQC8NP = 3;

// Raw accumulators of MR rows x NP panels over Kp; out[r * NP + j] holds row r, panel j.
// Out of line so that each instantiation gets its registers to itself.
template <int MR, int NP>
__attribute__((noinline)) void qc8w_tile(size_t Kp, const int8_t* a, size_t a_stride,
                                         const int8_t* w, size_t panel_stride, __m512i* out) {
  __m512i acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 2
  for (size_t k = 0; k < Kp; k += kKGroup) {
    __m512i wv[NP];
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j)
      wv[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * panel_stride + 16 * k), flip);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = bcast_i32(a + r * a_stride + k);
#pragma GCC unroll 3
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], wv[j], av);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j) _mm512_store_si512(out + r * NP + j, acc[r][j]);
}

template <int NP>
void qc8w_tile_rows(int mr, size_t Kp, const int8_t* a, size_t a_stride, const int8_t* w,
                    size_t panel_stride, __m512i* out) {
  switch (mr) {
    case 8: qc8w_tile<8, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 7: qc8w_tile<7, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 6: qc8w_tile<6, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 5: qc8w_tile<5, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 4: qc8w_tile<4, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 3: qc8w_tile<3, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    case 2: qc8w_tile<2, NP>(Kp, a, a_stride, w, panel_stride, out); break;
    default: qc8w_tile<1, NP>(Kp, a, a_stride, w, panel_stride, out); break;
  }
}

}  // namespace

void avx512vnni::qd8_f32_qc8w_gemm(size_t M, size_t N, size_t Kp, const int8_t* a,
                                   size_t a_stride, const float* a_scale, const int8_t* w,
                                   const float* w_scale, const float* bias, float* y,
                                   size_t y_stride) {
  if (M == 0 || N == 0) return;
  // Per-thread scratch from generic code, not a std::vector (isa_kernels.h: ISA_ODR).
  int32_t* sums = static_cast<int32_t*>(thread_scratch(M * sizeof(int32_t)));
  row_sums(M, Kp, a, a_stride, sums);
  alignas(64) __m512i acc[kQC8MR * kQC8NP];
  const size_t panels = num_panels(N), panel_stride = packed::qc8w_panel_bytes(Kp);
  for (size_t p0 = 0; p0 < panels; p0 += kQC8NP) {
    const int np = static_cast<int>(std::min<size_t>(kQC8NP, panels - p0));
    __m512 ws[kQC8NP], bv[kQC8NP];
    __mmask16 keep[kQC8NP];
    for (int j = 0; j < np; ++j) {
      const size_t n0 = (p0 + j) * kNR;
      keep[j] = first_lanes(N - n0);
      ws[j] = _mm512_loadu_ps(w_scale + n0);  // padded to whole panels
      bv[j] = bias ? _mm512_maskz_loadu_ps(keep[j], bias + n0) : _mm512_setzero_ps();
    }
    const int8_t* wp = w + p0 * panel_stride;
    for (size_t m = 0; m < M; m += kQC8MR) {
      const int mr = static_cast<int>(std::min<size_t>(kQC8MR, M - m));
      const int8_t* am = a + m * a_stride;
      switch (np) {
        case 3: qc8w_tile_rows<3>(mr, Kp, am, a_stride, wp, panel_stride, acc); break;
        case 2: qc8w_tile_rows<2>(mr, Kp, am, a_stride, wp, panel_stride, acc); break;
        default: qc8w_tile_rows<1>(mr, Kp, am, a_stride, wp, panel_stride, acc); break;
      }
      for (int r = 0; r < mr; ++r) {
        const size_t row = m + r;
        const __m512i off = _mm512_set1_epi32(128 * sums[row]);
        const __m512 as = _mm512_set1_ps(a_scale[row]);
        for (int j = 0; j < np; ++j) {
          // y = float(acc) * (a_scale * w_scale) + bias, as in kernels.h.
          const __m512i iv = _mm512_sub_epi32(acc[r * np + j], off);
          __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(iv), _mm512_mul_ps(as, ws[j]));
          if (bias) v = _mm512_add_ps(v, bv[j]);
          _mm512_mask_storeu_ps(y + row * y_stride + (p0 + j) * kNR, keep[j], v);
        }
      }
    }
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// qd8_f32_qb4w_gemm
//
// Micro-tile of MR rows x NP panels. One 64-byte load holds a group pair of a panel: 16
// channels x 8 k as nibbles, the low ones k 0..3 and the high ones k 4..7 of each channel,
// already in vpdpbusd's 4-k-per-lane order. Per block the int32 sums (started at
// -8 x the block's activation sum) are folded into float sums in the order of kernels.h. That
// float step (convert, multiply, add: 3 ops per 8 vpdpbusd at block 32) is what keeps int4 at
// ~0.8x the int8 speed here; unpacking the nibbles once per call instead of per row tile was
// tried and gained nothing.

constexpr int kQB4MR = 6;
constexpr int kQB4NP = 2;

// out[r * NP + j] = sum over blocks of float(acc_b) * w_scale[b] for row r, panel j.
template <int MR, int NP>
__attribute__((noinline)) void qb4w_tile(size_t nblocks, size_t block, const int8_t* a,
                                         size_t a_stride, const int32_t* bsum,
                                         size_t bsum_stride, const uint8_t* w,
                                         size_t panel_stride, const float* ws,
                                         size_t ws_stride, __m512* out) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const size_t chunks = block / kKAlign;
  __m512 s[MR][NP];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) s[r][j] = _mm512_setzero_ps();
  for (size_t b = 0; b < nblocks; ++b) {
    // Accumulators start at -8 x (activation sum of the block): the +8 offset of the nibbles
    // undone up front, one broadcast per row instead of a subtraction per accumulator.
    __m512i acc[MR][NP];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t asum = 0;
      for (size_t c = 0; c < chunks; ++c) asum += bsum[r * bsum_stride + b * chunks + c];
      const __m512i init = _mm512_set1_epi32(-8 * asum);
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) acc[r][j] = init;
    }
    const size_t k0 = b * block;
#pragma GCC unroll 4
    for (size_t k = k0; k < k0 + block; k += 8) {
      __m512i lo[NP], hi[NP];
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) {
        const __m512i v = _mm512_loadu_si512(w + j * panel_stride + 8 * k);
        lo[j] = _mm512_and_si512(v, mask);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      }
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512i al = bcast_i32(a + r * a_stride + k);
        const __m512i ah = bcast_i32(a + r * a_stride + k + 4);
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) {
          acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], lo[j], al);
          acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], hi[j], ah);
        }
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) {
        // s = s + float(acc_b) * w_scale[b], as in kernels.h.
        const __m512 wsb = _mm512_loadu_ps(ws + j * ws_stride + b * kNR);
        s[r][j] = _mm512_add_ps(s[r][j], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), wsb));
      }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) _mm512_store_ps(reinterpret_cast<float*>(out + r * NP + j), s[r][j]);
}

template <int NP>
void qb4w_tile_rows(int mr, size_t nblocks, size_t block, const int8_t* a, size_t a_stride,
                    const int32_t* bsum, size_t bsum_stride, const uint8_t* w,
                    size_t panel_stride, const float* ws, size_t ws_stride, __m512* out) {
  switch (mr) {
    case 6: qb4w_tile<6, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
    case 5: qb4w_tile<5, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
    case 4: qb4w_tile<4, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
    case 3: qb4w_tile<3, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
    case 2: qb4w_tile<2, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
    default: qb4w_tile<1, NP>(nblocks, block, a, a_stride, bsum, bsum_stride, w, panel_stride, ws, ws_stride, out); break;
  }
}

}  // namespace

void avx512vnni::qd8_f32_qb4w_gemm(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                                   size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                                   size_t bsum_stride, const uint8_t* w, const float* w_scale,
                                   const float* bias, float* y, size_t y_stride) {
  if (M == 0 || N == 0) return;
  alignas(64) __m512 s[kQB4MR * kQB4NP];
  const size_t nblocks = Kp / block, panels = num_panels(N);
  const size_t panel_stride = packed::qb4w_panel_bytes(Kp), ws_stride = packed::qb4w_panel_scales(Kp, block);
  for (size_t p0 = 0; p0 < panels; p0 += kQB4NP) {
    const int np = static_cast<int>(std::min<size_t>(kQB4NP, panels - p0));
    __m512 bv[kQB4NP];
    __mmask16 keep[kQB4NP];
    for (int j = 0; j < np; ++j) {
      const size_t n0 = (p0 + j) * kNR;
      keep[j] = first_lanes(N - n0);
      bv[j] = bias ? _mm512_maskz_loadu_ps(keep[j], bias + n0) : _mm512_setzero_ps();
    }
    const uint8_t* wp = w + p0 * panel_stride;
    const float* wsp = w_scale + p0 * ws_stride;
    for (size_t m = 0; m < M; m += kQB4MR) {
      const int mr = static_cast<int>(std::min<size_t>(kQB4MR, M - m));
      const int8_t* am = a + m * a_stride;
      const int32_t* bm = a_bsum + m * bsum_stride;
      if (np == 2)
        qb4w_tile_rows<2>(mr, nblocks, block, am, a_stride, bm, bsum_stride, wp, panel_stride, wsp, ws_stride, s);
      else
        qb4w_tile_rows<1>(mr, nblocks, block, am, a_stride, bm, bsum_stride, wp, panel_stride, wsp, ws_stride, s);
      for (int r = 0; r < mr; ++r) {
        const __m512 as = _mm512_set1_ps(a_scale[m + r]);
        for (int j = 0; j < np; ++j) {
          // y = s * a_scale + bias, as in kernels.h.
          __m512 v = _mm512_mul_ps(s[r * np + j], as);
          if (bias) v = _mm512_add_ps(v, bv[j]);
          _mm512_mask_storeu_ps(y + (m + r) * y_stride + (p0 + j) * kNR, keep[j], v);
        }
      }
    }
  }
}

}  // namespace pyrt
