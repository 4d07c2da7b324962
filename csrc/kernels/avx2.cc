// AVX2 + FMA kernels. This file alone is compiled with -mavx2 -mfma (x86_64 builds only), so
// nothing here may run before dispatch has checked the CPU; the rest of the library stays at
// the baseline ISA.
//
// Integer GEMMs reproduce ref.cc bit for bit: the int32 accumulators are exact, and the float
// epilogue uses the operations and order of kernels.h (mul, then add; never an FMA).
//
// qd8_f32_qc8w_gemm: int16 operands (activations widened into per-thread scratch, weights into
//   scratch or as they are loaded), micro-tile of 6 rows x 8 channels (12 int32 ymm
//   accumulators), one vpmaddwd + vpaddd per 16 MACs. See below for why this beats the
//   vpmaddubsw sign trick.
// qd8_f32_qb4w_gemm: micro-tile of 4 rows x 8 channels. Nibbles (q + 8, in [0, 15]) feed
//   vpmaddubsw directly as the unsigned operand, and the products of a 32-wide k chunk are summed
//   in int16 before one vpmaddwd widens them: about one multiplier-port op per 32 MACs.
// f32_gemm: micro-tile of 6 rows x 16 columns (12 ymm accumulators), broadcast A, FMA.
//
// The float kernels (f32_gemm, layernorm, softmax, gelu, swiglu, quick_gelu, rope, scale_add)
// follow the canonical evaluation of kernels.h operation for operation, so they equal ref.cc
// (and NEON) bit for bit as well: one FMA per k in k order, LayerNorm's 8-lane double
// reductions combined by hsum_pd, softmax's float sum by hsum_ps, exp_v and gelu_v as ref's
// exp_canon and gelu_canon, sigmoid_v as its sigmoid_canon.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

#include "isa_kernels.h"
#include "packed_layout.h"

namespace pyrt {
namespace {

inline __m256i bcast_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// An empty asm that claims to modify v: it pins an accumulation chain to program order. Without
// it GCC 12 reassociates the int16 sums of the int4 kernel into a tree, keeps every product
// live at once and spills most of them to the stack.
inline void pin(__m256i& v) { __asm__("" : "+x"(v)); }

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

inline uint32_t hmax_epu32(__m256i v) {
  __m128i s = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_max_epu32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_max_epu32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

// ---------------------------------------------------------------------------------------------
// quantize_rows

}  // namespace

void avx2::quantize_rows(size_t rows, size_t K, size_t Kp, const float* x, size_t x_stride,
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
    // default MXCSR rounding mode, which is what std::nearbyint uses too). max_ps(f, lo)
    // returns lo for a NaN f, as ref's std::max(lo, f) does.
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
          const float f = std::min(std::max(lo, xr[j] * inv), hi);
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

float avx2::absmax(size_t n, const float* x) {
  // As ref: the integer max of the bit patterns with the sign cleared, so a NaN always wins.
  const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
  auto abs_bits = [&](const float* p) {
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), mask);
  };
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epu32(m0, abs_bits(x + i));
    m1 = _mm256_max_epu32(m1, abs_bits(x + i + 8));
    m2 = _mm256_max_epu32(m2, abs_bits(x + i + 16));
    m3 = _mm256_max_epu32(m3, abs_bits(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_epu32(m0, abs_bits(x + i));
  const uint32_t m = hmax_epu32(_mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3)));
  return absmax_finish(m, n - i, x + i);
}

namespace {

// ---------------------------------------------------------------------------------------------
// Scratch

// Per-thread scratch for the widened int8 GEMM operands (a few hundred KB), from generic code:
// a std::vector here would instantiate templates that generic code shares (isa_kernels.h).
int16_t* scratch_i16(size_t n) { return static_cast<int16_t*>(thread_scratch(n * sizeof(int16_t))); }

// dst[i] = src[i] for i < n (n a multiple of 4), int8 -> int16.
inline void widen_i8(const int8_t* src, int16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = src[i];
}

// ---------------------------------------------------------------------------------------------
// qd8_f32_qc8w_gemm
//
// vpmaddwd on int16 operands: a pair of products is at most 2*128*127 in magnitude, so nothing
// can saturate, and it costs one vpmaddwd per 16 MACs. The vpmaddubsw sign trick needs vpsignb +
// vpmaddubsw + vpmaddwd per 32 MACs, and on Zen those three (and vpabsb, vpmovsxbw) share the
// same two ports (measured: each alone issues 2/cycle, any mix of them 2/cycle in total), so
// int16 operands need ~1.5x fewer port cycles: ~170 GOPS against ~140 GOPS for a 4x16 sign-
// trick tile on the same machine. Activation rows are widened once per M chunk into per-thread
// scratch; weights either the same way (each panel once per M chunk) or as they are loaded,
// whichever is cheaper for the shape (see `wide` below).
//
// Widened weight panel layout: [half h][group g][32 int16]; the first 16 are channels
// 8h+0..3 (4 k each), the next 16 channels 8h+4..7 -- i.e. the packed bytes, widened in place.
// A row's 4 activations of group g, as int16, are one 64-bit broadcast; vpmaddwd then leaves
// per channel two partial sums (k 0+1 and k 2+3) in adjacent int32 lanes, added at the end.

constexpr size_t kQC8MR = 6;
constexpr size_t kQC8WideMinRows = 24;
constexpr size_t kQC8WideMaxBytes = 32 * 1024;

// Adjacent int32 lanes summed: v0 = ch 0..3, v1 = ch 4..7 (pairs) -> ch 0..7.
inline __m256i fold_pairs(__m256i v0, __m256i v1) {
  // hadd gives [c0 c1 c4 c5 | c2 c3 c6 c7]; reorder the 64-bit pairs to c0..c7.
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(v0, v1), 0xD8);
}

// Integer dot products of MR rows x 8 channels over Kp. Kept out of line so that the 2*MR
// accumulators get registers of their own (inlined, GCC shuffles them through the stack).
// kWide: w is the widened half panel (32 int16 per group); otherwise it is the packed int8
// panel plus 32*h (64 bytes per group), widened here as it is loaded (for few rows, where
// widening the panel into scratch would cost more than it saves).
template <int MR, bool kWide>
__attribute__((noinline)) void qc8w_tile(size_t Kp, const int16_t* a, size_t a_stride,
                                         const void* w, int32_t* out) {
  const __m256i z = _mm256_setzero_si256();
  __m256i c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
  __m256i c40 = z, c41 = z, c50 = z, c51 = z;
  const int16_t* a0 = a;
  const int16_t* a1 = a + (MR > 1 ? a_stride : 0);
  const int16_t* a2 = a + (MR > 2 ? 2 * a_stride : 0);
  const int16_t* a3 = a + (MR > 3 ? 3 * a_stride : 0);
  const int16_t* a4 = a + (MR > 4 ? 4 * a_stride : 0);
  const int16_t* a5 = a + (MR > 5 ? 5 * a_stride : 0);
  for (size_t k = 0; k < Kp; k += kKGroup) {
    __m256i w0, w1;
    if constexpr (kWide) {
      const int16_t* wk = static_cast<const int16_t*>(w) + 8 * k;
      w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
      w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16));
    } else {
      const int8_t* wk = static_cast<const int8_t*>(w) + 16 * k;
      w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk)));
      w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + 16)));
    }
