#include "executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <set>

#include <pthread.h>
#include <stdexcept>

#include "../kernels/packed_layout.h"
#include "../ops/threadpool.h"
#include "../runtime_limits.h"

namespace pyrt {

int64_t LinearLayer::bops_per_row() const {
  const int64_t wb = w.bits, ab = w.bits == 32 ? 32 : a_bits;
  return int64_t(w.K) * int64_t(w.N) * wb * ab;
}

namespace {

using Clock = std::chrono::steady_clock;

// Working-set budget of one image group of a block (about a core's L2 on the CPUs targeted).
constexpr size_t kBlockGroupBytes = size_t(1) << 20;
// Query rows per attention tile: bounds the per-thread scores scratch to kAttnRows x T.
constexpr size_t kAttnRows = 64;
// Scratch larger than this is released when a run ends, so one huge batch does not keep its
// workspace for the life of the model; below it, buffers are kept to spare small runs the
// allocation.
constexpr size_t kKeepScratchBytes = size_t(32) << 20;

void fail(const std::string& what) { throw std::invalid_argument(what); }

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

void expect_size(const std::vector<float>& v, size_t n, const std::string& name) {
  if (v.size() != n)
    fail(name + " has " + std::to_string(v.size()) + " values, expected " + std::to_string(n));
}

void expect_norm(const LayerNormParams& p, size_t D, const std::string& name) {
  expect_size(p.weight, D, name + ".weight");
  expect_size(p.bias, D, name + ".bias");
}

void expect_linear(const LinearLayer& l, size_t N, size_t K) {
  if (l.w.bits != 4 && l.w.bits != 8 && l.w.bits != 32) fail(l.name + ": weights missing");
  if (l.w.N != N || l.w.K != K)
    fail(l.name + " is [" + std::to_string(l.w.N) + " x " + std::to_string(l.w.K) + "], expected [" +
         std::to_string(N) + " x " + std::to_string(K) + "]");
  if (!l.bias.empty()) expect_size(l.bias, N, l.name + ".bias");
  if (l.w.bits != 32 && (l.a_bits < 4 || l.a_bits > 8)) fail(l.name + ": activation bits must be 4..8");
  if (l.w.bits != 32 && l.scale == ScaleSource::kStatic && !(l.static_scale > 0 && std::isfinite(l.static_scale)))
    fail(l.name + ": static activation scale must be positive");
  if (l.w.bits != 32 && !(l.clip > 0 && l.clip <= 1)) fail(l.name + ": dynamic scale clip must lie in (0, 1]");
  if (l.w.bits != 32 && l.scale == ScaleSource::kPredicted && (l.coeffs.empty() || !all_finite(l.coeffs)))
    fail(l.name + ": predicted scale needs finite polynomial coefficients");
}

// Rows [0, rows) of `row_elems` elements each, in chunks over the pool.
template <typename F>
void parallel_rows(const RunContext& ctx, size_t rows, size_t row_elems, F&& f) {
  if (rows == 0) return;
  const size_t tasks = std::min(rows, task_count(rows * row_elems, kMinTaskElems, ctx.threads));
  const size_t chunk = (rows + tasks - 1) / tasks;
  ThreadPool::global().run((rows + chunk - 1) / chunk, ctx.threads, [&](size_t t) {
    const size_t r0 = t * chunk;
    f(r0, std::min(rows, r0 + chunk));
  });
}

void layernorm_rows(const RunContext& ctx, const LayerNormParams& p, float eps, const float* x,
                    size_t rows, size_t D, float* y) {
  parallel_rows(ctx, rows, D, [&](size_t r0, size_t r1) {
    ctx.kt->layernorm(r1 - r0, D, x + r0 * D, D, p.weight.data(), p.bias.data(), eps, y + r0 * D, D);
  });
}

float eval_poly(const std::vector<float>& c, float r) {
  double s = 0.0;
  for (size_t k = c.size(); k-- > 0;) s = s * r + c[k];
  return static_cast<float>(std::max(s, 1e-12));
}

// Softmax probabilities of one row of logits, in double for a stable decision.
void probabilities(const float* logits, size_t n, std::vector<double>& p) {
  p.resize(n);
  const double mx = *std::max_element(logits, logits + n);
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(double(logits[i]) - mx));
  for (double& v : p) v /= sum;
}

bool exits_here(const ExitHead& e, const float* logits, size_t n, std::vector<double>& p) {
  probabilities(logits, n, p);
  double top1 = 0.0, top2 = 0.0;
  for (double v : p) {
    if (v > top1) {
      top2 = top1;
      top1 = v;
    } else if (v > top2) {
      top2 = v;
    }
  }
  const double score = e.rule == ExitRule::kConfidence ? top1 : top1 - top2;
  return score >= double(e.threshold);
}

// The path a gate sends an image down, from its exit head's logits.
Path gate_decision(const Gate& g, float lambda, const float* logits, size_t n, std::vector<double>& p) {
  probabilities(logits, n, p);
  std::vector<double> f(p);
  std::partial_sort(f.begin(), f.begin() + g.topk, f.end(), std::greater<double>());
  double entropy = 0.0;
  for (double v : p) entropy -= v > 0.0 ? v * std::log(v) : 0.0;
  f.resize(g.topk);
  f.push_back(entropy);
  std::vector<double> h(g.hidden);
  for (size_t j = 0; j < g.hidden; ++j) {
    double s = g.b1[j];
    for (size_t i = 0; i <= g.topk; ++i) s += double(g.w1[j * (g.topk + 1) + i]) * f[i];
    h[j] = std::max(s, 0.0);
  }
  Path best = kPathExit;
  double best_score = 0.0;
  for (int path = 0; path < 3; ++path) {
    double s = g.b2[path];
    for (size_t j = 0; j < g.hidden; ++j) s += double(g.w2[path * g.hidden + j]) * h[j];
    const double score = 1.0 / (1.0 + std::exp(-s)) + double(lambda) * g.cost[path];
    if (path == 0 || score < best_score) {
      best = Path(path);
      best_score = score;
    }
  }
  return best;
}

// Packed operands of one image's head in the attention matmuls.
struct AttnGeometry {
  size_t T, dh;
  size_t kp, vp;             // fp32: floats of packed K^T [dh x T] and V [T x dh]
  size_t kd, kt;             // int8: padded reduction lengths of q.k^T (dh) and attn.v (T)
  size_t k_bytes, q8_bytes;  // int8: packed K [T x kd], then V^T [dh x kt]
  size_t k_scales, q8_scales; // int8: K's per-token scales, then V's per-channel ones
  AttnGeometry(size_t t, size_t d)
      : T(t), dh(d), kp(packed::f32_floats(t, d)), vp(packed::f32_floats(d, t)),
        kd(packed::qc8w_kp(d)), kt(packed::qc8w_kp(t)),
        k_bytes(packed::qc8w_bytes(t, kd)), q8_bytes(k_bytes + packed::qc8w_bytes(d, kt)),
        k_scales(packed::qc8w_scale_count(t)), q8_scales(k_scales + packed::qc8w_scale_count(d)) {}
};

struct AttnScratch {
  AlignedBuffer<float> kv_pack;   // fp32 attention
  AlignedBuffer<int8_t> kv_q8;    // int8 attention, with...
  AlignedBuffer<float> kv_scales; // ...its scales
};

// Per-thread buffers of the int8 attention tasks.
struct Q8Rows {
  AlignedBuffer<int8_t> q;
  AlignedBuffer<float> scale, inv;
  AlignedBuffer<int32_t> bsum;
  AlignedBuffer<float> f;  // float staging (V^T, scores)
};

// Quantises `rows` rows of K floats to int8 with one scale per row, max |x| / 127 (the
// activation quantiser's dynamic rule; a zero or non-finite scale gives zeros), padded with
// zeros to Kp. Writes the scales to `scale` (may be the caller's own array).
void quantize_rows_q8(const KernelTable& kt, size_t rows, size_t K, size_t Kp, const float* x,
                      size_t x_stride, float* scale, Q8Rows& buf) {
  buf.inv.reserve_scratch(rows);
  buf.q.reserve_scratch(rows * Kp);
  buf.bsum.reserve_scratch(rows * packed::act_bsums(Kp));
  for (size_t r = 0; r < rows; ++r) {
    const ScalePair s = usable_scale(kt.absmax(K, x + r * x_stride) / 127.0f);
    scale[r] = s.scale;
    buf.inv[r] = s.inv;
  }
  kt.quantize_rows(rows, K, Kp, x, x_stride, buf.inv.data(), 127, buf.q.data(), Kp, buf.bsum.data(),
                   packed::act_bsums(Kp));
}

// One head's K [T x dh] (rows `stride` apart in qkv) as int8 qc8w "weights", a scale per
// token: q.k^T then runs on the linear layers' integer GEMM. `scales`: g.k_scales floats.
void pack_k_q8(const KernelTable& kt, const AttnGeometry& g, const float* k, size_t stride, int8_t* out,
               float* scales) {
  thread_local Q8Rows buf;
  std::fill(scales, scales + g.k_scales, 0.0f);
  quantize_rows_q8(kt, g.T, g.dh, g.kd, k, stride, scales, buf);
  pack_qc8w_rows(buf.q.data(), g.kd, g.T, g.kd, out);
}

// One head's V [T x dh] as the int8 weights of attn.v: V^T [dh x T], a scale per channel.
// The scales come from a vertical max; each value is scaled by its channel's 1/scale in float
// (the product the quantiser forms) and rounded by quantize_rows with unit scales, keeping the
// token-major order, so the pack transposes bytes rather than floats. `scales`:
// g.q8_scales - g.k_scales floats.
void pack_v_q8(const KernelTable& kt, const AttnGeometry& g, const float* v, size_t stride, int8_t* out,
               float* scales) {
  thread_local Q8Rows buf;
  const size_t T = g.T, dh = g.dh, dp = packed::qc8w_kp(dh);
  buf.scale.reserve_scratch(dh);
  float* inv = buf.scale.data();
  std::fill(inv, inv + dh, 0.0f);
  for (size_t t = 0; t < T; ++t)
    for (size_t c = 0; c < dh; ++c) inv[c] = std::max(inv[c], std::fabs(v[t * stride + c]));
  std::fill(scales, scales + (g.q8_scales - g.k_scales), 0.0f);
  for (size_t c = 0; c < dh; ++c) {
    const ScalePair s = usable_scale(inv[c] / 127.0f);
    scales[c] = s.scale;
    inv[c] = s.inv;
  }
  buf.f.reserve_scratch(T * dh);
  for (size_t t = 0; t < T; ++t)
    for (size_t c = 0; c < dh; ++c) buf.f[t * dh + c] = v[t * stride + c] * inv[c];
  buf.inv.reserve_scratch(T);
  std::fill(buf.inv.data(), buf.inv.data() + T, 1.0f);
  buf.q.reserve_scratch(g.kt * dp);
  buf.bsum.reserve_scratch(T * packed::act_bsums(dp));
  kt.quantize_rows(T, dh, dp, buf.f.data(), dh, buf.inv.data(), 127, buf.q.data(), dp, buf.bsum.data(),
                   packed::act_bsums(dp));
  std::memset(buf.q.data() + T * dp, 0, (g.kt - T) * dp);  // padding tokens
  // Packed: panel p, k-group gk (tokens 4gk..4gk+3), channel c, j holds V[4gk + j][16p + c];
  // channels >= dh are zero already (quantize_rows pads each token's row to dp >= 16 panels).
  const int8_t* vq = buf.q.data();
  for (size_t p = 0; p < num_panels(dh); ++p)
    for (size_t gk = 0; gk < g.kt / kKGroup; ++gk) {
      int8_t* dst = out + p * packed::qc8w_panel_bytes(g.kt) + packed::qc8w_group_offset(gk, 0);
      const int8_t* src = vq + gk * kKGroup * dp + p * kNR;
      for (size_t c = 0; c < kNR; ++c)
        for (size_t j = 0; j < kKGroup; ++j) dst[packed::qc8w_group_offset(0, c) + j] = src[j * dp + c];
    }
}

// Attention of `rows` query rows of one head on int8 operands: q quantised per row (the
// 1/sqrt(dh) folded into its scale), s = q.k^T, p = softmax_q8(s) (probabilities straight to
// int8, each row's scale 1/sum), o = p.v.
// bias (null: none): rows x T additive terms (row stride T) added to the dequantised scores.
void attend_q8(const KernelTable& kt, const AttnGeometry& g, size_t rows, const float* q, size_t q_stride,
               float scale, const int8_t* packed, const float* scales, const float* bias, float* o, size_t o_stride) {
  thread_local Q8Rows buf;
  thread_local AlignedBuffer<float> a_scale;
  a_scale.reserve_scratch(rows);
  quantize_rows_q8(kt, rows, g.dh, g.kd, q, q_stride, a_scale.data(), buf);
  for (size_t r = 0; r < rows; ++r) a_scale[r] *= scale;
  buf.f.reserve_scratch(rows * g.T);
  float* s = buf.f.data();
  kt.qd8_f32_qc8w_gemm(rows, g.T, g.kd, buf.q.data(), g.kd, a_scale.data(), packed, scales, nullptr, s, g.T);
  if (bias) kt.add(rows * g.T, s, bias, s);
  buf.q.reserve_scratch(rows * g.kt);
  kt.softmax_q8(rows, g.T, g.kt, s, g.T, buf.q.data(), g.kt, a_scale.data());
  kt.qd8_f32_qc8w_gemm(rows, g.dh, g.kt, buf.q.data(), g.kt, a_scale.data(), packed + g.k_bytes,
                       scales + g.k_scales, nullptr, o, o_stride);
}

}  // namespace

