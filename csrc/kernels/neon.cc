// AArch64 Advanced SIMD kernels for the baseline ARMv8-A ISA (no dotprod): Cortex-A53/A57/A72
// class cores such as the Raspberry Pi 3 and 4. Built without extra -march flags.
//
// Integer GEMMs. The shared qc8w layout puts 4 channels x 4 k in a q-register
// ([c0k0 c0k1 c0k2 c0k3 c1k0 ... c3k3]); broadcasting 4 activation bytes to every 32-bit lane
// lines them up with it. SMULL/SMULL2 multiply 8 byte pairs into int16 (exact: |a*w| <= 128*128
// = 16384 < 32768) and SADALP adds adjacent pairs into int32 lanes, so each channel owns two
// int32 lanes (k%4 in {0,1} and {2,3}) until the epilogue folds them with ADDP. Integer adds are
// exact, so the accumulators equal ref's bit for bit whatever the order.
//
// Tiles: qc8w 2 rows x 16 channels (16 int32x4 accumulators); qb4w 2 rows x 8 channels;
// f32 4 rows x 16 channels. Panels are the outer loop so a weight panel stays in L1 while the
// rows of the caller's tile stream past it.
#if !defined(__aarch64__)
#error "neon.cc is AArch64-only; the build compiles it only for aarch64 targets"
#endif

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "isa_kernels.h"
#include "packed_layout.h"
#include "neon_common.h"

// GCC's pre-register-allocation scheduler (on by default for AArch64 at -O2 and -O3) hoists the
// multiplies of a register-blocked tile far ahead of their accumulations and runs out of the
// 32 vector registers: at -O3 the 2x16 qc8w tile spilled 41 q-registers per 16 k with it, none
// without. The tiles are written in dependency order; the cores reorder in hardware.
// fp-contract=off repeats the build's flag here, where the exactness contract depends on it: with
// contraction on (GCC's default in GNU modes) the GEMM epilogues' mul-then-add becomes FMLA.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-schedule-insns", "fp-contract=off")
#endif