#define PYRT_QC8_ROW(r)                                                       \
  if constexpr (MR > r) {                                                     \
    int64_t v;                                                                \
    std::memcpy(&v, a##r + k, sizeof(v));                                     \
    const __m256i av = _mm256_set1_epi64x(v);                                 \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(w0, av));           \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(w1, av));           \
  }
    PYRT_QC8_ROW(0)
    PYRT_QC8_ROW(1)
    PYRT_QC8_ROW(2)
    PYRT_QC8_ROW(3)
    PYRT_QC8_ROW(4)
    PYRT_QC8_ROW(5)
#undef PYRT_QC8_ROW
  }
  // Raw accumulators out; the caller folds the pairs. (Folding here makes GCC 12 copy every
  // accumulator to a new register on each iteration of the loop above.)
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_store_si256(o + 0, c00);
  _mm256_store_si256(o + 1, c01);
  if constexpr (MR > 1) _mm256_store_si256(o + 2, c10), _mm256_store_si256(o + 3, c11);
  if constexpr (MR > 2) _mm256_store_si256(o + 4, c20), _mm256_store_si256(o + 5, c21);
  if constexpr (MR > 3) _mm256_store_si256(o + 6, c30), _mm256_store_si256(o + 7, c31);
  if constexpr (MR > 4) _mm256_store_si256(o + 8, c40), _mm256_store_si256(o + 9, c41);
  if constexpr (MR > 5) _mm256_store_si256(o + 10, c50), _mm256_store_si256(o + 11, c51);
}

}  // namespace

void avx2::qd8_f32_qc8w_gemm(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                             const float* a_scale, const int8_t* w, const float* w_scale,
                             const float* bias, float* y, size_t y_stride) {
  if (M == 0 || N == 0) return;
  // Rows per chunk: widened activations of about 256 KB, so that they stay in L2 (512 KB on
  // Zen 3) while every panel streams over them. Each chunk re-widens the weight panels, so
  // smaller chunks cost more (measured: 6-row chunks lose ~30% at K = 3072).
  const size_t mb = std::max<size_t>(1, size_t(128) * 1024 / std::max<size_t>(Kp, 1));
  // Equal chunks (rounded up to whole tiles), so that no small last chunk pays for a full
  // re-widening of the weights.
  const size_t nchunks = (M + mb - 1) / mb;
  const size_t mchunk = std::min(M, round_up((M + nchunks - 1) / nchunks, kQC8MR));
  int16_t* a16 = scratch_i16(mchunk * Kp + Kp * kNR);
  int16_t* w16 = a16 + mchunk * Kp;
  alignas(32) float b16[kNR];
  alignas(32) int32_t acc[kQC8MR * 16];
  for (size_t m0 = 0; m0 < M; m0 += mchunk) {
    const size_t rows = std::min(mchunk, M - m0);
    // Weights widened into scratch, or as they are loaded? Widening a panel into scratch costs
    // about what ~2 rows of multiplies do, widening in the loop ~1/MR of the multiplies; and a
    // widened panel larger than L1 doubles the L2 traffic for weights. Measured: scratch +5%
    // at M = 197, K = 192; even at K >= 1536; in-loop +10% at M = 12..16 and 2.5x at M = 1.
    const bool wide = rows >= kQC8WideMinRows && Kp * kNR * sizeof(int16_t) <= kQC8WideMaxBytes;
    for (size_t r = 0; r < rows; ++r) widen_i8(a + (m0 + r) * a_stride, a16 + r * Kp, Kp);
    for (size_t p = 0; p < num_panels(N); ++p) {
      const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
      const int8_t* wp = w + p * packed::qc8w_panel_bytes(Kp);
      const size_t halves = ncols > 8 ? 2 : 1;
      if (wide)
        for (size_t h = 0; h < halves; ++h)
          for (size_t g = 0; g < Kp / kKGroup; ++g)
            widen_i8(wp + packed::qc8w_group_offset(g, 8 * h), w16 + h * Kp * 8 + g * 32, 32);
      if (bias) load_bias16(bias, n0, N, b16);
      for (size_t h = 0; h < halves; ++h) {
        const size_t nc = std::min<size_t>(8, ncols - 8 * h);
        const __m256 ws = _mm256_loadu_ps(w_scale + n0 + 8 * h);
        const __m256 bv = bias ? _mm256_load_ps(b16 + 8 * h) : _mm256_setzero_ps();
        for (size_t m = 0; m < rows; m += kQC8MR) {
          const size_t mr = std::min(kQC8MR, rows - m);
          const int16_t* am = a16 + m * Kp;
          if (wide) {
            const int16_t* wh = w16 + h * Kp * 8;
            switch (mr) {
              case 6: qc8w_tile<6, true>(Kp, am, Kp, wh, acc); break;
              case 5: qc8w_tile<5, true>(Kp, am, Kp, wh, acc); break;
              case 4: qc8w_tile<4, true>(Kp, am, Kp, wh, acc); break;
              case 3: qc8w_tile<3, true>(Kp, am, Kp, wh, acc); break;
              case 2: qc8w_tile<2, true>(Kp, am, Kp, wh, acc); break;
              default: qc8w_tile<1, true>(Kp, am, Kp, wh, acc); break;
            }
          } else {
            const int8_t* wh = wp + 32 * h;
            switch (mr) {
              case 6: qc8w_tile<6, false>(Kp, am, Kp, wh, acc); break;
              case 5: qc8w_tile<5, false>(Kp, am, Kp, wh, acc); break;
              case 4: qc8w_tile<4, false>(Kp, am, Kp, wh, acc); break;
              case 3: qc8w_tile<3, false>(Kp, am, Kp, wh, acc); break;
              case 2: qc8w_tile<2, false>(Kp, am, Kp, wh, acc); break;
              default: qc8w_tile<1, false>(Kp, am, Kp, wh, acc); break;
            }
          }
          for (size_t r = 0; r < mr; ++r) {
            const size_t row = m0 + m + r;
            // y = float(acc) * (a_scale * w_scale) + bias, as in kernels.h.
            const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(a_scale[row]), ws);
            const __m256i* ar = reinterpret_cast<const __m256i*>(acc + 16 * r);
            const __m256i iv = fold_pairs(_mm256_load_si256(ar), _mm256_load_si256(ar + 1));
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(iv), sc);
            if (bias) v = _mm256_add_ps(v, bv);
            store_cols(y + row * y_stride + n0 + 8 * h, v, nc);
          }
        }
      }
    }
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// qd8_f32_qb4w_gemm
//
// Micro-tile of MR rows x 8 channels (a half panel). Per group pair one 32-byte load holds 8
// channels x 8 k as nibbles: lo = v & 0xF is group 2gp, hi = (v >> 4) & 0xF group 2gp+1, both
// already in the 4-k-per-channel order vpmaddubsw wants, unsigned, so no sign trick is needed.
// A vpmaddubsw lane is at most 2*15*127 = 3810 in magnitude, so the eight products of a 32-wide
// k chunk are summed in int16 (<= 30480) and widened once per chunk with vpmaddwd. The +8 offset
// is undone per chunk with the activation sums, the float epilogue runs per block.

