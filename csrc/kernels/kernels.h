// Kernel table: one set of function pointers per ISA, filled once at start-up.
//
// Every ISA shares one packed weight layout (below) so that a model packed once can run on
// whichever kernel table dispatch picks, and so tests can run every ISA on the same buffers.
// The layouts suit x86 (AVX2: a ymm holds 8 channels x 4 k; AVX-512 VNNI: a zmm holds a whole
// 16-channel x 4 k group, the shape `vpdpbusd` wants) and ARM (a q-register holds 4 channels
// x 4 k, the shape `sdot`'s lane form wants).
//
// Exactness contract. For the integer GEMMs, the int32 accumulators are exact and the float
// epilogue is performed in a fixed order with no fused multiply-add (the whole library is built
// with -ffp-contract=off), so every ISA returns bit-identical floats:
//   qc8w: y = float(acc) * (a_scale[m] * w_scale[n]) + bias[n]
//   qb4w: s = 0; for each block b in order: s = s + float(acc_b) * w_scale[b][n];
//         y = s * a_scale[m] + bias[n]
//
// The float kernels are bit-identical on every ISA too, because a quantiser follows most of
// them: one ulp that moves a value across a rounding tie of the 8-bit activation quantiser
// changes an integer and the logits by ~1e-3. So each has one canonical evaluation -- the
// operations, their order, and which multiply-adds are fused -- which ref.cc spells out in
// scalar code (std::fma where SIMD fuses) and every SIMD kernel reproduces lane by lane:
//   f32_gemm:  acc = 0; for k = 0 .. K-1: acc = fma(a[m][k], B[k][n], acc)  (float);
//              y = acc + bias[n]. (Vectorised across columns, never across k.)
//   reductions (LayerNorm mean and variance): in double, 8 interleaved lanes over the whole
//              blocks of 8 (lane j takes element i, i % 8 == j), combined as
//              ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), then the remaining n % 8 elements
//              added in order. (AVX2: two __m256d; NEON: four float64x2.) Variance terms are
//              fma(d, d, s) with d = double(x) - mean.
//   layernorm: rstd = float(1 / sqrt(var + eps)) (double, correctly rounded);
//              y = fma(((x - mean_hi) - mean_lo) * rstd, gamma, beta) in float, mean = hi + lo.
//   softmax:   max = (max of x, or min for scale < 0) * scale, which equals the max of x*scale
//              (rounding is monotonic); e = exp(x*scale - max), the product rounded first;
//              sum in float: e zero-padded to a multiple of 32, each block folded to 8 lanes as
//              (e[j] + e[j+8]) + (e[j+16] + e[j+24]), lane j accumulating over the blocks in
//              order, lanes combined as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7));
//              inv = 1.0f / sum; y = e * inv.
//   exp, gelu: ref.cc's exp_canon (shifter-rounded n, one-constant reduction, degree-5
//              polynomial folded with 2^n) and gelu_canon (PyTorch's x/2 (1 + erf(x/sqrt 2)) as
//              fma(x, E, x/2), E a clamped odd/even rational), each fma and rounding as written
//              there.
//   sigmoid:   e = exp_canon(-|z|); (z >= 0 ? 1 : e) / (1 + e) (swiglu, quick_gelu).
//   rope, scale_add: products rounded, then added -- never fused (GCC fuses a multiply into
//              _mm256_addsub_ps even under -ffp-contract=off, so the AVX2 RoPE avoids it).
// Non-finite input. NaN surfaces identically on every ISA: wherever an output depends on a NaN
// input it is NaN (its payload and sign are not specified), and every other output keeps its
// bits. The traps are min/max: x86's minps/maxps return the second operand when either is NaN,
// ARM's FMINNM/FMAXNM return the number, FMIN/FMAX the NaN, and std::min/max the first operand.
// So each clamp is written std::max(x, lo) in ref and maxps(lo, x) on x86 (the same selection,
// NaN kept), ARM uses FMAX/FMIN where NaN must pass, and a row max tracks NaN explicitly. The
// per-kernel rules are stated at each type below; ref.cc spells them out in scalar code.
//
// No estimate instructions (rcp/rsqrt): division and sqrt are the correctly rounded IEEE ops,
// the same on every ISA. Denormals are not flushed (default MXCSR / FPCR).
//
// Activations lie in [-127, 127] (the quantiser never writes -128); weights may use the full
// int8 range. No kernel may saturate: the AVX2 int8 GEMM widens both operands to int16 for
// vpmaddwd (on Zen its multiply ports run that faster than the vpmaddubsw sign trick), the
// AVX-512 VNNI one multiplies w + 128 (unsigned) by activations in vpdpbusd, which sums into
// int32 without saturating, and the int4 GEMMs multiply unsigned nibbles (<= 15) by
// activations, which cannot saturate either.
// The [-127, 127] bound keeps a sign-trick kernel (|w| times sign(a, w)) legal for any ISA
// that wants one; the current kernels are exact even at -128.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyrt {

// Output channels per weight panel.
constexpr size_t kNR = 16;
// K values per packed group (one 32-bit lane).
constexpr size_t kKGroup = 4;
// Quantised activation rows are padded with zeros to a multiple of this many K values, and
// activation block sums are kept at this granularity.
constexpr size_t kKAlign = 32;

// `static`: each file that uses them gets its own copy, so an ISA-flagged file's copy can never
// be the one generic code links to (isa_kernels.h, ISA_ODR).
static constexpr size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static constexpr size_t num_panels(size_t n) { return (n + kNR - 1) / kNR; }

// Preconditions every kernel relies on: Kp is a multiple of kKAlign (so of 4), block is a
// multiple of kKAlign and divides Kp. ops.cc establishes them.
//
// The packed weight layouts (qc8w, qb4w, the f32 B operand), their offsets, strides and
// padding rules: packed_layout.h, the one place they are computed.

// y[M x N] = dequant(a) . dequant(w)^T + bias. `w`, `w_scale` point at a panel boundary;
// N <= panels*16 columns are written. bias may be null. a_stride, y_stride in elements.
using QC8WGemmFn = void (*)(size_t M, size_t N, size_t Kp, const int8_t* a, size_t a_stride,
                            const float* a_scale, const int8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride);

// Same for int4 block weights. a_bsum holds, per row, the sums of each 32-wide k chunk of a
// (row stride bsum_stride), used to undo the +8 offset of the stored nibbles.
using QB4WGemmFn = void (*)(size_t M, size_t N, size_t Kp, size_t block, const int8_t* a,
                            size_t a_stride, const float* a_scale, const int32_t* a_bsum,
                            size_t bsum_stride, const uint8_t* w, const float* w_scale,
                            const float* bias, float* y, size_t y_stride);

// y[M x N] = a[M x K] . B + bias with B packed as above (starting at a panel boundary).
using F32GemmFn = void (*)(size_t M, size_t N, size_t K, const float* a, size_t a_stride,
                           const float* b_packed, const float* bias, float* y, size_t y_stride);

// q[r][k] = nearbyint(clamp(x[r][k] * inv_scale[r], -qmax, qmax)) for k < K, 0 for K <= k < Kp;
// bsum[r][c] = sum of q[r][32c .. 32c+31]. Rounding is to nearest, ties to even, on every ISA.
// The clamp is max(-qmax, x * inv) first, then min: a NaN product quantises to -qmax on every
// ISA (deterministic, not meaningful: the executor refuses or poisons a row whose absmax is
// not finite before quantising it); +-inf clamp to +-qmax.
using QuantizeRowsFn = void (*)(size_t rows, size_t K, size_t Kp, const float* x,
                                size_t x_stride, const float* inv_scale, int qmax, int8_t* q,
                                size_t q_stride, int32_t* bsum, size_t bsum_stride);

// max |x[i]| over n values, as the integer max of the bit patterns with the sign cleared (NaN
// patterns lie above +inf's, so NaN wins whatever the comparison order): the one canonical
// quiet NaN (0x7FC00000) if any x is NaN, else +inf if any is infinite, else the max; +0 for
// n = 0. Callers use a non-finite result to refuse or poison the row.
using AbsMaxFn = float (*)(size_t n, const float* x);

// Row-wise LayerNorm with affine; y may alias x. A NaN or infinity in a row makes the whole row
// NaN (through the mean and variance), on every ISA.
using LayerNormFn = void (*)(size_t rows, size_t D, const float* x, size_t x_stride,
                             const float* gamma, const float* beta, float eps, float* y,
                             size_t y_stride);

// In-place row-wise softmax of `rows` rows of n values after multiplying by `scale`. A NaN in a
// row makes the whole row NaN: the row max is NaN then, and so is exp(NaN). (+inf: inf - inf
// is NaN, so the row is NaN too; a row of -inf likewise.)
using SoftmaxFn = void (*)(size_t rows, size_t n, float scale, float* x, size_t x_stride);

// Softmax of `rows` rows of n scores, quantised for the int8 attn.v GEMM (int8 attention,
// docs/model_format.md): per element y = max((x - max) * log2 e, -126), e = 2^y by the
// canonical exp2_q8 (ref.cc: y = n + f, |f| <= 1/2, degree-4 polynomial, fma as written
// there), q = min(nearbyint(e * 127), 127) in [0, 127]; q[r][i] = 0 for n <= i < Kp;
// scale[r] = 1 / float(sum of the row's q). n >= 1. A row whose max is not finite (a NaN in
// it, or +inf) gets q[r][0 .. Kp) = 0 and scale[r] = NaN, so its attn.v product is NaN.
using SoftmaxQ8Fn = void (*)(size_t rows, size_t n, size_t Kp, const float* x, size_t x_stride,
                             int8_t* q, size_t q_stride, float* scale);