namespace pyrt {
namespace {

// ---------------------------------------------------------------- quantize_rows, absmax

// 16 floats -> 16 int8, exactly as ref: multiply, clamp to [lo, hi], round to nearest even
// (FCVTNS), then narrow (values already fit int8, so narrowing is exact).
inline int8x16_t quantize16(const float* x, float32x4_t inv, float32x4_t lo, float32x4_t hi) {
  int32x4_t q[4];
  unroll<4>([&](auto i) {
    // FMAXNM, not FMAX: a NaN product gives lo, as in ref (FMAX would pass the NaN on).
    const float32x4_t v = vminq_f32(vmaxnmq_f32(vmulq_f32(vld1q_f32(x + 4 * i), inv), lo), hi);
    q[i] = vcvtnq_s32_f32(v);
  });
  const int16x8_t h0 = vmovn_high_s32(vmovn_s32(q[0]), q[1]);
  const int16x8_t h1 = vmovn_high_s32(vmovn_s32(q[2]), q[3]);
  return vmovn_high_s16(vmovn_s16(h0), h1);
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::quantize_rows(size_t rows, size_t K, size_t Kp, const float* x, size_t x_stride,
                         const float* inv_scale, int qmax, int8_t* q, size_t q_stride,
                         int32_t* bsum, size_t bsum_stride) {
  const float32x4_t lo = vdupq_n_f32(-static_cast<float>(qmax));
  const float32x4_t hi = vdupq_n_f32(static_cast<float>(qmax));
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    const float32x4_t inv = vdupq_n_f32(inv_scale[r]);
    size_t k = 0;
    for (; k + 16 <= K; k += 16) vst1q_s8(qr + k, quantize16(xr + k, inv, lo, hi));
    if (k < K) {  // the tail goes through the same vector code via a zero-padded copy
      float tmp[16] = {};
      int8_t out[16];
      std::memcpy(tmp, xr + k, (K - k) * sizeof(float));
      vst1q_s8(out, quantize16(tmp, inv, lo, hi));
      std::memcpy(qr + k, out, K - k);
    }
    if (Kp > K) std::memset(qr + K, 0, Kp - K);
    int32_t* br = bsum + r * bsum_stride;
    for (size_t c = 0; c < Kp / kKAlign; ++c) {
      const int16x8_t s = vpadalq_s8(vpaddlq_s8(vld1q_s8(qr + c * kKAlign)),
                                     vld1q_s8(qr + c * kKAlign + 16));
      br[c] = vaddlvq_s16(s);
    }
  }
}

PYRT_NEON_FLATTEN
float neon::absmax(size_t n, const float* x) {
  // As ref: the integer max of the bit patterns with the sign cleared, so a NaN always wins.
  const uint32x4_t mask = vdupq_n_u32(0x7FFFFFFFu);
  auto abs_bits = [&](const float* p) { return vandq_u32(vld1q_u32(reinterpret_cast<const uint32_t*>(p)), mask); };
  uint32x4_t m0 = vdupq_n_u32(0), m1 = m0, m2 = m0, m3 = m0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = vmaxq_u32(m0, abs_bits(x + i));
    m1 = vmaxq_u32(m1, abs_bits(x + i + 4));
    m2 = vmaxq_u32(m2, abs_bits(x + i + 8));
    m3 = vmaxq_u32(m3, abs_bits(x + i + 12));
  }
  for (; i + 4 <= n; i += 4) m0 = vmaxq_u32(m0, abs_bits(x + i));
  const uint32_t m = vmaxvq_u32(vmaxq_u32(vmaxq_u32(m0, m1), vmaxq_u32(m2, m3)));
  return absmax_finish(m, n - i, x + i);
}

namespace {

// ---------------------------------------------------------------- qd8_f32_qc8w_gemm

// One k-group (4 k values, 64 bytes of the panel) for MR rows: ab[r] holds row r's 4
// activations in every 32-bit lane.
template <int MR>
inline __attribute__((always_inline)) void qc8w_group(const int8_t* wg, const int8x16_t* ab,
                                                      int32x4_t (*acc)[8]) {
  int8x16_t w[4];
  unroll<4>([&](auto c) { w[c] = vld1q_s8(wg + 16 * c); });
  unroll<MR>([&](auto r) {
    unroll<4>([&](auto c) {
      acc[r][2 * c] = vpadalq_s16(acc[r][2 * c], vmull_s8(vget_low_s8(w[c]), vget_low_s8(ab[r])));
      acc[r][2 * c + 1] = vpadalq_s16(acc[r][2 * c + 1], vmull_high_s8(w[c], ab[r]));
    });
  });
}

template <int MR>
void qc8w_tile(size_t Kp, const int8_t* a, size_t a_stride, const float* a_scale,
               const int8_t* w, const float* w_scale, const float* bias, size_t nc, float* y,
               size_t y_stride) {
  int32x4_t acc[MR][8];
  unroll<MR>([&](auto r) { unroll<8>([&](auto i) { acc[r][i] = vdupq_n_s32(0); }); });
  size_t k = 0;
  for (; k + 16 <= Kp; k += 16) {
    int8x16_t av[MR];
    unroll<MR>([&](auto r) { av[r] = vld1q_s8(a + r * a_stride + k); });
    unroll<4>([&](auto g) {
      int8x16_t ab[MR];
      unroll<MR>([&](auto r) {
        const int32x4_t a32 = vreinterpretq_s32_s8(av[r]);
        ab[r] = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, decltype(g)::value));
      });
      qc8w_group<MR>(w + (k + 4 * g) * kNR, ab, acc);
    });
  }
  // Kp % 16 != 0: ops.cc never produces it (Kp % 32 == 0), handled anyway. Kp % 4 == 0 always:
  // the packed layout has whole k-groups.
  for (; k < Kp; k += kKGroup) {
    int8x16_t ab[MR];
    unroll<MR>([&](auto r) { ab[r] = load_dup4(a + r * a_stride + k); });
    qc8w_group<MR>(w + k * kNR, ab, acc);
  }
  float32x4_t ws[4], bs[4];
  unroll<4>([&](auto c) { ws[c] = vld1q_f32(w_scale + 4 * c); });  // panel-padded
  load_cols<4>(bias, nc, bs);
  unroll<MR>([&](auto r) {
    float32x4_t v[4];
    unroll<4>([&](auto c) {
      v[c] = qc8w_epilogue(vpaddq_s32(acc[r][2 * c], acc[r][2 * c + 1]), a_scale[r], ws[c]);
      if (bias) v[c] = vaddq_f32(v[c], bs[c]);
    });
    store_cols<4>(y + r * y_stride, nc, v);
  });
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::qd8_f32_qc8w_gemm(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                             const float* a_scale, const int8_t* w, const float* w_scale,
                             const float* bias, float* y, size_t y_stride) {
  for (size_t n0 = 0; n0 < N; n0 += kNR) {
    const size_t nc = std::min(kNR, N - n0);
    const int8_t* wp = w + (n0 / kNR) * packed::qc8w_panel_bytes(Kp);
    const float* bp = bias ? bias + n0 : nullptr;
    for_row_tiles<2>(M, [&](auto mr, size_t m) {
      qc8w_tile<decltype(mr)::value>(Kp, a + m * a_stride, a_stride, a_scale + m, wp,
                                     w_scale + n0, bp, nc, y + m * y_stride + n0, y_stride);
    });
  }
}

namespace {

// ---------------------------------------------------------------- qd8_f32_qb4w_gemm
//
// The stored nibbles u = q + 8 are in [0, 15]; AND / USHR split a q-register into the low
// nibbles (k = 8gp + 0..3) and the high ones (k = 8gp + 4..7), each again 4 channels x 4 k.
// |u * a| <= 15 * 128 = 1920, so int16 lanes can take 16 such products (30720 < 32767)
// before they must be widened: products of up to 8 group pairs (64 k) are accumulated with
// SMLAL in int16, then widened into int32 once. Each block's int32 accumulator starts at
// -8 * (activation sum of the block), which undoes the +8 offset exactly as ref does.
// Tile: 2 rows x 8 channels (two quads), so nothing spills.

template <int MR>
inline __attribute__((always_inline)) void qb4w_half_tile(
    size_t Kp, size_t block, const int8_t* a, size_t a_stride, const int32_t* a_bsum,
    size_t bsum_stride, const uint8_t* w, const float* w_scale, float32x4_t (*s)[2]) {
  const size_t nblocks = Kp / block, chunks = block / kKAlign;
  const uint8x16_t mask = vdupq_n_u8(0x0F);
  unroll<MR>([&](auto r) { unroll<2>([&](auto c) { s[r][c] = vdupq_n_f32(0.0f); }); });
  for (size_t b = 0; b < nblocks; ++b) {
    int32x4_t bacc[MR][2];
    unroll<MR>([&](auto r) {
      int32_t asum = 0;
      for (size_t c = 0; c < chunks; ++c) asum += a_bsum[r * bsum_stride + b * chunks + c];
      bacc[r][0] = bacc[r][1] = vdupq_n_s32(-8 * asum);
    });
    const uint8_t* wb = w + packed::qb4w_block_offset(block, b);
    for (size_t kb = 0; kb < block;) {
      const size_t len = std::min<size_t>(64, block - kb);  // a multiple of 32
      int16x8_t p[MR][4];
      unroll<MR>([&](auto r) { unroll<4>([&](auto i) { p[r][i] = vdupq_n_s16(0); }); });
      for (size_t gp = kb / 8; gp < (kb + len) / 8; ++gp) {
        int8x16_t alo[MR], ahi[MR];
        unroll<MR>([&](auto r) {
          const int32x2_t a8 = vreinterpret_s32_s8(vld1_s8(a + r * a_stride + b * block + 8 * gp));
          alo[r] = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 0));
          ahi[r] = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 1));
        });
        unroll<2>([&](auto c) {
          const uint8x16_t wv = vld1q_u8(wb + packed::qb4w_pair_offset(gp) + 16 * c);
          const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wv, mask));
          const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wv, 4));
          unroll<MR>([&](auto r) {
            int16x8_t& p0 = p[r][2 * c];
            int16x8_t& p1 = p[r][2 * c + 1];
            p0 = vmlal_s8(p0, vget_low_s8(lo), vget_low_s8(alo[r]));
            p0 = vmlal_s8(p0, vget_low_s8(hi), vget_low_s8(ahi[r]));
            p1 = vmlal_high_s8(p1, lo, alo[r]);
            p1 = vmlal_high_s8(p1, hi, ahi[r]);
          });
        });
      }
      // p[r][2c] lanes: channel 4c (k%4 = 0..3), channel 4c+1 (0..3); p[r][2c+1]: 4c+2, 4c+3.
      unroll<MR>([&](auto r) {
        unroll<2>([&](auto c) {
          bacc[r][c] = vaddq_s32(
              bacc[r][c], vpaddq_s32(vpaddlq_s16(p[r][2 * c]), vpaddlq_s16(p[r][2 * c + 1])));
        });
      });
      kb += len;
    }
    // s = s + float(acc_b) * w_scale[b]   (mul, then add: the contract's order)
    unroll<2>([&](auto c) {
      const float32x4_t ws = vld1q_f32(w_scale + b * kNR + 4 * c);
      unroll<MR>([&](auto r) {
        s[r][c] = vaddq_f32(s[r][c], vmulq_f32(vcvtq_f32_s32(bacc[r][c]), ws));
      });
    });
  }
}