constexpr size_t kQB4MR = 4;

// out[r][c] = sum over blocks of float(acc_b) * w_scale[b][c] for MR rows x 8 channels.
template <int MR>
__attribute__((noinline)) void qb4w_tile(size_t nblocks, size_t chunks, const int8_t* a,
                                         size_t a_stride, const int32_t* bsum,
                                         size_t bsum_stride, const uint8_t* w, const float* ws,
                                         float* out) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* a0 = a;
  const int8_t* a1 = a + (MR > 1 ? a_stride : 0);
  const int8_t* a2 = a + (MR > 2 ? 2 * a_stride : 0);
  const int8_t* a3 = a + (MR > 3 ? 3 * a_stride : 0);
  const int32_t* b0 = bsum;
  const int32_t* b1 = bsum + (MR > 1 ? bsum_stride : 0);
  const int32_t* b2 = bsum + (MR > 2 ? 2 * bsum_stride : 0);
  const int32_t* b3 = bsum + (MR > 3 ? 3 * bsum_stride : 0);
  // The float sums live in `out` (touched once per block), leaving registers to the integer
  // accumulators.
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + 8 * r, _mm256_setzero_ps());
  size_t chunk = 0;
  for (size_t b = 0; b < nblocks; ++b) {
    const __m256i z = _mm256_setzero_si256();
    __m256i c0 = z, c1 = z, c2 = z, c3 = z;
    for (size_t ci = 0; ci < chunks; ++ci, ++chunk) {
      const size_t k0 = chunk * kKAlign;
      const uint8_t* wc = w + k0 * 8;
      __m256i t0 = z, t1 = z, t2 = z, t3 = z;
#define PYRT_QB4_ROW(r, gp)                                                               \
  if constexpr (MR > r) {                                                                 \
    t##r = _mm256_add_epi16(t##r, _mm256_maddubs_epi16(lo, bcast_i32(a##r + k0 + 8 * gp)));     \
    pin(t##r);                                                                            \
    t##r = _mm256_add_epi16(t##r, _mm256_maddubs_epi16(hi, bcast_i32(a##r + k0 + 8 * gp + 4))); \
    pin(t##r);                                                                            \
  }
#define PYRT_QB4_GP(gp)                                                                   \
  {                                                                                       \
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 64 * gp)); \
    const __m256i lo = _mm256_and_si256(v, mask);                                         \
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);                  \
    PYRT_QB4_ROW(0, gp) PYRT_QB4_ROW(1, gp) PYRT_QB4_ROW(2, gp) PYRT_QB4_ROW(3, gp)       \
  }
      PYRT_QB4_GP(0)
      PYRT_QB4_GP(1)
      PYRT_QB4_GP(2)
      PYRT_QB4_GP(3)
#undef PYRT_QB4_GP
#undef PYRT_QB4_ROW
      // Widen, and subtract 8 x (sum of this chunk's activations) to undo the +8 offset.
#define PYRT_QB4_CHUNK(r)                                                          \
  if constexpr (MR > r)                                                            \
    c##r = _mm256_add_epi32(c##r, _mm256_sub_epi32(_mm256_madd_epi16(t##r, ones),  \
                                                   _mm256_set1_epi32(8 * b##r[chunk])));
      PYRT_QB4_CHUNK(0)
      PYRT_QB4_CHUNK(1)
      PYRT_QB4_CHUNK(2)
      PYRT_QB4_CHUNK(3)
#undef PYRT_QB4_CHUNK
    }
    // s = s + float(acc_b) * w_scale[b], as in kernels.h.
    const __m256 wsb = _mm256_loadu_ps(ws + b * kNR);
#define PYRT_QB4_BLOCK(r)                                                           \
  if constexpr (MR > r)                                                             \
    _mm256_storeu_ps(out + 8 * r, _mm256_add_ps(_mm256_loadu_ps(out + 8 * r),       \
                                                _mm256_mul_ps(_mm256_cvtepi32_ps(c##r), wsb)));
    PYRT_QB4_BLOCK(0)
    PYRT_QB4_BLOCK(1)
    PYRT_QB4_BLOCK(2)
    PYRT_QB4_BLOCK(3)
#undef PYRT_QB4_BLOCK
  }
}

}  // namespace

void avx2::qd8_f32_qb4w_gemm(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                             size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                             size_t bsum_stride, const uint8_t* w, const float* w_scale,
                             const float* bias, float* y, size_t y_stride) {
  alignas(32) float b16[kNR];
  alignas(32) float s[kQB4MR * 8];
  const size_t nblocks = Kp / block, chunks = block / kKAlign;
  for (size_t p = 0; p < num_panels(N); ++p) {
    const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
    const uint8_t* wp = w + p * packed::qb4w_panel_bytes(Kp);
    const float* ws = w_scale + p * packed::qb4w_panel_scales(Kp, block);
    if (bias) load_bias16(bias, n0, N, b16);
    for (size_t h = 0; h < 2 && 8 * h < ncols; ++h) {
      const size_t nc = std::min<size_t>(8, ncols - 8 * h);
      const __m256 bv = bias ? _mm256_load_ps(b16 + 8 * h) : _mm256_setzero_ps();
      for (size_t m = 0; m < M; m += kQB4MR) {
        const size_t mr = std::min(kQB4MR, M - m);
        const int8_t* am = a + m * a_stride;
        const int32_t* bm = a_bsum + m * bsum_stride;
        const uint8_t* wh = wp + 32 * h;
        const float* wsh = ws + 8 * h;
        switch (mr) {
          case 4: qb4w_tile<4>(nblocks, chunks, am, a_stride, bm, bsum_stride, wh, wsh, s); break;
          case 3: qb4w_tile<3>(nblocks, chunks, am, a_stride, bm, bsum_stride, wh, wsh, s); break;
          case 2: qb4w_tile<2>(nblocks, chunks, am, a_stride, bm, bsum_stride, wh, wsh, s); break;
          default: qb4w_tile<1>(nblocks, chunks, am, a_stride, bm, bsum_stride, wh, wsh, s); break;
        }
        for (size_t r = 0; r < mr; ++r) {
          // y = s * a_scale + bias, as in kernels.h.
          __m256 v = _mm256_mul_ps(_mm256_load_ps(s + 8 * r), _mm256_set1_ps(a_scale[m + r]));
          if (bias) v = _mm256_add_ps(v, bv);
          store_cols(y + (m + r) * y_stride + n0 + 8 * h, v, nc);
        }
      }
    }
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// f32_gemm

template <int MR>
void f32_rows(size_t K, const float* a, size_t a_stride, const float* bp, const float* bias16,
              float* y, size_t y_stride, size_t ncols) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  size_t k = 0;
  // Every row sums its k in the same order whatever the tile height: an image's logits must
  // not depend on how many other rows share its call (batch size, exits, thread split). So
  // no second accumulator set for short tiles, though it was faster at M = 1 (39 vs 29
  // GFLOP/s).
#pragma GCC unroll 4
  for (; k < K; ++k) {
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

// No K blocking: tried (K blocks of 256..1024 with partial sums through y), it was slower at
// every ViT shape measured, 197 x 768 x 3072 included.
}  // namespace

void avx2::f32_gemm(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                    const float* b_packed, const float* bias, float* y, size_t y_stride) {
  alignas(32) float b16[kNR];
  for (size_t p = 0; p < num_panels(N); ++p) {
    const size_t n0 = p * kNR, ncols = std::min(kNR, N - n0);
    const float* bp = b_packed + p * packed::f32_panel_floats(K);
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

namespace {

// ---------------------------------------------------------------------------------------------
// layernorm

// Mean and variance are accumulated in double, like ref: in float, a residual stream with a
// large common offset (or outlier channels) loses ~1e-5 to the sums. The output pass is float,
// with the mean split into hi + lo so that x - mean keeps its precision. The canonical order of
// kernels.h: the 8 double lanes of s0:s1 (lane j = elements i % 8 == j) are combined by
// hsum_pd(s0 + s1) = ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), then the tail in order.
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
inline double hsum_pd(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// Mean and variance of R rows at once. Each row's sums are chains of D/8 dependent adds (the
// canonical order fixes them); R independent rows keep the adders busy while one row's chain
// waits on its latency (4 rows: LayerNorm of 197 x 192 in 1/2.6 of the one-row time).
template <int R>
inline void layernorm_stats(const float* const* xr, size_t D, double* mean, double* var) {
  __m256d s0[R], s1[R];
  for (int r = 0; r < R; ++r) s0[r] = s1[r] = _mm256_setzero_pd();
  size_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_loadu_ps(xr[r] + i);
      s0[r] = _mm256_add_pd(s0[r], lo_pd(v));
      s1[r] = _mm256_add_pd(s1[r], hi_pd(v));
    }
  __m256d vmd[R];
  for (int r = 0; r < R; ++r) {
    double sum = hsum_pd(_mm256_add_pd(s0[r], s1[r]));
    for (size_t j = i; j < D; ++j) sum += xr[r][j];
    mean[r] = sum / double(D);
    vmd[r] = _mm256_set1_pd(mean[r]);
    s0[r] = s1[r] = _mm256_setzero_pd();
  }
  // Second pass: variance about the mean (numerically safe, unlike E[x^2] - mean^2).
  for (i = 0; i + 8 <= D; i += 8)
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_loadu_ps(xr[r] + i);
      const __m256d d0 = _mm256_sub_pd(lo_pd(v), vmd[r]), d1 = _mm256_sub_pd(hi_pd(v), vmd[r]);
      s0[r] = _mm256_fmadd_pd(d0, d0, s0[r]);
      s1[r] = _mm256_fmadd_pd(d1, d1, s1[r]);
    }
  for (int r = 0; r < R; ++r) {
    double v = hsum_pd(_mm256_add_pd(s0[r], s1[r]));
    for (size_t j = i; j < D; ++j) {
      const double d = double(xr[r][j]) - mean[r];
      v = std::fma(d, d, v);
    }
    var[r] = v / double(D);
  }
}

// y = ((x - mean_hi) - mean_lo) * rstd * gamma + beta for one row; y may alias x.
inline void layernorm_apply(const float* xr, size_t D, double mean, double var, float eps,
                            const float* gamma, const float* beta, float* yr) {
  const float rstd = static_cast<float>(1.0 / std::sqrt(var + double(eps)));
  const float mhi = static_cast<float>(mean), mlo = static_cast<float>(mean - double(mhi));
  const __m256 vhi = _mm256_set1_ps(mhi), vlo = _mm256_set1_ps(mlo), vr = _mm256_set1_ps(rstd);
  size_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vhi), vlo);
    const __m256 n = _mm256_mul_ps(d, vr);
    _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(n, _mm256_loadu_ps(gamma + i), _mm256_loadu_ps(beta + i)));
  }
  for (; i < D; ++i) yr[i] = std::fma(((xr[i] - mhi) - mlo) * rstd, gamma[i], beta[i]);
}

template <int R>
inline void layernorm_rows(size_t r0, size_t D, const float* x, size_t x_stride, const float* gamma,
                           const float* beta, float eps, float* y, size_t y_stride) {
  const float* xr[R];
  double mean[R], var[R];
  for (int r = 0; r < R; ++r) xr[r] = x + (r0 + r) * x_stride;
  layernorm_stats<R>(xr, D, mean, var);
  for (int r = 0; r < R; ++r) layernorm_apply(xr[r], D, mean[r], var[r], eps, gamma, beta, y + (r0 + r) * y_stride);
}

// y may alias x row for row (same stride): a group's rows are all read before any is written.
}  // namespace

void avx2::layernorm(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
                     const float* beta, float eps, float* y, size_t y_stride) {
  size_t r = 0;
  for (; r + 4 <= rows; r += 4) layernorm_rows<4>(r, D, x, x_stride, gamma, beta, eps, y, y_stride);
  for (; r < rows; ++r) layernorm_rows<1>(r, D, x, x_stride, gamma, beta, eps, y, y_stride);
}

namespace {

// ---------------------------------------------------------------------------------------------
// softmax

// exp(x) for x <= 0 (softmax arguments), ref.cc's exp_canon lane by lane: n = round(x log2e) by
// an fma with the shifter 1.5 * 2^23 + 127, whose bits shifted left by 23 are 2^n; r = x - n ln2
// in one fma; exp(r) = 1 + r P(r), P of degree 4, folded with the scaling as fma(r 2^n, P, 2^n).
// 0 below about -87.68. 11 operations, against 22 for the Cephes form it replaced (a separate
// round, convert, add and underflow mask, the xlo adds, a second Cody-Waite step, degree 5 + 2).
//
// The element-wise kernels work on V independent vectors at once, each step applied to all V
// before the next: one vector's chain of dependent FMAs is latency-bound, and the out-of-order
// window is too small to overlap the next vector's chain with it. The operations per lane are
// the same for any V.
#define PYRT_EACH(i) _Pragma("GCC unroll 4") for (int i = 0; i < V; ++i)

template <int V>
inline void exp_v(__m256* x) {
  const __m256 shift = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  __m256 s[V], t[V], r[V], p[V];
  PYRT_EACH(i) {
    s[i] = _mm256_max_ps(_mm256_set1_ps(-88.0f), x[i]);  // = std::max(x, -88): NaN stays NaN
    t[i] = _mm256_fmadd_ps(s[i], _mm256_set1_ps(1.44269504088896341f), shift);
  }
  PYRT_EACH(i) {
    const __m256 n = _mm256_sub_ps(t[i], shift);
    r[i] = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), s[i]);
  }
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(8.308717050e-3f), r[i], _mm256_set1_ps(4.190130904e-2f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(1.666731983e-1f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(4.999911785e-1f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(9.999998212e-1f));
  PYRT_EACH(i) {
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t[i]), 23));
    x[i] = _mm256_fmadd_ps(_mm256_mul_ps(r[i], scale), p[i], scale);
  }
}

