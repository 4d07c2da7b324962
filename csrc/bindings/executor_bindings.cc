// Builds an Executor from the graph (the model file's JSON, as a Python dict) and its tensors
// (numpy arrays, typically memory-mapped from the file). Every missing or mis-shaped entry is
// a ValueError naming it; pyruntime.load turns those into FormatError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <variant>

#include "bindings/gil.h"
#include "cpu/cpu.h"
#include "graph/executor.h"
#include "runtime_limits.h"

namespace py = pybind11;
using namespace pyrt;

int pick_threads(std::optional<long long> t);  // module.cc

namespace {

[[noreturn]] void bad(const std::string& msg) { throw py::value_error(msg); }

py::array tensor(const py::dict& t, const std::string& name) {
  if (!t.contains(name)) bad("missing tensor '" + name + "'");
  py::object v = t[py::str(name)];
  if (!py::isinstance<py::array>(v)) bad("tensor '" + name + "' is a " + std::string(py::str(py::type::handle_of(v).attr("__name__"))) + ", not a numpy array");
  return py::reinterpret_borrow<py::array>(v);
}

// `shape` holds sizes already bounded by the limits (build_spec checks them first), so the
// casts to ssize_t are exact.
template <typename T>
py::array_t<T, py::array::c_style> typed(const py::dict& t, const std::string& name, std::vector<ssize_t> shape) {
  py::array a = tensor(t, name);
  // equal, not is: an unpickled array's dtype is an equal but distinct object (byte order still counts)
  if (!a.dtype().equal(py::dtype::of<T>())) bad("tensor '" + name + "' has dtype " + std::string(py::str(a.dtype())));
  if (a.ndim() != ssize_t(shape.size())) bad("tensor '" + name + "' has the wrong number of dimensions");
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && a.shape(i) != shape[i])
      bad("tensor '" + name + "' has shape mismatch in dimension " + std::to_string(i) + ": " +
          std::to_string(a.shape(i)) + " != " + std::to_string(shape[i]));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

std::vector<float> floats(const py::dict& t, const std::string& name) {
  py::array a = tensor(t, name);
  if (!a.dtype().equal(py::dtype::of<float>())) bad("tensor '" + name + "' must be float32");  // as typed()
  auto f = py::array_t<float, py::array::c_style>::ensure(a);
  std::vector<float> v(f.data(), f.data() + f.size());
  for (float x : v)
    if (!std::isfinite(x)) bad("tensor '" + name + "' contains NaN or Inf");
  return v;
}

std::vector<float> floats_if(const py::dict& t, const std::string& name) {
  return t.contains(name) ? floats(t, name) : std::vector<float>{};
}

template <typename T>
T get(const py::dict& d, const char* key, const std::string& where) {
  if (!d.contains(key)) bad(where + ": missing '" + key + "'");
  try {
    return d[key].cast<T>();
  } catch (const py::cast_error&) {
    bad(where + ": '" + key + "' has the wrong type");
  }
}

// One linear layer: `p` its policy entry, weights under `prefix` (the layer's name, or
// "<name>:lo" for a QuEE reduced-precision variant), bias under "<name>.bias".
LinearLayer linear_from(const py::dict& graph, const py::dict& p, const py::dict& t, const std::string& name,
                        const std::string& prefix, size_t N, size_t K);

LinearLayer linear(const py::dict& graph, const py::dict& t, const std::string& name, size_t N, size_t K) {
  const py::dict layers = get<py::dict>(graph, "layers", "graph");
  if (!layers.contains(name)) bad("graph.layers has no entry for '" + name + "'");
  return linear_from(graph, layers[py::str(name)].cast<py::dict>(), t, name, name, N, K);
}

// The reduced-precision variant of a block linear, if the graph's gates name one.
LinearLayer linear_lo(const py::dict& graph, const py::dict& t, const std::string& name, size_t N, size_t K) {
  if (!graph.contains("gates") || graph["gates"].is_none()) return {};
  const py::dict gates = graph["gates"].cast<py::dict>();
  const py::dict reduced = get<py::dict>(gates, "reduced", "gates");
  if (!reduced.contains(name)) return {};
  return linear_from(graph, reduced[py::str(name)].cast<py::dict>(), t, name + ":lo", name + ":lo", N, K);
}

LinearLayer linear_from(const py::dict& graph, const py::dict& p, const py::dict& t, const std::string& name,
                        const std::string& prefix, size_t N, size_t K) {
  LinearLayer l;
  l.name = name;
  const int bits = get<int>(p, "w_bits", name);
  if (bits == 32) {
    auto w = typed<float>(t, prefix + ".weight", {ssize_t(N), ssize_t(K)});
    for (ssize_t i = 0; i < w.size(); ++i)
      if (!std::isfinite(w.data()[i])) bad("tensor '" + prefix + ".weight' contains NaN or Inf");
    l.w = pack_f32(w.data(), N, K);
  } else if (bits == 8) {
    auto q = typed<int8_t>(t, prefix + ".weight.q8", {ssize_t(N), ssize_t(K)});
    std::vector<float> s = floats(t, prefix + ".weight.scale");
    if (s.size() != N) bad("tensor '" + prefix + ".weight.scale' must have N values");
    for (ssize_t i = 0; i < q.size(); ++i)
      if (q.data()[i] == -128) bad("tensor '" + prefix + ".weight.q8' holds -128 (outside [-127, 127])");
    l.w = pack_qc8w(q.data(), s.data(), N, K);
  } else if (bits == 4) {
    const size_t block = p.contains("block_size") ? get<size_t>(p, "block_size", name) : 32;
    try {
      check_integer_weights(4, K, block);
    } catch (const std::invalid_argument& e) {
      bad(name + ": " + e.what());
    }
    auto q4 = typed<uint8_t>(t, prefix + ".weight.q4", {ssize_t(N), ssize_t((K + 1) / 2)});
    std::vector<float> s = floats(t, prefix + ".weight.scale");
    if (s.size() != N * ((K + block - 1) / block)) bad("tensor '" + prefix + ".weight.scale' has the wrong size");
    std::vector<int8_t> q(N * K);
    for (size_t n = 0; n < N; ++n)
      for (size_t k = 0; k < K; ++k) {
        const uint8_t byte = q4.data()[n * ((K + 1) / 2) + k / 2];
        q[n * K + k] = int8_t(((k % 2) ? byte >> 4 : byte & 0x0F) - 8);
      }
    l.w = pack_qb4w(q.data(), s.data(), N, K, block);
  } else {
    bad(name + ": w_bits must be 4, 8 or 32, got " + std::to_string(bits));
  }
  const std::string base = prefix.substr(0, prefix.find(':'));
  l.bias = floats_if(t, base + ".bias");
  if (bits != 32) {
    l.a_bits = get<int>(p, "a_bits", name);
    const std::string scale = p.contains("scale") ? p["scale"].cast<std::string>() : "dynamic";
    if (scale == "dynamic") {
      l.scale = ScaleSource::kDynamic;
      if (p.contains("clip")) l.clip = get<float>(p, "clip", name);
    } else if (scale == "static") {
      l.scale = ScaleSource::kStatic;
      l.static_scale = get<float>(p, "static_scale", name);
    } else if (scale == "predicted") {
      l.scale = ScaleSource::kPredicted;
      if (graph.contains("predictor") && !graph["predictor"].is_none()) {
        const py::dict pred = graph["predictor"].cast<py::dict>();
        const py::dict coeffs = get<py::dict>(pred, "coeffs", "predictor");
        if (coeffs.contains(prefix)) l.coeffs = coeffs[py::str(prefix)].cast<std::vector<float>>();
        for (float c : l.coeffs)
          if (!std::isfinite(c)) bad(name + ": predictor coefficients must be finite float32 values");
      }
    } else {
      bad(name + ": unknown scale mode '" + scale + "'");
    }
  }
  return l;
}

Gate gate(const py::dict& graph, const py::dict& t, int block) {
  const std::string n = "gates." + std::to_string(block);
  if (!graph.contains("gates") || graph["gates"].is_none()) bad("exit at block " + std::to_string(block) + " is a gate but the graph has no gates");
  const py::dict gd = graph["gates"].cast<py::dict>();
  Gate g;
  g.topk = get<size_t>(gd, "topk", "gates");
  g.hidden = get<size_t>(gd, "hidden", "gates");
  if (g.topk < 1 || g.topk > kMaxDim || g.hidden < 1 || g.hidden > kMaxDim)
    bad("gates: topk and hidden must be in 1.." + std::to_string(kMaxDim));
  const py::dict costs = get<py::dict>(gd, "cost", "gates");
  const std::string key = std::to_string(block);
  if (!costs.contains(key)) bad("gates.cost has no entry for block " + key);
  const auto c = costs[py::str(key)].cast<std::vector<float>>();
  if (c.size() != 3) bad("gates.cost[" + key + "] must hold 3 values (exit, full, reduced)");
  std::copy(c.begin(), c.end(), g.cost);
  g.w1 = floats(t, n + ".fc1.weight");
  g.b1 = floats(t, n + ".fc1.bias");
  g.w2 = floats(t, n + ".fc2.weight");
  g.b2 = floats(t, n + ".fc2.bias");
  return g;
}

// --- the op list -> typed op structs ---------------------------------------------------------

// What parsing one op knows: the graph, the tensors, the tensor ids and shapes so far.
struct Parser {
  const py::dict& graph;
  const py::dict& t;
  ModelSpec& s;
  std::map<std::string, int> ids{{"image", 0}};

