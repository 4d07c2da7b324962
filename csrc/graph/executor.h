// The executor: runs a model's program -- its typed op list (docs/model_format.md "Ops") --
// on a whole batch in one call, with per-layer precision, per-image activation scales, exit
// heads and compaction of the images that have left.
//
// Semantics are those of docs/model_format.md; pyruntime/_numpy_ref.py is the same forward
// pass written in numpy and the tests hold the two together.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

#include "../ops/ops.h"

namespace pyrt {

enum class ScaleSource { kDynamic, kStatic, kPredicted };
enum class ExitRule { kConfidence, kMargin, kGate };

struct LinearLayer {
  std::string name;
  QuantizedWeights w;
  std::vector<float> bias;  // empty: no bias
  int a_bits = 8;           // ignored for fp32 weights
  ScaleSource scale = ScaleSource::kDynamic;
  float static_scale = 0.0f;
  float clip = 1.0f;          // dynamic: scale = (max |x| / qmax) * clip, 0 < clip <= 1
  std::vector<float> coeffs;  // predicted: scale = sum_k coeffs[k] r^k

  size_t N() const { return w.N; }
  size_t K() const { return w.K; }
  // BOPs of one row: K * N MACs at w_bits x a_bits (fp32: 32 x 32).
  int64_t bops_per_row() const;
};

struct LayerNormParams {
  std::vector<float> weight, bias;
};

// A QuEE gate on an exit head: features of the head's softmax (top-k probabilities, entropy)
// go through a two-layer MLP predicting the error probability of each path -- exit here,
// continue at full precision, continue at reduced precision -- and the image takes
// argmin(error + lambda * cost).
struct Gate {
  size_t topk = 3, hidden = 0;
  std::vector<float> w1, b1, w2, b2;  // [hidden x (topk+1)], [hidden], [3 x hidden], [3]
  float cost[3] = {0, 0, 0};
  // fp32 MACs of the MLP (features -> hidden -> 3) x 32 x 32, paid by every image it decides for
  int64_t bops() const { return int64_t(hidden * (topk + 1) + 3 * hidden) * 32 * 32; }
};
enum Path : uint8_t { kPathExit = 0, kPathFull = 1, kPathReduced = 2 };

struct ExitHead {
  int block = 0;
  LayerNormParams norm;
  float eps = 1e-6f;
  LinearLayer fc;
  ExitRule rule = ExitRule::kConfidence;
  float threshold = 1.0f;
  Gate gate;  // rule == kGate
};

// The program's geometry, from its ops: the input image (patch_embed), the token stream every
// block runs on, the classes of the output.
struct Arch {
  size_t img_h = 0, img_w = 0, patch_h = 0, patch_w = 0, in_chans = 0;
  size_t embed_dim = 0, depth = 0, num_classes = 0, num_prefix = 0;