template <int MR>
void qb4w_tile(size_t Kp, size_t block, const int8_t* a, size_t a_stride, const float* a_scale,
               const int32_t* a_bsum, size_t bsum_stride, const uint8_t* w,
               const float* w_scale, const float* bias, size_t nc, float* y, size_t y_stride) {
  float32x4_t s[MR][4];
  {
    float32x4_t h[MR][2];
    qb4w_half_tile<MR>(Kp, block, a, a_stride, a_bsum, bsum_stride, w, w_scale, h);
    unroll<MR>([&](auto r) { s[r][0] = h[r][0]; s[r][1] = h[r][1]; });
    if (nc > 8) {
      qb4w_half_tile<MR>(Kp, block, a, a_stride, a_bsum, bsum_stride, w + 32, w_scale + 8, h);
      unroll<MR>([&](auto r) { s[r][2] = h[r][0]; s[r][3] = h[r][1]; });
    } else {
      unroll<MR>([&](auto r) { s[r][2] = s[r][3] = vdupq_n_f32(0.0f); });
    }
  }
  float32x4_t bs[4];
  load_cols<4>(bias, nc, bs);
  unroll<MR>([&](auto r) {
    const float32x4_t as = vdupq_n_f32(a_scale[r]);
    float32x4_t v[4];
    unroll<4>([&](auto c) {
      v[c] = vmulq_f32(s[r][c], as);  // y = s * a_scale + bias
      if (bias) v[c] = vaddq_f32(v[c], bs[c]);
    });
    store_cols<4>(y + r * y_stride, nc, v);
  });
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::qd8_f32_qb4w_gemm(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                             size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                             size_t bsum_stride, const uint8_t* w, const float* w_scale,
                             const float* bias, float* y, size_t y_stride) {
  for (size_t n0 = 0; n0 < N; n0 += kNR) {
    const size_t p = n0 / kNR, nc = std::min(kNR, N - n0);
    const uint8_t* wp = w + p * packed::qb4w_panel_bytes(Kp);
    const float* wsp = w_scale + p * packed::qb4w_panel_scales(Kp, block);
    const float* bp = bias ? bias + n0 : nullptr;
    for_row_tiles<2>(M, [&](auto mr, size_t m) {
      qb4w_tile<decltype(mr)::value>(Kp, block, a + m * a_stride, a_stride, a_scale + m,
                                     a_bsum + m * bsum_stride, bsum_stride, wp, wsp, bp, nc,
                                     y + m * y_stride + n0, y_stride);
    });
  }
}

namespace {

// ---------------------------------------------------------------- f32_gemm
// 4 rows x 16 columns, FMLA by lane. Each output is accumulated in the canonical order of
// kernels.h -- acc = fma(a[k], b[k], acc) for k = 0, 1, ... from 0, then + bias -- which is
// what ref.cc and avx2.cc compute too, so the results are bit-identical on every ISA.

template <int MR>
void f32_tile(size_t K, const float* a, size_t a_stride, const float* b, const float* bias,
              size_t nc, float* y, size_t y_stride) {
  float32x4_t acc[MR][4];
  unroll<MR>([&](auto r) { unroll<4>([&](auto c) { acc[r][c] = vdupq_n_f32(0.0f); }); });
  size_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float32x4_t av[MR];
    unroll<MR>([&](auto r) { av[r] = vld1q_f32(a + r * a_stride + k); });
    unroll<4>([&](auto l) {
      float32x4_t bv[4];
      unroll<4>([&](auto c) { bv[c] = vld1q_f32(b + (k + l) * kNR + 4 * c); });
      unroll<MR>([&](auto r) {
        unroll<4>([&](auto c) {
          acc[r][c] = vfmaq_laneq_f32(acc[r][c], bv[c], av[r], decltype(l)::value);
        });
      });
    });
  }
  for (; k < K; ++k) {
    float32x4_t bv[4];
    unroll<4>([&](auto c) { bv[c] = vld1q_f32(b + k * kNR + 4 * c); });
    unroll<MR>([&](auto r) {
      const float av = a[r * a_stride + k];
      unroll<4>([&](auto c) { acc[r][c] = vfmaq_n_f32(acc[r][c], bv[c], av); });
    });
  }
  float32x4_t bs[4];
  load_cols<4>(bias, nc, bs);
  unroll<MR>([&](auto r) {
    if (bias) unroll<4>([&](auto c) { acc[r][c] = vaddq_f32(acc[r][c], bs[c]); });
    store_cols<4>(y + r * y_stride, nc, acc[r]);
  });
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::f32_gemm(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                    const float* b_packed, const float* bias, float* y, size_t y_stride) {
  for (size_t n0 = 0; n0 < N; n0 += kNR) {
    const size_t nc = std::min(kNR, N - n0);
    const float* bp = b_packed + (n0 / kNR) * packed::f32_panel_floats(K);
    const float* bb = bias ? bias + n0 : nullptr;
    for_row_tiles<4>(M, [&](auto mr, size_t m) {
      f32_tile<decltype(mr)::value>(K, a + m * a_stride, a_stride, bp, bb, nc,
                                    y + m * y_stride + n0, y_stride);
    });
  }
}

namespace {

// ---------------------------------------------------------------- elementwise

// n < 4 floats into a vector, the other lanes `fill`; and back.
inline float32x4_t load_partial(const float* p, size_t n, float fill) {
  float tmp[4] = {fill, fill, fill, fill};
  std::memcpy(tmp, p, n * sizeof(float));
  return vld1q_f32(tmp);
}
inline void store_partial(float* p, size_t n, float32x4_t v) {
  float tmp[4];
  vst1q_f32(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}

// exp(x) for x <= 0 (softmax arguments), ref.cc's exp_canon operation for operation:
// n = round(x log2e) by an fma with the shifter 1.5 * 2^23 + 127, whose bits shifted left by 23
// are 2^n; r = x - n ln2 in one fma; exp(r) = 1 + r P(r), P of degree 4, folded with the
// scaling as fma(r 2^n, P, 2^n). x is clamped at -88, so n >= -127 and 2^-127 builds as +0:
// 0 below about -87.68.
inline float32x4_t exp_f32(float32x4_t x) {
  const float32x4_t shift = vdupq_n_f32(12583039.0f);  // 1.5 * 2^23 + 127
  const float32x4_t s = vmaxq_f32(x, vdupq_n_f32(-88.0f));
  const float32x4_t t = vfmaq_f32(shift, s, vdupq_n_f32(1.44269504088896341f));
  const float32x4_t n = vsubq_f32(t, shift);
  const float32x4_t r = vfmsq_f32(s, n, vdupq_n_f32(0.693147182f));  // s - n*ln2, fused
  float32x4_t p = vfmaq_f32(vdupq_n_f32(4.190130904e-2f), vdupq_n_f32(8.308717050e-3f), r);
  p = vfmaq_f32(vdupq_n_f32(1.666731983e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.999911785e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(9.999998212e-1f), p, r);
  const float32x4_t scale = vreinterpretq_f32_u32(vshlq_n_u32(vreinterpretq_u32_f32(t), 23));
  return vfmaq_f32(scale, vmulq_f32(r, scale), p);
}

// GELU, ref.cc's gelu_canon operation for operation: PyTorch's x/2 (1 + erf(x/sqrt 2)) as
// fma(x, E, x/2), E = erf(x/sqrt 2)/2 = xc P(xc^2) / Q(xc^2), xc = x clamped to +-5.21751785
// (where E is exactly 1/2): Eigen's rational erf, rescaled for x/sqrt 2 and the 1/2.
inline float32x4_t gelu_f32(float32x4_t x) {
  const float32x4_t xc = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-5.21751785f)), vdupq_n_f32(5.21751785f));
  const float32x4_t x2 = vmulq_f32(xc, xc);
  float32x4_t p = vfmaq_f32(vdupq_n_f32(1.50626613e-4f), vdupq_n_f32(5.06135211e-6f), x2);
  float32x4_t q = vfmaq_f32(vdupq_n_f32(7.35873925e-7f), vdupq_n_f32(-1.84243798e-9f), x2);
  p = vfmaq_f32(vdupq_n_f32(4.50388948e-3f), p, x2);
  q = vfmaq_f32(vdupq_n_f32(6.36226614e-5f), q, x2);
  p = vfmaq_f32(vdupq_n_f32(3.27405147e-2f), p, x2);
  q = vfmaq_f32(vdupq_n_f32(1.75880874e-3f), q, x2);
  p = vfmaq_f32(vdupq_n_f32(3.98942262e-1f), p, x2);
  q = vfmaq_f32(vdupq_n_f32(2.77462620e-2f), q, x2);
  p = vmulq_f32(p, xc);
  q = vfmaq_f32(vdupq_n_f32(2.48734623e-1f), q, x2);
  q = vfmaq_f32(vdupq_n_f32(1.0f), q, x2);
  return vfmaq_f32(vmulq_f32(x, vdupq_n_f32(0.5f)), x, vdivq_f32(p, q));
}

// The canonical 8-lane double reduction of kernels.h: q[0..3] hold lanes 0-1, 2-3, 4-5, 6-7;
// returns ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
inline double hsum8_f64(const float64x2_t* q) {
  const float64x2_t t01 = vaddq_f64(q[0], q[2]), t23 = vaddq_f64(q[1], q[3]);
  const float64x2_t u = vaddq_f64(t01, t23);
  return vgetq_lane_f64(u, 0) + vgetq_lane_f64(u, 1);
}

// Adds v0:v1 (8 floats, as doubles) into the 8 lanes q[0..3].
inline void add8_f64(float64x2_t* q, float32x4_t v0, float32x4_t v1) {
  q[0] = vaddq_f64(q[0], vcvt_f64_f32(vget_low_f32(v0)));
  q[1] = vaddq_f64(q[1], vcvt_high_f64_f32(v0));
  q[2] = vaddq_f64(q[2], vcvt_f64_f32(vget_low_f32(v1)));
  q[3] = vaddq_f64(q[3], vcvt_high_f64_f32(v1));
}

// x[i] = f(x[i]) for n floats: two vectors at a time, then one, then the tail through the same
// vector code on a zero-filled partial load (every element sees one instruction sequence).
template <class F>
inline void map_inplace(size_t n, float* x, F f) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vst1q_f32(x + i, f(vld1q_f32(x + i)));
    vst1q_f32(x + i + 4, f(vld1q_f32(x + i + 4)));
  }
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, f(vld1q_f32(x + i)));
  if (i < n) store_partial(x + i, n - i, f(load_partial(x + i, n - i, 0.0f)));
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::gelu(size_t n, float* x) {
  map_inplace(n, x, [](float32x4_t v) { return gelu_f32(v); });
}

