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
#include <vector>

#include "kernels.h"

namespace pyrt {
namespace {

void quantize_rows_ref(size_t rows, size_t K, size_t Kp, const float* x, size_t x_stride,
                       const float* inv_scale, int qmax, int8_t* q, size_t q_stride,
                       int32_t* bsum, size_t bsum_stride) {
  const float lo = -static_cast<float>(qmax), hi = static_cast<float>(qmax);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    int8_t* qr = q + r * q_stride;
    for (size_t k = 0; k < K; ++k) {
      const float v = std::min(std::max(xr[k] * inv_scale[r], lo), hi);
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

float absmax_ref(size_t n, const float* x) {
  float m = 0.0f;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

int8_t qc8w_at(const int8_t* w, size_t Kp, size_t n, size_t k) {
  const size_t p = n / kNR, c = n % kNR, g = k / kKGroup, j = k % kKGroup;
  return w[p * Kp * kNR + g * kNR * kKGroup + c * kKGroup + j];
}

void qd8_f32_qc8w_gemm_ref(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                           const float* a_scale, const int8_t* w, const float* w_scale,
                           const float* bias, float* y, size_t y_stride) {
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      int32_t acc = 0;
      for (size_t k = 0; k < Kp; ++k)
        acc += int32_t(a[m * a_stride + k]) * int32_t(qc8w_at(w, Kp, n, k));
      float v = static_cast<float>(acc) * (a_scale[m] * w_scale[n]);
      if (bias) v = v + bias[n];
      y[m * y_stride + n] = v;
    }
  }
}

// The stored nibble (q + 8) of weight (n, k).
int qb4w_nibble_at(const uint8_t* w, size_t Kp, size_t block, size_t n, size_t k) {
  const size_t p = n / kNR, c = n % kNR, b = k / block, kb = k % block;
  const size_t gp = kb / 8, hi = (kb % 8) / 4, j = kb % 4;
  const uint8_t byte = w[p * Kp * 8 + b * block * 8 + gp * 64 + c * 4 + j];
  return hi ? (byte >> 4) : (byte & 0x0F);
}

void qd8_f32_qb4w_gemm_ref(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                           size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                           size_t bsum_stride, const uint8_t* w, const float* w_scale,
                           const float* bias, float* y, size_t y_stride) {
  const size_t nblocks = Kp / block;
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
        acc -= 8 * asum;
        const float ws = w_scale[(n / kNR) * nblocks * kNR + b * kNR + n % kNR];
        s = s + static_cast<float>(acc) * ws;
      }
      float v = s * a_scale[m];
      if (bias) v = v + bias[n];
      y[m * y_stride + n] = v;
    }
  }
}

// fp32 GEMM, the canonical order (kernels.h): acc = fma(a[k], b[k], acc) for k = 0, 1, ..., K-1
// from acc = 0 in float, then + bias. The SIMD kernels vectorise across output columns and do
// exactly these operations per column, so every ISA returns the same bits.
void f32_gemm_ref(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                  const float* b_packed, const float* bias, float* y, size_t y_stride) {
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      const float* bp = b_packed + (n / kNR) * K * kNR + n % kNR;
      float acc = 0.0f;
      for (size_t k = 0; k < K; ++k) acc = std::fma(a[m * a_stride + k], bp[k * kNR], acc);
      if (bias) acc = acc + bias[n];
      y[m * y_stride + n] = acc;
    }
  }
}

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

void layernorm_ref(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
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

// exp(x + xlo) for x + xlo <= 88, the canonical polynomial every ISA evaluates (kernels.h):
// Cephes expf, x = n ln2 + r with |r| <= ln2/2 (two-constant Cody-Waite, xlo added after the
// reduction so that it is not lost to rounding), degree-5 polynomial; about 1 ulp. Sums below
// -87.3365 (results under FLT_MIN) return 0.
float exp_canon(float x, float xlo) {
  const float lo = -87.33654475f;
  const float s = x + xlo;
  const float sc = std::max(std::min(s, 88.0f), lo);
  const float n = std::nearbyint(sc * 1.44269504088896341f);
  float r = std::fma(-n, 0.693359375f, x);
  r = std::fma(-n, -2.12194440e-4f, r);
  r = r + xlo;
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float e;
  std::memcpy(&e, &bits, sizeof e);
  return s < lo ? 0.0f : p * e;
}

void softmax_ref(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    float mx = -INFINITY;
    for (size_t i = 0; i < n; ++i) mx = std::max(mx, xr[i] * scale);
    for (size_t i = 0; i < n; ++i) xr[i] = exp_canon(xr[i] * scale - mx, 0.0f);
    const double sum = reduce8(n, [&](double s, size_t i) { return s + double(xr[i]); });
    const float inv = static_cast<float>(1.0 / sum);
    for (size_t i = 0; i < n; ++i) xr[i] *= inv;
  }
}

// GELU as x * Phi(x) with Phi from erfc: Phi(x) = erfc(|x|/sqrt 2) / 2 for x < 0 (sign bit set)
// and 1 - erfc(|x|/sqrt 2) / 2 otherwise, so that neither side cancels. erfc(z) = t exp(-z^2 +
// P(t)), t = 1 / (1 + z/2): the Chebyshev fit of Numerical Recipes' erfcc, relative error
// < 1.2e-7 for all z >= 0. -z^2 = -(x*x)/2 is passed as hi + lo (x*x and its exact rounding
// error) so that the exponent, up to ~-87, carries no rounding error into the result. Measured
// against a double erfc: relative error < 5e-7 over the whole range, the negative tail included.
float gelu_canon(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / std::fma(z, 0.5f, 1.0f);
  float p = 0.17087277f;
  p = std::fma(p, t, -0.82215223f);
  p = std::fma(p, t, 1.48851587f);
  p = std::fma(p, t, -1.13520398f);
  p = std::fma(p, t, 0.27886807f);
  p = std::fma(p, t, -0.18628806f);
  p = std::fma(p, t, 0.09678418f);
  p = std::fma(p, t, 0.37409196f);
  p = std::fma(p, t, 1.00002368f);
  p = std::fma(p, t, -1.26551223f);
  const float hi = x * x;
  const float lo = std::fma(x, x, -hi);
  const float erfc = t * exp_canon(hi * -0.5f, std::fma(-lo, 0.5f, p));
  const float tail = erfc * 0.5f;  // Phi(-|x|)
  const float phi = std::signbit(x) ? tail : 1.0f - tail;
  return x * phi;
}

void gelu_ref(size_t n, float* x) {
  for (size_t i = 0; i < n; ++i) x[i] = gelu_canon(x[i]);
}

void add_ref(size_t n, const float* a, const float* b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

}  // namespace

const KernelTable* ref_kernels() {
  static const KernelTable t = [] {
    KernelTable k;
    k.name = "ref";
    k.quantize_rows = quantize_rows_ref;
    k.absmax = absmax_ref;
    k.qd8_f32_qc8w_gemm = qd8_f32_qc8w_gemm_ref;
    k.qd8_f32_qb4w_gemm = qd8_f32_qb4w_gemm_ref;
    k.f32_gemm = f32_gemm_ref;
    k.layernorm = layernorm_ref;
    k.softmax = softmax_ref;
    k.gelu = gelu_ref;
    k.add = add_ref;
    return k;
  }();
  return &t;
}

}  // namespace pyrt
