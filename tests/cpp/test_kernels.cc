// Every kernel table this CPU supports, against the scalar reference.
//
// Every kernel must be bit-identical to ref (the exactness contract in kernels.h): the integer
// GEMMs and the activation quantiser, and the float kernels too (fp32 GEMM, LayerNorm, softmax,
// GELU, add), which feed the quantisers. ref's float kernels are in turn checked for accuracy
// against double-precision formulas here, with tolerances. Buffers are allocated at their exact logical size so that an overrun
// trips AddressSanitizer in the sanitizer build.
//
// Environment:
//   PYRUNTIME_EXPECT_ISAS  comma-separated list the CPU must report exactly (emulated CPUs
//                          check dispatch this way: cortex-a57 has no dotprod).
//   PYRUNTIME_TEST_QUICK=1 skip the two largest ViT shapes (for slow emulation).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/isas.h"
#include "kernels/kernels.h"
#include "kernels/packed_layout.h"
#include "ops/ops.h"
#include "ops/threadpool.h"

using namespace pyrt;

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

std::string shape(const char* isa, const char* op, size_t M, size_t N, size_t K, const char* extra = "") {
  std::ostringstream s;
  s << isa << " " << op << " M=" << M << " N=" << N << " K=" << K << extra;
  return s.str();
}

struct Rng {
  std::mt19937 gen;
  explicit Rng(unsigned seed) : gen(seed) {}
  int i(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
  float f(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
};

enum class Fill { kRandom, kMax, kMin, kAlternate };

// int8 activations in [-127, 127] (never -128: the quantiser's contract) padded to Kp.
std::vector<int8_t> make_acts(Rng& r, size_t M, size_t K, size_t Kp, Fill fill) {
  std::vector<int8_t> a(M * Kp, 0);
  for (size_t m = 0; m < M; ++m)
    for (size_t k = 0; k < K; ++k) {
      int v = r.i(-127, 127);
      if (fill == Fill::kMax) v = 127;
      if (fill == Fill::kMin) v = -127;
      if (fill == Fill::kAlternate) v = ((m + k) % 2) ? 127 : -127;
      a[m * Kp + k] = int8_t(v);
    }
  return a;
}

std::vector<int32_t> block_sums(const std::vector<int8_t>& a, size_t M, size_t Kp) {
  std::vector<int32_t> s(M * (Kp / kKAlign), 0);
  for (size_t m = 0; m < M; ++m)
    for (size_t k = 0; k < Kp; ++k) s[m * (Kp / kKAlign) + k / kKAlign] += a[m * Kp + k];
  return s;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

bool close(const std::vector<float>& got, const std::vector<float>& want, double rtol, double atol) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - want[i]);
    if (!(d <= atol + rtol * std::fabs(double(want[i])))) return false;
  }
  return true;
}

// Exact GELU, x/2 erfc(-x/sqrt 2): accurate in both tails.
double gelu_exact(float x) { return 0.5 * double(x) * std::erfc(-double(x) * 0.70710678118654752440); }

// The GELU tolerance: |error| <= 2.5e-7 max(1, |x|), and relative 2.5e-7 for x >= 0 (ref's
// canonical GELU measures 2.05e-7 for both, on every float). Absolute in the left tail,
// where 1 + erf cancels (PyTorch's formula, and PyTorch's own error there is 1.1e-6).
bool gelu_close(const std::vector<float>& x, const std::vector<float>& got, const std::vector<double>& want) {
  for (size_t i = 0; i < x.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    if (!(err <= 2.5e-7 * std::max(1.0, std::fabs(double(x[i]))))) return false;
    if (x[i] >= 0 && !(err <= 2.5e-7 * want[i])) return false;
  }
  return true;
}

std::vector<float> scales_for(Rng& r, size_t n, bool with_zeros) {
  std::vector<float> s(n);
  for (size_t i = 0; i < n; ++i) s[i] = (with_zeros && i % 5 == 3) ? 0.0f : r.f(1e-4f, 0.05f);
  return s;
}

void test_qc8w(const KernelTable& kt, size_t M, size_t N, size_t K, Fill fill, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  std::vector<int8_t> wq(N * K);
  for (size_t i = 0; i < wq.size(); ++i) {
    int v = r.i(-128, 127);
    if (fill != Fill::kRandom) v = (i % 3 == 0) ? 127 : -128;
    wq[i] = int8_t(v);
  }
  std::vector<float> ws = scales_for(r, N, true);
  QuantizedWeights w = pack_qc8w(wq.data(), ws.data(), N, K);
  auto a = make_acts(r, M, K, w.Kp, fill);
  std::vector<float> as = scales_for(r, M, true), bias(N);
  for (auto& b : bias) b = r.f(-1, 1);
  for (int with_bias = 0; with_bias < 2; ++with_bias) {
    std::vector<float> y(M * N), y_ref(M * N);
    const float* b = with_bias ? bias.data() : nullptr;
    kt.qd8_f32_qc8w_gemm(M, N, w.Kp, a.data(), w.Kp, as.data(), w.q8.data(), w.scales.data(), b, y.data(), N);
    ref.qd8_f32_qc8w_gemm(M, N, w.Kp, a.data(), w.Kp, as.data(), w.q8.data(), w.scales.data(), b, y_ref.data(), N);
    report(same_bits(y, y_ref), shape(kt.name, "qc8w", M, N, K, with_bias ? " bias" : ""));
  }
}

void test_qb4w(const KernelTable& kt, size_t M, size_t N, size_t K, size_t block, Fill fill, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  std::vector<int8_t> wq(N * K);
  for (size_t i = 0; i < wq.size(); ++i) wq[i] = int8_t(fill == Fill::kRandom ? r.i(-8, 7) : (i % 2 ? 7 : -8));
  const size_t nb = (K + block - 1) / block;
  std::vector<float> ws = scales_for(r, N * nb, true);
  QuantizedWeights w = pack_qb4w(wq.data(), ws.data(), N, K, block);
  auto a = make_acts(r, M, K, w.Kp, fill);
  auto bs = block_sums(a, M, w.Kp);
  std::vector<float> as = scales_for(r, M, true), bias(N);
  for (auto& b : bias) b = r.f(-1, 1);
  std::vector<float> y(M * N), y_ref(M * N);
  const size_t bstride = w.Kp / kKAlign;
  kt.qd8_f32_qb4w_gemm(M, N, w.Kp, block, a.data(), w.Kp, as.data(), bs.data(), bstride, w.q4.data(),
                       w.scales.data(), bias.data(), y.data(), N);
  ref.qd8_f32_qb4w_gemm(M, N, w.Kp, block, a.data(), w.Kp, as.data(), bs.data(), bstride, w.q4.data(),
                        w.scales.data(), bias.data(), y_ref.data(), N);
  report(same_bits(y, y_ref), shape(kt.name, "qb4w", M, N, K, block == 32 ? "" : " block=64"));
}

