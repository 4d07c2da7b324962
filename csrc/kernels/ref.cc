// Scalar reference kernels: the oracle every SIMD kernel is tested against. Written for
// clarity, not speed; always built, on every target.
//
// Every kernel here evaluates the canonical formula and order of kernels.h, so each SIMD
// kernel must equal it bit for bit -- the float ones included: std::fma wherever a SIMD kernel
// fuses (the build has -ffp-contract=off, so nothing else is fused), the same polynomials, the
// same reduction tree, and only correctly rounded division and sqrt.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "isa_kernels.h"
#include "packed_layout.h"

namespace pyrt {
void ref::quantize_rows(size_t rows, size_t K, size_t Kp, const float* x, size_t x_stride,
                        const float* inv_scale, int qmax, int8_t* q, size_t q_stride,
                        int32_t* bsum, size_t bsum_stride) {
  const float lo = -static_cast<float>(qmax), hi = static_cast<float>(qmax);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    for (size_t k = 0; k < K; ++k) {
      // max(lo, x) (lo first: a NaN x gives lo, as SIMD max(x, lo) instructions do), then min.
      const float v = std::min(std::max(lo, xr[k] * inv_scale[r]), hi);
      qr[k] = static_cast<int8_t>(std::nearbyint(v));
    }
    for (size_t k = K; k < Kp; ++k) qr[k] = 0;
    int32_t* br = bsum + r * bsum_stride;
    for (size_t c = 0; c < Kp / kKAlign; ++c) {
      int32_t s = 0;
      for (size_t k = 0; k < kKAlign; ++k) s += qr[c * kKAlign + k];
      br[c] = s;
    }
  }
}

float ref::absmax(size_t n, const float* x) {
  // The max of |x| as the integer max of the bit patterns with the sign cleared: the order of
  // non-negative floats is that of their bits, and NaN patterns lie above +inf, so a NaN
  // anywhere wins whatever the order of comparison (a float max would drop it, or not,
  // depending on its operand order).
  return absmax_finish(0, n, x);
}

void ref::qd8_f32_qc8w_gemm(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                            const float* a_scale, const int8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride) {
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      int32_t acc = 0;
      for (size_t k = 0; k < Kp; ++k)
        acc += int32_t(a[m * a_stride + k]) * int32_t(w[packed::qc8w_offset(Kp, n, k)]);
      float v = static_cast<float>(acc) * (a_scale[m] * w_scale[n]);
      if (bias) v = v + bias[n];
      y[m * y_stride + n] = v;
    }
  }
}

namespace {

// The stored nibble (q + 8) of weight (n, k).
int qb4w_nibble_at(const uint8_t* w, size_t Kp, size_t block, size_t n, size_t k) {
  const packed::NibbleAt at = packed::qb4w_at(Kp, block, n, k);
  return at.high ? (w[at.byte] >> 4) : (w[at.byte] & 0x0F);
}

}  // namespace

void ref::qd8_f32_qb4w_gemm(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                            size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                            size_t bsum_stride, const uint8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride) {
  const size_t nblocks = packed::qb4w_blocks(Kp, block);
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      float s = 0.0f;
      for (size_t b = 0; b < nblocks; ++b) {
        // Computed the way the SIMD kernels do -- unsigned nibbles times activations, minus
        // 8 x the activation sum -- which is the same integer as sum((nib - 8) * a).
        int32_t acc = 0;
        for (size_t kb = 0; kb < block; ++kb) {
          const size_t k = b * block + kb;
          acc += int32_t(a[m * a_stride + k]) * qb4w_nibble_at(w, Kp, block, n, k);
        }
        int32_t asum = 0;
        for (size_t c = 0; c < block / kKAlign; ++c)
          asum += a_bsum[m * bsum_stride + b * (block / kKAlign) + c];
        acc -= packed::kQB4WOffset * asum;
        const float ws = w_scale[packed::qb4w_scale_offset(Kp, block, n, b)];
        s = s + static_cast<float>(acc) * ws;
      }
      float v = s * a_scale[m];
      if (bias) v = v + bias[n];
      y[m * y_stride + n] = v;
    }
  }
}

