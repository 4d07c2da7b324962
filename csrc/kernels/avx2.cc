// AVX2 + FMA kernels. This file alone is compiled with -mavx2 -mfma (x86_64 builds only), so
// nothing here may run before dispatch has checked the CPU; the rest of the library stays at
// the baseline ISA.
//
// Integer GEMMs reproduce ref.cc bit for bit: the int32 accumulators are exact, and the float
// epilogue uses the operations and order of kernels.h (mul, then add; never an FMA).
//
// qd8_f32_qc8w_gemm: micro-tile of 4 rows x 16 channels (8 int32 ymm accumulators). Per k-group
//   (4 k values) two 32-byte weight loads (8 channels x 4 k each), |w| computed once and reused
//   by the 4 rows; each row broadcasts its 4 activation bytes and does
//   vpmaddubsw(|w|, sign(a, w)) -> vpmaddwd(., 1) -> vpaddd. |w| <= 128 and |a| <= 127 keep a
//   vpmaddubsw pair below 32767, so nothing saturates (the contract in kernels.h).
// qd8_f32_qb4w_gemm: micro-tile of 4 rows x 8 channels. Nibbles (q + 8, in [0, 15]) feed
//   vpmaddubsw directly as the unsigned operand. A vpmaddubsw lane is at most 2*15*127 = 3810
//   in magnitude, so the eight products of a 32-wide k chunk are summed in int16 (<= 30480)
//   and widened once per chunk with vpmaddwd; that halves the multiplier-port work compared
//   with int8. Per chunk the +8 offset is removed with the activation block sum, per block the
//   float epilogue of kernels.h runs.
// f32_gemm: micro-tile of 6 rows x 16 columns (12 ymm accumulators), broadcast A, FMA.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace pyrt {
namespace {

inline __m256i bcast_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Stores the first n (<= 8) lanes of v.
inline void store_cols(float* y, __m256 v, size_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(y, v);
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (size_t i = 0; i < n; ++i) y[i] = t[i];
  }
}

// Stores the first n (<= 16) of the 16 lanes v0:v1.
inline void store_cols16(float* y, __m256 v0, __m256 v1, size_t n) {
  if (n >= 16) {
    _mm256_storeu_ps(y, v0);
    _mm256_storeu_ps(y + 8, v1);
  } else if (n >= 8) {
    _mm256_storeu_ps(y, v0);
    store_cols(y + 8, v1, n - 8);
  } else {
    store_cols(y, v0, n);
  }
}

// bias[n0 .. n0+16) into t, zero past N (bias holds exactly N values).
inline void load_bias16(const float* bias, size_t n0, size_t N, float* t) {
  const size_t nv = std::min<size_t>(kNR, N - n0);
  for (size_t i = 0; i < kNR; ++i) t[i] = i < nv ? bias[n0 + i] : 0.0f;
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// quantize_rows

void quantize_rows_avx2(size_t rows, size_t K, size_t Kp, const float* x, size_t x_stride,
                        const float* inv_scale, int qmax, int8_t* q, size_t q_stride,
                        int32_t* bsum, size_t bsum_stride) {
  const float lo = -static_cast<float>(qmax), hi = static_cast<float>(qmax);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  // packs_epi32 / packs_epi16 interleave 128-bit lanes; this puts the 32 bytes back in order.
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    int32_t* br = bsum + r * bsum_stride;
    const float inv = inv_scale[r];
    const __m256 vinv = _mm256_set1_ps(inv);
    size_t k = 0;
    // Same operations as ref: product, max, min, then round half to even (cvtps2dq under the
    // default MXCSR rounding mode, which is what std::nearbyint uses too).
    for (; k + kKAlign <= K; k += kKAlign) {
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        __m256 f = _mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * i), vinv);
        f = _mm256_min_ps(_mm256_max_ps(f, vlo), vhi);
        v[i] = _mm256_cvtps_epi32(f);
      }
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]),
                                         _mm256_add_epi32(v[2], v[3]));
      br[k / kKAlign] = hsum_epi32(s);
      const __m256i p01 = _mm256_packs_epi32(v[0], v[1]);
      const __m256i p23 = _mm256_packs_epi32(v[2], v[3]);
      const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), b);
    }
    // Tail chunks: scalar, the same expression as ref.
    for (size_t c = k; c < Kp; c += kKAlign) {
      int32_t s = 0;
      for (size_t j = c; j < c + kKAlign; ++j) {
        int8_t qv = 0;
        if (j < K) {
          const float f = std::min(std::max(xr[j] * inv, lo), hi);
          qv = static_cast<int8_t>(std::nearbyint(f));
        }
        qr[j] = qv;
        s += qv;
      }
      br[c / kKAlign] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// absmax

float absmax_avx2(size_t n, const float* x) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(x + i + 8), mask));
    m2 = _mm256_max_ps(m2, _mm256_and_ps(_mm256_loadu_ps(x + i + 16), mask));
    m3 = _mm256_max_ps(m3, _mm256_and_ps(_mm256_loadu_ps(x + i + 24), mask));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
  float m = hmax_ps(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

// ---------------------------------------------------------------------------------------------
// qd8_f32_qc8w_gemm

// acc[r][h] += a[r][4g..4g+3] . w[8h + c][4g..4g+3] for c < 8, over all k-groups.
template <int MR>
inline void qc8w_tile(size_t Kp, const int8_t* a, size_t a_stride, const int8_t* w,
                      __m256i (&acc)[MR][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int8_t* ar[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) ar[r] = a + r * a_stride;
  const size_t bytes = Kp * kNR;
#pragma GCC unroll 2
  for (size_t off = 0; off < bytes; off += kKGroup * kNR) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + off));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + off + 32));
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
    const size_t k = off / kNR;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i av = bcast_i32(ar[r] + k);
      const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(av, w0));
      const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(av, w1));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
}