// Every size the graph declares, against runtime_limits.h, before anything is computed from
// them: products of unchecked sizes can wrap, and a small file must not ask for a huge buffer.
void check_arch_limits(const Arch& a) {
  auto within = [](size_t v, size_t most, const char* what) {
    if (v == 0 || v > most) fail(std::string("arch: ") + what + " must be in 1.." + std::to_string(most) + ", got " + std::to_string(v));
  };
  within(a.img_h, kMaxImageSide, "image height");
  within(a.img_w, kMaxImageSide, "image width");
  within(a.patch_h, a.img_h, "patch height");
  within(a.patch_w, a.img_w, "patch width");
  within(a.in_chans, kMaxDim, "in_chans");
  within(a.embed_dim, kMaxDim, "embed_dim");
  within(a.depth, kMaxDepth, "depth");
  within(a.num_classes, kMaxDim, "num_classes");
  if (a.num_prefix > kMaxTokens) fail("arch: " + std::to_string(a.num_prefix) + " prefix tokens exceed " + std::to_string(kMaxTokens));
  // in_chans * patch area is the patch embedding's K; the patch sides are bounded by the image's.
  if (a.patch_dim() > kMaxK) fail("arch: a patch holds " + std::to_string(a.patch_dim()) + " values, more than " + std::to_string(kMaxK));
  if (a.tokens() > kMaxTokens)
    fail("arch: " + std::to_string(a.tokens()) + " tokens per image exceed the limit of " + std::to_string(kMaxTokens));
}

struct ExecWorkspace {
  // x: the residual stream of the batch; slots: the buffers a segment's tensors live in
  // (Plan); patches: the patch embedding's unfolded input; the rest: the exit heads'.
  AlignedBuffer<float> patches, x, pooled, pooled2, logits;
  std::vector<AlignedBuffer<float>> slots;
  AttnScratch attn_scratch;
  QuantizedActs qa;
  std::vector<float> row_scale;

  // Calls f on every buffer.
  template <typename F>
  void each(F&& f) {
    for (auto* b : {&patches, &x, &pooled, &pooled2, &logits, &attn_scratch.kv_pack, &attn_scratch.kv_scales,
                    &qa.scale, &qa.inv_scale})
      f(*b);
    for (auto& b : slots) f(b);
    f(attn_scratch.kv_q8);
    f(qa.q);
    f(qa.bsum);
  }

  size_t bytes() {
    size_t n = row_scale.capacity() * sizeof(float);
    each([&](auto& buf) { n += buf.size() * sizeof(*buf.data()); });
    return n;
  }