namespace {

// fp32 GEMM, the canonical order (kernels.h): acc = fma(a[k], b[k], acc) for k = 0, 1, ..., K-1
// from acc = 0 in float, then + bias. The SIMD kernels vectorise across output columns and do
// exactly these operations per column, so every ISA returns the same bits.
}  // namespace

void ref::f32_gemm(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                   const float* b_packed, const float* bias, float* y, size_t y_stride) {
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (size_t k = 0; k < K; ++k) acc = std::fma(a[m * a_stride + k], b_packed[packed::f32_offset(K, n, k)], acc);
      if (bias) acc = acc + bias[n];
      y[m * y_stride + n] = acc;
    }
  }
}

namespace {

// The canonical reduction of kernels.h: 8 interleaved double partial sums over the whole
// blocks of 8 (lane j takes f(i) for i % 8 == j), combined as ((l0+l4) + (l2+l6)) +
// ((l1+l5) + (l3+l7)), then the tail added in order. `step(acc, i)` returns the new lane value.
template <typename Step>
double reduce8(size_t n, Step step) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t j = 0; j < 8; ++j) l[j] = step(l[j], i + j);
  double t[4];
  for (size_t j = 0; j < 4; ++j) t[j] = l[j] + l[j + 4];
  double s = (t[0] + t[2]) + (t[1] + t[3]);
  for (; i < n; ++i) s = step(s, i);
  return s;
}

}  // namespace

void ref::layernorm(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
                    const float* beta, float eps, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    const double mean = reduce8(D, [&](double s, size_t i) { return s + double(xr[i]); }) / double(D);
    const double var = reduce8(D, [&](double s, size_t i) {
      const double d = double(xr[i]) - mean;
      return std::fma(d, d, s);
    }) / double(D);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + double(eps)));
    // x - mean as (x - mean_hi) - mean_lo: exact near the mean (Sterbenz), so a row far from 0
    // still normalises to ~1 ulp.
    const float mhi = static_cast<float>(mean), mlo = static_cast<float>(mean - double(mhi));
    float* yr = y + r * y_stride;
    // y may alias x: each element is read before it is written.
    for (size_t i = 0; i < D; ++i) yr[i] = std::fma(((xr[i] - mhi) - mlo) * rstd, gamma[i], beta[i]);
  }
}

namespace {

// exp(x) for x <= 0 (softmax arguments), the canonical evaluation every ISA reproduces
// (kernels.h). x = n ln2 + r: n = round(x log2e) comes from one fma with a shifter M = 1.5 * 2^23
// + 127 (t's low mantissa bits are then n + 127, so t << 23 is the bit pattern of 2^n, and t - M
// is n exactly); r = x - n ln2 in one fma, |r| <= ln2/2. exp(r) = 1 + r P(r), P of degree 4: a
// relative minimax fit on |r| <= ln2/2 (8.4e-8), folded with the scaling as fma(r 2^n, P, 2^n),
// so that the leading 1 is never rounded on its own. x is clamped at -88 so that n >= -127;
// n = -127 makes 2^n = +0, so exp returns 0 below about -87.68 (and denormals a little above).
// One ln2 constant, not Cody-Waite's two: its error (1.9e-9) costs |n| 1.9e-9 relative, under
// 6e-8 for the x >= -20 that a softmax sum can see, and saves an FMA of 12 operations (6%
// measured). Measured on every float: relative error < 2.1e-7 for x >= -20, < 3.9e-7 down to -87.
float exp_canon(float x) {
  const float kShift = 12583039.0f;  // 1.5 * 2^23 + 127
  const float s = std::max(x, -88.0f);
  const float t = std::fma(s, 1.44269504088896341f, kShift);
  const float n = t - kShift;
  const float r = std::fma(-n, 0.693147182f, s);
  float p = 8.308717050e-3f;
  p = std::fma(p, r, 4.190130904e-2f);
  p = std::fma(p, r, 1.666731983e-1f);
  p = std::fma(p, r, 4.999911785e-1f);
  p = std::fma(p, r, 9.999998212e-1f);
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return std::fma(r * scale, p, scale);
}

// The canonical softmax sum (kernels.h), in float: e zero-padded to a multiple of 32; each
// block of 32 folded to 8 lanes, w[j] = (e[j] + e[j+8]) + (e[j+16] + e[j+24]); lane j
// accumulates w[j] over the blocks in order; the lanes are combined as ((l0+l4) + (l2+l6)) +
// ((l1+l5) + (l3+l7)). All terms are >= 0, so nothing cancels: the relative error is at most
// about (n/32 + 5) ulps, typically far less (PyTorch's CPU softmax sums in float too). A double
// sum cost a conversion and two adds per 8 elements, 5% of the whole kernel (measured).
float softmax_sum(size_t n, const float* e) {
  auto at = [&](size_t i) { return i < n ? e[i] : 0.0f; };
  float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t b = 0; b < n; b += 32)
    for (size_t j = 0; j < 8; ++j)
      l[j] += (at(b + j) + at(b + j + 8)) + (at(b + j + 16) + at(b + j + 24));
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// max of x * scale, computed as (max or min of x) * scale: rounding is monotonic, so this is
// the same value (up to the sign of a zero, which no exp argument below can see) for one
// multiply per row instead of one per element.
// NaN if any x is NaN (std::max would keep or drop a NaN depending on where it lies).
float scaled_max(size_t n, const float* x, float scale) {
  float m = scale < 0.0f ? INFINITY : -INFINITY;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return std::numeric_limits<float>::quiet_NaN();
    m = scale < 0.0f ? std::min(m, x[i]) : std::max(m, x[i]);
  }
  return m * scale;
}

}  // namespace