template <int MR>
void qc8w_rows(size_t Kp, const int8_t* a, size_t a_stride, const float* a_scale,
               const int8_t* w, const __m256 ws[2], const float* bias16, float* y,
               size_t y_stride, size_t ncols) {
  __m256i acc[MR][2];
  qc8w_tile<MR>(Kp, a, a_stride, w, acc);
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m256 as = _mm256_set1_ps(a_scale[r]);
    // y = float(acc) * (a_scale * w_scale) + bias, as in kernels.h.
    __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(as, ws[0]));
    __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(as, ws[1]));
    if (bias16) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias16));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias16 + 8));
    }
    store_cols16(y + r * y_stride, v0, v1, ncols);
  }
}

void qd8_f32_qc8w_gemm_avx2(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                            const float* a_scale, const int8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride) {
  alignas(32) float b16[kNR];
  for (size_t p = 0; p < num_panels(N); ++p) {
    const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
    const int8_t* wp = w + p * Kp * kNR;
    const __m256 ws[2] = {_mm256_loadu_ps(w_scale + n0), _mm256_loadu_ps(w_scale + n0 + 8)};
    const float* bp = nullptr;
    if (bias) {
      load_bias16(bias, n0, N, b16);
      bp = b16;
    }
    size_t m = 0;
    for (; m + 4 <= M; m += 4)
      qc8w_rows<4>(Kp, a + m * a_stride, a_stride, a_scale + m, wp, ws, bp,
                   y + m * y_stride + n0, y_stride, ncols);
    const size_t rest = M - m;
    const int8_t* am = a + m * a_stride;
    float* ym = y + m * y_stride + n0;
    if (rest == 3) qc8w_rows<3>(Kp, am, a_stride, a_scale + m, wp, ws, bp, ym, y_stride, ncols);
    if (rest == 2) qc8w_rows<2>(Kp, am, a_stride, a_scale + m, wp, ws, bp, ym, y_stride, ncols);
    if (rest == 1) qc8w_rows<1>(Kp, am, a_stride, a_scale + m, wp, ws, bp, ym, y_stride, ncols);
  }
}

// ---------------------------------------------------------------------------------------------
// qd8_f32_qb4w_gemm

// One 4 x 8 (MR rows x half panel h) tile over all of K. w points at the panel.
template <int MR>
void qb4w_rows(size_t Kp, size_t block, const int8_t* a, size_t a_stride, const float* a_scale,
               const int32_t* a_bsum, size_t bsum_stride, const uint8_t* w, const float* ws,
               int h, const float* bias8, float* y, size_t y_stride, size_t ncols) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const size_t nblocks = Kp / block, chunks = block / kKAlign;
  __m256 s[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) s[r] = _mm256_setzero_ps();
  const uint8_t* wh = w + 32 * h;
  for (size_t b = 0; b < nblocks; ++b) {
    __m256i acc[MR];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_si256();
    for (size_t c = 0; c < chunks; ++c) {
      const size_t k0 = (b * chunks + c) * kKAlign;  // 32 k = 4 group pairs
      const uint8_t* wc = wh + k0 * 8;
      __m256i s16[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) s16[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int gp = 0; gp < 4; ++gp) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 64 * gp));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const int8_t* ap = a + r * a_stride + k0 + 8 * gp;
          // Each vpmaddubsw lane is at most 3810 in magnitude; eight of them fit in int16.
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, bcast_i32(ap)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, bcast_i32(ap + 4)));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        // Undo the +8 offset: subtract 8 x (sum of this chunk's activations).
        const __m256i off = _mm256_set1_epi32(8 * a_bsum[r * bsum_stride + k0 / kKAlign]);
        acc[r] = _mm256_add_epi32(acc[r],
                                  _mm256_sub_epi32(_mm256_madd_epi16(s16[r], ones), off));
      }
    }
    // s = s + float(acc_b) * w_scale[b], as in kernels.h.
    const __m256 wsb = _mm256_loadu_ps(ws + b * kNR + 8 * h);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
      s[r] = _mm256_add_ps(s[r], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r]), wsb));
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    __m256 v = _mm256_mul_ps(s[r], _mm256_set1_ps(a_scale[r]));
    if (bias8) v = _mm256_add_ps(v, _mm256_loadu_ps(bias8));
    store_cols(y + r * y_stride, v, ncols);
  }
}