void test_f32_gemm(const KernelTable& kt, size_t M, size_t N, size_t K, unsigned seed) {
  Rng r(seed);
  std::vector<float> a(M * K), b(K * N), bias(N);
  for (auto& v : a) v = r.f(-1, 1);
  for (auto& v : b) v = r.f(-1, 1);
  for (auto& v : bias) v = r.f(-1, 1);
  std::vector<float> bp(packed::f32_floats(N, K));
  pack_f32_b(b.data(), K, N, N, false, bp.data());
  for (int with_bias = 0; with_bias < 2; ++with_bias) {
    const float* bb = with_bias ? bias.data() : nullptr;
    std::vector<float> y(M * N), y_ref(M * N);
    kt.f32_gemm(M, N, K, a.data(), K, bp.data(), bb, y.data(), N);
    ref_kernels()->f32_gemm(M, N, K, a.data(), K, bp.data(), bb, y_ref.data(), N);
    report(same_bits(y, y_ref), shape(kt.name, "f32_gemm", M, N, K, with_bias ? " bias" : ""));
    if (std::string(kt.name) != "ref") continue;
    // ref's float accumulation against double: |sum| can cancel to ~0 while terms are O(1), so
    // bound by K * eps * magnitude of the terms.
    std::vector<float> y_dbl(M * N);
    for (size_t m = 0; m < M; ++m)
      for (size_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (size_t k = 0; k < K; ++k) s += double(a[m * K + k]) * double(b[k * N + n]);
        y_dbl[m * N + n] = float(s + (bb ? bb[n] : 0.0));
      }
    const double atol = 4.0 * std::sqrt(double(K) + 1) * 1.2e-7 * 4;
    report(close(y_ref, y_dbl, 1e-5, atol), shape("ref", "f32_gemm accuracy", M, N, K));
  }
}

void test_quantize_rows(const KernelTable& kt, size_t M, size_t K, int bits, unsigned seed) {
  Rng r(seed);
  const size_t Kp = round_up(K, kKAlign);
  std::vector<float> x(M * K), inv(M);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = r.f(-3, 3);
    if (i % 7 == 0) x[i] = float(int(x[i] * 4)) / 4 + 0.5f;  // exact ties: round half to even
    if (i % 11 == 0) x[i] = (i % 2 ? 1e30f : -1e30f);        // clamps
  }
  for (auto& s : inv) s = r.f(1, 60);
  if (M > 2) inv[1] = 0.0f;  // a zero scale
  const int qmax = (1 << (bits - 1)) - 1;
  std::vector<int8_t> q(M * Kp, 1), q_ref(M * Kp, 2);
  std::vector<int32_t> bs(M * (Kp / kKAlign), 3), bs_ref(M * (Kp / kKAlign), 4);
  kt.quantize_rows(M, K, Kp, x.data(), K, inv.data(), qmax, q.data(), Kp, bs.data(), Kp / kKAlign);
  ref_kernels()->quantize_rows(M, K, Kp, x.data(), K, inv.data(), qmax, q_ref.data(), Kp, bs_ref.data(), Kp / kKAlign);
  report(q == q_ref && bs == bs_ref, shape(kt.name, "quantize_rows", M, 0, K, (" bits=" + std::to_string(bits)).c_str()));
  float am = kt.absmax(x.size(), x.data()), am_ref = ref_kernels()->absmax(x.size(), x.data());
  report(am == am_ref, shape(kt.name, "absmax", M, 0, K));
}

// Float element-wise kernels: bit-identical to ref on `rows` rows of n values drawn from
// [lo, hi] plus an offset (LayerNorm's residual streams can sit far from 0). Softmax runs at
// three scales: the larger one pushes exp arguments below its underflow cut (-87.7), the
// negative one takes the row minimum path of the max.
void test_elementwise(const KernelTable& kt, size_t rows, size_t n, float lo, float hi,
                      float offset, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  std::vector<float> x(rows * n), g(n), b(n);
  for (auto& v : x) v = r.f(lo, hi) + offset;
  for (auto& v : g) v = r.f(0.5f, 1.5f);
  for (auto& v : b) v = r.f(-0.5f, 0.5f);
  if (x.size() > 3) x[1] = -0.0f, x[2] = 0.0f;
  char extra[64];
  std::snprintf(extra, sizeof extra, " range [%g, %g] + %g", lo, hi, offset);
  std::vector<float> y(x.size()), y_ref(x.size());
  kt.layernorm(rows, n, x.data(), n, g.data(), b.data(), 1e-6f, y.data(), n);
  ref.layernorm(rows, n, x.data(), n, g.data(), b.data(), 1e-6f, y_ref.data(), n);
  report(same_bits(y, y_ref), shape(kt.name, "layernorm", rows, n, 0, extra));
  y = x;  // in place (y aliases x), as the executor's final norm runs
  kt.layernorm(rows, n, y.data(), n, g.data(), b.data(), 1e-6f, y.data(), n);
  report(same_bits(y, y_ref), shape(kt.name, "layernorm in place", rows, n, 0, extra));
  for (float scale : {0.125f, 40.0f, -0.5f}) {
    y = x;
    y_ref = x;
    kt.softmax(rows, n, scale, y.data(), n);
    ref.softmax(rows, n, scale, y_ref.data(), n);
    report(same_bits(y, y_ref), shape(kt.name, "softmax", rows, n, 0, (std::string(extra) + " scale " + std::to_string(scale)).c_str()));
  }
  y = x;
  y_ref = x;
  kt.gelu(y.size(), y.data());
  ref.gelu(y_ref.size(), y_ref.data());
  report(same_bits(y, y_ref), shape(kt.name, "gelu", rows, n, 0, extra));
  kt.add(x.size(), x.data(), y_ref.data(), y.data());
  ref.add(x.size(), x.data(), y_ref.data(), y_ref.data());
  report(same_bits(y, y_ref), shape(kt.name, "add", rows, n, 0));
}