namespace {

// max of x * scale as ref's scaled_max: the max (or, for scale < 0, the min) of x, times scale.
// Min and max are exact, so their order is free. NaN if any x is NaN, as ref: FMAX/FMIN(V)
// propagate NaN from either operand; the scalar tail checks.
template <bool kMin>
inline float extremum(size_t n, const float* x) {
  auto op = [](float32x4_t a, float32x4_t b) { return kMin ? vminq_f32(a, b) : vmaxq_f32(a, b); };
  float32x4_t m0 = vdupq_n_f32(kMin ? INFINITY : -INFINITY), m1 = m0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    m0 = op(m0, vld1q_f32(x + i));
    m1 = op(m1, vld1q_f32(x + i + 4));
  }
  for (; i + 4 <= n; i += 4) m0 = op(m0, vld1q_f32(x + i));
  m0 = op(m0, m1);
  float m = kMin ? vminvq_f32(m0) : vmaxvq_f32(m0);
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return std::numeric_limits<float>::quiet_NaN();
    m = kMin ? std::min(m, x[i]) : std::max(m, x[i]);
  }
  return m;
}

// Lanes j < c all ones (c <= 4).
inline uint32x4_t lane_mask(size_t c) {
  const uint32_t iota[4] = {0, 1, 2, 3};
  return vcltq_u32(vld1q_u32(iota), vdupq_n_u32(static_cast<uint32_t>(c)));
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::softmax(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  if (n == 0) return;
  const float32x4_t sc = vdupq_n_f32(scale), zero = vdupq_n_f32(0.0f);
  const size_t nb = n / 32 * 32;
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    const float mx = (scale < 0.0f ? extremum<true>(n, xr) : extremum<false>(n, xr)) * scale;
    const float32x4_t vmx = vdupq_n_f32(mx);
    // x * scale - max, the product rounded first, as ref.
    auto arg = [&](float32x4_t v) { return vsubq_f32(vmulq_f32(v, sc), vmx); };
    // e = exp(x * scale - max), stored in place, summed in float in the canonical order of
    // kernels.h: blocks of 32 folded to 8 lanes, (e[j] + e[j+8]) + (e[j+16] + e[j+24]) -- in
    // q-vectors (v0 + v2) + (v4 + v6) for lanes 0-3, (v1 + v3) + (v5 + v7) for lanes 4-7 --
    // accumulated block by block, the last block zero-padded.
    float32x4_t acc_lo = zero, acc_hi = zero;
    auto fold = [&](const float32x4_t* e) {
      acc_lo = vaddq_f32(acc_lo, vaddq_f32(vaddq_f32(e[0], e[2]), vaddq_f32(e[4], e[6])));
      acc_hi = vaddq_f32(acc_hi, vaddq_f32(vaddq_f32(e[1], e[3]), vaddq_f32(e[5], e[7])));
    };
    for (size_t i = 0; i < nb; i += 32) {
      float32x4_t e[8];
      unroll<8>([&](auto k) { e[k] = exp_f32(arg(vld1q_f32(xr + i + 4 * k))); });
      unroll<8>([&](auto k) { vst1q_f32(xr + i + 4 * k, e[k]); });
      fold(e);
    }
    if (nb < n) {  // the last block through the same vector code; lanes past n zeroed
      float32x4_t e[8] = {zero, zero, zero, zero, zero, zero, zero, zero};
      for (size_t i = nb, k = 0; i < n; i += 4, ++k) {
        const size_t c = std::min<size_t>(4, n - i);
        if (c == 4) {
          e[k] = exp_f32(arg(vld1q_f32(xr + i)));
          vst1q_f32(xr + i, e[k]);
        } else {
          const float32x4_t v = exp_f32(arg(load_partial(xr + i, c, 0.0f)));
          e[k] = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), lane_mask(c)));
          store_partial(xr + i, c, e[k]);
        }
      }
      fold(e);
    }
    // ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)); not vaddvq_f32, whose pairing differs.
    const float32x4_t t = vaddq_f32(acc_lo, acc_hi);
    const float32x2_t u = vadd_f32(vget_low_f32(t), vget_high_f32(t));
    const float inv = 1.0f / (vget_lane_f32(u, 0) + vget_lane_f32(u, 1));
    const float32x4_t vinv = vdupq_n_f32(inv);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(xr + i, vmulq_f32(vld1q_f32(xr + i), vinv));
    for (; i < n; ++i) xr[i] *= inv;
  }
}