  int input(const std::string& op, const std::string& name) const {
    const auto it = ids.find(name);
    if (it == ids.end()) bad("op '" + op + "': input tensor '" + name + "' is produced by no earlier op");
    return it->second;
  }
  int output(const std::string& op, const std::string& name, TensorShape shape) {
    if (ids.count(name)) bad("op '" + op + "': output tensor '" + name + "' is already defined");
    if (shape.rows > kMaxTokens)
      bad("op '" + op + "': " + std::to_string(shape.rows) + " tokens per image exceed the limit of " + std::to_string(kMaxTokens));
    if (shape.rows == 0 || shape.width == 0 || shape.width > 3 * kMaxDim)
      bad("op '" + op + "': output '" + name + "' has an unsupported shape");
    ids[name] = int(s.tensors.size());
    s.tensors.push_back(shape);
    return ids[name];
  }
};

size_t bounded(const py::dict& attrs, const char* key, const std::string& op, size_t most) {
  const size_t v = get<size_t>(attrs, key, "op '" + op + "'");
  if (v == 0 || v > most) bad("op '" + op + "': " + key + " must be in 1.." + std::to_string(most));
  return v;
}

std::string str_of(const py::dict& d, const char* key, const std::string& where) { return get<std::string>(d, key, where); }

// The exit entry of graph.exits for a block: rule, threshold, gate.
ExitHead exit_entry(const py::dict& graph, const py::dict& t, int block) {
  if (graph.contains("exits") && !graph["exits"].is_none())
    for (const py::handle& h : graph["exits"].cast<py::list>()) {
      const py::dict e = h.cast<py::dict>();
      if (get<int>(e, "block", "exit") != block) continue;
      ExitHead x;
      x.block = block;
      const std::string n = "exits." + std::to_string(block);
      const std::string rule = get<std::string>(e, "rule", n);
      if (rule != "confidence" && rule != "margin" && rule != "gate") bad(n + ": unknown exit rule '" + rule + "'");
      x.rule = rule == "confidence" ? ExitRule::kConfidence : rule == "margin" ? ExitRule::kMargin : ExitRule::kGate;
      x.threshold = get<float>(e, "threshold", n);
      if (x.rule == ExitRule::kGate) x.gate = gate(graph, t, x.block);
      return x;
    }
  bad("an exit op after block " + std::to_string(block) + " has no entry in graph.exits");
}

// The name profiles time an op by: the embedding's token assembly as one "embed", the head as
// one "head", the attention core as "<name>.core", everything else by its name
// (pyruntime/latency.py reads these).
std::string timer_name(const std::string& kind, const std::string& name, int block, bool before_blocks) {
  if (block < 0 && kind != "patch_embed") return before_blocks ? "embed" : "head";
  return kind == "attention" ? name + ".core" : name;
}

// One op of the graph as its typed struct, with its output tensors' shapes: one case per kind.
Op parse_op(Parser& ps, const py::dict& d, bool before_blocks) {
  Op op;
  op.name = str_of(d, "name", "op");
  const std::string kind = str_of(d, "op", op.name);
  const std::string& n = op.name;
  const py::dict attrs = get<py::dict>(d, "attrs", n);
  const py::dict w = get<py::dict>(d, "weights", n);
  op.block = d["block"].is_none() ? -1 : get<int>(d, "block", n);
  const auto ins = get<std::vector<std::string>>(d, "in", n), outs = get<std::vector<std::string>>(d, "out", n);
  for (const std::string& i : ins) op.in.push_back(ps.input(n, i));
  op.timer = timer_name(kind, n, op.block, before_blocks);
  auto arity = [&](size_t ni, size_t no) {
    if (ins.size() != ni || outs.size() != no)
      bad("op '" + n + "' (" + kind + "): takes " + std::to_string(ni) + " inputs and gives " + std::to_string(no));
  };
  auto x = [&](size_t i = 0) { return ps.s.tensors[size_t(op.in[i])]; };
  auto role = [&](const char* r) { return str_of(w, r, n + " weights"); };
  auto out = [&](TensorShape sh, size_t i = 0) { op.out.push_back(ps.output(n, outs[i], sh)); };
  auto same_shape = [&] {
    if (op.in[0] == 0) bad("op '" + n + "' (" + kind + "): cannot take the image");
  };
  Arch& a = ps.s.arch;
  if (kind == "patch_embed") {
    arity(1, 1);
    if (op.in[0] != 0) bad("op '" + n + "': patch_embed takes the image");
    const auto img = get<std::vector<size_t>>(attrs, "img_size", n), patch = get<std::vector<size_t>>(attrs, "patch_size", n);
    if (img.size() != 2 || patch.size() != 2) bad("op '" + n + "': img_size and patch_size must have two values");
    a.img_h = img[0], a.img_w = img[1], a.patch_h = patch[0], a.patch_w = patch[1];
    a.in_chans = get<size_t>(attrs, "in_chans", n);
    a.embed_dim = get<size_t>(attrs, "out_features", n);
    a.depth = a.num_classes = 1;  // checked for real once known
    try {
      check_arch_limits(a);
    } catch (const std::invalid_argument& e) {
      bad(e.what());
    }
    if (a.img_h % a.patch_h || a.img_w % a.patch_w) bad("image size is not a multiple of the patch size");
    op.kind = PatchEmbedOp{linear(ps.graph, ps.t, role("layer"), a.embed_dim, a.patch_dim())};
    out({a.num_patches(), a.embed_dim});
  } else if (kind == "prefix_tokens") {
    arity(1, 1);
    same_shape();
    PrefixTokensOp k;
    size_t count = 0;
    for (const auto& [r, flag] : {std::pair<const char*, const char*>{"cls", "cls"}, {"dist", "dist"}, {"reg", "reg"}}) {
      const size_t m = std::string(r) == "reg" ? get<size_t>(attrs, flag, n) : size_t(get<bool>(attrs, flag, n));
      if (m > kMaxTokens) bad("op '" + n + "': too many prefix tokens");
      if (m == 0) continue;
      const std::vector<float> v = floats(ps.t, role(r));
      if (v.size() != m * x().width) bad("op '" + n + "': tensor '" + role(r) + "' has the wrong size");
      k.rows.insert(k.rows.end(), v.begin(), v.end());
      count += m;
    }
    a.num_prefix = count;
    out({x().rows + count, x().width});
    op.kind = std::move(k);
  } else if (kind == "pos_embed") {
    arity(1, 1);
    same_shape();
    op.kind = PosEmbedOp{floats(ps.t, role("pos"))};
    out(x());
  } else if (kind == "layernorm") {
    arity(1, 1);
    same_shape();
    op.kind = LayerNormOp{{floats(ps.t, role("weight")), floats(ps.t, role("bias"))}, get<float>(attrs, "eps", n)};
    out(x());
  } else if (kind == "linear") {
    arity(1, 1);
    same_shape();
    const size_t N = bounded(attrs, "out_features", n, kMaxDim), K = bounded(attrs, "in_features", n, kMaxDim);
    if (K != x().width) bad("op '" + n + "': input has " + std::to_string(x().width) + " features, in_features is " + std::to_string(K));
    const std::string layer = role("layer");
    op.kind = LinearOp{linear(ps.graph, ps.t, layer, N, K), linear_lo(ps.graph, ps.t, layer, N, K)};
    out({x().rows, N});
  } else if (kind == "attention") {
    arity(1, 1);
    same_shape();
    const size_t heads = bounded(attrs, "heads", n, kMaxDim);
    if (x().width % (3 * heads)) bad("op '" + n + "': input width is not 3 x heads x head width");
    AttentionOp k{heads, {}};
    if (w.contains("bias")) {
      k.bias = floats(ps.t, role("bias"));
      if (k.bias.size() != heads * x().rows * x().rows) bad("op '" + n + "': tensor '" + role("bias") + "' is not heads x T x T");
    }
    op.kind = std::move(k);
    out({x().rows, x().width / 3});
  } else if (kind == "rope") {
    arity(1, 1);
    same_shape();
    RopeOp k;
    k.heads = bounded(attrs, "heads", n, kMaxDim);
    k.prefix = get<size_t>(attrs, "prefix", n);
    k.form = get<bool>(attrs, "half", n) ? RopeForm::kHalf : RopeForm::kInterleaved;
    k.per_head = get<bool>(attrs, "per_head", n);
    if (x().width % (3 * k.heads) || (x().width / (3 * k.heads)) % 2)
      bad("op '" + n + "': input width is not 3 x heads x an even head width");
    if (k.prefix >= x().rows) bad("op '" + n + "': prefix " + std::to_string(k.prefix) + " leaves no token to rotate");
    const size_t table = (x().rows - k.prefix) * (x().width / 3) / (k.per_head ? 1 : k.heads);
    k.sin = floats(ps.t, role("sin"));
    k.cos = floats(ps.t, role("cos"));
    if (k.sin.size() != table || k.cos.size() != table)
      bad("op '" + n + "': tensors '" + role("sin") + "' and '" + role("cos") + "' must hold " + std::to_string(table) + " values");
    op.kind = std::move(k);
    out(x());
  } else if (kind == "swiglu") {
    arity(1, 1);
    same_shape();
    if (x().width % 2) bad("op '" + n + "': a swiglu input needs an even width (gate, then input)");
    op.kind = SwiGluOp{};
    out({x().rows, x().width / 2});
  } else if (kind == "attention_pool") {
    arity(1, 1);
    same_shape();
    const size_t heads = bounded(attrs, "heads", n, kMaxDim);
    if (x().width % (2 * heads)) bad("op '" + n + "': input width is not 2 x heads x head width");
    const size_t start = get<size_t>(attrs, "start", n);
    if (start >= x().rows) bad("op '" + n + "': start " + std::to_string(start) + " is outside the tokens");
    AttentionPoolOp k{heads, start, floats(ps.t, role("query"))};
    if (k.query.size() != x().width / 2) bad("op '" + n + "': tensor '" + role("query") + "' must hold D values");
    op.kind = std::move(k);
    out({1, x().width / 2});
  } else if (kind == "gelu" || kind == "quick_gelu" || kind == "add" || kind == "average") {
    const bool binary = kind == "add" || kind == "average";
    arity(binary ? 2 : 1, 1);
    same_shape();
    if (binary && (x(1).rows != x().rows || x(1).width != x().width)) bad("op '" + n + "': inputs differ in shape");
    if (kind == "gelu") op.kind = GeluOp{};
    else if (kind == "quick_gelu") op.kind = QuickGeluOp{};
    else if (kind == "add") op.kind = AddOp{};
    else op.kind = AverageOp{};
    out(x());
  } else if (kind == "layer_scale") {
    arity(1, 1);
    same_shape();
    op.kind = LayerScaleOp{floats(ps.t, role("gamma"))};
    out(x());
  } else if (kind == "pool" || kind == "exit") {
    arity(1, kind == "pool" ? 1 : 2);
    same_shape();
    const std::string mode = str_of(attrs, "mode", n);
    if (mode != "token" && mode != "avg") bad("op '" + n + "': unsupported pooling mode '" + mode + "'");
    const size_t start = get<size_t>(attrs, "start", n);
    if (start >= x().rows) bad("op '" + n + "': start " + std::to_string(start) + " is outside the tokens");
    if (kind == "pool") {
      op.kind = PoolOp{mode == "avg", start};
      out({1, x().width});
    } else {
      if (op.block < 0) bad("op '" + n + "': an exit belongs to a block");
      ExitOp k{exit_entry(ps.graph, ps.t, op.block), mode == "avg", start};
      const size_t NC = bounded(attrs, "out_features", n, kMaxDim);
      k.head.norm = {floats(ps.t, role("norm.weight")), floats(ps.t, role("norm.bias"))};
      k.head.eps = get<float>(attrs, "eps", n);
      k.head.fc = linear(ps.graph, ps.t, role("layer"), NC, x().width);
      out({1, NC}, 0);
      out({1, x().width}, 1);
      op.kind = std::move(k);
    }
  } else if (kind == "output") {
    arity(3, 0);
    a.num_classes = x(0).floats();
    op.kind = OutputOp{};
  } else {
    bad("op '" + n + "': unknown op kind '" + kind + "'");
  }
  return op;
}

ModelSpec build_spec(const py::dict& graph, const py::dict& t) {
  ModelSpec s;
  s.tensors.push_back({});  // the image
  // A graph without its op list (format 2/3, or built in memory) runs its lowering.
  const py::list ops = py::module_::import("pyruntime.graph").attr("executor_ops")(graph).cast<py::list>();
  if (ops.size() < 2 || ops.size() > 64 * (kMaxDepth + 2)) bad("graph.ops must hold a program (2 to many ops)");
  Parser ps{graph, t, s};
  int depth = 0;
  for (const py::handle& h : ops) {
    const py::dict d = h.cast<py::dict>();
    s.ops.push_back(parse_op(ps, d, depth == 0));
    depth = std::max(depth, s.ops.back().block + 1);
    if (s.ops.size() == 1 && !std::holds_alternative<PatchEmbedOp>(s.ops[0].kind)) bad("the program must start with patch_embed");
  }
  Arch& a = s.arch;
  a.depth = size_t(depth);
  try {
    check_arch_limits(a);
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }
  if (graph.contains("gates") && !graph["gates"].is_none())
    s.gate_lambda = get<float>(graph["gates"].cast<py::dict>(), "lambda", "gates");
  if (graph.contains("attention") && !graph["attention"].is_none())
    s.attn_bits = get<int>(graph["attention"].cast<py::dict>(), "bits", "attention");
  if (graph.contains("predictor") && !graph["predictor"].is_none()) {
    const py::dict p = graph["predictor"].cast<py::dict>();
    s.predictor.block = get<int>(p, "block", "predictor");
    s.predictor.chunk = get<size_t>(p, "chunk", "predictor");
  }
  return s;
}

size_t exit_count(const Executor& ex) {
  return size_t(std::count_if(ex.spec().ops.begin(), ex.spec().ops.end(),
                              [](const Op& op) { return std::holds_alternative<ExitOp>(op.kind); }));
}

py::dict run(Executor& ex, py::array_t<float, py::array::c_style> x, std::optional<long long> threads,
             std::optional<std::string> isa, bool collect_exits, bool tokens) {
  const Arch& a = ex.spec().arch;
  if (x.ndim() != 4 || size_t(x.shape(1)) != a.in_chans || size_t(x.shape(2)) != a.img_h ||
      size_t(x.shape(3)) != a.img_w)
    bad("input must be float32 [B, " + std::to_string(a.in_chans) + ", " + std::to_string(a.img_h) + ", " +
        std::to_string(a.img_w) + "]");
  RunContext ctx{isa ? kernels_for(*isa) : default_kernels(), pick_threads(threads)};
  const size_t B = x.shape(0);
  // The backstop of pyruntime.Model's own check (a masked array can hide a NaN from it).
  for (ssize_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x.data()[i])) bad("images contain NaN or Inf");
  const float* xp = x.data();
  RunOptions opts;
  opts.collect_exits = collect_exits;
  opts.tokens = tokens;
  RunResult r = without_gil([&] { return ex.run(xp, B, ctx, opts); });
  py::dict out;
  py::array_t<float> logits({B, a.num_classes});
  std::copy(r.logits.begin(), r.logits.end(), logits.mutable_data());
  out["logits"] = logits;
  out["exit_block"] = py::array_t<int32_t>(B, r.exit_block.data());
  out["bops"] = py::array_t<int64_t>(B, r.bops.data());
  out["stat"] = py::array_t<float>(B, r.stat.data());
  py::array_t<uint8_t> path({B, a.depth});
  std::copy(r.block_path.begin(), r.block_path.end(), path.mutable_data());
  out["block_path"] = path;
  py::array_t<float> features({B, a.embed_dim});
  std::copy(r.features.begin(), r.features.end(), features.mutable_data());
  out["features"] = features;
  if (tokens) {
    py::array_t<float> tok({B, a.tokens(), a.embed_dim});
    std::copy(r.tokens.begin(), r.tokens.end(), tok.mutable_data());
    out["tokens"] = tok;
  }
  out["isa"] = std::string(ctx.kt->name);
  if (collect_exits) {
    py::array_t<float> el({exit_count(ex), B, a.num_classes});
    std::copy(r.exit_logits.begin(), r.exit_logits.end(), el.mutable_data());
    out["exit_logits"] = el;
  }
  return out;
}

}  // namespace