// ref's float element-wise kernels against double-precision formulas (run once: the SIMD
// kernels equal ref bit for bit, checked above).
void test_float_accuracy(size_t rows, size_t n, float lo, float hi, float offset, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  std::vector<float> x(rows * n), g(n), b(n);
  for (auto& v : x) v = r.f(lo, hi) + offset;
  for (auto& v : g) v = r.f(0.5f, 1.5f);
  for (auto& v : b) v = r.f(-0.5f, 0.5f);
  char extra[64];
  std::snprintf(extra, sizeof extra, " range [%g, %g] + %g", lo, hi, offset);
  std::vector<float> y(x.size()), want(x.size());
  ref.layernorm(rows, n, x.data(), n, g.data(), b.data(), 1e-6f, y.data(), n);
  for (size_t i = 0; i < rows; ++i) {
    const float* xr = x.data() + i * n;
    double mean = 0, var = 0;
    for (size_t j = 0; j < n; ++j) mean += xr[j];
    mean /= double(n);
    for (size_t j = 0; j < n; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / double(n) + 1e-6);
    for (size_t j = 0; j < n; ++j) want[i * n + j] = float((xr[j] - mean) * rstd * g[j] + b[j]);
  }
  report(close(y, want, 1e-5, 1e-5), shape("ref", "layernorm accuracy", rows, n, 0, extra));
  // Softmax against double (from the same float products x * scale), relative 1e-6 +
  // 6e-8 |a| for an element whose exp argument is a = x * scale - max: exp_canon is within 4e-7
  // (2.1e-7 for a >= -20), the float sum, 1/sum and the product add a few ulps, and rounding a
  // to float (as PyTorch's x - max does) costs up to half its ulp, 2^-24 |a|. The absolute
  // 1e-30 only covers exp's cut to 0 below -87.7 (scale 40).
  std::vector<double> exact(x.size());
  for (float scale : {0.125f, 40.0f, -0.5f}) {
    y = x;
    ref.softmax(rows, n, scale, y.data(), n);
    bool ok = true;
    for (size_t i = 0; i < rows; ++i) {
      const float* xr = x.data() + i * n;
      double mx = -INFINITY, sum = 0;
      for (size_t j = 0; j < n; ++j) mx = std::max(mx, double(xr[j] * scale));
      for (size_t j = 0; j < n; ++j) sum += std::exp(double(xr[j] * scale) - mx);
      for (size_t j = 0; j < n; ++j) {
        const double a = double(xr[j] * scale) - mx, p = std::exp(a) / sum;
        const double err = std::fabs(double(y[i * n + j]) - p);
        ok = ok && err <= p * (1e-6 + 6e-8 * std::fabs(a)) + 1e-30;
      }
    }
    report(ok, shape("ref", "softmax accuracy", rows, n, 0, (std::string(extra) + " scale " + std::to_string(scale)).c_str()));
  }
  y = x;
  ref.gelu(y.size(), y.data());
  for (size_t i = 0; i < x.size(); ++i) exact[i] = gelu_exact(x[i]);
  report(gelu_close(x, y, exact), shape("ref", "gelu accuracy", rows, n, 0, extra));
}

// GELU on a dense grid of [-12, 12] (step 2^-13) and a geometric one of tiny |x| (from 1e-38),
// with the tolerance of gelu_close, and its shape at the clamp: x itself from 5.2176 on, 0 from
// -5.2176 down, never a wrong sign, never above x. Any coefficient off in its fourth digit fails.
void test_gelu_dense() {
  const KernelTable& ref = *ref_kernels();
  std::vector<float> x;
  for (int k = -12 * 8192; k <= 12 * 8192; ++k) x.push_back(float(k) / 8192.0f);
  for (float v = 1e-38f; v < 1.0f / 4096; v *= 1.001f) x.push_back(v), x.push_back(-v);
  for (float v : {5.2176f, 5.5f, 6.0f, 100.0f, 3e4f, 1e30f}) x.push_back(v), x.push_back(-v);
  std::vector<float> y = x;
  ref.gelu(y.size(), y.data());
  std::vector<double> exact(x.size());
  for (size_t i = 0; i < x.size(); ++i) exact[i] = gelu_exact(x[i]);
  report(gelu_close(x, y, exact), "ref gelu accuracy, dense grid of [-12, 12]");
  bool shape_ok = true;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] >= 5.2176f) shape_ok = shape_ok && y[i] == x[i];
    if (x[i] <= -5.2176f) shape_ok = shape_ok && y[i] == 0.0f;
    shape_ok = shape_ok && (x[i] < 0 ? y[i] <= 0 : y[i] >= 0 && y[i] <= x[i]);
  }
  report(shape_ok, "ref gelu: x above 5.2176, 0 below -5.2176, sign and GELU(x) <= x");
}

// softmax_q8 (int8 attention): every table bit-identical to ref (q and scales), and ref
// against double exp: q within 0.5 + 1e-3 of 127 exp(x - max) (the polynomial's error is
// < 4e-4 of a step), the row maximum 127, padding zero, scale 1/sum q. Scores spread over
// `range` push the exponent below -126 (all-zero q) when wide.
void test_softmax_q8(const KernelTable& kt, size_t rows, size_t n, float range, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const size_t Kp = round_up(n, kKAlign) + kKAlign, stride = n + 3;
  std::vector<float> x(rows * stride);
  for (auto& v : x) v = r.f(-range, range);
  if (n > 2) x[1] = x[0];  // ties at the maximum
  std::vector<int8_t> q(rows * Kp, 99), q_ref(rows * Kp, 99);
  std::vector<float> s(rows), s_ref(rows);
  kt.softmax_q8(rows, n, Kp, x.data(), stride, q.data(), Kp, s.data());
  ref.softmax_q8(rows, n, Kp, x.data(), stride, q_ref.data(), Kp, s_ref.data());
  char extra[48];
  std::snprintf(extra, sizeof extra, " range +-%g", range);
  report(q == q_ref && same_bits(s, s_ref), shape(kt.name, "softmax_q8", rows, n, Kp, extra));
  if (&kt != &ref) return;
  bool ok = true;
  for (size_t i = 0; i < rows; ++i) {
    const float* xr = x.data() + i * stride;
    const int8_t* qr = q_ref.data() + i * Kp;
    const float mx = *std::max_element(xr, xr + n);
    int sum = 0, top = 0;
    for (size_t j = 0; j < n; ++j) {
      const double want = 127.0 * std::exp(double(xr[j]) - double(mx));
      ok = ok && qr[j] >= 0 && std::fabs(qr[j] - want) <= 0.501;
      sum += qr[j];
      top = std::max<int>(top, qr[j]);
    }
    for (size_t j = n; j < Kp; ++j) ok = ok && qr[j] == 0;
    ok = ok && top == 127 && s_ref[i] == 1.0f / float(sum);
  }
  report(ok, shape("ref", "softmax_q8 accuracy", rows, n, Kp, extra));
}

// Non-finite input (kernels.h's NaN rules): every ISA must put NaN at the same places as ref and
// equal it bit for bit everywhere else. `special` goes into row 1 (of 3) at position `at`; rows
// 0 and 2 stay finite and must be untouched by it.
float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// NaN exactly where `want` has NaN, the same bits everywhere else.
bool same_nan_pattern(const float* got, const float* want, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return false;
    if (!std::isnan(want[i]) && to_bits(got[i]) != to_bits(want[i])) return false;
  }
  return true;
}
bool all_nan(const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isnan(x[i])) return false;
  return true;
}