  // Frees every buffer above kKeepScratchBytes (the next run allocates what it needs again).
  void release_large() {
    each([](auto& buf) {
      if (buf.size() * sizeof(*buf.data()) > kKeepScratchBytes) buf.resize(0);
    });
    if (row_scale.capacity() * sizeof(float) > kKeepScratchBytes) std::vector<float>().swap(row_scale);
  }
};

size_t Executor::scratch_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return ws_->bytes();
}

void Executor::WorkspaceDeleter::operator()(ExecWorkspace* w) const { delete w; }

// Every live executor, so that a child of fork() can reset their locks: a lock held by another
// thread of the parent at the fork (inside run()) is copied held, and that thread does not exist
// in the child, so its first run() on the model would wait forever. Heap-allocated and never
// destroyed, like the thread pool, so that nothing here runs at exit.
namespace {
std::mutex& registry_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::set<Executor*>& registry() {
  static auto* s = new std::set<Executor*>;
  return *s;
}
}  // namespace

// In the child, one thread: the parent's lock states mean nothing, so fresh locks replace them
// (never unlocked or destroyed: they may be held by a thread that is not here).
void reset_executor_locks_in_child() {
  new (&registry_mutex()) std::mutex;
  for (Executor* e : registry()) new (&e->mu_) std::mutex;
}


// --- the plan: the op list cut into segments, each tensor in a buffer slot ----------------------

namespace {
constexpr int kStream = -1;  // the residual stream ws.x (a block's or the head's input)
constexpr int kImage = -2;   // the input images

// Ops whose output may overwrite their first input once nothing reads it any more.
bool in_place(const OpKind& k) {
  return std::holds_alternative<LayerNormOp>(k) || std::holds_alternative<GeluOp>(k) ||
         std::holds_alternative<RopeOp>(k) ||
         std::holds_alternative<QuickGeluOp>(k) ||
         std::holds_alternative<LayerScaleOp>(k) || std::holds_alternative<AddOp>(k) ||
         std::holds_alternative<AverageOp>(k) || std::holds_alternative<PosEmbedOp>(k);
}
}  // namespace

// Ops run together on a group of images: the embedding, one block's body, or the head.
struct Segment {
  std::vector<size_t> ops;          // indices into ModelSpec::ops, in order
  int in = -1, out = -1;            // tensor ids: what the segment reads and leaves
  std::map<int, int> slot;          // tensor -> buffer slot, kStream or kImage
  std::vector<size_t> slot_floats;  // per slot: the most floats one image's tensor there needs
  size_t max_floats = 0;            // the largest tensor of one image (sets the group size)
};

struct Plan {
  Segment embed, head;
  std::vector<Segment> blocks;
  std::vector<int> exit_of_block;   // op index of the block's exit, -1 for none
  std::vector<const ExitOp*> exits; // in block order (collect_exits' order)
  std::vector<uint8_t> has_reduced; // per block: some linear has a QuEE copy
  std::vector<size_t> tokens_chain; // head ops from the stream to the tokens output
  int logits = -1, features = -1, tokens = -1;
};

void Executor::PlanDeleter::operator()(Plan* p) const { delete p; }

namespace {

// Slots by liveness: an in-place op takes over its first input's slot when that input is read
// no further; every other output takes a free slot (or a new one). `keep` are read after the
// segment (never freed).
Segment plan_segment(const ModelSpec& s, std::vector<size_t> ops, int in, int in_slot, const std::set<int>& keep) {
  Segment g;
  g.ops = std::move(ops);
  g.in = in;
  g.slot[in] = in_slot;
  std::map<int, size_t> last;
  for (size_t i = 0; i < g.ops.size(); ++i)
    for (int t : s.ops[g.ops[i]].in) last[t] = i;
  std::vector<int> free;
  auto floats = [&](int t) { return s.tensors[size_t(t)].floats(); };
  if (in_slot != kImage) g.max_floats = floats(in);
  for (size_t i = 0; i < g.ops.size(); ++i) {
    const Op& op = s.ops[g.ops[i]];
    for (int t : op.in)
      if (!g.slot.count(t)) fail(op.name + ": input tensor " + std::to_string(t) + " is not computed in its segment");
    std::vector<int> dying;
    for (int t : op.in)
      if (last[t] == i && !keep.count(t) && std::find(dying.begin(), dying.end(), t) == dying.end()) dying.push_back(t);
    for (size_t o = 0; o < op.out.size(); ++o) {
      const int t = op.out[o];
      g.max_floats = std::max(g.max_floats, floats(t));
      const int first = op.in.empty() ? kImage : op.in[0];
      const auto it = std::find(dying.begin(), dying.end(), first);
      if (o == 0 && in_place(op.kind) && it != dying.end() && g.slot[first] != kImage && floats(first) == floats(t)) {
        g.slot[t] = g.slot[first];
        dying.erase(it);
        continue;
      }
      int k;
      if (!free.empty()) {
        k = free.back();
        free.pop_back();
      } else {
        k = int(g.slot_floats.size());
        g.slot_floats.push_back(0);
      }
      g.slot_floats[size_t(k)] = std::max(g.slot_floats[size_t(k)], floats(t));
      g.slot[t] = k;
    }
    for (int t : dying)
      if (g.slot[t] >= 0) free.push_back(g.slot[t]);
  }
  g.out = g.ops.empty() ? in : s.ops[g.ops.back()].out[0];
  return g;
}

Plan make_plan(const ModelSpec& s) {
  Plan p;
  const size_t depth = s.arch.depth, n = s.ops.size();
  if (n < 2 || !std::holds_alternative<PatchEmbedOp>(s.ops[0].kind) || !std::holds_alternative<OutputOp>(s.ops[n - 1].kind))
    fail("the program must start with patch_embed and end with output");
  size_t i = 0;
  std::vector<size_t> embed;
  for (; i < n && s.ops[i].block < 0; ++i) embed.push_back(i);
  p.embed = plan_segment(s, embed, 0, kImage, {});
  int stream = p.embed.out;
  p.exit_of_block.assign(depth, -1);
  p.has_reduced.assign(depth, 0);
  for (size_t b = 0; b < depth; ++b) {
    std::vector<size_t> body;
    for (; i < n && s.ops[i].block == int(b) && !std::holds_alternative<ExitOp>(s.ops[i].kind); ++i) {
      body.push_back(i);
      if (auto* l = std::get_if<LinearOp>(&s.ops[i].kind)) p.has_reduced[b] |= l->reduced.w.bits != 0;
      if (std::holds_alternative<PatchEmbedOp>(s.ops[i].kind) || std::holds_alternative<OutputOp>(s.ops[i].kind) ||
          std::holds_alternative<PrefixTokensOp>(s.ops[i].kind))
        fail(s.ops[i].name + ": this op kind cannot run inside a block");
    }
    if (body.empty()) fail("block " + std::to_string(b) + " has no ops (blocks must come in order)");
    p.blocks.push_back(plan_segment(s, body, stream, kStream, {}));
    stream = p.blocks.back().out;
    const TensorShape& st = s.tensors[size_t(stream)];
    if (st.rows != s.arch.tokens() || st.width != s.arch.embed_dim)
      fail("block " + std::to_string(b) + " must leave token rows [T x D]");
    if (i < n && s.ops[i].block == int(b)) {  // its exit
      const auto* e = std::get_if<ExitOp>(&s.ops[i].kind);
      if (s.ops[i].in.size() != 1 || s.ops[i].in[0] != stream)
        fail(s.ops[i].name + ": an exit reads its block's output");
      p.exit_of_block[b] = int(i);
      p.exits.push_back(e);
      ++i;
    }
  }
  std::vector<size_t> head;
  for (; i + 1 < n; ++i) {
    if (s.ops[i].block >= 0) fail(s.ops[i].name + ": block ops after the head started");
    head.push_back(i);
  }
  const Op& out = s.ops[n - 1];
  if (out.in.size() != 3) fail("output takes logits, features and tokens");
  p.logits = out.in[0];
  p.features = out.in[1];
  p.tokens = out.in[2];
  p.head = plan_segment(s, head, stream, kStream, {p.logits, p.features, p.tokens});
  for (int t : {p.logits, p.features, p.tokens})
    if (!p.head.slot.count(t)) fail("output: its inputs must be computed after the last block");
  // The ops an early-exiting image's tokens go through: single-input in-place ops from the
  // stream to the tokens output.
  std::map<int, size_t> producer;
  for (size_t k : head) producer[s.ops[k].out[0]] = k;
  for (int t = p.tokens; t != stream;) {
    const auto it = producer.find(t);
    if (it == producer.end()) fail("output: tokens must come from the last block's output");
    const Op& op = s.ops[it->second];
    if (op.in.size() != 1 || !in_place(op.kind)) fail(op.name + ": the tokens output must come through single-input elementwise ops");
    p.tokens_chain.insert(p.tokens_chain.begin(), it->second);
    t = op.in[0];
  }
  return p;
}

}  // namespace