void register_executor(py::module_& m) {
  py::class_<Executor>(m, "Executor")
      .def(py::init([](const py::dict& graph, const py::dict& tensors) {
             try {
               return new Executor(build_spec(graph, tensors));
             } catch (const py::cast_error& e) {
               // A value of the wrong type deep in the graph (a list where an object belongs).
               bad(std::string("graph has a value of the wrong type: ") + e.what());
             } catch (py::error_already_set& e) {
               if (!e.matches(PyExc_TypeError)) throw;
               bad(std::string("graph has a value of the wrong type: ") + e.what());
             }
           }),
           py::arg("graph"), py::arg("tensors"))
      .def("run", &run, py::arg("x"), py::arg("num_threads") = py::none(), py::arg("isa") = py::none(),
           py::arg("collect_exits") = false, py::arg("tokens") = false)
      .def("set_profiling", &Executor::set_profiling)
      .def("profile", &Executor::profile)
      .def("reset_profile", &Executor::reset_profile)
      .def_property_readonly("scratch_bytes", &Executor::scratch_bytes)
      .def_property_readonly("weight_bytes", [](const Executor& e) {
        size_t n = 0;
        for (const Op& op : e.spec().ops) {
          if (auto* k = std::get_if<PatchEmbedOp>(&op.kind)) n += k->linear.w.bytes();
          if (auto* k = std::get_if<LinearOp>(&op.kind)) n += k->full.w.bytes() + k->reduced.w.bytes();
          if (auto* k = std::get_if<ExitOp>(&op.kind)) n += k->head.fc.w.bytes();
        }
        return n;
      });
}