void test_nonfinite(const KernelTable& kt, size_t n, float special, size_t at, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const size_t rows = 3;
  const bool nan = std::isnan(special);
  std::vector<float> x(rows * n), g(n), b(n);
  for (auto& v : x) v = r.f(-4, 4);
  for (auto& v : g) v = r.f(0.5f, 1.5f);
  for (auto& v : b) v = r.f(-0.5f, 0.5f);
  x[n + at] = special;
  char extra[80];
  std::snprintf(extra, sizeof extra, " special 0x%08x at %zu", to_bits(special), at);
  auto what = [&](const char* op) { return shape(kt.name, op, rows, n, 0, extra); };

  // absmax: the canonical quiet NaN for any NaN, +inf for an infinity.
  const float am = kt.absmax(rows * n, x.data());
  const uint32_t want_am = nan ? 0x7FC00000u : std::isinf(special) ? 0x7F800000u : to_bits(ref.absmax(rows * n, x.data()));
  report(to_bits(am) == want_am && to_bits(ref.absmax(rows * n, x.data())) == want_am, what("absmax"));

  // gelu: NaN in, NaN out at that element only; +inf -> +inf.
  std::vector<float> y = x, y_ref = x;
  kt.gelu(y.size(), y.data());
  ref.gelu(y_ref.size(), y_ref.data());
  bool ok = same_nan_pattern(y.data(), y_ref.data(), y.size());
  if (nan) ok = ok && std::isnan(y[n + at]);
  if (special == INFINITY) ok = ok && y[n + at] == INFINITY;
  report(ok, what("gelu"));

  // softmax, layernorm: the special row's outputs all depend on the special element: a NaN
  // makes the whole row NaN (so does an infinity: inf - inf or inf / inf inside). Other rows
  // are as without it.
  for (float scale : {0.125f, -0.5f}) {
    y = x;
    y_ref = x;
    kt.softmax(rows, n, scale, y.data(), n);
    ref.softmax(rows, n, scale, y_ref.data(), n);
    ok = same_nan_pattern(y.data(), y_ref.data(), y.size()) && !std::isnan(y[0]) && !std::isnan(y[2 * n]);
    if (nan) ok = ok && all_nan(y.data() + n, n);
    report(ok, what(scale > 0 ? "softmax" : "softmax scale < 0"));
  }
  kt.layernorm(rows, n, x.data(), n, g.data(), b.data(), 1e-6f, y.data(), n);
  ref.layernorm(rows, n, x.data(), n, g.data(), b.data(), 1e-6f, y_ref.data(), n);
  ok = same_nan_pattern(y.data(), y_ref.data(), y.size()) && !std::isnan(y[0]) && !std::isnan(y[2 * n]);
  if (nan) ok = ok && all_nan(y.data() + n, n);
  report(ok, what("layernorm"));

  // softmax_q8: a row whose max is not finite gets q = 0 and a NaN scale (kernels.h).
  const size_t Kp = round_up(n, kKAlign);
  std::vector<int8_t> q(rows * Kp, 99), q_ref(rows * Kp, 99);
  std::vector<float> s(rows), s_ref(rows);
  kt.softmax_q8(rows, n, Kp, x.data(), n, q.data(), Kp, s.data());
  ref.softmax_q8(rows, n, Kp, x.data(), n, q_ref.data(), Kp, s_ref.data());
  ok = q == q_ref && same_nan_pattern(s.data(), s_ref.data(), rows) && !std::isnan(s[0]) && !std::isnan(s[2]);
  if (nan || special == INFINITY) {
    ok = ok && std::isnan(s[1]);
    for (size_t i = 0; i < Kp; ++i) ok = ok && q[Kp + i] == 0;
  }
  report(ok, what("softmax_q8"));

  // quantize_rows: deterministic on every ISA (a NaN quantises to -qmax), bsum consistent.
  const size_t qKp = round_up(n, kKAlign);
  std::vector<int8_t> qq(rows * qKp), qq_ref(rows * qKp);
  std::vector<int32_t> bs(rows * qKp / kKAlign), bs_ref(bs.size());
  const std::vector<float> inv(rows, 20.0f);
  kt.quantize_rows(rows, n, qKp, x.data(), n, inv.data(), 127, qq.data(), qKp, bs.data(), qKp / kKAlign);
  ref.quantize_rows(rows, n, qKp, x.data(), n, inv.data(), 127, qq_ref.data(), qKp, bs_ref.data(), qKp / kKAlign);
  ok = qq == qq_ref && bs == bs_ref;
  if (nan) ok = ok && qq[qKp + at] == -127;
  report(ok, what("quantize_rows"));
}

void test_nonfinite_all(const KernelTable& kt, unsigned& seed) {
  const float specials[] = {from_bits(0x7FC00000u), from_bits(0xFFC00000u), from_bits(0x7F800001u),
                            from_bits(0xFFFFFFFFu), INFINITY, -INFINITY};
  for (size_t n : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 197})
    for (float sp : specials)
      for (size_t at : {size_t(0), n / 2, n - 1}) test_nonfinite(kt, n, sp, at, seed++);
}

// A row's fp32 result must not depend on the tile it lands in: the executor runs an image's
// rows together with however many other rows a batch (or the exits) leaves, and promises the
// same bits alone or in a batch. So each row computed alone equals it computed among 13.
void test_f32_row_invariance(const KernelTable& kt) {
  Rng r(11);
  const size_t M = 13, N = 40, K = 97;
  std::vector<float> a(M * K), b(K * N), bias(N);
  for (auto& v : a) v = r.f(-1, 1);
  for (auto& v : b) v = r.f(-1, 1);
  for (auto& v : bias) v = r.f(-1, 1);
  std::vector<float> bp(packed::f32_floats(N, K)), y(M * N), y1(N);
  pack_f32_b(b.data(), K, N, N, false, bp.data());
  kt.f32_gemm(M, N, K, a.data(), K, bp.data(), bias.data(), y.data(), N);
  bool same = true;
  for (size_t m = 0; m < M; ++m) {
    kt.f32_gemm(1, N, K, a.data() + m * K, K, bp.data(), bias.data(), y1.data(), N);
    same = same && std::memcmp(y1.data(), y.data() + m * N, N * sizeof(float)) == 0;
  }
  report(same, std::string(kt.name) + " f32_gemm rows independent of tile height");
}

// Threaded ops give the same bits as one thread, whatever the split.
void test_threads(const KernelTable& kt) {
  Rng r(7);
  const size_t M = 197, N = 200, K = 129;
  std::vector<float> x(M * K), w(N * K), bias(N);
  for (auto& v : x) v = r.f(-2, 2);
  for (auto& v : w) v = r.f(-1, 1);
  for (int bits : {8, 4, 32}) {
    std::vector<int8_t> q(N * K);
    std::vector<float> s(N * ((K + 31) / 32));
    QuantizedWeights qw;
    if (bits == 32) {
      qw = pack_f32(w.data(), N, K);
    } else {
      quantize_weights_canonical(w.data(), N, K, bits, 32, q.data(), s.data());
      qw = bits == 8 ? pack_qc8w(q.data(), s.data(), N, K) : pack_qb4w(q.data(), s.data(), N, K, 32);
    }
    std::vector<float> y1(M * N), yt(M * N);
    QuantizedActs scratch;
    linear(RunContext{&kt, 1}, x.data(), M, K, qw, bias.data(), 8, ScaleMode::kDynamicTensor, nullptr, scratch, y1.data(), N);
    for (int t : {2, 3, 5}) {
      linear(RunContext{&kt, t}, x.data(), M, K, qw, bias.data(), 8, ScaleMode::kDynamicTensor, nullptr, scratch, yt.data(), N);
      report(same_bits(y1, yt), std::string(kt.name) + " linear threads=" + std::to_string(t) + " bits=" + std::to_string(bits));
    }
  }
}