// Lanes j < k all ones (0 < k < 8).
inline __m256i lane_mask(size_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// max of x * scale as ref's scaled_max: the max (or, for scale < 0, the min) of x, times
// scale -- one multiply per row. Min and max are exact, so the order is free: two accumulators,
// and the last 8 elements loaded once more for the tail.
template <bool kMin>
inline float extremum(size_t n, const float* x) {
  auto op = [](__m256 a, __m256 b) { return kMin ? _mm256_min_ps(a, b) : _mm256_max_ps(a, b); };
  if (n < 8) {
    float m = kMin ? INFINITY : -INFINITY;
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(x[i])) return std::numeric_limits<float>::quiet_NaN();
      m = kMin ? std::min(m, x[i]) : std::max(m, x[i]);
    }
    return m;
  }
  // min_ps/max_ps drop a NaN or keep it depending on its operand position, so NaNs are
  // tracked on the side (one unordered compare per two vectors): a NaN anywhere gives NaN, as
  // in ref.
  __m256 m0 = _mm256_loadu_ps(x + n - 8), m1 = m0;
  __m256 nan = _mm256_cmp_ps(m0, m0, _CMP_UNORD_Q);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
    m0 = op(m0, v0);
    m1 = op(m1, v1);
  }
  if (i + 8 <= n) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m0 = op(m0, v);
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  m0 = op(m0, m1);
  __m128 s = kMin ? _mm_min_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1))
                  : _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  s = kMin ? _mm_min_ps(s, _mm_movehl_ps(s, s)) : _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = kMin ? _mm_min_ss(s, _mm_movehdup_ps(s)) : _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of the 8 lanes as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The sum in the canonical order of kernels.h (ref.cc's softmax_sum): blocks of 32 folded to 8
// lanes, (v0 + v1) + (v2 + v3), accumulated block by block in one float vector, the last block
// zero-padded, the lanes combined by hsum_ps. (The sum used to be converted and added in double
// for every vector: 4 operations per 8 elements, now 1.)
//
// The last n % 32 elements (up to four vectors, the last maybe partial: masked load, exp
// lanes past n zeroed) go first, so that their chain overlaps the main loop; their sum joins
// the lanes last, and the partial vector stays in a register until the normalising pass.
}  // namespace

