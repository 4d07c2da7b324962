// pyruntime._core: the compiled half of pyruntime. Arguments are validated (dtype, shape,
// NaN) by the Python wrappers in pyruntime/kernels.py; the checks here are the backstop that
// keeps a bad call from ever reaching a kernel. Heavy calls release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>

#include "bench/peak.h"
#include "bindings/gil.h"
#include "cpu/cpu.h"
#include "runtime_limits.h"
#include "kernels/packed_layout.h"
#include "ops/ops.h"

namespace py = pybind11;
using namespace pyrt;

void register_executor(py::module_& m);  // executor_bindings.cc

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I8 = py::array_t<int8_t, py::array::c_style>;

const KernelTable* pick_isa(const std::optional<std::string>& isa) {
  return isa ? kernels_for(*isa) : default_kernels();
}

}  // namespace

// Shared with executor_bindings.cc: the one check of a thread count handed in from Python.
int pick_threads(std::optional<long long> t) {
  if (!t) return physical_cores();
  if (*t < 1 || *t > kMaxThreads)
    throw py::value_error("num_threads must be in 1.." + std::to_string(kMaxThreads) + ", got " + std::to_string(*t));
  return int(*t);
}

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

void require_2d(const py::array& a, const char* name) {
  require(a.ndim() == 2, std::string(name) + " must be 2-D, got " + std::to_string(a.ndim()) + "-D");
}

// The peak loops run for `seconds`: a typo must not hold the process for hours.
void check_peak_seconds(double seconds) {
  require(seconds > 0 && seconds <= 60, "seconds must be in (0, 60], got " + std::to_string(seconds));
}

size_t n_scales(int bits, size_t N, size_t K, size_t block) {
  return bits == 8 ? N : N * ((K + block - 1) / block);
}

std::shared_ptr<QuantizedWeights> quantize_weights(F32 w, int bits, size_t block) {
  require_2d(w, "w");
  const size_t N = w.shape(0), K = w.shape(1);
  require(N > 0 && K > 0, "w must not be empty");
  require(bits == 4 || bits == 8 || bits == 32, "weight bits must be 4, 8 or 32, got " + std::to_string(bits));
  if (bits == 32) return std::make_shared<QuantizedWeights>(pack_f32(w.data(), N, K));
  check_integer_weights(bits, K, block);
  std::vector<int8_t> q(N * K);
  std::vector<float> s(n_scales(bits, N, K, block));
  without_gil([&] { quantize_weights_canonical(w.data(), N, K, bits, block, q.data(), s.data()); });
  return std::make_shared<QuantizedWeights>(
      bits == 8 ? pack_qc8w(q.data(), s.data(), N, K) : pack_qb4w(q.data(), s.data(), N, K, block));
}

std::shared_ptr<QuantizedWeights> from_canonical(I8 q, F32 scales, int bits, size_t block) {
  require_2d(q, "q");
  const size_t N = q.shape(0), K = q.shape(1);
  require(N > 0 && K > 0, "q must not be empty");
  check_integer_weights(bits, K, block);
  require(static_cast<size_t>(scales.size()) == n_scales(bits, N, K, block),
          "scales has " + std::to_string(scales.size()) + " values, expected " +
              std::to_string(n_scales(bits, N, K, block)));
  for (ssize_t i = 0; i < scales.size(); ++i)
    require(std::isfinite(scales.data()[i]), "weight scales contain NaN or Inf");
  if (bits == 8) {
    for (ssize_t i = 0; i < q.size(); ++i) require(q.data()[i] != -128, "int8 weights must be in [-127, 127]");
    return std::make_shared<QuantizedWeights>(pack_qc8w(q.data(), scales.data(), N, K));
  }
  return std::make_shared<QuantizedWeights>(pack_qb4w(q.data(), scales.data(), N, K, block));
}