// The pool runs every task exactly once whether its workers are spinning (back-to-back calls)
// or asleep (a pause longer than the spin), passes a task's exception to the caller and keeps
// working after it; task_count sizes work as threadpool.h says.
void test_thread_pool() {
  ThreadPool& pool = ThreadPool::global();
  auto exactly_once = [&](size_t n, int threads) {
    std::vector<std::atomic<int>> hits(n);
    for (auto& h : hits) h = 0;
    pool.run(n, threads, [&](size_t i) { hits[i].fetch_add(1); });
    return std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; });
  };
  bool ok = true;
  for (int threads : {1, 2, 3, 5})
    for (size_t n : {1, 2, 7, 64}) ok = ok && exactly_once(n, threads);
  report(ok, "thread pool: every task once, 1..5 threads");
  ok = true;
  for (int i = 0; i < 2000; ++i) ok = ok && exactly_once(5, 2);
  report(ok, "thread pool: 2000 back-to-back calls");
  ok = true;
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));  // > the spin: workers sleep
    ok = ok && exactly_once(9, 3);
  }
  report(ok, "thread pool: calls after the workers fell asleep");
  bool threw = false;
  try {
    pool.run(8, 2, [](size_t i) {
      if (i == 5) throw std::runtime_error("task 5");
    });
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()) == "task 5";
  }
  report(threw && exactly_once(8, 2), "thread pool: a task's exception reaches the caller, pool still works");
  report(task_count(size_t(1) << 30, 1, 1) == 1 && task_count(100, 1000, 4) == 1 &&
             task_count(size_t(1) << 30, 1000, 2) == 8 && task_count(3000, 1000, 4) == 3,
         "task_count: one per thread count of 1, none below min_work, at most 4 per thread");
}

void test_dispatch() {
  const char* expect = std::getenv("PYRUNTIME_EXPECT_ISAS");
  std::string have;
  for (const auto& n : available_isas()) have += (have.empty() ? "" : ",") + n;
  std::printf("available ISAs: %s (default %s, %d physical cores)\n", have.c_str(), default_kernels()->name,
              physical_cores());
  if (expect) report(have == expect, std::string("dispatch: expected ISAs ") + expect + ", got " + have);
  bool threw = false;
  try {
    kernels_for("avx512");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  report(threw, "dispatch: unknown ISA is rejected");
}

// ---- The kernels of the newer ViT families: SwiGLU, QuickGELU, RoPE, attention bias.

// Fills with values in [lo, hi], and a few extremes where there is room (both signs of zero,
// large magnitudes, the exp cut-off around -88, a denormal).
std::vector<float> spread(Rng& r, size_t n, float lo, float hi, bool extremes) {
  std::vector<float> v(n);
  for (auto& x : v) x = r.f(lo, hi);
  if (extremes) {
    const float special[] = {-0.0f, 0.0f, 88.5f, -88.5f, -87.0f, 100.0f, -100.0f, 3e4f, -3e4f, 1e30f, -1e30f, 1e-40f};
    for (size_t i = 0; i < std::size(special) && 3 * i + 1 < n; ++i) v[3 * i + 1] = special[i];
  }
  return v;
}

// swiglu and quick_gelu, bit-exact against ref, on rows of n, the gate and value halves of one
// packed [rows x 2n] buffer (as SwiGLUPacked's fc1 writes them), out of place and in place.
void test_gated(const KernelTable& kt, size_t rows, size_t n, float lo, float hi, bool extremes, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const std::vector<float> x = spread(r, rows * 2 * n, lo, hi, extremes);
  char extra[64];
  std::snprintf(extra, sizeof extra, " range [%g, %g]%s", lo, hi, extremes ? " + extremes" : "");
  std::vector<float> y(rows * n), y_ref(rows * n);
  kt.swiglu(rows, n, x.data(), 2 * n, x.data() + n, 2 * n, y.data(), n);
  ref.swiglu(rows, n, x.data(), 2 * n, x.data() + n, 2 * n, y_ref.data(), n);
  report(same_bits(y, y_ref), shape(kt.name, "swiglu", rows, n, 0, extra));
  std::vector<float> inplace = x;  // y over the gate half, same stride
  kt.swiglu(rows, n, inplace.data(), 2 * n, inplace.data() + n, 2 * n, inplace.data(), 2 * n);
  bool ok = true;
  for (size_t i = 0; i < rows; ++i)
    ok = ok && std::memcmp(inplace.data() + i * 2 * n, y_ref.data() + i * n, n * sizeof(float)) == 0;
  report(ok, shape(kt.name, "swiglu in place", rows, n, 0, extra));
  std::vector<float> q = x, q_ref = x;
  kt.quick_gelu(q.size(), q.data());
  ref.quick_gelu(q_ref.size(), q_ref.data());
  report(same_bits(q, q_ref), shape(kt.name, "quick_gelu", rows, 2 * n, 0, extra));
}

// The RoPE formula of kernels.h written out independently: rot(x) built as timm builds it
// (pairs (2i, 2i+1), or halves), then x * cos + rot(x) * sin per element.
std::vector<float> rope_formula(const std::vector<float>& x, size_t rows, size_t heads, size_t hd, RopeForm form,
                                const std::vector<float>& s, const std::vector<float>& c, size_t tab_head_stride) {
  std::vector<float> y = x, rot(hd);
  for (size_t r = 0; r < rows; ++r)
    for (size_t h = 0; h < heads; ++h) {
      const float* xh = x.data() + (r * heads + h) * hd;
      const size_t t = r * hd * (tab_head_stride ? heads : 1) + h * tab_head_stride;
      for (size_t i = 0; i < hd; ++i) {
        if (form == RopeForm::kInterleaved)
          rot[i] = i % 2 == 0 ? -xh[i + 1] : xh[i - 1];
        else
          rot[i] = i < hd / 2 ? -xh[i + hd / 2] : xh[i - hd / 2];
      }
      for (size_t i = 0; i < hd; ++i) y[(r * heads + h) * hd + i] = xh[i] * c[t + i] + rot[i] * s[t + i];
    }
  return y;
}

void test_rope(const KernelTable& kt, size_t rows, size_t heads, size_t hd, RopeForm form, bool per_head,
               unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const std::vector<float> x = spread(r, rows * heads * hd, -8, 8, seed % 3 == 0);
  const size_t tab_rows = rows * (per_head ? heads : 1);
  std::vector<float> s(tab_rows * hd), c(tab_rows * hd);
  for (size_t i = 0; i < s.size(); ++i) {
    const float a = r.f(-100, 100);
    s[i] = std::sin(a);
    c[i] = std::cos(a);
  }
  const size_t ths = per_head ? hd : 0, ts = hd * (per_head ? heads : 1);
  std::vector<float> y = x, y_ref = x;
  kt.rope(rows, heads, hd, form, y.data(), heads * hd, s.data(), c.data(), ts, ths);
  ref.rope(rows, heads, hd, form, y_ref.data(), heads * hd, s.data(), c.data(), ts, ths);
  char extra[64];
  std::snprintf(extra, sizeof extra, " heads %zu %s%s", heads, form == RopeForm::kHalf ? "half" : "interleaved",
                per_head ? " per-head tables" : "");
  report(same_bits(y, y_ref), shape(kt.name, "rope", rows, hd, 0, extra));
  if (std::string(kt.name) == "ref")
    report(same_nan_pattern(y_ref.data(), rope_formula(x, rows, heads, hd, form, s, c, ths).data(), y.size()),
           shape("ref", "rope = x cos + rot(x) sin", rows, hd, 0, extra));
}

// scale_add, and the attention-bias softmax it serves: softmax(scale_add(x, scale, bias), 1).
void test_scale_add(const KernelTable& kt, size_t rows, size_t n, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const std::vector<float> x = spread(r, rows * n, -30, 30, false), b = spread(r, rows * n, -5, 5, false);
  for (float scale : {0.125f, 0.0883883476f, -0.5f}) {
    std::vector<float> y(x.size()), y_ref(x.size());
    kt.scale_add(x.size(), x.data(), scale, b.data(), y.data());
    ref.scale_add(x.size(), x.data(), scale, b.data(), y_ref.data());
    bool ok = same_bits(y, y_ref);
    for (size_t i = 0; i < x.size(); ++i) ok = ok && y_ref[i] == x[i] * scale + b[i];
    report(ok, shape(kt.name, "scale_add", rows, n, 0, (" scale " + std::to_string(scale)).c_str()));
    kt.softmax(rows, n, 1.0f, y.data(), n);
    ref.softmax(rows, n, 1.0f, y_ref.data(), n);
    report(same_bits(y, y_ref), shape(kt.name, "softmax with bias", rows, n, 0, (" scale " + std::to_string(scale)).c_str()));
  }
}

// ref's sigmoid-based kernels against double: silu(g) u and x sigmoid(1.702 x) within
// 1e-6 relative (the canonical sigmoid's error is < 5e-7, two roundings more), plus 2e-36
// absolute: exp_canon is 0 below -87.68 (its 2^n is cut at n = -127), so x sigmoid(x) is 0
// where the exact value is below |x| 2^-126 ~ 1.1e-36 (PyTorch keeps those tiny normals).
void test_gated_accuracy() {
  const KernelTable& ref = *ref_kernels();
  std::vector<float> g;
  for (int k = -100 * 256; k <= 100 * 256; ++k) g.push_back(float(k) / 256.0f);
  for (float v = 1e-30f; v < 1.0f; v *= 1.01f) g.push_back(v), g.push_back(-v);
  const std::vector<float> u(g.size(), 1.0f);
  std::vector<float> y(g.size());
  ref.swiglu(1, g.size(), g.data(), 0, u.data(), 0, y.data(), 0);
  std::vector<float> q = g;
  ref.quick_gelu(q.size(), q.data());
  bool ok_s = true, ok_q = true;
  double worst_s = 0, worst_q = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double x = g[i];
    const double silu = x / (1.0 + std::exp(-x));
    const double z = double(1.702f * g[i]);
    const double qg = x / (1.0 + std::exp(-z));
    const double es = std::fabs(y[i] - silu), eq = std::fabs(q[i] - qg);
    if (!(es <= 1e-6 * std::fabs(silu) + 2e-36) && ok_s) std::printf("silu(%.9g) = %.9g, want %.9g\n", x, y[i], silu);
    if (!(eq <= 1e-6 * std::fabs(qg) + 2e-36) && ok_q) std::printf("quick_gelu(%.9g) = %.9g, want %.9g\n", x, q[i], qg);
    ok_s = ok_s && es <= 1e-6 * std::fabs(silu) + 2e-36;
    ok_q = ok_q && eq <= 1e-6 * std::fabs(qg) + 2e-36;
    if (std::fabs(silu) > 1e-30) worst_s = std::max(worst_s, es / std::fabs(silu));
    if (std::fabs(qg) > 1e-30) worst_q = std::max(worst_q, eq / std::fabs(qg));
  }
  char w[96];
  std::snprintf(w, sizeof w, " (worst relative %.2e)", worst_s);
  report(ok_s, std::string("ref swiglu accuracy, silu on [-100, 100]") + w);
  std::snprintf(w, sizeof w, " (worst relative %.2e)", worst_q);
  report(ok_q, std::string("ref quick_gelu accuracy on [-100, 100]") + w);
}