PYRT_NEON_FLATTEN
void neon::layernorm(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
                     const float* beta, float eps, float* y, size_t y_stride) {
  if (D == 0) return;
  const float64x2_t z = vdupq_n_f64(0.0);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    // Mean and variance are accumulated in double, two-pass, like ref, in the canonical order
    // of kernels.h (8 double lanes, a fixed tree, then the tail in order): the rows of a ViT's
    // residual stream can have a mean far from 0 and D up to 1024+.
    float64x2_t q[4] = {z, z, z, z};
    size_t i = 0;
    for (; i + 8 <= D; i += 8) add8_f64(q, vld1q_f32(xr + i), vld1q_f32(xr + i + 4));
    double sum = hsum8_f64(q);
    for (; i < D; ++i) sum += double(xr[i]);
    const double mean = sum / double(D);
    const float64x2_t vm = vdupq_n_f64(mean);
    q[0] = q[1] = q[2] = q[3] = z;
    for (i = 0; i + 8 <= D; i += 8) {
      const float32x4_t v0 = vld1q_f32(xr + i), v1 = vld1q_f32(xr + i + 4);
      const float64x2_t d[4] = {vsubq_f64(vcvt_f64_f32(vget_low_f32(v0)), vm),
                                vsubq_f64(vcvt_high_f64_f32(v0), vm),
                                vsubq_f64(vcvt_f64_f32(vget_low_f32(v1)), vm),
                                vsubq_f64(vcvt_high_f64_f32(v1), vm)};
      unroll<4>([&](auto j) { q[j] = vfmaq_f64(q[j], d[j], d[j]); });
    }
    double var = hsum8_f64(q);
    for (; i < D; ++i) {
      const double d = double(xr[i]) - mean;
      var = std::fma(d, d, var);
    }
    var /= double(D);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + double(eps)));
    // y = (x - mean) * rstd * gamma + beta, in float. x - mean is taken as (x - mean_hi) -
    // mean_lo with mean = mean_hi + mean_lo: the first difference is exact when x is near the
    // mean (Sterbenz), so a row whose mean is thousands of standard deviations away from 0
    // still normalises to ~1 ulp. y may alias x: each element is read before it is written.
    const float mean_hi = static_cast<float>(mean);
    const float mean_lo = static_cast<float>(mean - double(mean_hi));
    const float32x4_t vmh = vdupq_n_f32(mean_hi), vml = vdupq_n_f32(mean_lo);
    const float32x4_t vr = vdupq_n_f32(rstd);
    float* yr = y + r * y_stride;
    i = 0;
    for (; i + 4 <= D; i += 4) {
      const float32x4_t d = vsubq_f32(vsubq_f32(vld1q_f32(xr + i), vmh), vml);
      vst1q_f32(yr + i, vfmaq_f32(vld1q_f32(beta + i), vmulq_f32(d, vr), vld1q_f32(gamma + i)));
    }
    for (; i < D; ++i) yr[i] = std::fma(((xr[i] - mean_hi) - mean_lo) * rstd, gamma[i], beta[i]);
  }
}