// Raw int8 weights in the full range [-128, 127] (kernel tests exercise -128 on purpose).
std::shared_ptr<QuantizedWeights> from_int8_unchecked(I8 q, F32 scales) {
  require_2d(q, "q");
  require(static_cast<size_t>(scales.size()) == static_cast<size_t>(q.shape(0)), "one scale per row");
  return std::make_shared<QuantizedWeights>(pack_qc8w(q.data(), scales.data(), q.shape(0), q.shape(1)));
}

py::tuple canonical(const QuantizedWeights& w) {
  require(w.bits != 32, "fp32 weights have no integer form; use dequantize()");
  I8 q({w.N, w.K});
  std::vector<ssize_t> sshape{ssize_t(w.N)};
  if (w.bits == 4) sshape.push_back(ssize_t((w.K + w.block - 1) / w.block));
  F32 s(sshape);
  unpack_weights(w, q.mutable_data(), s.mutable_data());
  return py::make_tuple(q, s);
}

F32 dequantize(const QuantizedWeights& w) {
  F32 out({w.N, w.K});
  dequantize_weights(w, out.mutable_data());
  return out;
}

F32 linear_py(F32 x, const QuantizedWeights& w, std::optional<F32> bias, std::optional<float> act_scale,
           int act_bits, std::optional<long long> num_threads, std::optional<std::string> isa) {
  require_2d(x, "x");
  const size_t M = x.shape(0), K = x.shape(1);
  require(K == w.K, "x has K=" + std::to_string(K) + " but the weights expect K=" + std::to_string(w.K));
  require(act_bits >= 4 && act_bits <= 8, "act_bits must be in 4..8, got " + std::to_string(act_bits));
  if (bias) require(bias->ndim() == 1 && size_t(bias->shape(0)) == w.N, "bias must have shape (N,)");
  if (act_scale) require(std::isfinite(*act_scale) && *act_scale >= 0, "act_scale must be finite and >= 0");
  RunContext ctx{pick_isa(isa), pick_threads(num_threads)};
  F32 y({M, w.N});
  const float* b = bias ? bias->data() : nullptr;
  float* yp = y.mutable_data();
  const float* xp = x.data();
  std::vector<float> scales(act_scale ? M : 0, act_scale ? *act_scale : 0.0f);
  without_gil([&] {
    QuantizedActs scratch;
    linear(ctx, xp, M, K, w, b, act_bits, act_scale ? ScaleMode::kGiven : ScaleMode::kDynamicTensor,
           scales.data(), scratch, yp, w.N);
  });
  return y;
}

py::tuple quantize_acts_py(F32 x, int bits, std::optional<float> scale, bool per_row,
                           std::optional<std::string> isa) {
  require_2d(x, "x");
  require(bits >= 2 && bits <= 8, "bits must be in 2..8");
  const size_t M = x.shape(0), K = x.shape(1);
  RunContext ctx{pick_isa(isa), 1};
  QuantizedActs a;
  std::vector<float> s(M, scale ? *scale : 0.0f);
  const ScaleMode mode = scale ? ScaleMode::kGiven : per_row ? ScaleMode::kDynamicRow : ScaleMode::kDynamicTensor;
  quantize_acts(ctx, x.data(), M, K, K, packed::qc8w_kp(K), bits, mode, s.data(), a);
  I8 q({M, K});
  F32 sc(std::vector<ssize_t>{ssize_t(M)});
  const size_t nb = packed::act_bsums(a.Kp);
  py::array_t<int32_t> bs({M, nb});
  for (size_t r = 0; r < M; ++r) {
    std::copy(a.q.data() + r * a.Kp, a.q.data() + r * a.Kp + K, q.mutable_data() + r * K);
    sc.mutable_data()[r] = a.scale[r];
    std::copy(a.bsum.data() + r * nb, a.bsum.data() + (r + 1) * nb, bs.mutable_data() + r * nb);
  }
  return py::make_tuple(q, sc, bs);
}