// Non-finite input: NaN in, NaN out at that element only, the other bits as ref's; the
// infinities as PyTorch gives them (silu(+inf) = +inf, silu(-inf) = NaN, likewise QuickGELU).
// RoPE: a NaN x poisons its own pair only; a NaN sin/cos the elements that use it.
void test_newops_nonfinite(const KernelTable& kt, size_t n, float special, size_t at, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const size_t rows = 3;
  std::vector<float> x(rows * 2 * n);
  for (auto& v : x) v = r.f(-4, 4);
  char extra[80];
  std::snprintf(extra, sizeof extra, " special 0x%08x at %zu", to_bits(special), at);
  auto what = [&](const char* op) { return shape(kt.name, op, rows, n, 0, extra); };
  const bool nan = std::isnan(special);
  // in the gate of row 1, then in the value of row 1
  for (int in_value = 0; in_value < 2; ++in_value) {
    std::vector<float> xs = x;
    const size_t pos = 2 * n + (in_value ? n : 0) + at;
    xs[pos] = special;
    std::vector<float> y(rows * n), y_ref(rows * n);
    kt.swiglu(rows, n, xs.data(), 2 * n, xs.data() + n, 2 * n, y.data(), n);
    ref.swiglu(rows, n, xs.data(), 2 * n, xs.data() + n, 2 * n, y_ref.data(), n);
    bool ok = same_nan_pattern(y.data(), y_ref.data(), y.size());
    for (size_t i = 0; i < y.size(); ++i) ok = ok && (std::isnan(y[i]) == (i == n + at && (nan || (!in_value && special < 0) || (in_value && xs[2 * n + at] == 0))));
    if (special == INFINITY && !in_value) ok = ok && std::isinf(y[n + at]);
    report(ok, what(in_value ? "swiglu (special value)" : "swiglu (special gate)"));
    std::vector<float> q = xs, q_ref = xs;
    kt.quick_gelu(q.size(), q.data());
    ref.quick_gelu(q_ref.size(), q_ref.data());
    ok = same_nan_pattern(q.data(), q_ref.data(), q.size());
    for (size_t i = 0; i < q.size(); ++i) ok = ok && std::isnan(q[i]) == (i == pos && (nan || special < 0));
    if (special == INFINITY) ok = ok && q[pos] == INFINITY;
    report(ok, what("quick_gelu"));
  }
  // rope: one head of hd = 2n (even), the special in x of row 1
  const size_t hd = 2 * n;
  std::vector<float> s(rows * hd), c(rows * hd);
  for (size_t i = 0; i < s.size(); ++i) s[i] = std::sin(float(i)), c[i] = std::cos(float(i));
  for (RopeForm form : {RopeForm::kInterleaved, RopeForm::kHalf}) {
    std::vector<float> y = x;
    y[hd + at] = special;
    std::vector<float> y_ref = y;
    kt.rope(rows, 1, hd, form, y.data(), hd, s.data(), c.data(), hd, 0);
    ref.rope(rows, 1, hd, form, y_ref.data(), hd, s.data(), c.data(), hd, 0);
    const size_t partner = form == RopeForm::kInterleaved ? (at ^ 1) : (at < n ? at + n : at - n);
    bool ok = same_nan_pattern(y.data(), y_ref.data(), y.size());
    if (nan)
      for (size_t i = 0; i < y.size(); ++i) ok = ok && std::isnan(y[i]) == (i == hd + at || i == hd + partner);
    report(ok, what(form == RopeForm::kHalf ? "rope half" : "rope interleaved"));
  }
}