namespace {

PYRT_NEON_FLATTEN
// softmax_q8 (int8 attention): ref.cc's softmax_q8_elem lane by lane.
inline int32x4_t softmax_q8_f32(float32x4_t x, float32x4_t mx) {
  const float32x4_t y = vmaxq_f32(vmulq_f32(vsubq_f32(x, mx), vdupq_n_f32(1.44269504088896341f)),
                                  vdupq_n_f32(-126.0f));
  const float32x4_t n = vrndnq_f32(y);
  const float32x4_t f = vsubq_f32(y, n);
  float32x4_t p = vfmaq_f32(vdupq_n_f32(0.05590642988681793f), vdupq_n_f32(0.009582852944731712f), f);
  p = vfmaq_f32(vdupq_n_f32(0.24024099111557007f), p, f);
  p = vfmaq_f32(vdupq_n_f32(0.6931241750717163f), p, f);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, f);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t v = vmulq_f32(vmulq_f32(p, vreinterpretq_f32_s32(e)), vdupq_n_f32(127.0f));
  return vcvtq_s32_f32(vminq_f32(vrndnq_f32(v), vdupq_n_f32(127.0f)));  // integral: exact
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::softmax_q8(size_t rows, size_t n, size_t Kp, const float* x, size_t x_stride, int8_t* q,
                      size_t q_stride, float* scale) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    const float mx = extremum<false>(n, xr);
    if (!std::isfinite(mx)) {
      softmax_q8_poison_row(Kp, qr, scale + r);
      continue;
    }
    const float32x4_t vmx = vdupq_n_f32(mx);
    int32x4_t acc = vdupq_n_s32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const int32x4_t e0 = softmax_q8_f32(vld1q_f32(xr + i), vmx);
      const int32x4_t e1 = softmax_q8_f32(vld1q_f32(xr + i + 4), vmx);
      acc = vaddq_s32(acc, vaddq_s32(e0, e1));
      const int16x8_t h = vcombine_s16(vmovn_s32(e0), vmovn_s32(e1));
      vst1_s8(qr + i, vmovn_s16(h));
    }
    int32_t sum = vaddvq_s32(acc);
    for (; i < n; i += 4) {  // the tail through the same vector code; padding lanes dropped
      const size_t c = std::min<size_t>(4, n - i);
      int32_t e[4];
      vst1q_s32(e, softmax_q8_f32(load_partial(xr + i, c, 0.0f), vmx));
      for (size_t j = 0; j < c; ++j) {
        qr[i + j] = static_cast<int8_t>(e[j]);
        sum += e[j];
      }
    }
    std::memset(qr + n, 0, Kp - n);
    scale[r] = 1.0f / static_cast<float>(sum);
  }
}

