// AArch64 kernels for ARMv8.2-A with the dotprod extension (Cortex-A55/A76/A78, Neoverse N1+,
// Apple M1+). Only this file is compiled with -march=armv8.2-a+dotprod; dispatch (cpu/) picks
// it only when HWCAP_ASIMDDP says the CPU has SDOT.
//
// The shared qc8w layout puts 4 channels x 4 k in a q-register, which is exactly what
// SDOT's by-element form wants: vdotq_laneq_s32(acc, w, a, l) adds, for each channel lane c,
// sum_j w[c][j] * a[4l + j]. One SDOT = 16 exact int8 products into int32 lanes, so the
// accumulators are ref's integers bit for bit. Tiles: 4 rows x 16 channels for qc8w (16
// accumulators), 4 rows x 8 channels for qb4w (its per-block float sums need registers too).
// Everything that is not an integer GEMM is neon.cc's code: tables.cc builds the neondot table
// from neon.cc's kernels and these two GEMMs.
#if !defined(__aarch64__) || !defined(__ARM_FEATURE_DOTPROD)
#error "neondot.cc must be compiled for AArch64 with -march=armv8.2-a+dotprod"
#endif

#include <arm_neon.h>

#include <algorithm>

#include "isa_kernels.h"
#include "packed_layout.h"
#include "neon_common.h"

// As in neon.cc: GCC's pre-register-allocation scheduler makes the 4x16 tile spill (3 q-registers
// per 16 k at -O3); without it the inner loop is 64 SDOT + 20 loads and nothing else. And the
// epilogues must not be contracted into FMLA, whatever the build's flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-schedule-insns", "fp-contract=off")
#endif

namespace pyrt {
namespace {

// ---------------------------------------------------------------- qd8_f32_qc8w_gemm

template <int MR>
void qc8w_dot_tile(size_t Kp, const int8_t* a, size_t a_stride, const float* a_scale,
                   const int8_t* w, const float* w_scale, const float* bias, size_t nc,
                   float* y, size_t y_stride) {
  int32x4_t acc[MR][4];
  unroll<MR>([&](auto r) { unroll<4>([&](auto c) { acc[r][c] = vdupq_n_s32(0); }); });
  size_t k = 0;
  for (; k + 16 <= Kp; k += 16) {
    int8x16_t av[MR];
    unroll<MR>([&](auto r) { av[r] = vld1q_s8(a + r * a_stride + k); });
    unroll<4>([&](auto g) {
      const int8_t* wg = w + (k + 4 * g) * kNR;
      int8x16_t wv[4];
      unroll<4>([&](auto c) { wv[c] = vld1q_s8(wg + 16 * c); });
      unroll<MR>([&](auto r) {
        unroll<4>([&](auto c) {
          acc[r][c] = vdotq_laneq_s32(acc[r][c], wv[c], av[r], decltype(g)::value);
        });
      });
    });
  }
  // Kp % 16 != 0: ops.cc never produces it (Kp % 32 == 0), handled anyway. Kp % 4 == 0 always:
  // the packed layout has whole k-groups.
  for (; k < Kp; k += kKGroup) {
    int8x16_t wv[4];
    unroll<4>([&](auto c) { wv[c] = vld1q_s8(w + k * kNR + 16 * c); });
    unroll<MR>([&](auto r) {
      const int8x16_t ab = load_dup4(a + r * a_stride + k);
      unroll<4>([&](auto c) { acc[r][c] = vdotq_s32(acc[r][c], wv[c], ab); });
    });
  }
  float32x4_t ws[4], bs[4];
  unroll<4>([&](auto c) { ws[c] = vld1q_f32(w_scale + 4 * c); });  // panel-padded
  load_cols<4>(bias, nc, bs);
  unroll<MR>([&](auto r) {
    float32x4_t v[4];
    unroll<4>([&](auto c) {
      v[c] = qc8w_epilogue(acc[r][c], a_scale[r], ws[c]);
      if (bias) v[c] = vaddq_f32(v[c], bs[c]);
    });
    store_cols<4>(y + r * y_stride, nc, v);
  });
}

}  // namespace

PYRT_NEON_FLATTEN
void neondot::qd8_f32_qc8w_gemm(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                                const float* a_scale, const int8_t* w, const float* w_scale,
                                const float* bias, float* y, size_t y_stride) {
  for (size_t n0 = 0; n0 < N; n0 += kNR) {
    const size_t nc = std::min(kNR, N - n0);
    const int8_t* wp = w + (n0 / kNR) * packed::qc8w_panel_bytes(Kp);
    const float* bp = bias ? bias + n0 : nullptr;
    for_row_tiles<4>(M, [&](auto mr, size_t m) {
      qc8w_dot_tile<decltype(mr)::value>(Kp, a + m * a_stride, a_stride, a_scale + m, wp,
                                         w_scale + n0, bp, nc, y + m * y_stride + n0, y_stride);
    });
  }
}

namespace {

// ---------------------------------------------------------------- qd8_f32_qb4w_gemm
//
// A group pair (64 bytes) holds, per channel quad, the low nibbles for k = 8gp + 0..3 and the
// high ones for k = 8gp + 4..7; AND / USHR split them into two SDOT operands (u = q + 8 in
// [0, 15] is a valid signed byte). 16 activation bytes cover two group pairs: lanes 0, 1 for
// the first (low, high), 2, 3 for the second. Each block's accumulator starts at
// -8 * (activation sum of the block), undoing the +8 exactly as ref does, then
// s = s + float(acc_b) * w_scale[b] (mul, then add), and finally y = s * a_scale + bias.

template <int MR>
inline __attribute__((always_inline)) void qb4w_dot_half(size_t Kp, size_t block, const int8_t* a,
                                                         size_t a_stride, const int32_t* a_bsum,
                                                         size_t bsum_stride, const uint8_t* w,
                                                         const float* w_scale,
                                                         float32x4_t (*s)[2]) {
  const size_t nblocks = Kp / block, chunks = block / kKAlign;
  const uint8x16_t mask = vdupq_n_u8(0x0F);
  unroll<MR>([&](auto r) { unroll<2>([&](auto c) { s[r][c] = vdupq_n_f32(0.0f); }); });
  for (size_t b = 0; b < nblocks; ++b) {
    int32x4_t acc[MR][2];
    unroll<MR>([&](auto r) {
      int32_t asum = 0;
      for (size_t c = 0; c < chunks; ++c) asum += a_bsum[r * bsum_stride + b * chunks + c];
      acc[r][0] = acc[r][1] = vdupq_n_s32(-8 * asum);
    });
    const uint8_t* wb = w + packed::qb4w_block_offset(block, b);
    const int8_t* ab = a + b * block;
    for (size_t kb = 0; kb < block; kb += 16) {  // two group pairs
      int8x16_t av[MR];
      unroll<MR>([&](auto r) { av[r] = vld1q_s8(ab + r * a_stride + kb); });
      unroll<2>([&](auto h) {
        constexpr int L = 2 * decltype(h)::value;
        unroll<2>([&](auto c) {
          const uint8x16_t wv = vld1q_u8(wb + packed::qb4w_pair_offset(kb / 8 + h) + 16 * c);
          const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wv, mask));
          const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wv, 4));
          unroll<MR>([&](auto r) {
            acc[r][c] = vdotq_laneq_s32(acc[r][c], lo, av[r], L);
            acc[r][c] = vdotq_laneq_s32(acc[r][c], hi, av[r], L + 1);
          });
        });
      });
    }
    unroll<2>([&](auto c) {
      const float32x4_t ws = vld1q_f32(w_scale + b * kNR + 4 * c);
      unroll<MR>([&](auto r) {
        s[r][c] = vaddq_f32(s[r][c], vmulq_f32(vcvtq_f32_s32(acc[r][c]), ws));
      });
    });
  }
}

