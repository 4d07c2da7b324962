// Whole-tensor operations built on a kernel table: weight quantisation and packing,
// activation quantisation, and the threaded GEMMs. The executor and the Python bindings both
// call these; nothing here depends on Python.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../kernels/kernels.h"
#include "aligned.h"

namespace pyrt {

// Weights of one linear layer, N outputs x K inputs, in canonical and packed form.
// bits: 8 (a scale per output channel), 4 (a scale per `block` K values), 32 (fp32).
struct QuantizedWeights {
  int bits = 0;
  size_t N = 0, K = 0, Kp = 0, block = 0;
  AlignedBuffer<int8_t> q8;    // bits 8: packed qc8w data
  AlignedBuffer<uint8_t> q4;   // bits 4: packed qb4w data
  AlignedBuffer<float> f32;    // bits 32: packed f32 B operand (W^T)
  AlignedBuffer<float> scales; // packed scales (bits 8 and 4)
  size_t bytes() const;
};

// Throws std::invalid_argument unless integer weights of K inputs can be packed at `bits` (4 or
// 8): K <= kMaxK (runtime_limits.h: exact int32 accumulation), and for int4 a block that is a
// positive multiple of 32 no larger than K rounded up to 32 (a larger block only pads, and its
// padded size can wrap around size_t). Every packer calls it; the bindings call it first.
void check_integer_weights(int bits, size_t K, size_t block);

// Quantise fp32 weights [N x K] to canonical integers and scales.
//   bits 8: scale[n] = max|w[n]| / 127, q in [-127, 127].
//   bits 4: per block of `block` K values, the value of largest magnitude maps to -8
//           (llama.cpp's q4_0 rule), q in [-8, 7]; scale[n][b].
// Returns canonical q [N x K] (int8) and scales ([N] or [N x ceil(K/block)]).
void quantize_weights_canonical(const float* w, size_t N, size_t K, int bits, size_t block,
                                int8_t* q, float* scales);

// Pack canonical weights (as produced above, or read from a model file).
QuantizedWeights pack_qc8w(const int8_t* q, const float* scales, size_t N, size_t K);
QuantizedWeights pack_qb4w(const int8_t* q, const float* scales, size_t N, size_t K,
                           size_t block);
QuantizedWeights pack_f32(const float* w, size_t N, size_t K);

// Pack N rows of int8 weights already padded with zeros to Kp (a multiple of kKAlign; row
// stride q_stride) into the qc8w layout at `out` (packed::qc8w_bytes(N, Kp) bytes, padding
// channels zeroed). pack_qc8w uses it at load time; int8 attention packs K and V per image.
void pack_qc8w_rows(const int8_t* q, size_t q_stride, size_t N, size_t Kp, int8_t* out);

// Canonical values back from packed weights (for dequantize() and the file writer).
void unpack_weights(const QuantizedWeights& w, int8_t* q, float* scales);
void dequantize_weights(const QuantizedWeights& w, float* out);

// Quantised activations of M rows of K values, rows padded to Kp.
struct QuantizedActs {
  size_t M = 0, K = 0, Kp = 0;
  AlignedBuffer<int8_t> q;
  AlignedBuffer<float> scale, inv_scale;
  AlignedBuffer<int32_t> bsum;
  void reshape(size_t m, size_t k, size_t kp);
};

enum class ScaleMode { kDynamicTensor, kDynamicRow, kGiven };

// The quantiser's scale rule: a scale that is not positive and finite becomes 0, and so does
// its inverse, so that it quantises to 0 (quantize_acts; int8 attention's operands too).
struct ScalePair {
  float scale, inv;
};
inline ScalePair usable_scale(float s) {
  const bool ok = s > 0.0f && std::isfinite(s);
  return {ok ? s : 0.0f, ok ? 1.0f / s : 0.0f};
}

struct RunContext {
  const KernelTable* kt;
  int threads;
};

// Quantise x [M x K] to `bits` (4..8) in int8 storage. kDynamicTensor: one scale max|x|/qmax;
// kDynamicRow: one per row; kGiven: `scales` holds one per row. A zero scale quantises to 0.
// Kp: the padded width, packed::qc8w_kp(K), or packed::qb4w_kp(K, block) for int4 weights.
void quantize_acts(const RunContext& ctx, const float* x, size_t M, size_t K, size_t x_stride,
                   size_t Kp, int bits, ScaleMode mode, const float* scales, QuantizedActs& out);

// y [M x N] = x . W^T + bias for any weight precision; quantises x with `bits`/`mode` first
// when W is integer. `scratch` holds the quantised activations between calls.
void linear(const RunContext& ctx, const float* x, size_t M, size_t x_stride,
            const QuantizedWeights& w, const float* bias, int act_bits, ScaleMode mode,
            const float* act_scales, QuantizedActs& scratch, float* y, size_t y_stride);

// Integer GEMM on already-quantised activations (Kp must match the weights').
void gemm_q(const RunContext& ctx, const QuantizedActs& a, const QuantizedWeights& w,
            const float* bias, float* y, size_t y_stride);

// y [M x N] = a [M x K] . B [K x N] + bias, B given packed (pack_f32_b).
void gemm_f32(const RunContext& ctx, size_t M, size_t N, size_t K, const float* a,
              size_t a_stride, const float* b_packed, const float* bias, float* y,
              size_t y_stride);

// Pack B for gemm_f32. b_is_nk: source holds B^T as [N x K] rows (stride ld), else B as
// [K x N] rows (stride ld). out must hold packed::f32_floats(N, K) floats.
void pack_f32_b(const float* b, size_t K, size_t N, size_t ld, bool b_is_nk, float* out);

// ---- Attention and the position encodings of the newer ViT families (per head, no graph).

// In place: softmax(s * scale + bias) over `rows` rows of T scores (row stride s_stride).
// bias null: the softmax kernel's own softmax(s * scale), bit-identical to the attention before
// biases existed. Otherwise bias holds rows x T additive terms (row stride bias_stride: BEiT's
// relative position bias or vit_relpos's for one head), added to the rounded product s * scale
// (PyTorch's order) by scale_add, then softmax with scale 1, which is exact.
void attention_softmax(const KernelTable& kt, size_t rows, size_t T, float scale, const float* bias,
                       size_t bias_stride, float* s, size_t s_stride);

// One head's fp32 attention of `rows` query rows against T keys:
//   o = softmax(q . K^T * scale + bias) . V
// k_packed: K^T packed by pack_f32_b(k, dh, T, k_stride, /*b_is_nk=*/true) (f32_floats(T, dh)
// floats); v_packed: V by pack_f32_b(v, T, dh, v_stride, false). bias as attention_softmax's.
// scores: rows x T floats of scratch. Runs on the calling thread (callers split heads and rows).
void attend_f32(const KernelTable& kt, size_t rows, size_t T, size_t dh, const float* q, size_t q_stride,
                const float* k_packed, const float* v_packed, float scale, const float* bias,
                size_t bias_stride, float* scores, float* o, size_t o_stride);

// Rotary position embedding (kernels.h's RopeFn) of `heads` heads of hd values in each of T
// token rows of x (row stride x_stride; a q or k slice of a qkv row), in place; the first
// `prefix` tokens (class, registers) are left as they are, as timm's Eva does. sin/cos hold
// the T - prefix patch tokens' tables, timm's layout: [T - prefix, hd] shared by every head
// (per_head false, 'cat' RoPE), or [heads, T - prefix, hd] ('mixed' RoPE).
void apply_rope(const KernelTable& kt, size_t T, size_t prefix, size_t heads, size_t hd, RopeForm form,
                float* x, size_t x_stride, const float* sin, const float* cos, bool per_head);

}  // namespace pyrt