void avx2::softmax(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  if (n == 0) return;
  const __m256 vs = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
  const size_t nb = n / 32 * 32, nfull = n / 8 * 8;
  const __m256i tail_mask = lane_mask(n % 8);  // unused when n % 8 == 0
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    const float mx = (scale < 0.0f ? extremum<true>(n, xr) : extremum<false>(n, xr)) * scale;
    const __m256 vmx = _mm256_set1_ps(mx);
    // x * scale - max, the product rounded first, as ref.
    auto arg = [&](__m256 v) { return _mm256_sub_ps(_mm256_mul_ps(v, vs), vmx); };
    __m256 rem[4] = {zero, zero, zero, zero};
    for (size_t i = nb, j = 0; i < n; i += 8, ++j) {
      rem[j] = arg(i + 8 <= n ? _mm256_loadu_ps(xr + i) : _mm256_maskload_ps(xr + i, tail_mask));
      exp_v<1>(&rem[j]);
      if (i + 8 <= n)
        _mm256_storeu_ps(xr + i, rem[j]);
      else
        rem[j] = _mm256_and_ps(rem[j], _mm256_castsi256_ps(tail_mask));
    }
    const __m256 w_rem = _mm256_add_ps(_mm256_add_ps(rem[0], rem[1]), _mm256_add_ps(rem[2], rem[3]));
    __m256 sum = zero;
    for (size_t i = 0; i < nb; i += 32) {
      __m256 e[4];
      for (int j = 0; j < 4; ++j) e[j] = arg(_mm256_loadu_ps(xr + i + 8 * j));
      exp_v<4>(e);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(xr + i + 8 * j, e[j]);
      sum = _mm256_add_ps(sum, _mm256_add_ps(_mm256_add_ps(e[0], e[1]), _mm256_add_ps(e[2], e[3])));
    }
    sum = _mm256_add_ps(sum, w_rem);  // + 0 when there is no last block: exact
    const float inv = 1.0f / hsum_ps(sum);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (size_t i = 0; i < nfull; i += 8) _mm256_storeu_ps(xr + i, _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv));
    if (nfull < n) _mm256_maskstore_ps(xr + nfull, tail_mask, _mm256_mul_ps(rem[(nfull - nb) / 8], vinv));
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// gelu