Executor::Executor(ModelSpec spec) : spec_(std::move(spec)), ws_(new ExecWorkspace) {
  validate();
  plan_.reset(new Plan(make_plan(spec_)));
  static std::once_flag at_fork;
  std::call_once(at_fork, [] { pthread_atfork(nullptr, nullptr, reset_executor_locks_in_child); });
  std::lock_guard<std::mutex> lk(registry_mutex());
  registry().insert(this);
}

Executor::~Executor() {
  std::lock_guard<std::mutex> lk(registry_mutex());
  registry().erase(this);
}

// Every op's weights against the shapes of its tensors, and the scale sources' order.
void Executor::validate() const {
  const Arch& a = spec_.arch;
  check_arch_limits(a);
  const size_t D = a.embed_dim, NC = a.num_classes;
  const Predictor& pr = spec_.predictor;
  if (pr.block >= int(a.depth) || (pr.block >= 0 && pr.chunk == 0)) fail("bad scale predictor");
  auto check_predicted = [&](const LinearLayer& l, int block) {
    if (l.w.bits != 32 && l.scale == ScaleSource::kPredicted && (pr.block < 0 || block <= pr.block))
      fail(l.name + ": a predicted scale needs a predictor at an earlier block");
  };
  auto shape = [&](const Op& op, int t) -> const TensorShape& {
    if (t < 0 || size_t(t) >= spec_.tensors.size()) fail(op.name + ": tensor id out of range");
    return spec_.tensors[size_t(t)];
  };
  int prev_exit = -1;
  for (const Op& op : spec_.ops) {
    for (int t : op.in) shape(op, t);
    for (int t : op.out) shape(op, t);
    const int order = op.block < 0 ? (&op == &spec_.ops.front() ? -1 : int(a.depth)) : op.block;
    const TensorShape* x = op.in.empty() ? nullptr : &shape(op, op.in[0]);
    if (auto* k = std::get_if<PatchEmbedOp>(&op.kind)) {
      expect_linear(k->linear, D, a.patch_dim());
      check_predicted(k->linear, -1);
    } else if (auto* k = std::get_if<PrefixTokensOp>(&op.kind)) {
      expect_size(k->rows, a.num_prefix * D, op.name + " prefix tokens");
    } else if (auto* k = std::get_if<PosEmbedOp>(&op.kind)) {
      expect_size(k->pos, x->floats(), op.name + " pos");
    } else if (auto* k = std::get_if<LayerNormOp>(&op.kind)) {
      expect_norm(k->p, x->width, op.name);
      if (!(k->eps > 0.0f) || !std::isfinite(k->eps)) fail(op.name + ": eps must be a positive finite float32");
    } else if (auto* k = std::get_if<LinearOp>(&op.kind)) {
      const TensorShape& y = shape(op, op.out[0]);
      expect_linear(k->full, y.width, x->width);
      check_predicted(k->full, order);
      if (k->reduced.w.bits != 0) {
        expect_linear(k->reduced, y.width, x->width);
        check_predicted(k->reduced, order);
      }
    } else if (auto* k = std::get_if<AttentionOp>(&op.kind)) {
      if (x->rows != a.tokens() || x->width != 3 * D || k->heads == 0 || D % k->heads)
        fail(op.name + ": attention needs qkv [T x 3D] and heads dividing D");
    } else if (auto* k = std::get_if<RopeOp>(&op.kind)) {
      if (k->heads == 0 || x->width % (3 * k->heads) || (x->width / (3 * k->heads)) % 2 || k->prefix >= x->rows)
        fail(op.name + ": rope needs qkv [T x 3 heads dh] with dh even and a prefix shorter than T");
      const size_t table = (x->rows - k->prefix) * (x->width / 3) / (k->per_head ? 1 : k->heads);
      expect_size(k->sin, table, op.name + " sin");
      expect_size(k->cos, table, op.name + " cos");
    } else if (std::holds_alternative<SwiGluOp>(op.kind)) {
      const TensorShape& y = shape(op, op.out[0]);
      if (y.width * 2 != x->width || y.rows != x->rows) fail(op.name + ": swiglu halves its input's width");
    } else if (auto* k = std::get_if<AttentionPoolOp>(&op.kind)) {
      if (k->heads == 0 || x->width % (2 * k->heads) || k->query.size() != x->width / 2 || k->start >= x->rows)
        fail(op.name + ": attention pooling needs kv [T x 2D], heads dividing D and a query of D values");
    } else if (auto* k = std::get_if<LayerScaleOp>(&op.kind)) {
      expect_size(k->gamma, x->width, op.name + " gamma");
    } else if (auto* k = std::get_if<PoolOp>(&op.kind)) {
      if (k->start >= x->rows) fail(op.name + ": pooling start outside the tokens");
    } else if (auto* k = std::get_if<ExitOp>(&op.kind)) {
      const ExitHead& e = k->head;
      if (e.block <= prev_exit || e.block >= int(a.depth) - 1 || e.block != op.block)
        fail("exit blocks must be increasing and < depth - 1 (the final head answers after the last block)");
      prev_exit = e.block;
      if (k->start >= x->rows) fail(op.name + ": pooling start outside the tokens");
      expect_norm(e.norm, D, op.name + ".norm");
      expect_linear(e.fc, NC, D);
      check_predicted(e.fc, e.block);
      if (!(e.threshold >= 0.0f && e.threshold <= 1.0f)) fail("exit thresholds must lie in [0, 1]");
      if (e.rule == ExitRule::kGate) {
        const Gate& g = e.gate;
        const std::string n = "gates." + std::to_string(e.block);
        if (g.topk < 1 || g.topk > NC || g.hidden < 1) fail(n + ": bad gate sizes");
        expect_size(g.w1, g.hidden * (g.topk + 1), n + ".fc1.weight");
        expect_size(g.b1, g.hidden, n + ".fc1.bias");
        expect_size(g.w2, 3 * g.hidden, n + ".fc2.weight");
        expect_size(g.b2, 3, n + ".fc2.bias");
        for (float c : g.cost)
          if (!(c >= 0.0f) || !std::isfinite(c)) fail(n + ": path costs must be finite and >= 0");
      }
    } else if (std::holds_alternative<OutputOp>(op.kind)) {
      if (shape(op, op.in[0]).floats() != NC || shape(op, op.in[1]).floats() != D ||
          shape(op, op.in[2]).rows != a.tokens() || shape(op, op.in[2]).width != D)
        fail("output: logits [n], features [D] and tokens [T x D] expected");
    }
  }
  if (!(spec_.gate_lambda >= 0.0f) || !std::isfinite(spec_.gate_lambda)) fail("gate lambda must be finite and >= 0");
  if (spec_.attn_bits != 8 && spec_.attn_bits != 32) fail("attention bits must be 8 or 32");
}

void Executor::set_profiling(bool on) {
  std::lock_guard<std::mutex> lk(mu_);
  profiling_ = on;
}

std::map<std::string, double> Executor::profile() const {
  std::lock_guard<std::mutex> lk(mu_);
  return profile_;
}

void Executor::reset_profile() {
  std::lock_guard<std::mutex> lk(mu_);
  profile_.clear();
}