F32 gemm_f32_py(F32 a, F32 b, std::optional<F32> bias, std::optional<long long> num_threads,
                std::optional<std::string> isa) {
  require_2d(a, "a");
  require_2d(b, "b");
  const size_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
  require(size_t(b.shape(0)) == K, "a is [M, K] and b must be [K, N]; inner sizes differ");
  if (bias) require(bias->ndim() == 1 && size_t(bias->shape(0)) == N, "bias must have shape (N,)");
  RunContext ctx{pick_isa(isa), pick_threads(num_threads)};
  F32 y({M, N});
  AlignedBuffer<float> bp(packed::f32_floats(N, K));
  const float* ap = a.data();
  const float* bb = bias ? bias->data() : nullptr;
  float* yp = y.mutable_data();
  const float* bsrc = b.data();
  without_gil([&] {
    pack_f32_b(bsrc, K, N, N, false, bp.data());
    gemm_f32(ctx, M, N, K, ap, K, bp.data(), bb, yp, N);
  });
  return y;
}

F32 copy_of(const F32& x) {
  F32 y(std::vector<ssize_t>(x.shape(), x.shape() + x.ndim()));
  std::copy(x.data(), x.data() + x.size(), y.mutable_data());
  return y;
}

size_t last_dim(const F32& x) { return x.ndim() ? size_t(x.shape(x.ndim() - 1)) : 1; }

F32 layernorm_py(F32 x, F32 gamma, F32 beta, float eps, std::optional<std::string> isa) {
  const size_t D = last_dim(x);
  require(size_t(gamma.size()) == D && size_t(beta.size()) == D, "gamma and beta must match the last dimension");
  const KernelTable* kt = pick_isa(isa);
  F32 y = copy_of(x);
  kt->layernorm(D ? x.size() / D : 0, D, x.data(), D, gamma.data(), beta.data(), eps, y.mutable_data(), D);
  return y;
}

// bias: one row of n per row of x, or null (ops.h's attention_softmax).
F32 softmax_py(F32 x, float scale, std::optional<std::string> isa, std::optional<F32> bias) {
  const size_t n = last_dim(x);
  if (bias) require(bias->size() == x.size(), "softmax: bias must have x's shape");
  F32 y = copy_of(x);
  if (n) attention_softmax(*pick_isa(isa), x.size() / n, n, scale, bias ? bias->data() : nullptr, n, y.mutable_data(), n);
  return y;
}

F32 quick_gelu_py(F32 x, std::optional<std::string> isa) {
  F32 y = copy_of(x);
  pick_isa(isa)->quick_gelu(y.size(), y.mutable_data());
  return y;
}

// silu(gate) * up. up absent: x is packed, [..., 2n] with the gate in the first half (timm's
// SwiGLUPacked), read in place with stride 2n.
F32 swiglu_py(F32 x, std::optional<F32> up, std::optional<std::string> isa) {
  const size_t last = last_dim(x);
  std::vector<ssize_t> shape(x.shape(), x.shape() + x.ndim());
  const KernelTable& kt = *pick_isa(isa);
  if (up) {
    require(up->ndim() == x.ndim() && std::equal(shape.begin(), shape.end(), up->shape()), "swiglu: gate and up shapes differ");
    F32 y(shape);
    const size_t rows = last ? x.size() / last : 0;
    kt.swiglu(rows, last, x.data(), last, up->data(), last, y.mutable_data(), last);
    return y;
  }
  require(x.ndim() >= 1 && last % 2 == 0, "swiglu: a packed input needs an even last dimension");
  shape.back() = ssize_t(last / 2);
  F32 y(shape);
  const size_t n = last / 2, rows = last ? x.size() / last : 0;
  kt.swiglu(rows, n, x.data(), last, x.data() + n, last, y.mutable_data(), n);
  return y;
}