void neon::add(size_t n, const float* a, const float* b, float* y) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    unroll<4>([&](auto j) {
      vst1q_f32(y + i + 4 * j, vaddq_f32(vld1q_f32(a + i + 4 * j), vld1q_f32(b + i + 4 * j)));
    });
  }
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vld1q_f32(a + i), vld1q_f32(b + i)));
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

PYRT_NEON_FLATTEN
void neon::scale_add(size_t n, const float* x, float scale, const float* b, float* y) {
  const float32x4_t vs = vdupq_n_f32(scale);
  size_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vmulq_f32(vld1q_f32(x + i), vs), vld1q_f32(b + i)));
  for (; i < n; ++i) y[i] = x[i] * scale + b[i];
}

namespace {

// ---------------------------------------------------------------- sigmoid-gated activations
// ref.cc's sigmoid_canon lane by lane: e = exp(-|z|), sigmoid = (z >= 0 ? 1 : e) / (1 + e).
// FCMGE is false for NaN, as ref's comparison; e is NaN then anyway.
inline float32x4_t sigmoid_f32(float32x4_t z) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  const float32x4_t e = exp_f32(vnegq_f32(vabsq_f32(z)));
  const float32x4_t num = vbslq_f32(vcgeq_f32(z, vdupq_n_f32(0.0f)), one, e);
  return vdivq_f32(num, vaddq_f32(one, e));
}