void qd8_f32_qb4w_gemm_avx2(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                            size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                            size_t bsum_stride, const uint8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride) {
  alignas(32) float b16[kNR];
  const size_t nblocks = Kp / block;
  for (size_t p = 0; p < num_panels(N); ++p) {
    const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
    const uint8_t* wp = w + p * Kp * 8;
    const float* ws = w_scale + p * nblocks * kNR;
    if (bias) load_bias16(bias, n0, N, b16);
    for (int h = 0; h < 2; ++h) {
      if (ncols <= size_t(8 * h)) break;
      const size_t nc = ncols - 8 * h;
      const float* bp = bias ? b16 + 8 * h : nullptr;
      float* yh = y + n0 + 8 * h;
      size_t m = 0;
      for (; m + 4 <= M; m += 4)
        qb4w_rows<4>(Kp, block, a + m * a_stride, a_stride, a_scale + m, a_bsum + m * bsum_stride,
                     bsum_stride, wp, ws, h, bp, yh + m * y_stride, y_stride, nc);
      const size_t rest = M - m;
      const int8_t* am = a + m * a_stride;
      const int32_t* bm = a_bsum + m * bsum_stride;
      float* ym = yh + m * y_stride;
      if (rest == 3)
        qb4w_rows<3>(Kp, block, am, a_stride, a_scale + m, bm, bsum_stride, wp, ws, h, bp, ym,
                     y_stride, nc);
      if (rest == 2)
        qb4w_rows<2>(Kp, block, am, a_stride, a_scale + m, bm, bsum_stride, wp, ws, h, bp, ym,
                     y_stride, nc);
      if (rest == 1)
        qb4w_rows<1>(Kp, block, am, a_stride, a_scale + m, bm, bsum_stride, wp, ws, h, bp, ym,
                     y_stride, nc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// f32_gemm

template <int MR>
void f32_rows(size_t K, const float* a, size_t a_stride, const float* bp, const float* bias16,
              float* y, size_t y_stride, size_t ncols) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (size_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(bp + k * kNR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_stride + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  // Constant indices only, so that acc stays in registers.
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    __m256 v0 = acc[r][0], v1 = acc[r][1];
    if (bias16) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias16));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias16 + 8));
    }
    store_cols16(y + r * y_stride, v0, v1, ncols);
  }
}

