#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../kernels/packed_layout.h"
#include "../runtime_limits.h"
#include "threadpool.h"

namespace pyrt {
namespace {

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// Splits an M x panels output into tiles and runs f(m0, m1, p0, p1) over them on the pool.
// Rows are blocked so one tile's activations stay in L2 while its weight panels stream by;
// panels are split so that there are a few tasks per thread for balance (fewer for a GEMM too
// small to be worth it). K is the reduction length; min_macs the smallest task (threadpool.h).
// Tasks are numbered row block by row block, so the pool's front/back split keeps each
// thread on the same rows as the element-wise ops before and after (threadpool.h).
template <typename F>
void parallel_tiles(const RunContext& ctx, size_t M, size_t panels, size_t K, size_t min_macs, F&& f) {
  if (M == 0 || panels == 0) return;  // an empty output: no tile to size (and no division by 0)
  const size_t m_tiles = ceil_div(M, 64);
  const size_t mb = std::min(M, round_up(ceil_div(M, m_tiles), 4));
  const size_t m_count = ceil_div(M, mb);
  const size_t want = task_count(M * panels * kNR * K, min_macs, ctx.threads);
  const size_t n_chunks = std::max<size_t>(1, std::min(panels, ceil_div(want, m_count)));
  const size_t pc = ceil_div(panels, n_chunks);
  const size_t p_count = ceil_div(panels, pc);
  ThreadPool::global().run(m_count * p_count, ctx.threads, [&](size_t t) {
    const size_t mi = t / p_count, pi = t % p_count;
    const size_t m0 = mi * mb, m1 = std::min(M, m0 + mb);
    const size_t p0 = pi * pc, p1 = std::min(panels, p0 + pc);
    f(m0, m1, p0, p1);
  });
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}


}  // namespace

void check_integer_weights(int bits, size_t K, size_t block) {
  check(bits == 4 || bits == 8, "integer weight bits must be 4 or 8, got " + std::to_string(bits));
  check(K <= kMaxK, "integer layers need K <= " + std::to_string(kMaxK) + " (exact int32 accumulation), got K=" +
                        std::to_string(K));
  if (bits == 8) return;
  const size_t most = packed::qc8w_kp(K);  // a larger block only pads
  check(block > 0 && block % kKAlign == 0 && block <= most,
        "int4 block size must be a positive multiple of 32 and at most K rounded up to 32 (" + std::to_string(most) +
            "), got " + std::to_string(block));
}

size_t QuantizedWeights::bytes() const {
  return q8.size() + q4.size() + f32.size() * sizeof(float) + scales.size() * sizeof(float);
}

void quantize_weights_canonical(const float* w, size_t N, size_t K, int bits, size_t block,
                                int8_t* q, float* scales) {
  check_integer_weights(bits, K, block);
  if (bits == 8) {
    for (size_t n = 0; n < N; ++n) {
      const float* wr = w + n * K;
      float amax = 0.0f;
      for (size_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(wr[k]));
      const float s = amax / 127.0f;
      scales[n] = s;
      for (size_t k = 0; k < K; ++k) {
        const float v = s > 0.0f ? std::nearbyint(wr[k] / s) : 0.0f;
        q[n * K + k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      }
    }
    return;
  }
  check_integer_weights(bits, K, block);
  const size_t nb = ceil_div(K, block);
  for (size_t n = 0; n < N; ++n) {
    for (size_t b = 0; b < nb; ++b) {
      const size_t k0 = b * block, k1 = std::min(K, k0 + block);
      float mx = 0.0f;  // the signed value of largest magnitude
      for (size_t k = k0; k < k1; ++k)
        if (std::fabs(w[n * K + k]) > std::fabs(mx)) mx = w[n * K + k];
      const float d = mx / -8.0f;
      scales[n * nb + b] = d;
      for (size_t k = k0; k < k1; ++k) {
        const float v = d != 0.0f ? std::nearbyint(w[n * K + k] / d) : 0.0f;
        q[n * K + k] = static_cast<int8_t>(std::min(7.0f, std::max(-8.0f, v)));
      }
    }
  }
}

QuantizedWeights pack_qc8w(const int8_t* q, const float* scales, size_t N, size_t K) {
  check_integer_weights(8, K, 0);
  QuantizedWeights w;
  w.bits = 8;
  w.N = N;
  w.K = K;
  w.Kp = packed::qc8w_kp(K);
  w.q8.resize(packed::qc8w_bytes(N, w.Kp));
  w.scales.resize(packed::qc8w_scale_count(N));
  std::vector<int8_t> padded(N * w.Kp, 0);
  for (size_t n = 0; n < N; ++n) {
    w.scales[n] = scales[n];
    std::memcpy(padded.data() + n * w.Kp, q + n * K, K);
  }
  pack_qc8w_rows(padded.data(), w.Kp, N, w.Kp, w.q8.data());
  return w;
}

void pack_qc8w_rows(const int8_t* q, size_t q_stride, size_t N, size_t Kp, int8_t* out) {
  const size_t panels = num_panels(N), groups = Kp / kKGroup;
  for (size_t p = 0; p < panels; ++p) {
    int8_t* panel = out + p * packed::qc8w_panel_bytes(Kp);
    const size_t c_end = std::min(kNR, N - p * kNR);
    if (c_end < kNR) std::memset(panel, 0, packed::qc8w_panel_bytes(Kp));
    for (size_t c = 0; c < c_end; ++c) {
      const int8_t* row = q + (p * kNR + c) * q_stride;
      // One 4-byte k-group at a time: the layout interleaves the 16 channels' groups.
      for (size_t g = 0; g < groups; ++g)
        std::memcpy(panel + packed::qc8w_group_offset(g, c), row + g * kKGroup, kKGroup);
    }
  }
}

QuantizedWeights pack_qb4w(const int8_t* q, const float* scales, size_t N, size_t K,
                           size_t block) {
  check_integer_weights(4, K, block);
  QuantizedWeights w;
  w.bits = 4;
  w.N = N;
  w.K = K;
  w.block = block;
  w.Kp = packed::qb4w_kp(K, block);
  const size_t nb_src = ceil_div(K, block);
  w.q4.resize(packed::qb4w_bytes(N, w.Kp));
  std::fill(w.q4.data(), w.q4.data() + w.q4.size(), packed::kQB4WZeroByte);
  w.scales.resize(packed::qb4w_scale_count(N, w.Kp, block));
  for (size_t n = 0; n < N; ++n) {
    for (size_t b = 0; b < nb_src; ++b)
      w.scales[packed::qb4w_scale_offset(w.Kp, block, n, b)] = scales[n * nb_src + b];
    for (size_t k = 0; k < K; ++k) {
      const int v = q[n * K + k];
      if (v < -8 || v > 7) throw std::invalid_argument("int4 weight out of range [-8, 7]");
      const packed::NibbleAt at = packed::qb4w_at(w.Kp, block, n, k);
      uint8_t& byte = w.q4[at.byte];
      const uint8_t nib = static_cast<uint8_t>(v + packed::kQB4WOffset);
      byte = at.high ? uint8_t((byte & 0x0F) | (nib << 4)) : uint8_t((byte & 0xF0) | nib);
    }
  }
  return w;
}

QuantizedWeights pack_f32(const float* wt, size_t N, size_t K) {
  QuantizedWeights w;
  w.bits = 32;
  w.N = N;
  w.K = K;
  w.Kp = K;
  w.f32.resize(packed::f32_floats(N, K));
  pack_f32_b(wt, K, N, K, /*b_is_nk=*/true, w.f32.data());
  return w;
}

void unpack_weights(const QuantizedWeights& w, int8_t* q, float* scales) {
  const size_t N = w.N, K = w.K;
  if (w.bits == 8) {
    for (size_t n = 0; n < N; ++n) {
      scales[n] = w.scales[n];
      for (size_t k = 0; k < K; ++k) q[n * K + k] = w.q8[packed::qc8w_offset(w.Kp, n, k)];
    }
  } else if (w.bits == 4) {
    const size_t nb_src = ceil_div(K, w.block);
    for (size_t n = 0; n < N; ++n) {
      for (size_t b = 0; b < nb_src; ++b)
        scales[n * nb_src + b] = w.scales[packed::qb4w_scale_offset(w.Kp, w.block, n, b)];
      for (size_t k = 0; k < K; ++k) {
        const packed::NibbleAt at = packed::qb4w_at(w.Kp, w.block, n, k);
        const uint8_t byte = w.q4[at.byte];
        q[n * K + k] = static_cast<int8_t>((at.high ? byte >> 4 : byte & 0x0F) - packed::kQB4WOffset);
      }
    }
  } else {
    throw std::invalid_argument("unpack_weights: fp32 weights have no integer form");
  }
}

void dequantize_weights(const QuantizedWeights& w, float* out) {
  const size_t N = w.N, K = w.K;
  if (w.bits == 32) {
    for (size_t n = 0; n < N; ++n)
      for (size_t k = 0; k < K; ++k) out[n * K + k] = w.f32[packed::f32_offset(K, n, k)];
    return;
  }
  std::vector<int8_t> q(N * K);
  const size_t ns = w.bits == 8 ? N : N * ceil_div(K, w.block);
  std::vector<float> s(ns);
  unpack_weights(w, q.data(), s.data());
  for (size_t n = 0; n < N; ++n)
    for (size_t k = 0; k < K; ++k) {
      const float sc = w.bits == 8 ? s[n] : s[n * ceil_div(K, w.block) + k / w.block];
      out[n * K + k] = float(q[n * K + k]) * sc;
    }
}

void QuantizedActs::reshape(size_t m, size_t k, size_t kp) {
  M = m;
  K = k;
  Kp = kp;
  q.reserve_scratch(m * kp);
  scale.reserve_scratch(m);
  inv_scale.reserve_scratch(m);
  bsum.reserve_scratch(m * packed::act_bsums(kp));
}

void quantize_acts(const RunContext& ctx, const float* x, size_t M, size_t K, size_t x_stride,
                   size_t Kp, int bits, ScaleMode mode, const float* scales, QuantizedActs& out) {
  check(bits >= 2 && bits <= 8, "activation bits must be in 2..8, got " + std::to_string(bits));
  check(Kp % kKAlign == 0 && Kp >= K, "quantize_acts: bad padded width");
  check(K <= kMaxK, "quantize_acts: K=" + std::to_string(K) + " exceeds " + std::to_string(kMaxK));
  out.reshape(M, K, Kp);
  if (M == 0) return;
  const int qmax = (1 << (bits - 1)) - 1;
  if (mode == ScaleMode::kDynamicTensor) {
    float amax = 0.0f;
    for (size_t r = 0; r < M; ++r) amax = std::max(amax, ctx.kt->absmax(K, x + r * x_stride));
    for (size_t r = 0; r < M; ++r) out.scale[r] = amax / float(qmax);
  } else if (mode == ScaleMode::kDynamicRow) {
    for (size_t r = 0; r < M; ++r) out.scale[r] = ctx.kt->absmax(K, x + r * x_stride) / float(qmax);
  } else {
    for (size_t r = 0; r < M; ++r) out.scale[r] = scales[r];
  }
  for (size_t r = 0; r < M; ++r) {
    const ScalePair s = usable_scale(out.scale[r]);
    out.scale[r] = s.scale;
    out.inv_scale[r] = s.inv;
  }
  const size_t rows_per_task = ceil_div(M, task_count(M * K, kMinTaskElems, ctx.threads));
  ThreadPool::global().run(ceil_div(M, rows_per_task), ctx.threads, [&](size_t t) {
    const size_t r0 = t * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
    const size_t bs = packed::act_bsums(Kp);
    ctx.kt->quantize_rows(r1 - r0, K, Kp, x + r0 * x_stride, x_stride, out.inv_scale.data() + r0,
                          qmax, out.q.data() + r0 * Kp, Kp, out.bsum.data() + r0 * bs, bs);
  });
}

void gemm_q(const RunContext& ctx, const QuantizedActs& a, const QuantizedWeights& w,
            const float* bias, float* y, size_t y_stride) {
  check(a.Kp == w.Kp, "gemm_q: activation and weight padding differ");
  const size_t bs = packed::act_bsums(a.Kp);
  parallel_tiles(ctx, a.M, num_panels(w.N), a.Kp, kMinTaskMacsInt, [&](size_t m0, size_t m1, size_t p0, size_t p1) {
    const size_t n0 = p0 * kNR, n = std::min(w.N, p1 * kNR) - n0;
    const float* b = bias ? bias + n0 : nullptr;
    float* yt = y + m0 * y_stride + n0;
    if (w.bits == 8) {
      ctx.kt->qd8_f32_qc8w_gemm(m1 - m0, n, w.Kp, a.q.data() + m0 * a.Kp, a.Kp,
                                a.scale.data() + m0, w.q8.data() + p0 * packed::qc8w_panel_bytes(w.Kp),
                                w.scales.data() + n0, b, yt, y_stride);
    } else {
      ctx.kt->qd8_f32_qb4w_gemm(m1 - m0, n, w.Kp, w.block, a.q.data() + m0 * a.Kp, a.Kp,
                                a.scale.data() + m0, a.bsum.data() + m0 * bs, bs,
                                w.q4.data() + p0 * packed::qb4w_panel_bytes(w.Kp),
                                w.scales.data() + p0 * packed::qb4w_panel_scales(w.Kp, w.block), b, yt, y_stride);
    }
  });
}

void gemm_f32(const RunContext& ctx, size_t M, size_t N, size_t K, const float* a,
              size_t a_stride, const float* b_packed, const float* bias, float* y,
              size_t y_stride) {
  parallel_tiles(ctx, M, num_panels(N), K, kMinTaskMacsF32, [&](size_t m0, size_t m1, size_t p0, size_t p1) {
    const size_t n0 = p0 * kNR, n = std::min(N, p1 * kNR) - n0;
    ctx.kt->f32_gemm(m1 - m0, n, K, a + m0 * a_stride, a_stride, b_packed + p0 * packed::f32_panel_floats(K),
                     bias ? bias + n0 : nullptr, y + m0 * y_stride + n0, y_stride);
  });
}

void pack_f32_b(const float* b, size_t K, size_t N, size_t ld, bool b_is_nk, float* out) {
  // Panel by panel, k by k: the writes are sequential (this packs K and V per image and head).
  for (size_t p = 0; p < num_panels(N); ++p)
    for (size_t k = 0; k < K; ++k)
      for (size_t n = p * kNR; n < (p + 1) * kNR; ++n)
        out[packed::f32_offset(K, n, k)] = n < N ? (b_is_nk ? b[n * ld + k] : b[k * ld + n]) : 0.0f;
}

void linear(const RunContext& ctx, const float* x, size_t M, size_t x_stride,
            const QuantizedWeights& w, const float* bias, int act_bits, ScaleMode mode,
            const float* act_scales, QuantizedActs& scratch, float* y, size_t y_stride) {
  if (w.bits == 32) {
    gemm_f32(ctx, M, w.N, w.K, x, x_stride, w.f32.data(), bias, y, y_stride);
    return;
  }
  quantize_acts(ctx, x, M, w.K, x_stride, w.Kp, act_bits, mode, act_scales, scratch);
  gemm_q(ctx, scratch, w, bias, y, y_stride);
}

void attention_softmax(const KernelTable& kt, size_t rows, size_t T, float scale, const float* bias,
                       size_t bias_stride, float* s, size_t s_stride) {
  if (!bias) {
    kt.softmax(rows, T, scale, s, s_stride);
    return;
  }
  for (size_t r = 0; r < rows; ++r) kt.scale_add(T, s + r * s_stride, scale, bias + r * bias_stride, s + r * s_stride);
  kt.softmax(rows, T, 1.0f, s, s_stride);
}

void attend_f32(const KernelTable& kt, size_t rows, size_t T, size_t dh, const float* q, size_t q_stride,
                const float* k_packed, const float* v_packed, float scale, const float* bias,
                size_t bias_stride, float* scores, float* o, size_t o_stride) {
  kt.f32_gemm(rows, T, dh, q, q_stride, k_packed, nullptr, scores, T);
  attention_softmax(kt, rows, T, scale, bias, bias_stride, scores, T);
  kt.f32_gemm(rows, dh, T, scores, T, v_packed, nullptr, o, o_stride);
}

void apply_rope(const KernelTable& kt, size_t T, size_t prefix, size_t heads, size_t hd, RopeForm form,
                float* x, size_t x_stride, const float* sin, const float* cos, bool per_head) {
  check(hd % 2 == 0, "rope: head_dim must be even, got " + std::to_string(hd));
  if (prefix >= T) return;
  const size_t n = T - prefix;
  kt.rope(n, heads, hd, form, x + prefix * x_stride, x_stride, sin, cos, hd, per_head ? n * hd : 0);
}

}  // namespace pyrt
