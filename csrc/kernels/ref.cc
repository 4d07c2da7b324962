// Scalar reference kernels: the oracle every SIMD kernel is tested against. Written for
// clarity, not speed; always built, on every target.
#include <algorithm>
#include <cmath>
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

void f32_gemm_ref(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                  const float* b_packed, const float* bias, float* y, size_t y_stride) {
  for (size_t m = 0; m < M; ++m) {
    for (size_t n = 0; n < N; ++n) {
      const float* bp = b_packed + (n / kNR) * K * kNR + n % kNR;
      double acc = 0.0;  // the oracle accumulates in double
      for (size_t k = 0; k < K; ++k) acc += double(a[m * a_stride + k]) * double(bp[k * kNR]);
      if (bias) acc += bias[n];
      y[m * y_stride + n] = static_cast<float>(acc);
    }
  }
}

void layernorm_ref(size_t rows, size_t D, const float* x, size_t x_stride, const float* gamma,
                   const float* beta, float eps, float* y, size_t y_stride) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    double mean = 0.0, var = 0.0;
    for (size_t i = 0; i < D; ++i) mean += xr[i];
    mean /= double(D);
    for (size_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= double(D);
    const double rstd = 1.0 / std::sqrt(var + eps);
    float* yr = y + r * y_stride;
    for (size_t i = 0; i < D; ++i)
      yr[i] = static_cast<float>((xr[i] - mean) * rstd * gamma[i] + beta[i]);
  }
}

void softmax_ref(size_t rows, size_t n, float scale, float* x, size_t x_stride) {
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    float mx = -INFINITY;
    for (size_t i = 0; i < n; ++i) mx = std::max(mx, xr[i] * scale);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) {
      xr[i] = std::exp(xr[i] * scale - mx);
      sum += xr[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (size_t i = 0; i < n; ++i) xr[i] *= inv;
  }
}

void gelu_ref(size_t n, float* x) {
  for (size_t i = 0; i < n; ++i)
    x[i] = static_cast<float>(0.5 * x[i] * (1.0 + std::erf(x[i] * 0.70710678118654752440)));
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