// x [T, heads * hd] rotated from token `prefix` on; sin, cos [T - prefix, hd] or
// [heads, T - prefix, hd].
F32 rope_py(F32 x, F32 sin, F32 cos, size_t heads, size_t prefix, bool half, std::optional<std::string> isa) {
  require_2d(x, "x");
  const size_t T = x.shape(0), D = x.shape(1);
  require(heads > 0 && D % heads == 0 && (D / heads) % 2 == 0, "rope: x's width must be heads x an even head_dim");
  require(prefix <= T, "rope: prefix exceeds the token count");
  const size_t hd = D / heads, n = T - prefix;
  require(sin.ndim() == cos.ndim() && (sin.ndim() == 2 || sin.ndim() == 3), "rope: sin and cos must both be 2-D or 3-D");
  const bool per_head = sin.ndim() == 3;
  for (const F32* t : {&sin, &cos}) {
    const bool ok = per_head ? size_t(t->shape(0)) == heads && size_t(t->shape(1)) == n && size_t(t->shape(2)) == hd
                             : size_t(t->shape(0)) == n && size_t(t->shape(1)) == hd;
    require(ok, "rope: sin/cos must be [T - prefix, head_dim] or [heads, T - prefix, head_dim]");
  }
  F32 y = copy_of(x);
  apply_rope(*pick_isa(isa), T, prefix, heads, hd, half ? RopeForm::kHalf : RopeForm::kInterleaved, y.mutable_data(),
             D, sin.data(), cos.data(), per_head);
  return y;
}

// Multi-head fp32 attention: q [H, Tq, dh], k and v [H, T, dh], bias [H, Tq, T] or none ->
// [H, Tq, dh], each head through ops.h's attend_f32.
F32 attention_py(F32 q, F32 k, F32 v, float scale, std::optional<F32> bias, std::optional<std::string> isa) {
  require(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3, "attention: q, k and v must be 3-D [heads, tokens, head_dim]");
  const size_t H = q.shape(0), Tq = q.shape(1), dh = q.shape(2), T = k.shape(1);
  require(size_t(k.shape(0)) == H && size_t(v.shape(0)) == H && size_t(k.shape(2)) == dh &&
              size_t(v.shape(1)) == T && size_t(v.shape(2)) == dh,
          "attention: k and v must be [heads, T, head_dim] matching q");
  require(T > 0 && dh > 0, "attention: empty keys or heads");
  if (bias)
    require(bias->ndim() == 3 && size_t(bias->shape(0)) == H && size_t(bias->shape(1)) == Tq && size_t(bias->shape(2)) == T,
            "attention: bias must be [heads, Tq, T]");
  const KernelTable& kt = *pick_isa(isa);
  F32 o(std::vector<ssize_t>{ssize_t(H), ssize_t(Tq), ssize_t(dh)});
  const float *qp = q.data(), *kp = k.data(), *vp = v.data(), *bp = bias ? bias->data() : nullptr;
  float* op = o.mutable_data();
  without_gil([&] {
    AlignedBuffer<float> kpack(packed::f32_floats(T, dh)), vpack(packed::f32_floats(dh, T)), scores(Tq * T);
    for (size_t h = 0; h < H; ++h) {
      pack_f32_b(kp + h * T * dh, dh, T, dh, /*b_is_nk=*/true, kpack.data());
      pack_f32_b(vp + h * T * dh, T, dh, dh, /*b_is_nk=*/false, vpack.data());
      attend_f32(kt, Tq, T, dh, qp + h * Tq * dh, dh, kpack.data(), vpack.data(), scale,
                 bp ? bp + h * Tq * T : nullptr, T, scores.data(), op + h * Tq * dh, dh);
    }
  });
  return o;
}

F32 gelu_py(F32 x, std::optional<std::string> isa) {
  F32 y = copy_of(x);
  pick_isa(isa)->gelu(y.size(), y.mutable_data());
  return y;
}