// GELU as ref.cc's gelu_canon, PyTorch's x/2 (1 + erf(x/sqrt 2)) evaluated as fma(x, E, x/2),
// E = erf(x/sqrt 2)/2 = xc P(xc^2) / Q(xc^2) with xc = x clamped to +-5.21751785 (where E is
// exactly 1/2): Eigen's rational erf, its coefficients rescaled for x/sqrt 2 and the 1/2. 17
// operations including one division, against 44 including one division for the erfc-and-exp
// form it replaced; |error| < 2.1e-7 max(1, |x|).
template <int V>
inline void gelu_v(__m256* x) {
  const __m256 clamp = _mm256_set1_ps(5.21751785f);
  __m256 xc[V], x2[V], p[V], q[V];
  PYRT_EACH(i) {
    // = std::min(std::max(x, -c), c), NaN kept: max_ps/min_ps return the second operand when
    // either is NaN.
    xc[i] = _mm256_min_ps(clamp, _mm256_max_ps(_mm256_set1_ps(-5.21751785f), x[i]));
    x2[i] = _mm256_mul_ps(xc[i], xc[i]);
  }
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(5.06135211e-6f), x2[i], _mm256_set1_ps(1.50626613e-4f));
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(_mm256_set1_ps(-1.84243798e-9f), x2[i], _mm256_set1_ps(7.35873925e-7f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], x2[i], _mm256_set1_ps(4.50388948e-3f));
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(q[i], x2[i], _mm256_set1_ps(6.36226614e-5f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], x2[i], _mm256_set1_ps(3.27405147e-2f));
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(q[i], x2[i], _mm256_set1_ps(1.75880874e-3f));
  PYRT_EACH(i) p[i] = _mm256_fmadd_ps(p[i], x2[i], _mm256_set1_ps(3.98942262e-1f));
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(q[i], x2[i], _mm256_set1_ps(2.77462620e-2f));
  PYRT_EACH(i) p[i] = _mm256_mul_ps(p[i], xc[i]);
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(q[i], x2[i], _mm256_set1_ps(2.48734623e-1f));
  PYRT_EACH(i) q[i] = _mm256_fmadd_ps(q[i], x2[i], _mm256_set1_ps(1.0f));
  PYRT_EACH(i) x[i] = _mm256_fmadd_ps(x[i], _mm256_div_ps(p[i], q[i]), _mm256_mul_ps(x[i], _mm256_set1_ps(0.5f)));
}