void ref::softmax(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    const float mx = scaled_max(n, xr, scale);
    // The product rounded first, as in PyTorch's (q k^T) * scale; then the difference is <= 0.
    for (size_t i = 0; i < n; ++i) xr[i] = exp_canon(xr[i] * scale - mx);
    const float inv = 1.0f / softmax_sum(n, xr);
    for (size_t i = 0; i < n; ++i) xr[i] *= inv;
  }
}

namespace {

// GELU as PyTorch defines it, x/2 (1 + erf(x/sqrt 2)), evaluated as fma(x, E, x/2) with
// E(x) = erf(x/sqrt 2)/2 = x P(x^2) / Q(x^2): Eigen's 9/12-degree rational erf (also XLA's;
// 2e-8 from erf on its range), its coefficients rescaled for the argument x/sqrt 2 and the
// factor 1/2 (powers of two exactly; 1/sqrt 2 into the numerator's). x is clamped at
// +-kGeluClamp, a float at which E evaluates to exactly 1/2 (found by search: around it the
// rounded E only touches 1/2, and it overshoots from 5.2176 on), and below which E never exceeds
// 1/2 (checked on every float); so GELU is x above it, 0 below its negative, and never has the
// wrong sign. (The true E(5.2175) is 1/2 - 9e-8.) Like PyTorch's, 1 + erf cancels in the left
// tail: the error is absolute there. Measured against a double erfc GELU on every float with
// 4e-31 <= |x| < 128: |error| < 2.1e-7 max(1, |x|), relative < 2.1e-7 for x >= 0.
constexpr float kGeluClamp = 5.21751785f;  // 0x1.4debdp+2
float gelu_canon(float x) {
  const float xc = std::min(std::max(x, -kGeluClamp), kGeluClamp);
  const float x2 = xc * xc;
  float p = 5.06135211e-6f;
  p = std::fma(p, x2, 1.50626613e-4f);
  p = std::fma(p, x2, 4.50388948e-3f);
  p = std::fma(p, x2, 3.27405147e-2f);
  p = std::fma(p, x2, 3.98942262e-1f);
  p = p * xc;
  float q = -1.84243798e-9f;
  q = std::fma(q, x2, 7.35873925e-7f);
  q = std::fma(q, x2, 6.36226614e-5f);
  q = std::fma(q, x2, 1.75880874e-3f);
  q = std::fma(q, x2, 2.77462620e-2f);
  q = std::fma(q, x2, 2.48734623e-1f);
  q = std::fma(q, x2, 1.0f);
  return std::fma(x, p / q, x * 0.5f);
}

}  // namespace

void ref::gelu(size_t n, float* x) {
  for (size_t i = 0; i < n; ++i) x[i] = gelu_canon(x[i]);
}