// ops.cc's attention op: without a bias exactly the sequence the executor ran before biases
// existed (f32_gemm, softmax(s, scale), f32_gemm); with one, every ISA equals ref bit for bit
// and ref is within 1e-5 of softmax(q k^T scale + bias) v in double.
void test_attend(const KernelTable& kt, size_t Tq, size_t T, size_t dh, unsigned seed) {
  Rng r(seed);
  const KernelTable& ref = *ref_kernels();
  const std::vector<float> q = spread(r, Tq * dh, -2, 2, false), k = spread(r, T * dh, -2, 2, false),
                           v = spread(r, T * dh, -2, 2, false), bias = spread(r, Tq * T, -3, 3, false);
  std::vector<float> kp(packed::f32_floats(T, dh)), vp(packed::f32_floats(dh, T));
  pack_f32_b(k.data(), dh, T, dh, true, kp.data());
  pack_f32_b(v.data(), T, dh, dh, false, vp.data());
  const float scale = 1.0f / std::sqrt(float(dh));
  std::vector<float> s(Tq * T), o(Tq * dh), o_ref(Tq * dh), o_old(Tq * dh);
  attend_f32(kt, Tq, T, dh, q.data(), dh, kp.data(), vp.data(), scale, nullptr, 0, s.data(), o.data(), dh);
  kt.f32_gemm(Tq, T, dh, q.data(), dh, kp.data(), nullptr, s.data(), T);
  kt.softmax(Tq, T, scale, s.data(), T);
  kt.f32_gemm(Tq, dh, T, s.data(), T, vp.data(), nullptr, o_old.data(), dh);
  report(same_bits(o, o_old), shape(kt.name, "attend_f32 without bias = the old sequence", Tq, T, dh));
  attend_f32(kt, Tq, T, dh, q.data(), dh, kp.data(), vp.data(), scale, bias.data(), T, s.data(), o.data(), dh);
  attend_f32(ref, Tq, T, dh, q.data(), dh, kp.data(), vp.data(), scale, bias.data(), T, s.data(), o_ref.data(), dh);
  report(same_bits(o, o_ref), shape(kt.name, "attend_f32 with bias", Tq, T, dh));
  if (std::string(kt.name) != "ref") return;
  std::vector<float> want(Tq * dh);
  for (size_t i = 0; i < Tq; ++i) {
    std::vector<double> p(T);
    double mx = -INFINITY, sum = 0;
    for (size_t j = 0; j < T; ++j) {
      double d = 0;
      for (size_t c = 0; c < dh; ++c) d += double(q[i * dh + c]) * k[j * dh + c];
      p[j] = d * scale + bias[i * T + j];
      mx = std::max(mx, p[j]);
    }
    for (size_t j = 0; j < T; ++j) sum += p[j] = std::exp(p[j] - mx);
    for (size_t c = 0; c < dh; ++c) {
      double acc = 0;
      for (size_t j = 0; j < T; ++j) acc += p[j] / sum * v[j * dh + c];
      want[i * dh + c] = float(acc);
    }
  }
  report(close(o_ref, want, 1e-5, 1e-5), shape("ref", "attend_f32 with bias accuracy", Tq, T, dh));
}

// apply_rope leaves the prefix tokens alone and rotates the rest with the tables' rows from 0.
void test_apply_rope(const KernelTable& kt, size_t T, size_t prefix, size_t heads, size_t hd, bool per_head,
                     unsigned seed) {
  Rng r(seed);
  const size_t D = heads * hd, n = T - prefix;
  const std::vector<float> x = spread(r, T * 3 * D, -3, 3, false);  // a qkv buffer: rotate k
  std::vector<float> s = spread(r, (per_head ? heads : 1) * n * hd, -1, 1, false), c = s;
  for (auto& v : c) v = std::sqrt(1 - v * v);
  std::vector<float> y = x;
  apply_rope(kt, T, prefix, heads, hd, RopeForm::kHalf, y.data() + D, 3 * D, s.data(), c.data(), per_head);
  bool ok = std::memcmp(y.data(), x.data(), (prefix * 3 * D + D) * sizeof(float)) == 0;
  std::vector<float> want = x;
  for (size_t t = prefix; t < T; ++t)
    ref_kernels()->rope(1, heads, hd, RopeForm::kHalf, want.data() + t * 3 * D + D, 0, s.data() + (t - prefix) * hd,
                        c.data() + (t - prefix) * hd, 0, per_head ? n * hd : 0);
  ok = ok && same_bits(y, want);
  report(ok, shape(kt.name, "apply_rope prefix", T, prefix, hd, per_head ? " per-head" : ""));
}

void test_newops(const KernelTable& kt, unsigned& seed) {
  for (size_t n = 1; n <= 17; ++n) test_gated(kt, 3, n, -8, 8, n > 5, seed++);
  for (size_t n : {31, 32, 33, 63, 64, 65, 197, 768, 1025}) test_gated(kt, 2, n, -8, 8, true, seed++);
  test_gated(kt, 2, 300, -100, 100, false, seed++);  // both exp tails, past the -88 cut
  test_gated(kt, 2, 300, -1e-3f, 1e-3f, false, seed++);
  for (size_t hd : {2, 4, 6, 8, 10, 14, 16, 18, 24, 30, 32, 34, 64, 66, 80, 128})
    for (size_t heads : {1, 3})
      for (RopeForm form : {RopeForm::kInterleaved, RopeForm::kHalf})
        for (bool per_head : {false, true}) {
          test_rope(kt, 1, heads, hd, form, per_head, seed++);  // T = 1
          test_rope(kt, 5, heads, hd, form, per_head, seed++);
        }
  test_rope(kt, 196, 3, 64, RopeForm::kInterleaved, false, seed++);  // eva02_tiny's shape
  test_rope(kt, 196, 3, 64, RopeForm::kHalf, true, seed++);
  for (size_t n : {1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 50, 197, 257}) test_scale_add(kt, 3, n, seed++);
  for (size_t T : {1, 2, 17, 50, 197})
    for (size_t dh : {1, 7, 32, 64}) test_attend(kt, std::min<size_t>(T, 9), T, dh, seed++);
  for (size_t prefix : {0, 1, 5})
    for (bool per_head : {false, true}) test_apply_rope(kt, 12, prefix, 3, 10, per_head, seed++);
  const float specials[] = {from_bits(0x7FC00000u), from_bits(0xFFC00000u), from_bits(0x7F800001u), INFINITY, -INFINITY};
  for (size_t n : {1, 3, 4, 7, 8, 9, 16, 17, 33})
    for (float sp : specials)
      for (size_t at : {size_t(0), n / 2, n - 1}) test_newops_nonfinite(kt, n, sp, at, seed++);
}