#undef PYRT_EACH

// x[i] = Op(x[i]) for n floats: four vectors at a time, then one, then the tail through the same
// vector code via a zero-padded copy (every element sees one instruction sequence). Op::apply<V>
// transforms V vectors in registers.
template <class Op>
inline void map_inplace(size_t n, float* x) {
  constexpr int V = 4;
  size_t i = 0;
  for (; i + 8 * V <= n; i += 8 * V) {
    __m256 v[V];
    for (int j = 0; j < V; ++j) v[j] = _mm256_loadu_ps(x + i + 8 * j);
    Op::template apply<V>(v);
    for (int j = 0; j < V; ++j) _mm256_storeu_ps(x + i + 8 * j, v[j]);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    Op::template apply<1>(&v);
    _mm256_storeu_ps(x + i, v);
  }
  if (i < n) {
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, x + i, (n - i) * sizeof(float));
    __m256 v = _mm256_load_ps(t);
    Op::template apply<1>(&v);
    _mm256_store_ps(t, v);
    std::memcpy(x + i, t, (n - i) * sizeof(float));
  }
}

struct GeluOp {
  template <int V>
  static void apply(__m256* v) { gelu_v<V>(v); }
};

}  // namespace

void avx2::gelu(size_t n, float* x) { map_inplace<GeluOp>(n, x); }

namespace {

// ---------------------------------------------------------------------------------------------
// softmax_q8 (int8 attention): ref.cc's softmax_q8_elem lane by lane, four vectors at a time.

template <int V>
inline void softmax_q8_v(const __m256* x, __m256 mx, __m256i* q) {
  __m256 y[V], p[V], n[V];
  for (int i = 0; i < V; ++i) {
    y[i] = _mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(x[i], mx), _mm256_set1_ps(1.44269504088896341f)),
                         _mm256_set1_ps(-126.0f));
    n[i] = _mm256_round_ps(y[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y[i] = _mm256_sub_ps(y[i], n[i]);  // f
    p[i] = _mm256_fmadd_ps(_mm256_set1_ps(0.009582852944731712f), y[i], _mm256_set1_ps(0.05590642988681793f));
  }
  for (int i = 0; i < V; ++i) p[i] = _mm256_fmadd_ps(p[i], y[i], _mm256_set1_ps(0.24024099111557007f));
  for (int i = 0; i < V; ++i) p[i] = _mm256_fmadd_ps(p[i], y[i], _mm256_set1_ps(0.6931241750717163f));
  for (int i = 0; i < V; ++i) p[i] = _mm256_fmadd_ps(p[i], y[i], _mm256_set1_ps(1.0f));
  for (int i = 0; i < V; ++i) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[i]), _mm256_set1_epi32(127)), 23);
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(p[i], _mm256_castsi256_ps(e)), _mm256_set1_ps(127.0f));
    // nearbyint then min, as ref (the rounding is exact; cvt of an integral float is exact)
    q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                            _mm256_set1_ps(127.0f)));
  }
}

// 8 int32 in [0, 127] to 8 bytes.
inline void store_q8x8(int8_t* dst, __m256i v) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}

}  // namespace

void avx2::softmax_q8(size_t rows, size_t n, size_t Kp, const float* x, size_t x_stride, int8_t* q,
                      size_t q_stride, float* scale) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    const float mx = extremum<false>(n, xr);
    if (!std::isfinite(mx)) {
      softmax_q8_poison_row(Kp, qr, scale + r);
      continue;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256i acc = _mm256_setzero_si256();  // exact: the order of an integer sum is free
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
      __m256 v[4];
      __m256i e[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xr + i + 8 * j);
      softmax_q8_v<4>(v, vmx, e);
      for (int j = 0; j < 4; ++j) {
        acc = _mm256_add_epi32(acc, e[j]);
        store_q8x8(qr + i + 8 * j, e[j]);
      }
    }
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      __m256i e;
      softmax_q8_v<1>(&v, vmx, &e);
      acc = _mm256_add_epi32(acc, e);
      store_q8x8(qr + i, e);
    }
    int32_t sum = hsum_epi32(acc);
    if (i < n) {  // the tail through the same vector code; padding lanes dropped
      alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      alignas(32) int32_t e8[8];
      std::memcpy(t, xr + i, (n - i) * sizeof(float));
      const __m256 v = _mm256_load_ps(t);
      __m256i e;
      softmax_q8_v<1>(&v, vmx, &e);
      _mm256_store_si256(reinterpret_cast<__m256i*>(e8), e);
      for (size_t j = i; j < n; ++j) {
        qr[j] = static_cast<int8_t>(e8[j - i]);
        sum += e8[j - i];
      }
    }
    std::memset(qr + n, 0, Kp - n);
    scale[r] = 1.0f / static_cast<float>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// add

void avx2::add(size_t n, const float* a, const float* b, float* y) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

void avx2::scale_add(size_t n, const float* x, float scale, const float* b, float* y) {
  const __m256 vs = _mm256_set1_ps(scale);
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) y[i] = x[i] * scale + b[i];
}

namespace {

// ---------------------------------------------------------------------------------------------
// sigmoid-gated activations: ref.cc's sigmoid_canon lane by lane, V vectors at a time (see
// exp_v for why): e = exp(-|z|), sigmoid = (z >= 0 ? 1 : e) / (1 + e).

#define PYRT_EACH(i) _Pragma("GCC unroll 4") for (int i = 0; i < V; ++i)

template <int V>
inline void sigmoid_v(const __m256* z, __m256* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 e[V];
  PYRT_EACH(i) e[i] = _mm256_or_ps(z[i], sign);  // -|z|
  exp_v<V>(e);
  // z >= 0 is false for NaN, as in ref; e is NaN then anyway.
  PYRT_EACH(i) {
    const __m256 num = _mm256_blendv_ps(e[i], one, _mm256_cmp_ps(z[i], zero, _CMP_GE_OQ));
    out[i] = _mm256_div_ps(num, _mm256_add_ps(one, e[i]));
  }
}

// y = (g * sigmoid(g)) * u for 8V values.
template <int V>
inline void swiglu_v(const float* g, const float* u, float* y) {
  __m256 gv[V], sg[V];
  PYRT_EACH(j) gv[j] = _mm256_loadu_ps(g + 8 * j);
  sigmoid_v<V>(gv, sg);
  PYRT_EACH(j) _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(_mm256_mul_ps(gv[j], sg[j]), _mm256_loadu_ps(u + 8 * j)));
}