// In-place GELU (erf form), y = x/2 (1 + erf(x / sqrt 2)), evaluated as fma(x, erf(x/sqrt 2)/2,
// x/2) with a rational erf (ref.cc's gelu_canon); |error| < 2.1e-7 max(1, |x|).
// gelu(NaN) = NaN, gelu(+inf) = +inf, gelu(-inf) = NaN (-inf * 0, as PyTorch's).
using GeluFn = void (*)(size_t n, float* x);

// y[i] = a[i] + b[i]; y may alias a or b.
using AddFn = void (*)(size_t n, const float* a, const float* b, float* y);

// y[i] = x[i] * scale + b[i], the product rounded first (never fused), as PyTorch's
// (q k^T) * scale + bias; y may alias x or b. An additive attention bias (BEiT's relative
// position bias, vit_relpos) goes through it before a softmax with scale 1, which then equals
// softmax(x * scale + b) exactly.
using ScaleAddFn = void (*)(size_t n, const float* x, float scale, const float* b, float* y);

// The canonical sigmoid of the gated and quick activations (ref.cc's sigmoid_canon):
// e = exp_canon(-|z|) (the softmax exp, whose argument is never positive here), then
// sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e), one correctly rounded division, so nothing
// overflows and neither tail cancels. Measured (tests/cpp, step 1/256 on [-100, 100]): silu
// and QuickGELU within 3.7e-7 relative of double; 0 below exp's cut at -87.68.
// sigmoid(NaN) = NaN; sigmoid(+inf) = 1, sigmoid(-inf) = 0.

// SwiGLU's gate (timm SwiGLU, SwiGLUPacked): y = silu(g) * u, silu(g) = g * sigmoid(g), each
// product rounded. `rows` rows of n values; strides in elements, so the two halves of a packed
// fc1 output ([rows x 2n]: gate first) are read in place. y may alias g or u (same stride).
// silu(-inf) = -inf * 0 = NaN, silu(+inf) = +inf, as PyTorch's x / (1 + exp(-x)).
using SwiGluFn = void (*)(size_t rows, size_t n, const float* g, size_t g_stride, const float* u,
                          size_t u_stride, float* y, size_t y_stride);

// In-place QuickGELU (CLIP): x * sigmoid(1.702 x), the product 1.702f * x rounded first.
// quick_gelu(-inf) = NaN (-inf * 0), quick_gelu(+inf) = +inf, NaN stays NaN.
using QuickGeluFn = void (*)(size_t n, float* x);

// Rotary position embedding, in place, as timm's apply_rot_embed (pos_embed_sincos.py):
// y = x * cos + rot(x) * sin, each product rounded, then added (not fused) -- PyTorch's eager
// order, so the result equals timm's fp32 bits. Per head, with h = hd / 2:
//   kInterleaved (rot):              y[2i]   = x[2i] c[2i] - x[2i+1] s[2i],
//                                    y[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1];
//   kHalf (rope_rotate_half):        y[i]    = x[i] c[i] - x[i+h] s[i],
//                                    y[i+h]  = x[i+h] c[i+h] + x[i] s[i+h]     (i < h).
// (x c + (-x') s equals x c - x' s: negation is exact.) `rows` tokens, `heads` heads of hd
// values each (hd even), head j of row r at x + r x_stride + j hd. sin/cos: hd values per
// row and head at sin + r tab_stride + j tab_head_stride (tab_head_stride = 0: one table
// shared by the heads, timm's 'cat' RoPE; per head: 'mixed'). Prefix tokens are skipped by
// the caller (they are not rotated).
enum class RopeForm : int { kInterleaved = 0, kHalf = 1 };
using RopeFn = void (*)(size_t rows, size_t heads, size_t hd, RopeForm form, float* x,
                        size_t x_stride, const float* sin, const float* cos, size_t tab_stride,
                        size_t tab_head_stride);

struct KernelTable {
  const char* name = nullptr;
  QuantizeRowsFn quantize_rows = nullptr;
  AbsMaxFn absmax = nullptr;
  QC8WGemmFn qd8_f32_qc8w_gemm = nullptr;
  QB4WGemmFn qd8_f32_qb4w_gemm = nullptr;
  F32GemmFn f32_gemm = nullptr;
  LayerNormFn layernorm = nullptr;
  SoftmaxFn softmax = nullptr;
  SoftmaxQ8Fn softmax_q8 = nullptr;
  GeluFn gelu = nullptr;
  AddFn add = nullptr;
  ScaleAddFn scale_add = nullptr;
  SwiGluFn swiglu = nullptr;
  QuickGeluFn quick_gelu = nullptr;
  RopeFn rope = nullptr;
};

// Tables per ISA (tables.cc: constant data, assembled in baseline code, so asking for one runs
// no ISA instruction). Each returns nullptr when the ISA was not compiled into this build.
// Whether the running CPU supports it is cpu/'s business (cpu/isas.h), and a table's kernels
// must not be called before cpu/ said yes.
const KernelTable* ref_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512vnni_kernels();  // AVX2's table with VNNI integer GEMMs
const KernelTable* neon_kernels();
const KernelTable* neondot_kernels();

}  // namespace pyrt
