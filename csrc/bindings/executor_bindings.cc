// Builds an Executor from the graph (the model file's JSON, as a Python dict) and its tensors
// (numpy arrays, typically memory-mapped from the file). Every missing or mis-shaped entry is
// a ValueError naming it; pyruntime.load turns those into FormatError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>

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
  if (!a.dtype().is(py::dtype::of<T>())) bad("tensor '" + name + "' has dtype " + std::string(py::str(a.dtype())));
  if (a.ndim() != ssize_t(shape.size())) bad("tensor '" + name + "' has the wrong number of dimensions");
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && a.shape(i) != shape[i])
      bad("tensor '" + name + "' has shape mismatch in dimension " + std::to_string(i) + ": " +
          std::to_string(a.shape(i)) + " != " + std::to_string(shape[i]));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

std::vector<float> floats(const py::dict& t, const std::string& name) {
  py::array a = tensor(t, name);
  if (!a.dtype().is(py::dtype::of<float>())) bad("tensor '" + name + "' must be float32");
  auto f = py::array_t<float, py::array::c_style>::ensure(a);
  std::vector<float> v(f.data(), f.data() + f.size());
  for (float x : v)
    if (!std::isfinite(x)) bad("tensor '" + name + "' contains NaN or Inf");
  return v;
}

std::vector<float> floats_if(const py::dict& t, const std::string& name) {
  return t.contains(name) ? floats(t, name) : std::vector<float>{};
}

LayerNormParams norm(const py::dict& t, const std::string& name) {
  return {floats(t, name + ".weight"), floats(t, name + ".bias")};
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

ModelSpec build_spec(const py::dict& graph, const py::dict& t) {
  ModelSpec s;
  const py::dict ad = get<py::dict>(graph, "arch", "graph");
  Arch& a = s.arch;
  const auto img = get<std::vector<size_t>>(ad, "img_size", "arch");
  const auto patch = get<std::vector<size_t>>(ad, "patch_size", "arch");
  if (img.size() != 2 || patch.size() != 2) bad("arch: img_size and patch_size must have two values");
  a.img_h = img[0];
  a.img_w = img[1];
  a.patch_h = patch[0];
  a.patch_w = patch[1];
  a.in_chans = get<size_t>(ad, "in_chans", "arch");
  a.embed_dim = get<size_t>(ad, "embed_dim", "arch");
  a.depth = get<size_t>(ad, "depth", "arch");
  a.num_heads = get<size_t>(ad, "num_heads", "arch");
  a.mlp_hidden = get<size_t>(ad, "mlp_hidden", "arch");
  a.num_classes = get<size_t>(ad, "num_classes", "arch");
  a.cls_token = get<bool>(ad, "cls_token", "arch");
  a.dist_token = get<bool>(ad, "dist_token", "arch");
  a.reg_tokens = get<size_t>(ad, "reg_tokens", "arch");
  a.no_embed_class = get<bool>(ad, "no_embed_class", "arch");
  const std::string pool = get<std::string>(ad, "global_pool", "arch");
  if (pool != "token" && pool != "avg") bad("arch: unsupported global_pool '" + pool + "'");
  a.avg_pool = pool == "avg";
  a.fc_norm = get<bool>(ad, "fc_norm", "arch");
  a.final_norm = get<bool>(ad, "final_norm", "arch");
  a.norm_pre = get<bool>(ad, "norm_pre", "arch");
  a.eps = get<float>(ad, "eps", "arch");
  try {
    check_arch_limits(a);
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }

  const size_t D = a.embed_dim;
  s.patch_embed = linear(graph, t, "patch_embed", D, a.patch_dim());
  if (a.cls_token) s.cls_token = floats(t, "cls_token");
  if (a.dist_token) s.dist_token = floats(t, "dist_token");
  if (a.reg_tokens) s.reg_token = floats(t, "reg_token");
  s.pos_embed = floats(t, "pos_embed");
  if (a.norm_pre) s.norm_pre = norm(t, "norm_pre");
  if (a.final_norm) s.norm = norm(t, "norm");
  if (a.fc_norm) s.fc_norm = norm(t, "fc_norm");
  for (size_t i = 0; i < a.depth; ++i) {
    const std::string b = "blocks." + std::to_string(i);
    Block blk;
    blk.norm1 = norm(t, b + ".norm1");
    blk.norm2 = norm(t, b + ".norm2");
    blk.qkv = linear(graph, t, b + ".attn.qkv", 3 * D, D);
    blk.proj = linear(graph, t, b + ".attn.proj", D, D);
    blk.fc1 = linear(graph, t, b + ".mlp.fc1", a.mlp_hidden, D);
    blk.fc2 = linear(graph, t, b + ".mlp.fc2", D, a.mlp_hidden);
    blk.qkv_lo = linear_lo(graph, t, b + ".attn.qkv", 3 * D, D);
    blk.proj_lo = linear_lo(graph, t, b + ".attn.proj", D, D);
    blk.fc1_lo = linear_lo(graph, t, b + ".mlp.fc1", a.mlp_hidden, D);
    blk.fc2_lo = linear_lo(graph, t, b + ".mlp.fc2", D, a.mlp_hidden);
    blk.ls1 = floats_if(t, b + ".ls1.gamma");
    blk.ls2 = floats_if(t, b + ".ls2.gamma");
    s.blocks.push_back(std::move(blk));
  }
  if (graph.contains("exits") && !graph["exits"].is_none()) {
    for (const py::handle& h : graph["exits"].cast<py::list>()) {
      const py::dict e = h.cast<py::dict>();
      ExitHead x;
      x.block = get<int>(e, "block", "exit");
      const std::string n = "exits." + std::to_string(x.block);
      x.norm = norm(t, n + ".norm");
      x.fc = linear(graph, t, n + ".fc", a.num_classes, D);
      const std::string rule = get<std::string>(e, "rule", n);
      if (rule != "confidence" && rule != "margin" && rule != "gate") bad(n + ": unknown exit rule '" + rule + "'");
      x.rule = rule == "confidence" ? ExitRule::kConfidence : rule == "margin" ? ExitRule::kMargin : ExitRule::kGate;
      x.threshold = get<float>(e, "threshold", n);
      if (x.rule == ExitRule::kGate) x.gate = gate(graph, t, x.block);
      s.exits.push_back(std::move(x));
    }
  }
  s.head = linear(graph, t, "head", a.num_classes, D);
  if (a.dist_token) s.head_dist = linear(graph, t, "head_dist", a.num_classes, D);
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
    py::array_t<float> el({ex.spec().exits.size(), B, a.num_classes});
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
        size_t n = e.spec().patch_embed.w.bytes() + e.spec().head.w.bytes();
        for (const Block& b : e.spec().blocks)
          for (const LinearLayer* l : {&b.qkv, &b.proj, &b.fc1, &b.fc2, &b.qkv_lo, &b.proj_lo, &b.fc1_lo, &b.fc2_lo})
            n += l->w.bytes();
        for (const ExitHead& x : e.spec().exits) n += x.fc.w.bytes();
        return n;
      });
}