// x = x * sigmoid(1.702 x), V vectors in registers.
struct QuickGeluOp {
  template <int V>
  static void apply(__m256* x) {
    __m256 z[V], sg[V];
    PYRT_EACH(j) z[j] = _mm256_mul_ps(x[j], _mm256_set1_ps(1.702f));
    sigmoid_v<V>(z, sg);
    PYRT_EACH(j) x[j] = _mm256_mul_ps(x[j], sg[j]);
  }
};

#undef PYRT_EACH

}  // namespace

void avx2::swiglu(size_t rows, size_t n, const float* g, size_t g_stride, const float* u,
                  size_t u_stride, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* gr = g + r * g_stride;
    const float* ur = u + r * u_stride;
    float* yr = y + r * y_stride;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) swiglu_v<4>(gr + i, ur + i, yr + i);
    for (; i + 8 <= n; i += 8) swiglu_v<1>(gr + i, ur + i, yr + i);
    if (i < n) {  // the tail through the same vector code, via zero-padded copies
      alignas(32) float tg[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tu[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tg, gr + i, (n - i) * sizeof(float));
      std::memcpy(tu, ur + i, (n - i) * sizeof(float));
      swiglu_v<1>(tg, tu, tg);
      std::memcpy(yr + i, tg, (n - i) * sizeof(float));
    }
  }
}

void avx2::quick_gelu(size_t n, float* x) { map_inplace<QuickGeluOp>(n, x); }

// ---------------------------------------------------------------------------------------------
// rope: ref.cc's products and sums lane by lane (mul, mul, then add or sub; never fused).
//
// No _mm256_addsub_ps: GCC 12 fuses a multiply feeding it into vfmaddsub even under
// -ffp-contract=off (and SLP-vectorises a scalar pair loop into the same), one rounding fewer
// than ref. The even lanes' products are negated (exact) and added instead, and the tails run
// through the same vector code via zero-padded copies, so no scalar loop is left to vectorise.

namespace {

// 4 interleaved pairs: the partner of lane 2i is 2i+1 and back (permute within 128-bit halves).
inline void rope_interleaved8(float* x, const float* c, const float* s) {
  const __m256 neg_even = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0));
  const __m256 v = _mm256_loadu_ps(x);
  const __m256 xc = _mm256_mul_ps(v, _mm256_loadu_ps(c));
  const __m256 xs = _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), _mm256_loadu_ps(s));
  _mm256_storeu_ps(x, _mm256_add_ps(xc, _mm256_xor_ps(xs, neg_even)));
}

// 8 pairs (i, i + half): a = x[i..], b = x[i + half..] with their tables.
inline void rope_half8(float* xa, float* xb, const float* ca, const float* cb, const float* sa, const float* sb) {
  const __m256 a = _mm256_loadu_ps(xa), b = _mm256_loadu_ps(xb);
  const __m256 ya = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(ca)), _mm256_mul_ps(b, _mm256_loadu_ps(sa)));
  const __m256 yb = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(cb)), _mm256_mul_ps(a, _mm256_loadu_ps(sb)));
  _mm256_storeu_ps(xa, ya);
  _mm256_storeu_ps(xb, yb);
}

// Copies n < 8 floats into a zero-padded vector-sized buffer.
inline void pad8(float* t, const float* p, size_t n) {
  for (size_t i = 0; i < 8; ++i) t[i] = 0.0f;
  std::memcpy(t, p, n * sizeof(float));
}

void rope_head(float* xh, size_t hd, RopeForm form, const float* s, const float* c) {
  const size_t half = hd / 2;
  alignas(32) float tx[8], tc[8], ts[8], ty[8], tcb[8], tsb[8];
  if (form == RopeForm::kInterleaved) {
    size_t i = 0;
    for (; i + 8 <= hd; i += 8) rope_interleaved8(xh + i, c + i, s + i);
    if (i < hd) {  // whole pairs: hd and i are even
      pad8(tx, xh + i, hd - i);
      pad8(tc, c + i, hd - i);
      pad8(ts, s + i, hd - i);
      rope_interleaved8(tx, tc, ts);
      std::memcpy(xh + i, tx, (hd - i) * sizeof(float));
    }
    return;
  }
  size_t i = 0;
  for (; i + 8 <= half; i += 8) rope_half8(xh + i, xh + half + i, c + i, c + half + i, s + i, s + half + i);
  if (i < half) {
    const size_t n = half - i;
    pad8(tx, xh + i, n);
    pad8(ty, xh + half + i, n);
    pad8(tc, c + i, n);
    pad8(tcb, c + half + i, n);
    pad8(ts, s + i, n);
    pad8(tsb, s + half + i, n);
    rope_half8(tx, ty, tc, tcb, ts, tsb);
    std::memcpy(xh + i, tx, n * sizeof(float));
    std::memcpy(xh + half + i, ty, n * sizeof(float));
  }
}

}  // namespace

void avx2::rope(size_t rows, size_t heads, size_t hd, RopeForm form, float* x, size_t x_stride,
                const float* sin, const float* cos, size_t tab_stride, size_t tab_head_stride) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t h = 0; h < heads; ++h)
      rope_head(x + r * x_stride + h * hd, hd, form, sin + r * tab_stride + h * tab_head_stride,
                cos + r * tab_stride + h * tab_head_stride);
}

}  // namespace pyrt