F32 add_py(F32 a, F32 b, std::optional<std::string> isa) {
  require(a.size() == b.size(), "add: sizes differ");
  F32 y = copy_of(a);
  pick_isa(isa)->add(a.size(), a.data(), b.data(), y.mutable_data());
  return y;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyruntime compiled core: kernels, dispatch and the ViT executor";
  register_executor(m);
  m.def("isa", [] { return std::string(default_kernels()->name); },
        "Name of the ISA used when none is named (PYRUNTIME_ISA, else the best available).");
  m.def("available_isas", &available_isas, "ISAs compiled in and supported by this CPU, best last.");
  m.def("physical_cores", &physical_cores);
  m.def("limits", [] {
    py::dict d;
    d["max_k"] = kMaxK;
    d["max_tokens"] = kMaxTokens;
    d["max_threads"] = kMaxThreads;
    d["max_image_side"] = kMaxImageSide;
    d["max_depth"] = kMaxDepth;
    d["max_dim"] = kMaxDim;
    return d;
  }, "The size limits the runtime enforces (csrc/runtime_limits.h).");
  m.def("int8_peak_gops", [](long long threads, double seconds) {
    const int t = pick_threads(threads);
    check_peak_seconds(seconds);
    return without_gil([&] { return int8_peak_gops(t, seconds); });
  }, py::arg("threads") = 1, py::arg("seconds") = 0.3);
  m.def("fp32_peak_gflops", [](long long threads, double seconds) {
    const int t = pick_threads(threads);
    check_peak_seconds(seconds);
    return without_gil([&] { return fp32_peak_gflops(t, seconds); });
  }, py::arg("threads") = 1, py::arg("seconds") = 0.3);
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512vnni"] = f.avx512vnni;
    d["neon"] = f.neon;
    d["dotprod"] = f.dotprod;
    d["i8mm"] = f.i8mm;
    return d;
  });

  py::class_<QuantizedWeights, std::shared_ptr<QuantizedWeights>>(m, "QuantizedWeights")
      .def_readonly("bits", &QuantizedWeights::bits)
      .def_property_readonly("shape", [](const QuantizedWeights& w) { return py::make_tuple(w.N, w.K); })
      .def_property_readonly("block_size", [](const QuantizedWeights& w) -> py::object {
        return w.bits == 4 ? py::object(py::int_(w.block)) : py::none();
      })
      .def_property_readonly("nbytes", &QuantizedWeights::bytes)
      .def("canonical", &canonical, "(q int8 [N, K], scales float32) as quantised")
      .def("__repr__", [](const QuantizedWeights& w) {
        return "<QuantizedWeights bits=" + std::to_string(w.bits) + " shape=(" + std::to_string(w.N) +
               ", " + std::to_string(w.K) + ")" + (w.bits == 4 ? " block=" + std::to_string(w.block) : "") + ">";
      });

  m.def("quantize_weights", &quantize_weights, py::arg("w"), py::arg("bits"), py::arg("block_size"));
  m.def("weights_from_canonical", &from_canonical, py::arg("q"), py::arg("scales"), py::arg("bits"),
        py::arg("block_size"));
  m.def("weights_from_int8_unchecked", &from_int8_unchecked, py::arg("q"), py::arg("scales"));
  m.def("dequantize", &dequantize);
  m.def("linear", &linear_py, py::arg("x"), py::arg("qw"), py::arg("bias"), py::arg("act_scale"),
        py::arg("act_bits"), py::arg("num_threads"), py::arg("isa"));
  m.def("quantize_acts", &quantize_acts_py, py::arg("x"), py::arg("bits"), py::arg("scale"),
        py::arg("per_row"), py::arg("isa"));
  m.def("gemm_f32", &gemm_f32_py, py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("num_threads"),
        py::arg("isa"));
  m.def("layernorm", &layernorm_py, py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
        py::arg("isa"));
  m.def("softmax", &softmax_py, py::arg("x"), py::arg("scale"), py::arg("isa"), py::arg("bias") = py::none());
  m.def("quick_gelu", &quick_gelu_py, py::arg("x"), py::arg("isa"));
  m.def("swiglu", &swiglu_py, py::arg("x"), py::arg("up"), py::arg("isa"));
  m.def("rope", &rope_py, py::arg("x"), py::arg("sin"), py::arg("cos"), py::arg("heads"), py::arg("prefix"),
        py::arg("half"), py::arg("isa"));
  m.def("attention", &attention_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("bias"),
        py::arg("isa"));
  m.def("gelu", &gelu_py, py::arg("x"), py::arg("isa"));
  m.def("add", &add_py, py::arg("a"), py::arg("b"), py::arg("isa"));
}