  size_t grid_h() const { return img_h / patch_h; }
  size_t grid_w() const { return img_w / patch_w; }
  size_t num_patches() const { return grid_h() * grid_w(); }
  size_t tokens() const { return num_patches() + num_prefix; }
  size_t patch_dim() const { return in_chans * patch_h * patch_w; }
};

// Throws std::invalid_argument unless every size `a` declares lies within runtime_limits.h
// (image sides, dimensions, depth, tokens per image, the patch embedding's K). The bindings
// call it before computing any shape from the sizes; the Executor's own validation calls it
// again.
void check_arch_limits(const Arch& a);

struct Predictor {
  int block = -1;  // -1: none
  size_t chunk = 0;
};

// --- the program: one struct per op kind (docs/model_format.md "Ops") -----------------------
// A new op kind is a struct here, its case in Runner::exec (executor.cc), its parser in the
// bindings, and its function in pyruntime/_numpy_ref.py.

struct PatchEmbedOp { LinearLayer linear; };           // patches in (c, i, j) order -> linear
struct PrefixTokensOp { std::vector<float> rows; };    // [n x D] rows put before the input's
struct PosEmbedOp { std::vector<float> pos; };         // + pos [rows x D]
struct LayerNormOp { LayerNormParams p; float eps = 1e-6f; };
struct LinearOp { LinearLayer full, reduced; };        // reduced.w.bits == 0: no QuEE copy
struct AttentionOp { size_t heads = 1; std::vector<float> bias; };  // on fused qkv [T x 3D]; bias: [heads x T x T] or none
// RoPE on fused qkv [T x 3D], in place: q and k of tokens prefix..T-1 rotated per head (ops.h's
// apply_rope), v and the prefix tokens as they are. sin/cos: [T - prefix, dh] shared by the
// heads, or per_head [heads, T - prefix, dh].
struct RopeOp {
  size_t heads = 1, prefix = 0;
  RopeForm form = RopeForm::kInterleaved;
  bool per_head = false;
  std::vector<float> sin, cos;
};
struct SwiGluOp {};                                    // [.. x 2F] -> silu(first half) * second half
struct AttentionPoolOp { size_t heads = 1, start = 0; std::vector<float> query; };  // kv [T x 2D] rows start..; query [D]
struct GeluOp {};
struct QuickGeluOp {};                                // CLIP's x * sigmoid(1.702 x)
struct LayerScaleOp { std::vector<float> gamma; };
struct AddOp {};
struct AverageOp {};                                   // (a + b) / 2
struct PoolOp { bool avg = false; size_t start = 0; }; // token `start`, or mean of rows start..
struct ExitOp { ExitHead head; bool avg = false; size_t start = 0; };
struct OutputOp {};                                    // in: logits, features, tokens

using OpKind = std::variant<PatchEmbedOp, PrefixTokensOp, PosEmbedOp, LayerNormOp, LinearOp, AttentionOp, RopeOp,
                            SwiGluOp, AttentionPoolOp, GeluOp, QuickGeluOp, LayerScaleOp, AddOp, AverageOp, PoolOp,
                            ExitOp, OutputOp>;

struct Op {
  std::string name;
  std::string timer;         // the name profiles time it by
  std::vector<int> in, out;  // tensor ids
  int block = -1;            // -1: outside the blocks
  OpKind kind;
};

// One activation tensor of one image: `rows` rows of `width` values (rows 1: a vector).
struct TensorShape {
  size_t rows = 0, width = 0;
  size_t floats() const { return rows * width; }
};

struct ModelSpec {
  Arch arch;
  std::vector<Op> ops;
  std::vector<TensorShape> tensors;  // by id; id 0 is the image (its shape unused)
  Predictor predictor;
  float gate_lambda = 0.0f;
  // Operand bits of the attention matmuls (q.k^T and attn.v) in every block: 32 (fp32) or 8
  // (q, k, the probabilities and v quantised to int8 per image, docs/model_format.md).
  int attn_bits = 32;
};

struct RunResult {
  std::vector<float> logits;       // [B x num_classes]
  std::vector<int32_t> exit_block; // [B]
  std::vector<int64_t> bops;       // [B]
  std::vector<float> stat;         // [B] the predictor's statistic (NaN when none)
  std::vector<float> exit_logits;  // [exits x B x num_classes], only when collecting
  std::vector<uint8_t> block_path; // [B x depth]: 0 not run, 1 full, 2 reduced precision
  // [B x D] pre-logits features of the head that answered: the final head's pooled (and
  // fc_norm'ed; distilled models: the mean of the class and distillation tokens) features, or
  // an exit head's LayerNorm'ed pooled features.
  std::vector<float> features;
  // [B x T x D], only when asked: every token after the final norm (timm's forward_features);
  // an image that exited early gives its tokens after its exit block, through the final norm.
  std::vector<float> tokens;
};

struct RunOptions {
  // Evaluate every exit head but let no image leave, and return each head's logits (what
  // calibration needs to choose thresholds).
  bool collect_exits = false;
  bool tokens = false;
};

struct ExecWorkspace;  // scratch kept between runs (executor.cc)
struct Plan;           // the program cut into segments, with buffer slots (executor.cc)

class Executor {
 public:
  // Validates the spec (shapes, tokens, exits) and throws std::invalid_argument naming the
  // first problem.
  explicit Executor(ModelSpec spec);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // x: [B x C x H x W] normalised float32. Thread-safe (one run at a time per executor).
  RunResult run(const float* x, size_t B, const RunContext& ctx, const RunOptions& opts = {});

  // Accumulated seconds per op name since the last reset; filled only while profiling.
  void set_profiling(bool on);
  std::map<std::string, double> profile() const;
  void reset_profile();

  const ModelSpec& spec() const { return spec_; }

  // Bytes of scratch kept between runs (sized to one image group, except the residual stream).
  size_t scratch_bytes() const;

 private:
  struct WorkspaceDeleter {
    void operator()(ExecWorkspace* w) const;
  };
  struct PlanDeleter {
    void operator()(Plan* p) const;
  };
  void validate() const;
  friend void reset_executor_locks_in_child();

  ModelSpec spec_;
  std::unique_ptr<Plan, PlanDeleter> plan_;
  // Scratch kept between runs (guarded by mu_) so small models do not pay for allocation.
  std::unique_ptr<ExecWorkspace, WorkspaceDeleter> ws_;
  mutable std::mutex mu_;
  bool profiling_ = false;
  std::map<std::string, double> profile_;
};

}  // namespace pyrt