namespace {

// Everything one run needs to know about where its rows belong.
struct Batch {
  std::vector<size_t> active;  // original image index of each image still running
  std::vector<float> stat;     // predictor statistic per original image
  size_t n_full = 0;           // active[0, n_full) run full precision, the rest reduced
  RunResult* res;
  // Per original image: a non-finite value met its forward pass. Its answer becomes NaN at the
  // end, on every ISA alike: quantising a non-finite row would otherwise give plausible logits
  // (a NaN or Inf scale quantises to zeros) that differ between kernels.
  std::vector<uint8_t> nonfinite;

  void mark_nonfinite(size_t i) { nonfinite[active[i]] = 1; }

  // Marks each of `images` active images from `first` whose `per_image` values at x are not
  // all finite (absmax is NaN or Inf then, on every ISA).
  void check_finite(const KernelTable& kt, const float* x, size_t first, size_t images, size_t per_image) {
    for (size_t i = 0; i < images; ++i)
      if (!std::isfinite(kt.absmax(per_image, x + i * per_image))) mark_nonfinite(first + i);
  }
};

class Runner {
 public:
  Runner(const ModelSpec& s, const Plan& p, const RunContext& ctx, ExecWorkspace& workspace, bool profiling,
         std::map<std::string, double>& prof)
      : s_(s), p_(p), a_(s.arch), ctx_(ctx), ws(workspace), profiling_(profiling), prof_(prof),
        ptr_(s.tensors.size(), nullptr) {}

  template <typename F>
  void timed(const std::string& name, F&& f) {
    if (!profiling_) {
      f();
      return;
    }
    const auto t0 = Clock::now();
    f();
    prof_[name] += std::chrono::duration<double>(Clock::now() - t0).count();
  }