void f32_gemm_avx2(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                   const float* b_packed, const float* bias, float* y, size_t y_stride) {
  alignas(32) float b16[kNR];
  for (size_t p = 0; p < num_panels(N); ++p) {
    const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
    const float* bp = b_packed + p * K * kNR;
    const float* bb = nullptr;
    if (bias) {
      load_bias16(bias, n0, N, b16);
      bb = b16;
    }
    size_t m = 0;
    for (; m + 6 <= M; m += 6)
      f32_rows<6>(K, a + m * a_stride, a_stride, bp, bb, y + m * y_stride + n0, y_stride, ncols);
    const float* am = a + m * a_stride;
    float* ym = y + m * y_stride + n0;
    switch (M - m) {
      case 5: f32_rows<5>(K, am, a_stride, bp, bb, ym, y_stride, ncols); break;
      case 4: f32_rows<4>(K, am, a_stride, bp, bb, ym, y_stride, ncols); break;
      case 3: f32_rows<3>(K, am, a_stride, bp, bb, ym, y_stride, ncols); break;
      case 2: f32_rows<2>(K, am, a_stride, bp, bb, ym, y_stride, ncols); break;
      case 1: f32_rows<1>(K, am, a_stride, bp, bb, ym, y_stride, ncols); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// layernorm

void layernorm_avx2(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
                    const float* beta, float eps, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float* yr = y + r * y_stride;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    size_t i = 0;
    for (; i + 16 <= D; i += 16) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xr + i));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(xr + i + 8));
    }
    for (; i + 8 <= D; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xr + i));
    float sum = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < D; ++i) sum += xr[i];
    const float mean = sum / static_cast<float>(D);
    // Second pass: variance about the mean (numerically safe, unlike E[x^2] - mean^2).
    const __m256 vm = _mm256_set1_ps(mean);
    s0 = _mm256_setzero_ps();
    s1 = s0;
    for (i = 0; i + 16 <= D; i += 16) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + i), vm);
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(xr + i + 8), vm);
      s0 = _mm256_fmadd_ps(d0, d0, s0);
      s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    for (; i + 8 <= D; i += 8) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + i), vm);
      s0 = _mm256_fmadd_ps(d0, d0, s0);
    }
    float var = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<float>(D);
    const float rstd = static_cast<float>(1.0 / std::sqrt(double(var) + double(eps)));
    const __m256 vr = _mm256_set1_ps(rstd);
    // y may alias x: each element is read before it is written, and only once from here on.
    for (i = 0; i + 8 <= D; i += 8) {
      const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vm), vr);
      _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(n, _mm256_loadu_ps(gamma + i),
                                               _mm256_loadu_ps(beta + i)));
    }
    for (; i < D; ++i) yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
  }
}

// ---------------------------------------------------------------------------------------------
// softmax

// exp(x) for x <= 0 (softmax arguments), Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-5
// polynomial; about 1 ulp. Arguments below -87.3 (results under FLT_MIN) return 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654475f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n; n >= -126 after the clamp, so the exponent field stays positive.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

void softmax_avx2(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(vmx, _mm256_mul_ps(_mm256_loadu_ps(xr + i), vs));
    float mx = hmax_ps(vmx);
    for (; i < n; ++i) mx = std::max(mx, xr[i] * scale);
    vmx = _mm256_set1_ps(mx);
    // The sum is kept in double, as ref does, so long rows lose nothing to it.
    __m256d d0 = _mm256_setzero_pd(), d1 = d0;
    for (i = 0; i + 8 <= n; i += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vs), vmx));
      _mm256_storeu_ps(xr + i, e);
      d0 = _mm256_add_pd(d0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      d1 = _mm256_add_pd(d1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    if (i < n) {
      alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t j = i; j < n; ++j) t[j - i] = xr[j] * scale - mx;
      // Unused lanes are -inf and come out as 0.
      for (size_t j = n - i; j < 8; ++j) t[j] = -INFINITY;
      const __m256 e = exp_ps(_mm256_load_ps(t));
      _mm256_store_ps(t, e);
      for (size_t j = i; j < n; ++j) xr[j] = t[j - i];
      d0 = _mm256_add_pd(d0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      d1 = _mm256_add_pd(d1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    alignas(32) double ds[4];
    _mm256_store_pd(ds, _mm256_add_pd(d0, d1));
    const double sum = (ds[0] + ds[1]) + (ds[2] + ds[3]);
    const float inv = static_cast<float>(1.0 / sum);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(xr + i, _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv));
    for (; i < n; ++i) xr[i] *= inv;
  }
}

// ---------------------------------------------------------------------------------------------
// gelu

// erf(x): Eigen's rational approximation x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in float
// beyond), a few ulp.
inline __m256 erf_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(4.0f)), _mm256_set1_ps(-4.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

inline __m256 gelu_ps(__m256 x) {
  const __m256 e = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752440f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)),
                       _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

void gelu_avx2(size_t n, float* x) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu_ps(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t j = i; j < n; ++j) t[j - i] = x[j];
    _mm256_store_ps(t, gelu_ps(_mm256_load_ps(t)));
    for (size_t j = i; j < n; ++j) x[j] = t[j - i];
  }
}

// ---------------------------------------------------------------------------------------------
// add

void add_avx2(size_t n, const float* a, const float* b, float* y) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable t = [] {
    KernelTable k;
    k.name = "avx2";
    k.quantize_rows = quantize_rows_avx2;
    k.absmax = absmax_avx2;
    k.qd8_f32_qc8w_gemm = qd8_f32_qc8w_gemm_avx2;
    k.qd8_f32_qb4w_gemm = qd8_f32_qb4w_gemm_avx2;
    k.f32_gemm = f32_gemm_avx2;
    k.layernorm = layernorm_avx2;
    k.softmax = softmax_avx2;
    k.gelu = gelu_avx2;
    k.add = add_avx2;
    return k;
  }();
  return &t;
}

}  // namespace pyrt