namespace {

// 2^y for y >= -126, the canonical exp2 of softmax_q8 (kernels.h): y = n + f, n = nearbyint(y),
// |f| <= 1/2, degree-4 polynomial in f, 2^n built in the exponent field.
float exp2_q8(float y) {
  const float n = std::nearbyint(y);
  const float f = y - n;
  float p = std::fma(0.009582852944731712f, f, 0.05590642988681793f);
  p = std::fma(p, f, 0.24024099111557007f);
  p = std::fma(p, f, 0.6931241750717163f);
  p = std::fma(p, f, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float e;
  std::memcpy(&e, &bits, sizeof e);
  return p * e;
}

// One quantised probability: y = max((x - max) * log2 e, -126), q = min(nearbyint(2^y * 127), 127).
int32_t softmax_q8_elem(float x, float mx) {
  const float y = std::max((x - mx) * 1.44269504088896341f, -126.0f);
  const float v = exp2_q8(y) * 127.0f;
  return static_cast<int32_t>(std::min(std::nearbyint(v), 127.0f));
}

}  // namespace

void ref::softmax_q8(size_t rows, size_t n, size_t Kp, const float* x, size_t x_stride, int8_t* q,
                     size_t q_stride, float* scale) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    const float mx = scaled_max(n, xr, 1.0f);  // exact: max * 1
    if (!std::isfinite(mx)) {
      softmax_q8_poison_row(Kp, qr, scale + r);
      continue;
    }
    int32_t sum = 0;
    for (size_t i = 0; i < n; ++i) {
      const int32_t e = softmax_q8_elem(xr[i], mx);
      qr[i] = static_cast<int8_t>(e);
      sum += e;
    }
    std::memset(qr + n, 0, Kp - n);
    scale[r] = 1.0f / static_cast<float>(sum);
  }
}

void ref::add(size_t n, const float* a, const float* b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

void ref::scale_add(size_t n, const float* x, float scale, const float* b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = x[i] * scale + b[i];
}

namespace {

// The canonical sigmoid (kernels.h): exp of -|z| only, so the softmax's exp_canon (made for
// arguments <= 0) serves, nothing overflows, and the left tail is e / (1 + e) rather than
// 1 - something. One division. A NaN z gives a NaN e, so a NaN result; z >= 0 is false for NaN.
float sigmoid_canon(float z) {
  const float e = exp_canon(-std::fabs(z));
  return (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

}  // namespace

void ref::swiglu(size_t rows, size_t n, const float* g, size_t g_stride, const float* u,
                 size_t u_stride, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* gr = g + r * g_stride;
    const float* ur = u + r * u_stride;
    float* yr = y + r * y_stride;
    for (size_t i = 0; i < n; ++i) yr[i] = (gr[i] * sigmoid_canon(gr[i])) * ur[i];
  }
}

void ref::quick_gelu(size_t n, float* x) {
  for (size_t i = 0; i < n; ++i) x[i] = x[i] * sigmoid_canon(1.702f * x[i]);
}

void ref::rope(size_t rows, size_t heads, size_t hd, RopeForm form, float* x, size_t x_stride,
               const float* sin, const float* cos, size_t tab_stride, size_t tab_head_stride) {
  // Pair (i, j) of a head: y[i] = x[i] c[i] - x[j] s[i], y[j] = x[j] c[j] + x[i] s[j].
  const size_t half = hd / 2;
  for (size_t r = 0; r < rows; ++r)
    for (size_t h = 0; h < heads; ++h) {
      float* xh = x + r * x_stride + h * hd;
      const float* s = sin + r * tab_stride + h * tab_head_stride;
      const float* c = cos + r * tab_stride + h * tab_head_stride;
      for (size_t p = 0; p < half; ++p) {
        const size_t i = form == RopeForm::kInterleaved ? 2 * p : p;
        const size_t j = form == RopeForm::kInterleaved ? 2 * p + 1 : p + half;
        const float xi = xh[i], xj = xh[j];
        xh[i] = xi * c[i] - xj * s[i];
        xh[j] = xj * c[j] + xi * s[j];
      }
    }
}

}  // namespace pyrt