inline float32x4_t swiglu_f32(float32x4_t g, float32x4_t u) {
  return vmulq_f32(vmulq_f32(g, sigmoid_f32(g)), u);
}

inline float32x4_t quick_gelu_f32(float32x4_t x) {
  return vmulq_f32(x, sigmoid_f32(vmulq_f32(x, vdupq_n_f32(1.702f))));
}

}  // namespace

PYRT_NEON_FLATTEN
void neon::swiglu(size_t rows, size_t n, const float* g, size_t g_stride, const float* u,
                  size_t u_stride, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* gr = g + r * g_stride;
    const float* ur = u + r * u_stride;
    float* yr = y + r * y_stride;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const float32x4_t y0 = swiglu_f32(vld1q_f32(gr + i), vld1q_f32(ur + i));
      const float32x4_t y1 = swiglu_f32(vld1q_f32(gr + i + 4), vld1q_f32(ur + i + 4));
      vst1q_f32(yr + i, y0);
      vst1q_f32(yr + i + 4, y1);
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(yr + i, swiglu_f32(vld1q_f32(gr + i), vld1q_f32(ur + i)));
    if (i < n)
      store_partial(yr + i, n - i, swiglu_f32(load_partial(gr + i, n - i, 0.0f), load_partial(ur + i, n - i, 0.0f)));
  }
}

PYRT_NEON_FLATTEN
void neon::quick_gelu(size_t n, float* x) {
  map_inplace(n, x, [](float32x4_t v) { return quick_gelu_f32(v); });
}

// ---------------------------------------------------------------- rope
// ref.cc's products and sums lane by lane (mul, mul, then add or sub; never fused).

PYRT_NEON_FLATTEN
void neon::rope(size_t rows, size_t heads, size_t hd, RopeForm form, float* x, size_t x_stride,
                const float* sin, const float* cos, size_t tab_stride, size_t tab_head_stride) {
  const size_t half = hd / 2;
  // Interleaved: REV64 swaps each pair; the even lanes' products are negated (exact) and added,
  // which is ref's subtraction bit for bit.
  const uint32_t neg_even_bits[4] = {0x80000000u, 0, 0x80000000u, 0};
  const uint32x4_t neg_even = vld1q_u32(neg_even_bits);
  for (size_t r = 0; r < rows; ++r)
    for (size_t h = 0; h < heads; ++h) {
      float* xh = x + r * x_stride + h * hd;
      const float* s = sin + r * tab_stride + h * tab_head_stride;
      const float* c = cos + r * tab_stride + h * tab_head_stride;
      size_t p = 0;  // pairs done
      if (form == RopeForm::kInterleaved) {
        for (; 2 * p + 4 <= hd; p += 2) {
          const float32x4_t v = vld1q_f32(xh + 2 * p);
          const float32x4_t xc = vmulq_f32(v, vld1q_f32(c + 2 * p));
          const float32x4_t xs = vmulq_f32(vrev64q_f32(v), vld1q_f32(s + 2 * p));
          const float32x4_t t = vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(xs), neg_even));
          vst1q_f32(xh + 2 * p, vaddq_f32(xc, t));
        }
        for (; p < half; ++p) {
          const float xi = xh[2 * p], xj = xh[2 * p + 1];
          xh[2 * p] = xi * c[2 * p] - xj * s[2 * p];
          xh[2 * p + 1] = xj * c[2 * p + 1] + xi * s[2 * p + 1];
        }
      } else {
        for (; p + 4 <= half; p += 4) {
          const float32x4_t a = vld1q_f32(xh + p), b = vld1q_f32(xh + p + half);
          const float32x4_t ya = vsubq_f32(vmulq_f32(a, vld1q_f32(c + p)), vmulq_f32(b, vld1q_f32(s + p)));
          const float32x4_t yb = vaddq_f32(vmulq_f32(b, vld1q_f32(c + p + half)), vmulq_f32(a, vld1q_f32(s + p + half)));
          vst1q_f32(xh + p, ya);
          vst1q_f32(xh + p + half, yb);
        }
        for (; p < half; ++p) {
          const float xi = xh[p], xj = xh[p + half];
          xh[p] = xi * c[p] - xj * s[p];
          xh[p + half] = xj * c[p + half] + xi * s[p + half];
        }
      }
    }
}

}  // namespace pyrt