template <int MR>
void qb4w_dot_tile(size_t Kp, size_t block, const int8_t* a, size_t a_stride,
                   const float* a_scale, const int32_t* a_bsum, size_t bsum_stride,
                   const uint8_t* w, const float* w_scale, const float* bias, size_t nc,
                   float* y, size_t y_stride) {
  float32x4_t s[MR][4];
  {
    float32x4_t h[MR][2];
    qb4w_dot_half<MR>(Kp, block, a, a_stride, a_bsum, bsum_stride, w, w_scale, h);
    unroll<MR>([&](auto r) { s[r][0] = h[r][0]; s[r][1] = h[r][1]; });
    if (nc > 8) {
      qb4w_dot_half<MR>(Kp, block, a, a_stride, a_bsum, bsum_stride, w + 32, w_scale + 8, h);
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
      v[c] = vmulq_f32(s[r][c], as);
      if (bias) v[c] = vaddq_f32(v[c], bs[c]);
    });
    store_cols<4>(y + r * y_stride, nc, v);
  });
}

}  // namespace

PYRT_NEON_FLATTEN
void neondot::qd8_f32_qb4w_gemm(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                                size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                                size_t bsum_stride, const uint8_t* w, const float* w_scale,
                                const float* bias, float* y, size_t y_stride) {
  for (size_t n0 = 0; n0 < N; n0 += kNR) {
    const size_t p = n0 / kNR, nc = std::min(kNR, N - n0);
    const uint8_t* wp = w + p * packed::qb4w_panel_bytes(Kp);
    const float* wsp = w_scale + p * packed::qb4w_panel_scales(Kp, block);
    const float* bp = bias ? bias + n0 : nullptr;
    for_row_tiles<4>(M, [&](auto mr, size_t m) {
      qb4w_dot_tile<decltype(mr)::value>(Kp, block, a + m * a_stride, a_stride, a_scale + m,
                                         a_bsum + m * bsum_stride, bsum_stride, wp, wsp, bp, nc,
                                         y + m * y_stride + n0, y_stride);
    });
  }
}

}  // namespace pyrt