// The ISA list (cpu/isas.h) and the tables tables.cc assembles from it: a table exactly when
// the ISA is built, named as listed, every kernel set; the composite tables take their base's
// float kernels and their own integer GEMMs. Fetching any table runs no ISA code (it is
// constant data), so this runs on every CPU.
void test_isa_tables() {
  report(known_isas() == "ref, avx2, avx512vnni, neon, neondot", "isa list: known names " + known_isas());
  for (const IsaInfo& isa : kIsas) {
    const KernelTable* t = isa.table();
    report((t != nullptr) == isa.built, std::string("isa list: table exactly when built: ") + isa.name);
    if (!t) continue;
    const bool complete = t->quantize_rows && t->absmax && t->qd8_f32_qc8w_gemm && t->qd8_f32_qb4w_gemm &&
                          t->f32_gemm && t->layernorm && t->softmax && t->softmax_q8 && t->gelu && t->add &&
                          t->scale_add && t->swiglu && t->quick_gelu && t->rope;
    report(std::string(t->name) == isa.name && complete, std::string("isa list: table complete: ") + isa.name);
  }
  auto composite = [](const KernelTable* t, const KernelTable* base, const char* what) {
    if (!t || !base) return;
    const bool floats_shared = t->quantize_rows == base->quantize_rows && t->absmax == base->absmax &&
                               t->f32_gemm == base->f32_gemm && t->layernorm == base->layernorm &&
                               t->softmax == base->softmax && t->softmax_q8 == base->softmax_q8 &&
                               t->gelu == base->gelu && t->add == base->add && t->scale_add == base->scale_add &&
                               t->swiglu == base->swiglu && t->quick_gelu == base->quick_gelu && t->rope == base->rope;
    const bool own_gemms = t->qd8_f32_qc8w_gemm != base->qd8_f32_qc8w_gemm &&
                           t->qd8_f32_qb4w_gemm != base->qd8_f32_qb4w_gemm;
    report(floats_shared && own_gemms, std::string("isa list: ") + what);
  };
  composite(avx512vnni_kernels(), avx2_kernels(), "avx512vnni = avx2's float kernels + VNNI GEMMs");
  composite(neondot_kernels(), neon_kernels(), "neondot = neon's float kernels + dotprod GEMMs");
  bool threw = false;
  try {
    kernels_for("sse9");
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("known: " + known_isas()) != std::string::npos;
  }
  report(threw, "isa list: an unknown name's error lists the known ones");
}

}  // namespace

int main() {
  test_dispatch();
  test_isa_tables();
  test_thread_pool();
  const bool quick = std::getenv("PYRUNTIME_TEST_QUICK") != nullptr;
  unsigned seed = 1;
  for (size_t n : {1, 7, 8, 9, 17, 64, 197, 768}) test_float_accuracy(3, n, -6, 6, 0, 1000 + unsigned(n));
  test_float_accuracy(4, 192, -40, 40, 0, 2001);
  test_float_accuracy(4, 384, -2, 2, 1000, 2002);
  test_gelu_dense();
  test_gated_accuracy();
  for (const auto& name : available_isas()) {
    const KernelTable& kt = *kernels_for(name);
    for (size_t M = 1; M <= 17; ++M)
      for (size_t N = 1; N <= 17; ++N)
        for (size_t K = 1; K <= 17; ++K) {
          test_qc8w(kt, M, N, K, Fill::kRandom, seed++);
          if ((M + N + K) % 3 == 0) test_qb4w(kt, M, N, K, 32, Fill::kRandom, seed++);
          if ((M * N + K) % 4 == 0) test_f32_gemm(kt, M, N, K, seed++);
        }
    const size_t ms[] = {1, 4, 5, 31, 33, 65}, ns[] = {15, 16, 17, 31, 32, 33, 63, 64, 65};
    const size_t ks[] = {31, 32, 33, 63, 64, 65, 127, 128, 129};
    for (size_t M : ms)
      for (size_t N : ns)
        for (size_t K : ks) {
          test_qc8w(kt, M, N, K, Fill::kRandom, seed++);
          test_qb4w(kt, M, N, K, 32, Fill::kRandom, seed++);
          test_f32_gemm(kt, M, N, K, seed++);
        }
    for (Fill f : {Fill::kMax, Fill::kMin, Fill::kAlternate}) {
      test_qc8w(kt, 7, 33, 1031, f, seed++);
      test_qb4w(kt, 7, 33, 1031, 32, f, seed++);
    }
    test_qb4w(kt, 9, 40, 200, 64, Fill::kRandom, seed++);
    struct Vit { size_t M, K, N; };
    std::vector<Vit> vit = {{197, 192, 576}};
    if (!quick) {
      vit.push_back({197, 384, 1536});
      vit.push_back({197, 768, 3072});
    }
    for (const Vit& v : vit) {
      test_qc8w(kt, v.M, v.N, v.K, Fill::kRandom, seed++);
      test_qb4w(kt, v.M, v.N, v.K, 32, Fill::kRandom, seed++);
      test_f32_gemm(kt, v.M, v.N, v.K, seed++);
      test_qb4w(kt, 3, v.N, v.K + 17, 32, Fill::kRandom, seed++);  // K not a multiple of 32
    }
    for (size_t K : {1, 5, 31, 32, 33, 100, 768})
      for (int bits = 4; bits <= 8; ++bits) test_quantize_rows(kt, 5, K, bits, seed++);
    // Float element-wise kernels, bit-exact: 1..17, 2^n +- 1, ViT widths and token counts.
    for (size_t n = 1; n <= 17; ++n) test_elementwise(kt, 3, n, -6, 6, 0, seed++);
    for (size_t n : {31, 32, 33, 63, 64, 65, 127, 128, 129, 192, 197, 255, 256, 257, 384, 768, 1025})
      test_elementwise(kt, 3, n, -6, 6, 0, seed++);
    test_elementwise(kt, 4, 192, -40, 40, 0, seed++);      // GELU's far tails, exp underflow
    test_elementwise(kt, 4, 197, -1e-3f, 1e-3f, 0, seed++);  // tiny values
    test_elementwise(kt, 4, 384, -2, 2, 1000, seed++);     // a large common offset
    test_elementwise(kt, 2, 768, -300, 300, 0, seed++);
    // Row counts around the AVX2 LayerNorm's groups of 4 rows (a group, then single rows).
    for (size_t rows : {5, 8, 9, 13}) test_elementwise(kt, rows, 33, -3, 3, 7, seed++);
    for (size_t n : {1, 2, 3, 7, 8, 9, 17, 31, 32, 33, 64, 65, 197, 257})
      for (float range : {0.01f, 4.0f, 60.0f, 400.0f}) test_softmax_q8(kt, 3, n, range, seed++);
    test_nonfinite_all(kt, seed);
    test_threads(kt);
    test_f32_row_invariance(kt);
    test_newops(kt, seed);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