  // y = x . W^T + b for `rows` rows, `rows_per_image` of them per active image; scales and
  // BOPs are per image, so an image gets the same numbers alone or in any batch.
  void linear_rows(const LinearLayer& l, const float* x, size_t rows, size_t rows_per_image,
                   float* y, Batch& b, QuantizedActs& qa, std::vector<float>& row_scale,
                   size_t first_image = 0) {
    const size_t images = rows / rows_per_image, K = l.K();
    const size_t* active = b.active.data() + first_image;
    for (size_t i = 0; i < images; ++i) b.res->bops[active[i]] += int64_t(rows_per_image) * l.bops_per_row();
    if (l.w.bits == 32) {
      gemm_f32(ctx_, rows, l.N(), K, x, K, l.w.f32.data(), l.bias.empty() ? nullptr : l.bias.data(), y, l.N());
      return;
    }
    const float qmax = float((1 << (l.a_bits - 1)) - 1);
    row_scale.resize(rows);
    // Per-row max |x| on the pool (max is exact in any order), reduced per image below: the
    // dynamic scale, and for every scale source the check that the rows are finite (absmax
    // returns NaN or Inf for a row holding one, on every ISA).
    parallel_rows(ctx_, rows, K, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; ++r) row_scale[r] = ctx_.kt->absmax(K, x + r * K);
    });
    for (size_t i = 0; i < images; ++i) {
      const auto first = row_scale.begin() + i * rows_per_image, last = first + rows_per_image;
      const bool finite = std::all_of(first, last, [](float v) { return std::isfinite(v); });
      float s = finite ? (*std::max_element(first, last) / qmax) * l.clip : 0.0f;
      if (l.scale == ScaleSource::kStatic) s = l.static_scale;
      if (l.scale == ScaleSource::kPredicted) s = eval_poly(l.coeffs, b.stat[active[i]]);
      if (!finite || !std::isfinite(s)) b.mark_nonfinite(first_image + i);
      std::fill(first, last, s);
    }
    quantize_acts(ctx_, x, rows, K, K, l.w.Kp, l.a_bits, ScaleMode::kGiven, row_scale.data(), qa);
    gemm_q(ctx_, qa, l.w, l.bias.empty() ? nullptr : l.bias.data(), y, l.N());
  }

  // A linear over active images [first, first + count) (x and y hold just those), T rows
  // each: full-precision images (active[0, n_full)) with the primary weights, reduced-precision
  // ones with the QuEE copy when the layer has one.
  void block_linear(const LinearLayer& full, const LinearLayer& reduced, const float* x, size_t T,
                    float* y, Batch& b, QuantizedActs& qa, std::vector<float>& row_scale,
                    size_t first, size_t count) {
    const size_t end = first + count;
    const size_t split = reduced.w.bits == 0 ? end : std::min(end, std::max(first, b.n_full));
    if (split > first) linear_rows(full, x, (split - first) * T, T, y, b, qa, row_scale, first);
    if (split < end)
      linear_rows(reduced, x + (split - first) * T * full.K(), (end - split) * T, T,
                  y + (split - first) * T * full.N(), b, qa, row_scale, split);
  }

  // Multi-head self-attention of `images` images: qkv [images*T x 3D] -> out [images*T x D].
  // Images are processed in waves so the packed K/V buffers stay small for big batches; each
  // wave packs K and V of every head (separate tasks: an odd head count balances better),
  // then runs query rows in tasks. fp32 or int8 operands as the spec says.
  // SigLIP's attention pooling in fp32: per image and head, the fixed query row against the
  // image's keys and values (attend_f32 with one query row: the same kernels as attention).
  void attention_pool(const float* kv, size_t images, float* out, size_t rows, size_t start, size_t D, size_t H,
                      const std::vector<float>& query) {
    const size_t dh = D / H, T = rows - start;
    const AttnGeometry g(T, dh);
    const float scale = 1.0f / std::sqrt(float(dh));
    ThreadPool::global().run(images * H, ctx_.threads, [&](size_t t) {
      const size_t img = t / H, h = t % H;
      thread_local AlignedBuffer<float> pack, scores;
      pack.reserve_scratch(g.kp + g.vp);
      scores.reserve_scratch(T);
      const float* k = kv + (img * rows + start) * 2 * D + h * dh;
      pack_f32_b(k, dh, T, 2 * D, /*b_is_nk=*/true, pack.data());
      pack_f32_b(k + D, T, dh, 2 * D, /*b_is_nk=*/false, pack.data() + g.kp);
      attend_f32(*ctx_.kt, 1, T, dh, query.data() + h * dh, dh, pack.data(), pack.data() + g.kp, scale, nullptr, 0,
                 scores.data(), out + img * D + h * dh, D);
    });
  }

  void attention(const float* qkv, size_t images, float* out, AttnScratch& ws, size_t T, size_t D, size_t H,
                 const std::vector<float>& bias) {
    const size_t dh = D / H;
    const bool q8 = s_.attn_bits == 8;
    const AttnGeometry g(T, dh);
    const size_t threads = size_t(std::max(ctx_.threads, 1));
    const size_t wave = std::max<size_t>(1, std::min(images, (4 * threads + H - 1) / H));
    if (q8) {
      ws.kv_q8.reserve_scratch(wave * H * g.q8_bytes);
      ws.kv_scales.reserve_scratch(wave * H * g.q8_scales);
    } else {
      ws.kv_pack.reserve_scratch(wave * H * (g.kp + g.vp));
    }
    const float scale = 1.0f / std::sqrt(float(dh));
    for (size_t i0 = 0; i0 < images; i0 += wave) {
      const size_t n = std::min(wave, images - i0);
      ThreadPool::global().run(2 * n * H, ctx_.threads, [&](size_t t) {
        const size_t ih = t / 2, img = i0 + ih / H, h = ih % H;
        const float* k = qkv + img * T * 3 * D + D + h * dh;
        const bool is_v = t % 2 == 1;
        if (q8) {
          int8_t* packed = ws.kv_q8.data() + ih * g.q8_bytes;
          float* scales = ws.kv_scales.data() + ih * g.q8_scales;
          if (is_v)
            pack_v_q8(*ctx_.kt, g, k + D, 3 * D, packed + g.k_bytes, scales + g.k_scales);
          else
            pack_k_q8(*ctx_.kt, g, k, 3 * D, packed, scales);
        } else if (!is_v)
          pack_f32_b(k, dh, T, 3 * D, /*b_is_nk=*/true, ws.kv_pack.data() + ih * (g.kp + g.vp));
        else
          pack_f32_b(k + D, T, dh, 3 * D, /*b_is_nk=*/false, ws.kv_pack.data() + ih * (g.kp + g.vp) + g.kp);
      });
      // Split query rows too, so that batch 1 still has enough tasks per thread to balance
      // (3 heads on 2 threads: 9 tasks would leave one thread 5 to the other's 4).
      const size_t splits = threads == 1 ? 1 : std::max<size_t>(1, std::min(T / 12, (16 * threads + n * H - 1) / (n * H)));
      const size_t rows = (T + splits - 1) / splits;
      ThreadPool::global().run(n * H * splits, ctx_.threads, [&](size_t t) {
        const size_t part = t % splits, ih = t / splits, img = i0 + ih / H, h = ih % H;
        const size_t r0 = part * rows, r1 = std::min(T, r0 + rows);
        if (r0 >= r1) return;
        // Row tiles of at most kAttnRows: the scores' scratch is O(kAttnRows x T) per thread,
        // not T^2, whatever the token count and thread count.
        for (size_t t0 = r0; t0 < r1; t0 += kAttnRows) {
          const size_t n_rows = std::min(kAttnRows, r1 - t0);
          const float* q = qkv + (img * T + t0) * 3 * D + h * dh;
          float* o = out + (img * T + t0) * D + h * dh;
          const float* b = bias.empty() ? nullptr : bias.data() + (h * T + t0) * T;
          if (q8) {
            attend_q8(*ctx_.kt, g, n_rows, q, 3 * D, scale, ws.kv_q8.data() + ih * g.q8_bytes,
                      ws.kv_scales.data() + ih * g.q8_scales, b, o, D);
            continue;
          }
          thread_local AlignedBuffer<float> scores;
          scores.reserve_scratch(kAttnRows * T);
          const float* pk = ws.kv_pack.data() + ih * (g.kp + g.vp);
          ctx_.kt->f32_gemm(n_rows, T, dh, q, 3 * D, pk, nullptr, scores.data(), T);
          attention_softmax(*ctx_.kt, n_rows, T, scale, b, T, scores.data(), T);
          ctx_.kt->f32_gemm(n_rows, dh, T, scores.data(), T, pk + g.kp, nullptr, o, D);
        }
      });
    }
  }

  // Row `start` of each image's T x D tokens, or the mean of rows start..T-1.
  void pool(const float* x, size_t images, size_t T, size_t D, bool avg, size_t start, float* pooled) {
    for (size_t i = 0; i < images; ++i) {
      const float* xi = x + i * T * D;
      float* pi = pooled + i * D;
      if (!avg) {
        std::memcpy(pi, xi + start * D, D * sizeof(float));
        continue;
      }
      std::vector<double> acc(D, 0.0);
      for (size_t t = start; t < T; ++t)
        for (size_t d = 0; d < D; ++d) acc[d] += xi[t * D + d];
      for (size_t d = 0; d < D; ++d) pi[d] = float(acc[d] / double(T - start));
    }
  }

  // Patches of `images` images in (c, i, j) order, row-major over the grid, into ws.patches.
  void unfold(const float* input, size_t images) {
    const Arch& a = a_;
    const size_t P = a.num_patches(), PD = a.patch_dim();
    ws.patches.reserve_scratch(images * P * PD);
    // Over the input's rows in memory order (one task row = one image row of patches): each
    // image row is read once, sequentially, and scattered to its grid row's patches; (c, i, j)
    // order within a patch, like the conv weight.
    const size_t gh = a.grid_h(), gw = a.grid_w(), ph = a.patch_h, pw = a.patch_w, H = a.img_h, W = a.img_w;
    const size_t C = a.in_chans;
    parallel_rows(ctx_, images * gh, gw * PD, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; ++r) {
        const size_t img = r / gh, gy = r % gh;
        float* dst = ws.patches.data() + (img * P + gy * gw) * PD;
        for (size_t c = 0; c < C; ++c)
          for (size_t i = 0; i < ph; ++i) {
            const float* src = input + ((img * C + c) * H + gy * ph + i) * W;
            for (size_t gx = 0; gx < gw; ++gx)
              std::memcpy(dst + gx * PD + (c * ph + i) * pw, src + gx * pw, pw * sizeof(float));
          }
      }
    });
  }

  // One op on active images [first, first + count), whose tensors ptr_ points at (each
  // tensor's images `floats()` apart). The one place each op kind's semantics live in C++.
  void exec(const Op& op, Batch& b, size_t first, size_t count) {
    const float* x = op.in.empty() ? nullptr : ptr_[size_t(op.in[0])];
    const TensorShape& xs = s_.tensors[size_t(op.in.empty() ? 0 : op.in[0])];
    float* y = op.out.empty() ? nullptr : ptr_[size_t(op.out[0])];
    const TensorShape& ys = s_.tensors[size_t(op.out.empty() ? 0 : op.out[0])];
    const size_t rows = count * xs.rows;
    auto copy_in = [&] {
      if (y != x) std::memmove(y, x, count * xs.floats() * sizeof(float));
    };
    if (auto* k = std::get_if<PatchEmbedOp>(&op.kind)) {
      timed(op.timer + ".unfold", [&] { unfold(x, count); });
      timed(op.timer, [&] {
        linear_rows(k->linear, ws.patches.data(), count * ys.rows, ys.rows, y, b, ws.qa, ws.row_scale, first);
      });
    } else if (auto* k = std::get_if<PrefixTokensOp>(&op.kind)) {
      timed(op.timer, [&] {
        const size_t n = k->rows.size(), xf = xs.floats();
        for (size_t i = 0; i < count; ++i) {
          std::memcpy(y + i * (n + xf), k->rows.data(), n * sizeof(float));
          std::memcpy(y + i * (n + xf) + n, x + i * xf, xf * sizeof(float));
        }
      });
    } else if (auto* k = std::get_if<PosEmbedOp>(&op.kind)) {
      timed(op.timer, [&] {
        copy_in();
        const size_t f = xs.floats();
        for (size_t i = 0; i < count; ++i)
          for (size_t j = 0; j < f; ++j) y[i * f + j] += k->pos[j];
      });
    } else if (auto* k = std::get_if<LayerNormOp>(&op.kind)) {
      timed(op.timer, [&] { layernorm_rows(ctx_, k->p, k->eps, x, rows, xs.width, y); });
    } else if (auto* k = std::get_if<LinearOp>(&op.kind)) {
      timed(op.timer, [&] { block_linear(k->full, k->reduced, x, xs.rows, y, b, ws.qa, ws.row_scale, first, count); });
    } else if (auto* k = std::get_if<AttentionOp>(&op.kind)) {
      // Int8 attention quantises q, k and v with scales from their maxima: a non-finite value
      // there would quietly become zeros, so it is caught here.
      if (s_.attn_bits == 8) b.check_finite(*ctx_.kt, x, first, count, xs.floats());
      const size_t T = xs.rows, D = ys.width;
      const int64_t bops = int64_t(2) * int64_t(T) * int64_t(T) * int64_t(D) * s_.attn_bits * s_.attn_bits;
      for (size_t i = 0; i < count; ++i) b.res->bops[b.active[first + i]] += bops;
      timed(op.timer, [&] { attention(x, count, y, ws.attn_scratch, T, D, k->heads, k->bias); });
    } else if (auto* k = std::get_if<RopeOp>(&op.kind)) {
      timed(op.timer, [&] {
        copy_in();
        const size_t T = xs.rows, W = xs.width, D = W / 3, hd = D / k->heads;
        // q and k of each image rotate independently: a task each.
        ThreadPool::global().run(2 * count, ctx_.threads, [&](size_t t) {
          float* img = y + (t / 2) * T * W + (t % 2) * D;
          apply_rope(*ctx_.kt, T, k->prefix, k->heads, hd, k->form, img, W, k->sin.data(), k->cos.data(), k->per_head);
        });
      });
    } else if (std::holds_alternative<SwiGluOp>(op.kind)) {
      timed(op.timer, [&] {
        const size_t W = xs.width, F = W / 2;
        parallel_rows(ctx_, rows, W, [&](size_t r0, size_t r1) {
          ctx_.kt->swiglu(r1 - r0, F, x + r0 * W, W, x + r0 * W + F, W, y + r0 * F, F);
        });
      });
    } else if (auto* k = std::get_if<AttentionPoolOp>(&op.kind)) {
      const size_t T = xs.rows, D = ys.width;
      const int64_t bops = int64_t(2) * int64_t(T - k->start) * int64_t(D) * 32 * 32;  // always fp32
      for (size_t i = 0; i < count; ++i) b.res->bops[b.active[first + i]] += bops;
      timed(op.timer, [&] { attention_pool(x, count, y, T, k->start, D, k->heads, k->query); });
    } else if (std::holds_alternative<GeluOp>(op.kind)) {
      timed(op.timer, [&] {
        copy_in();
        const size_t W = xs.width;
        parallel_rows(ctx_, rows, W, [&](size_t r0, size_t r1) { ctx_.kt->gelu((r1 - r0) * W, y + r0 * W); });
      });
    } else if (std::holds_alternative<QuickGeluOp>(op.kind)) {
      timed(op.timer, [&] {
        copy_in();
        const size_t W = xs.width;
        parallel_rows(ctx_, rows, W, [&](size_t r0, size_t r1) { ctx_.kt->quick_gelu((r1 - r0) * W, y + r0 * W); });
      });
    } else if (auto* k = std::get_if<LayerScaleOp>(&op.kind)) {
      timed(op.timer, [&] {
        const size_t W = xs.width;
        parallel_rows(ctx_, rows, W, [&](size_t r0, size_t r1) {
          for (size_t r = r0; r < r1; ++r)
            for (size_t d = 0; d < W; ++d) y[r * W + d] = k->gamma[d] * x[r * W + d];
        });
      });
    } else if (std::holds_alternative<AddOp>(op.kind)) {
      const float* h = ptr_[size_t(op.in[1])];
      timed(op.timer, [&] {
        const size_t W = xs.width;
        parallel_rows(ctx_, rows, W, [&](size_t r0, size_t r1) { ctx_.kt->add((r1 - r0) * W, x + r0 * W, h + r0 * W, y + r0 * W); });
      });
    } else if (std::holds_alternative<AverageOp>(op.kind)) {
      const float* h = ptr_[size_t(op.in[1])];
      timed(op.timer, [&] {
        for (size_t j = 0; j < count * xs.floats(); ++j) y[j] = (x[j] + h[j]) / 2.0f;
      });
    } else if (auto* k = std::get_if<PoolOp>(&op.kind)) {
      timed(op.timer, [&] { pool(x, count, xs.rows, xs.width, k->avg, k->start, y); });
    } else {
      fail(op.name + ": this op kind runs only where the executor places it (exit, output)");
    }
  }

  // Points ptr_ at the buffers of a segment's tensors for a group of `count` images: the
  // stream slice `stream` (or the images), and slot k's start for the rest.
  void bind(const Segment& g, const float* input, float* stream, size_t count) {
    for (size_t k = 0; k < g.slot_floats.size(); ++k) {
      if (ws.slots.size() <= k) ws.slots.resize(k + 1);
      ws.slots[k].reserve_scratch(count * g.slot_floats[k]);
    }
    for (const auto& [t, k] : g.slot)
      ptr_[size_t(t)] = k == kStream ? stream : k == kImage ? const_cast<float*>(input) : ws.slots[size_t(k)].data();
  }

  // Runs a segment's ops on active images [first, first + count).
  void run_segment(const Segment& g, Batch& b, size_t first, size_t count) {
    for (size_t i : g.ops) exec(s_.ops[i], b, first, count);
  }

  // The embedding, a group of images at a time, into the residual stream ws.x.
  void embed(const float* input, size_t B, Batch& batch) {
    const Segment& g = p_.embed;
    const size_t TD = a_.tokens() * a_.embed_dim, CHW = a_.in_chans * a_.img_h * a_.img_w;
    const size_t per_image = std::max(g.max_floats, a_.num_patches() * a_.patch_dim());
    const size_t group = std::min(B, std::max<size_t>(1, kBlockGroupBytes / (per_image * sizeof(float))));
    for (size_t g0 = 0; g0 < B; g0 += group) {
      const size_t gi = std::min(group, B - g0);
      float* xg = ws.x.data() + g0 * TD;
      bind(g, input + g0 * CHW, xg, gi);
      run_segment(g, batch, g0, gi);
      if (ptr_[size_t(g.out)] != xg) std::memcpy(xg, ptr_[size_t(g.out)], gi * TD * sizeof(float));
    }
  }

  // Block l's body on the active images, `group` images at a time, reusing the start of the
  // slot buffers, so that each op's output is still in L2 when the next op reads it (at batch 8
  // whole-batch ops were 10-18% slower per image than at batch 1, from L3 traffic).
  void block(size_t l, Batch& batch) {
    const Segment& g = p_.blocks[l];
    const size_t TD = a_.tokens() * a_.embed_dim, imgs = batch.active.size();
    const size_t group = std::max<size_t>(1, kBlockGroupBytes / (g.max_floats * sizeof(float)));
    for (size_t g0 = 0; g0 < imgs; g0 += group) {
      const size_t gi = std::min(group, imgs - g0);
      float* xg = ws.x.data() + g0 * TD;
      bind(g, nullptr, xg, gi);
      run_segment(g, batch, g0, gi);
      if (ptr_[size_t(g.out)] != xg) std::memcpy(xg, ptr_[size_t(g.out)], gi * TD * sizeof(float));
      batch.check_finite(*ctx_.kt, xg, g0, gi, TD);
    }
  }

  // An exit head after block l: every active image's logits; with collect_exits they are only
  // recorded, else each image exits, continues at full precision or (a gate) at reduced
  // precision, and the images that go on are compacted to the front of the residual stream.
  void exit_head(const ExitOp& op, size_t exit_index, size_t l, Batch& batch, const RunOptions& opts,
                 std::vector<double>& probs) {
    const ExitHead& e = op.head;
    const bool collect_exits = opts.collect_exits;
    const size_t T = a_.tokens(), D = a_.embed_dim, NC = a_.num_classes, B = batch.stat.size();
    RunResult& res = *batch.res;
    const size_t imgs = batch.active.size();
    float* x = ws.x.data();
    pool(x, imgs, T, D, op.avg, op.start, ws.pooled.data());
    ctx_.kt->layernorm(imgs, D, ws.pooled.data(), D, e.norm.weight.data(), e.norm.bias.data(), e.eps, ws.pooled2.data(), D);
    linear_rows(e.fc, ws.pooled2.data(), imgs, 1, ws.logits.data(), batch, ws.qa, ws.row_scale);
    if (collect_exits) {
      for (size_t i = 0; i < imgs; ++i)
        std::memcpy(res.exit_logits.data() + (exit_index * B + batch.active[i]) * NC, ws.logits.data() + i * NC, NC * sizeof(float));
      return;
    }
    std::vector<Path> path(imgs);
    for (size_t i = 0; i < imgs; ++i) {
      const float* li = ws.logits.data() + i * NC;
      if (e.rule == ExitRule::kGate) {
        path[i] = gate_decision(e.gate, s_.gate_lambda, li, NC, probs);
        res.bops[batch.active[i]] += e.gate.bops();
      } else {
        path[i] = exits_here(e, li, NC, probs) ? kPathExit : (i < batch.n_full ? kPathFull : kPathReduced);
      }
      if (path[i] == kPathExit) {
        const size_t orig = batch.active[i];
        std::memcpy(res.logits.data() + orig * NC, li, NC * sizeof(float));
        std::memcpy(res.features.data() + orig * D, ws.pooled2.data() + i * D, D * sizeof(float));
        if (opts.tokens) final_tokens(x + i * T * D, i, batch, res.tokens.data() + orig * T * D);
        res.exit_block[orig] = int32_t(l);
      }
    }
    compact(path, T * D, batch);
  }

  // One image's tokens (active image i) through the ops that make the tokens output (the final
  // norm: timm's forward_features), into `out`.
  void final_tokens(const float* x, size_t i, Batch& b, float* out) {
    std::memcpy(out, x, a_.tokens() * a_.embed_dim * sizeof(float));
    for (size_t k : p_.tokens_chain) {
      const Op& op = s_.ops[k];
      ptr_[size_t(op.in[0])] = out;
      ptr_[size_t(op.out[0])] = out;
      exec(op, b, i, 1);
    }
  }

  // Images that exit leave; the rest move up so later blocks run on fewer rows, full-precision
  // images first (a gate may switch an image either way).
  void compact(const std::vector<Path>& path, size_t image_floats, Batch& batch) {
    float* x = ws.x.data();
    const size_t imgs = path.size(), bytes = image_floats * sizeof(float);
    std::vector<size_t> full, reduced;
    for (size_t i = 0; i < imgs; ++i) {
      if (path[i] == kPathFull) full.push_back(i);
      if (path[i] == kPathReduced) reduced.push_back(i);
    }
    // A reduced image that precedes a full one would be overwritten by moving the full images up:
    // those few are set aside first (they are the only ones that can move backwards).
    std::vector<float> aside;
    std::vector<size_t> aside_of;
    for (size_t k = 0; k < reduced.size(); ++k)
      if (!full.empty() && reduced[k] < full.back()) aside_of.push_back(k);
    aside.resize(aside_of.size() * image_floats);
    for (size_t j = 0; j < aside_of.size(); ++j) std::memcpy(aside.data() + j * image_floats, x + reduced[aside_of[j]] * image_floats, bytes);
    std::vector<size_t> active;
    for (size_t i : full) {
      if (i != active.size()) std::memmove(x + active.size() * image_floats, x + i * image_floats, bytes);
      active.push_back(batch.active[i]);
    }
    size_t next_aside = 0;
    for (size_t k = 0; k < reduced.size(); ++k) {
      float* dst = x + active.size() * image_floats;
      if (next_aside < aside_of.size() && aside_of[next_aside] == k) {
        std::memcpy(dst, aside.data() + next_aside++ * image_floats, bytes);
      } else if (reduced[k] != active.size()) {
        std::memmove(dst, x + reduced[k] * image_floats, bytes);
      }
      active.push_back(batch.active[reduced[k]]);
    }
    batch.active = std::move(active);
    batch.n_full = full.size();
  }

  // The ops after the last block on the images still running, then their outputs.
  void head(Batch& batch, const RunOptions& opts) {
    const Segment& g = p_.head;
    const size_t T = a_.tokens(), D = a_.embed_dim, NC = a_.num_classes, imgs = batch.active.size();
    RunResult& res = *batch.res;
    bind(g, nullptr, ws.x.data(), imgs);
    run_segment(g, batch, 0, imgs);
    const float* logits = ptr_[size_t(p_.logits)];
    const float* features = ptr_[size_t(p_.features)];
    const float* tokens = ptr_[size_t(p_.tokens)];
    for (size_t i = 0; i < imgs; ++i) {
      const size_t orig = batch.active[i];
      std::memcpy(res.logits.data() + orig * NC, logits + i * NC, NC * sizeof(float));
      std::memcpy(res.features.data() + orig * D, features + i * D, D * sizeof(float));
      if (opts.tokens) std::memcpy(res.tokens.data() + orig * T * D, tokens + i * T * D, T * D * sizeof(float));
    }
  }

 private:
  const ModelSpec& s_;
  const Plan& p_;
  const Arch& a_;
  const RunContext& ctx_;
  ExecWorkspace& ws;
  bool profiling_;
  std::map<std::string, double>& prof_;
  std::vector<float*> ptr_;  // each tensor's data for the current group (see bind)
};

// ScalePredictor's robust range statistic: the mean over chunks of `chunk` consecutive values
// of each chunk's max |x|.
float range_statistic(const KernelTable& kt, const float* x, size_t n, size_t chunk) {
  double sum = 0.0;
  size_t count = 0;
  for (size_t i = 0; i < n; i += chunk, ++count) sum += kt.absmax(std::min(chunk, n - i), x + i);
  return count ? float(sum / double(count)) : 0.0f;
}

}  // namespace

RunResult Executor::run(const float* input, size_t B, const RunContext& ctx, const RunOptions& opts) {
  const bool collect_exits = opts.collect_exits;
  std::lock_guard<std::mutex> lk(mu_);
  const Arch& a = spec_.arch;
  const Plan& plan = *plan_;
  const size_t T = a.tokens(), D = a.embed_dim, NC = a.num_classes;
  RunResult res;
  res.logits.assign(B * NC, 0.0f);
  res.exit_block.assign(B, int32_t(a.depth) - 1);
  res.bops.assign(B, 0);
  res.stat.assign(B, std::numeric_limits<float>::quiet_NaN());
  if (collect_exits) res.exit_logits.assign(plan.exits.size() * B * NC, 0.0f);
  res.features.assign(B * D, 0.0f);
  if (opts.tokens) res.tokens.assign(B * T * D, 0.0f);
  res.block_path.assign(B * a.depth, 0);
  if (B == 0) return res;

  Batch batch{std::vector<size_t>(B), std::vector<float>(B, std::numeric_limits<float>::quiet_NaN()), B, &res,
              std::vector<uint8_t>(B, 0)};
  std::iota(batch.active.begin(), batch.active.end(), size_t{0});
  ExecWorkspace& ws = *ws_;
  // Whatever happens, a run leaves no oversized scratch behind.
  struct Trim {
    ExecWorkspace& ws;
    ~Trim() { ws.release_large(); }
  } trim{ws};
  Runner run(spec_, plan, ctx, ws, profiling_, profile_);

  // The residual stream of the whole batch is the one buffer that must hold every image; the
  // slots are sized to one group of images (embedding or block), so their size does not grow
  // with the batch (the head's hold one vector per image).
  ws.x.reserve_scratch(B * T * D);
  run.embed(input, B, batch);

  ws.pooled.reserve_scratch(B * D);
  ws.pooled2.reserve_scratch(B * D);
  ws.logits.reserve_scratch(B * NC);
  size_t next_exit = 0;
  std::vector<double> probs;

  for (size_t l = 0; l < a.depth && !batch.active.empty(); ++l) {
    const size_t imgs = batch.active.size();
    float* x = ws.x.data();
    // An image past a gate's "reduced" decision runs reduced only where the block has a
    // reduced copy of some layer; otherwise it ran the block's full weights, and says so.
    for (size_t i = 0; i < imgs; ++i)
      res.block_path[batch.active[i] * a.depth + l] = i < batch.n_full || !plan.has_reduced[l] ? kPathFull : kPathReduced;
    run.block(l, batch);

    if (spec_.predictor.block == int(l)) {
      for (size_t i = 0; i < imgs; ++i) {
        const float r = range_statistic(*ctx.kt, x + i * T * D, T * D, spec_.predictor.chunk);
        batch.stat[batch.active[i]] = r;
        res.stat[batch.active[i]] = r;
      }
    }

    if (plan.exit_of_block[l] >= 0) {
      const size_t exit_index = next_exit++;
      const Op& op = spec_.ops[size_t(plan.exit_of_block[l])];
      run.timed(op.timer, [&] { run.exit_head(*plan.exits[exit_index], exit_index, l, batch, opts, probs); });
    }
  }

  if (!batch.active.empty()) run.head(batch, opts);

  // Images that met a non-finite value answer NaN (every head's logits, with collect_exits).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t img = 0; img < B; ++img) {
    const float* li = res.logits.data() + img * NC;
    if (!std::all_of(li, li + NC, [](float v) { return std::isfinite(v); })) batch.nonfinite[img] = 1;
    if (!batch.nonfinite[img]) continue;
    std::fill(res.logits.begin() + img * NC, res.logits.begin() + (img + 1) * NC, nan);
    std::fill_n(res.features.begin() + img * D, D, nan);
    if (opts.tokens) std::fill_n(res.tokens.begin() + img * T * D, T * D, nan);
    for (size_t e = 0; collect_exits && e < plan.exits.size(); ++e)
      std::fill_n(res.exit_logits.begin() + (e * B + img) * NC, NC, nan);
  }
  return res;
}

}  // namespace pyrt
