"""Whole-model latency of pyruntime against its peers (PyTorch, ONNX Runtime, ExecuTorch).

Shared by ``bench/test_bench_models.py`` (pytest-benchmark) and ``tools/bench_models.py``
(standalone: table, ``bench/results/models.json`` and ``models.png``). See bench/README.md,
"Model benchmarks".

Every runtime runs the same timm model (``pretrained=False``: random weights, created after
``torch.manual_seed(seed)``, never downloaded) on the same float32 input array:

=================  ==========================================================================
runtime            what runs
=================  ==========================================================================
pyruntime-fp32     ``pyruntime.convert(model, policy="fp32")`` + ``Model.run(x, num_threads=t)``
pyruntime-w8a8     the same, ``policy="w8a8"`` (int8 weights, dynamic per-image int8 activations)
pyruntime-w8a8-attn8  ``policy="w8a8-attn8"``: W8A8 plus int8 attention matmuls (q.k^T and attn.v)
pyruntime-w4a8     the same, ``policy="w4a8"`` (int4 weights in blocks of 32)
torch-fp32         eager PyTorch, ``torch.set_num_threads(t)``, ``torch.inference_mode()``
torch-int8         ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=qint8)``
ort-fp32           ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch) in ONNX
                   Runtime: ``intra_op_num_threads=t``, ``inter_op_num_threads=1``, ORT_ENABLE_ALL
ort-int8           ``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)`` of that file
ort-int4           ``MatMulNBitsQuantizer`` (4-bit, block 32, symmetric, accuracy_level 4 =
                   int8 activations, i.e. ORT's W4A8) of that file
executorch         only when ``import executorch`` works (not installed here: skipped)
=================  ==========================================================================

Converted files (pyruntime models, ONNX exports) are cached in ``bench/.cache/`` (override
with ``PYRUNTIME_BENCH_CACHE``), keyed by a fingerprint of the model's weights and of the
software that produced them, so a stale file is never reused. torch, timm, onnx and
onnxruntime are imported only where needed; a peer that is missing or fails is reported as
unavailable with the reason, never silently dropped.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import pyruntime
from pyruntime import _core
from pyruntime._atomic import atomic_path
from pyruntime.latency import cpu_model

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
JSON_PATH = RESULTS_DIR / "models.json"
PNG_PATH = RESULTS_DIR / "models.png"

# DeiT (the default run), and the families beside it: EVA-02-Ti (RoPE, SwiGLU) and SigLIP-B/16
# (attention-pooling head, num_classes 0: its "logits" are the pooled features).
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "eva02_tiny_patch14_224", "vit_base_patch16_siglip_224")
SHORT = {"deit_tiny_patch16_224": "deit_tiny", "deit_small_patch16_224": "deit_small",
         "eva02_tiny_patch14_224": "eva02_tiny", "vit_base_patch16_siglip_224": "siglip_base"}
BATCHES = (1, 8)
THREADS = (1, 2)
SEED = 0

# Measurement order within one (model, batch, threads) configuration: the baselines first, so
# that a pyruntime result can be put next to an already-measured peer (pytest ordering).
RUNTIMES = ("ort-fp32", "ort-int8", "ort-int4", "torch-fp32", "torch-int8", "executorch",
            "pyruntime-fp32", "pyruntime-w8a8", "pyruntime-w8a8-attn8", "pyruntime-w4a8")
# Order for tables and plots.
DISPLAY = ("pyruntime-fp32", "pyruntime-w8a8", "pyruntime-w8a8-attn8", "pyruntime-w4a8", "torch-fp32", "torch-int8",
           "ort-fp32", "ort-int8", "ort-int4", "executorch")
PYRUNTIME_POLICY = {"pyruntime-fp32": "fp32", "pyruntime-w8a8": "w8a8", "pyruntime-w8a8-attn8": "w8a8-attn8",
                    "pyruntime-w4a8": "w4a8"}
# The W8A8 variants the int8 targets are checked for: ratio key prefix -> runtime.
W8A8_RUNTIMES = {"w8a8": "pyruntime-w8a8", "w8a8_attn8": "pyruntime-w8a8-attn8"}

ONNX_OPSET = 17
ORT_INT4 = {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4}

# Shown next to the figures; nothing asserts on them (timings on a shared machine are noise).
TARGETS = {
    "w8a8_over_ort_int8_max": 0.5,        # pyruntime W8A8 latency / ORT int8 latency (both variants)
    "fp32_over_ort_fp32_max": 1.0,        # pyruntime fp32 latency / ORT fp32 latency
    "w8a8_frac_of_int8_peak_min": 0.65,   # W8A8 effective GOPS / measured int8 peak (both variants)
}
PEAK_SECONDS = 0.3


class Unavailable(Exception):
    """A peer that cannot run here; the message says why (shown as the skip reason)."""


# ----------------------------------------------------------------------------- small helpers

def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cache_root() -> Path:
    return Path(os.environ.get("PYRUNTIME_BENCH_CACHE") or BENCH_DIR / ".cache")


@contextlib.contextmanager
def quiet():
    """Silence the (expected) warnings of exporters and quantisers: the TorchScript exporter's
    deprecation notice, TracerWarnings, torch.ao's deprecation. pyproject turns warnings into
    errors under pytest. Also mutes onnxruntime.quantization's logging ("consider running
    pre-processing": we quantise the exported graph as is; pre-processing made no difference
    here)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def make_inputs(batch: int, seed: int = SEED) -> np.ndarray:
    """float32 [batch, 3, 224, 224], standard normal (the range of normalised images). Batch 1 is
    the first image of batch 8, so every runtime and batch sees the same data."""
    n = max(batch, max(BATCHES))
    x = np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)
    return np.ascontiguousarray(x[:batch])


def percentile_ms(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q) * 1e3)


def int8_peak(threads: int, seconds: float = PEAK_SECONDS) -> Tuple[Optional[float], Optional[str]]:
    """(GOPS, note): the CPU's int8 peak on ``threads`` threads measured now, or (None, why)."""
    fn = getattr(_core, "int8_peak_gops", None)
    if fn is None:
        return None, "pyruntime._core.int8_peak_gops is missing (csrc/bench/peak.cc not built)"
    try:
        v = float(fn(threads, seconds))
    except Exception as e:  # noqa: BLE001 - report whatever the extension raised
        return None, f"int8_peak_gops({threads}) raised {type(e).__name__}: {e}"
    if not v > 0:
        return None, f"int8_peak_gops({threads}) returned {v} (no int8 peak loop for this ISA?)"
    return v, None


def _file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()[:16]


def pyruntime_fingerprint() -> str:
    """Changes whenever the converter, quantiser, file format or compiled extension changes."""
    pkg = Path(pyruntime.__file__).parent
    files = [pkg / n for n in ("convert.py", "modelfile.py", "policy.py", "kernels.py")]
    return _file_digest(files + [Path(_core.__file__)])


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "numpy": np.__version__,
                                     "pyruntime": pyruntime.__version__}
    for mod in ("torch", "timm", "onnx", "onnxruntime", "executorch"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed / broken: recorded as None
            out[mod] = None
    return out


def environment() -> Dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": int(_core.physical_cores()) if hasattr(_core, "physical_cores") else None,
        "isa": pyruntime.isa(),
        "pyruntime_core": str(Path(_core.__file__)),
        "versions": versions(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "OMP_WAIT_POLICY", "PYRUNTIME_ISA") if os.environ.get(k)},
    }


# ----------------------------------------------------------------------------- one model's peers

class ModelPeers:
    """The torch module of one timm model and everything derived from it, built lazily.

    ``bind(runtime, threads, x)`` returns a zero-argument callable that runs the batch ``x`` once
    on that runtime (inputs already in the runtime's own form, so only inference is timed) and
    returns the logits as numpy; it raises :class:`Unavailable` for a peer that cannot run.
    """

    def __init__(self, name: str, seed: int = SEED, cache: Optional[Path] = None,
                 log: Callable[[str], None] = lambda s: None):
        self.name, self.seed, self.log = name, seed, log
        self.cache = Path(cache) if cache is not None else cache_root()
        self._torch = None
        self._torch_int8 = None
        self._files: Dict[str, Path] = {}
        self._pyrt: Dict[str, Any] = {}
        self._ort: Dict[Tuple[str, int], Any] = {}
        self._broken: Dict[str, str] = {}
        self._fingerprint: Optional[str] = None
        self.export_method = "cached"
        self.prepare_seconds: Dict[str, float] = {}

    # -- the source model
    @property
    def torch_model(self):
        if self._torch is None:
            try:
                import timm
                import torch
            except ImportError as e:
                raise Unavailable(f"torch and timm are needed to build {self.name}: {e}") from None
            torch.manual_seed(self.seed)
            with quiet():
                m = timm.create_model(self.name, pretrained=False)  # random weights: never downloads
            self._torch = m.eval()
        return self._torch

    def weights_fingerprint(self) -> str:
        if self._fingerprint is None:
            import torch

            h = hashlib.sha256(f"{self.name}|seed={self.seed}".encode())
            with torch.no_grad():
                for k, v in self.torch_model.state_dict().items():
                    h.update(k.encode())
                    h.update(v.detach().contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _dir(self, tag: str) -> Path:
        d = self.cache / f"{SHORT.get(self.name, self.name)}-{self.weights_fingerprint()}" / tag
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _timed(self, what: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.prepare_seconds[what] = round(time.perf_counter() - t0, 3)
        return out

    # -- pyruntime
    def pyruntime_file(self, policy: str) -> Path:
        key = f"pyruntime-{policy}"
        if key not in self._files:
            d = self._dir(f"pyruntime-{pyruntime_fingerprint()}")
            path = d / f"{policy}.pyrt"
            if not path.is_file():
                self.log(f"  converting {self.name} -> {path.relative_to(self.cache)} ({policy})")
                with quiet():
                    self._timed(f"convert {policy}", lambda: pyruntime.convert(self.torch_model, path, policy=policy))
            self._files[key] = path
        return self._files[key]

    def pyruntime_model(self, policy: str):
        if policy not in self._pyrt:
            path = self.pyruntime_file(policy)
            self._pyrt[policy] = pyruntime.load(path)
        return self._pyrt[policy]

    def macs_per_image(self) -> int:
        """MACs of one image through the whole network: every linear layer and both attention
        matmuls (``pyruntime.bops.layer_macs`` of the converted graph)."""
        from pyruntime import bops

        return int(sum(bops.layer_macs(self.pyruntime_model("w8a8").graph).values()))

    # -- ONNX files
    def _onnx_dir(self) -> Path:
        v = versions()
        sw = hashlib.sha256(f"{v['torch']}|{v['timm']}|{v['onnx']}|{v['onnxruntime']}|opset{ONNX_OPSET}|"
                            f"{sorted(ORT_INT4.items())}".encode()).hexdigest()[:12]
        return self._dir(f"onnx-{sw}")

    def _export_onnx(self, path: Path) -> None:
        import torch

        x = torch.from_numpy(make_inputs(1, self.seed))
        errors = []
        with atomic_path(path) as tmp, quiet():
            try:  # the TorchScript exporter first: what most deployments still use
                torch.onnx.export(self.torch_model, (x,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
                self.export_method = "torchscript (dynamo=False)"
                return
            except Exception as e:  # noqa: BLE001
                errors.append(f"dynamo=False: {type(e).__name__}: {e}")
            try:
                batch = torch.export.Dim("batch", min=1, max=64)
                torch.onnx.export(self.torch_model, (x,), str(tmp), dynamo=True, opset_version=ONNX_OPSET,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_shapes={"x": {0: batch}}, external_data=False)
                self.export_method = "dynamo"
            except Exception as e:  # noqa: BLE001
                errors.append(f"dynamo=True: {type(e).__name__}: {e}")
                raise Unavailable("torch.onnx.export failed: " + "; ".join(errors)) from None

    def onnx_file(self, kind: str) -> Path:
        """kind: 'fp32', 'int8' (dynamic quantisation) or 'int4' (MatMulNBits)."""
        key = f"onnx-{kind}"
        if key in self._broken:
            raise Unavailable(self._broken[key])
        if key in self._files:
            return self._files[key]
        try:
            path = self._onnx_dir() / f"{kind}.onnx"
            if not path.is_file():
                if kind == "fp32":
                    try:
                        import onnx  # noqa: F401  (the exporter needs it)
                    except ImportError as e:
                        raise Unavailable(f"onnx is not installed: {e}") from None
                    self.log(f"  exporting {self.name} to ONNX (opset {ONNX_OPSET})")
                    self._timed("onnx export", lambda: self._export_onnx(path))
                elif kind == "int8":
                    src = self.onnx_file("fp32")
                    self.log(f"  ORT dynamic int8 quantisation of {self.name}")
                    self._timed("ort quantize_dynamic", lambda: self._quantize_int8(src, path))
                elif kind == "int4":
                    src = self.onnx_file("fp32")
                    self.log(f"  ORT MatMulNBits int4 quantisation of {self.name}")
                    self._timed("ort matmul_nbits", lambda: self._quantize_int4(src, path))
                else:
                    raise ValueError(kind)
        except Unavailable as e:
            self._broken[key] = str(e)
            raise
        self._files[key] = path
        return path

    @staticmethod
    def _quantize_int8(src: Path, dst: Path) -> None:
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError as e:
            raise Unavailable(f"onnxruntime.quantization unavailable: {e}") from None
        try:
            with atomic_path(dst) as tmp, quiet():
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"onnxruntime quantize_dynamic failed: {type(e).__name__}: {e}") from None

    @staticmethod
    def _quantize_int4(src: Path, dst: Path) -> None:
        try:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as e:
            raise Unavailable(f"onnxruntime MatMulNBitsQuantizer unavailable: {e}") from None
        try:
            with quiet():
                q = MatMulNBitsQuantizer(onnx.load(str(src)), **ORT_INT4)
                q.process()
            with atomic_path(dst) as tmp:
                q.model.save_model_to_file(str(tmp), False)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"onnxruntime MatMulNBitsQuantizer({ORT_INT4}) failed: {type(e).__name__}: {e}") from None

    def ort_session(self, kind: str, threads: int):
        key = (kind, threads)
        if key not in self._ort:
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise Unavailable(f"onnxruntime is not installed: {e}") from None
            path = self.onnx_file(kind)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            try:
                self._ort[key] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001
                msg = f"onnxruntime cannot load the {kind} model: {type(e).__name__}: {e}"
                self._broken[f"onnx-{kind}"] = msg
                raise Unavailable(msg) from None
        return self._ort[key]

    # -- torch dynamic int8
    def torch_int8_model(self):
        if "torch-int8" in self._broken:
            raise Unavailable(self._broken["torch-int8"])
        if self._torch_int8 is None:
            try:
                import torch
                import torch.nn as nn

                qd = torch.ao.quantization.quantize_dynamic
            except (ImportError, AttributeError) as e:
                self._broken["torch-int8"] = f"torch.ao.quantization.quantize_dynamic unavailable: {e}"
                raise Unavailable(self._broken["torch-int8"]) from None
            try:
                with quiet():
                    self._torch_int8 = qd(self.torch_model, {nn.Linear}, dtype=torch.qint8).eval()
                    with torch.inference_mode():
                        self._torch_int8(torch.from_numpy(make_inputs(1, self.seed)))
            except Exception as e:  # noqa: BLE001 - e.g. no quantized engine in this build
                self._broken["torch-int8"] = (f"torch dynamic int8 failed (engine "
                                              f"{torch.backends.quantized.engine}): {type(e).__name__}: {e}")
                raise Unavailable(self._broken["torch-int8"]) from None
        return self._torch_int8

    # -- the uniform interface
    def bind(self, runtime: str, threads: int, x: np.ndarray) -> Callable[[], np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if runtime in PYRUNTIME_POLICY:
            model = self.pyruntime_model(PYRUNTIME_POLICY[runtime])
            return lambda: model.run(x, num_threads=threads).logits
        if runtime in ("torch-fp32", "torch-int8"):
            import torch

            module = self.torch_model if runtime == "torch-fp32" else self.torch_int8_model()
            xt = torch.from_numpy(x)

            def run_torch():
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                with torch.inference_mode():
                    return module(xt).numpy()

            return run_torch
        if runtime.startswith("ort-"):
            sess = self.ort_session(runtime[4:], threads)
            name = sess.get_inputs()[0].name
            feed = {name: x}
            return lambda: sess.run(None, feed)[0]
        if runtime == "executorch":
            try:
                import executorch  # noqa: F401
            except ImportError as e:
                raise Unavailable(f"executorch is not installed ({e}); not benchmarked") from None
            raise Unavailable("executorch is installed but this benchmark has no ExecuTorch path yet "
                              "(needs an XNNPACK-delegated .pte export)")
        raise ValueError(f"unknown runtime {runtime!r}")

    def agreement(self, x: np.ndarray, threads: int = 2, runtimes: Sequence[str] = DISPLAY) -> Dict[str, Any]:
        """Each runtime's logits on ``x`` against eager torch fp32: top-1 agreement and max |diff|.
        Random weights give nearly flat logits, so quantised runtimes may well flip argmaxes;
        pyruntime-fp32 and ort-fp32 must match torch to float rounding."""
        ref = self.bind("torch-fp32", threads, x)()
        out: Dict[str, Any] = {"images": int(len(x)), "reference": "torch-fp32",
                               "logit_std": float(ref.std())}
        for rt in runtimes:
            if rt == "torch-fp32":
                continue
            try:
                with quiet():
                    y = np.asarray(self.bind(rt, threads, x)())
            except Unavailable as e:
                out[rt] = {"unavailable": str(e)}
                continue
            out[rt] = {"top1_agree": float((y.argmax(1) == ref.argmax(1)).mean()),
                       "max_abs_diff": float(np.abs(y - ref).max())}
        fp = out.get("pyruntime-fp32", {})
        if "top1_agree" in fp:
            tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
            fp["ok"] = bool(fp["top1_agree"] == 1.0 and fp["max_abs_diff"] <= tol)
            fp["tolerance"] = tol
        return out

    def close(self) -> None:
        self._ort.clear()
        self._pyrt.clear()
        self._torch = self._torch_int8 = None


# ----------------------------------------------------------------------------- measuring

def plan_runs(first_s: float, budget_s: float, min_runs: int, max_runs: int,
              max_cell_s: float = 6.0, floor_runs: int = 3) -> int:
    """Timed runs for one cell: enough to fill ``budget_s``, within [min_runs, max_runs]; a slow
    cell (deit_small at batch 8, a busy machine) gets fewer, down to ``floor_runs``, so that it
    spends at most about ``max_cell_s``."""
    if first_s <= 0:
        return max_runs
    n = min(max_runs, max(min_runs, math.ceil(budget_s / first_s)))
    return int(max(floor_runs, min(n, math.floor(max_cell_s / first_s))))


def time_calls(fn: Callable[[], Any], n: int) -> List[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


@dataclass
class Cell:
    """One (model, runtime, batch, threads) measurement."""

    model: str
    runtime: str
    batch: int
    threads: int
    samples: List[float] = field(default_factory=list)   # seconds per batch
    unavailable: Optional[str] = None

    def summary(self, macs_per_image: Optional[int] = None) -> Dict[str, Any]:
        d: Dict[str, Any] = {"model": self.model, "runtime": self.runtime, "batch": self.batch,
                             "threads": self.threads}
        if self.unavailable is not None or not self.samples:
            d["unavailable"] = self.unavailable or "no samples"
            return d
        med = percentile_ms(self.samples, 50)
        d.update({"runs": len(self.samples), "median_ms": med, "p90_ms": percentile_ms(self.samples, 90),
                  "min_ms": min(self.samples) * 1e3, "ms_per_image": med / self.batch})
        if macs_per_image:
            d["effective_gops"] = 2.0 * macs_per_image * self.batch / (med * 1e-3) * 1e-9
        return d


def ratios(cells: Mapping[str, Mapping[str, Any]], peak_gops: Optional[float]) -> Dict[str, Any]:
    """The figures the targets are about, for one (model, batch, threads) configuration;
    ``cells``: runtime -> :meth:`Cell.summary`."""
    def med(rt):
        c = cells.get(rt) or {}
        return c.get("median_ms")

    def div(a, b):
        return a / b if a is not None and b else None

    out = {
        "fp32_over_ort_fp32": div(med("pyruntime-fp32"), med("ort-fp32")),
        "w4a8_over_ort_int4": div(med("pyruntime-w4a8"), med("ort-int4")),
        "fp32_over_torch_fp32": div(med("pyruntime-fp32"), med("torch-fp32")),
        "int8_peak_gops": peak_gops,
        # How hard the 0.5x target is in this cell: ORT int8's own share of the int8 peak, and
        # the share a runtime at half ORT's latency would need (twice ORT's effective GOPS).
        "ort_int8_frac_of_int8_peak": div((cells.get("ort-int8") or {}).get("effective_gops"), peak_gops),
    }
    out["half_ort_int8_needs_frac_of_int8_peak"] = (None if out["ort_int8_frac_of_int8_peak"] is None
                                                    else out["ort_int8_frac_of_int8_peak"] / TARGETS["w8a8_over_ort_int8_max"])
    for key, rt in W8A8_RUNTIMES.items():
        gops = (cells.get(rt) or {}).get("effective_gops")
        out[f"{key}_over_ort_int8"] = div(med(rt), med("ort-int8"))
        out[f"{key}_over_torch_int8"] = div(med(rt), med("torch-int8"))
        out[f"{key}_effective_gops"] = gops
        out[f"{key}_frac_of_int8_peak"] = div(gops, peak_gops)
    out["misses"] = misses(out)
    return out


def misses(r: Mapping[str, Any]) -> List[str]:
    out = []
    for key in W8A8_RUNTIMES:
        name = key.replace("_", "-")
        if r.get(f"{key}_over_ort_int8") is not None and r[f"{key}_over_ort_int8"] > TARGETS["w8a8_over_ort_int8_max"]:
            out.append(f"{name}/ort-i8>{TARGETS['w8a8_over_ort_int8_max']}")
        if r.get(f"{key}_frac_of_int8_peak") is not None and \
                r[f"{key}_frac_of_int8_peak"] < TARGETS["w8a8_frac_of_int8_peak_min"]:
            out.append(f"{name} %pk8<{TARGETS['w8a8_frac_of_int8_peak_min']:.0%}")
    if r.get("fp32_over_ort_fp32") is not None and r["fp32_over_ort_fp32"] > TARGETS["fp32_over_ort_fp32_max"]:
        out.append(f"fp32/ort-fp32>{TARGETS['fp32_over_ort_fp32_max']}")
    return out


# ----------------------------------------------------------------------------- reporting

ABBREV = {"pyruntime-fp32": "pr-fp32", "pyruntime-w8a8": "pr-w8a8", "pyruntime-w8a8-attn8": "pr-w8at8",
          "pyruntime-w4a8": "pr-w4a8",
          "torch-fp32": "th-fp32", "torch-int8": "th-int8", "ort-fp32": "ort-fp32", "ort-int8": "ort-int8",
          "ort-int4": "ort-int4", "executorch": "et"}


def _f(v: Optional[float], spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else format(v, f">{width}{spec}")


def _pct(frac: Optional[float], width: int) -> str:
    return _f(None if frac is None else 100 * frac, '.0f', width)


def format_latency_table(cells: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per measured cell: median / p90 batch latency, ms per image, runs (unavailable
    peers are left out; list them separately)."""
    head = (f"{'model':10} {'B':>2} {'t':>2} {'runtime':20} {'median ms':>10} {'p90 ms':>9} {'ms/img':>8} "
            f"{'runs':>4}  note")
    lines = [head, "-" * len(head)]
    for c in cells:
        if "unavailable" in c:
            continue
        model = SHORT.get(c["model"], c["model"])
        gops = c.get("effective_gops") if c["runtime"] in W8A8_RUNTIMES.values() else None
        note = f"{gops:.1f} effective GOPS" if gops else ""
        lines.append(f"{model:10} {c['batch']:>2} {c['threads']:>2} {c['runtime']:20} {c['median_ms']:>10.2f} "
                     f"{c['p90_ms']:>9.2f} {c['ms_per_image']:>8.2f} {c['runs']:>4}  {note}")
    return lines


def format_summary_table(configs: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per (model, batch, threads): ms/image per runtime (median), then the ratios."""
    rts = [rt for rt in DISPLAY if any(rt in c["cells"] and "ms_per_image" in c["cells"][rt] for c in configs)]
    head = (f"{'model':10} {'B':>2} {'t':>2} | " + " ".join(f"{ABBREV[rt]:>8}" for rt in rts)
            + f" | {'w8/ort8':>7} {'w8at8/ort8':>10} {'fp/ortfp':>8} {'pk8':>6} {'%pk8':>5} {'%pk8at8':>7}"
            + f" {'ort8%':>5} {'need%':>5} | misses")
    lines = ["ms per image (median of batch latency / B); ratios of median latencies; "
             f"targets: w8/ort8 <= {TARGETS['w8a8_over_ort_int8_max']}, fp/ortfp <= "
             f"{TARGETS['fp32_over_ort_fp32_max']}, %pk8 >= {TARGETS['w8a8_frac_of_int8_peak_min']:.0%}; "
             f"ort8%: ORT int8's share of the int8 peak, need%: the share {TARGETS['w8a8_over_ort_int8_max']}x "
             "ORT int8's latency would take",
             head, "-" * len(head)]
    for c in configs:
        r = c["ratios"]
        vals = " ".join(_f((c["cells"].get(rt) or {}).get("ms_per_image"), ".2f", 8) for rt in rts)
        frac, frac_at8 = r.get("w8a8_frac_of_int8_peak"), r.get("w8a8_attn8_frac_of_int8_peak")
        lines.append(f"{SHORT.get(c['model'], c['model']):10} {c['batch']:>2} {c['threads']:>2} | {vals} | "
                     f"{_f(r.get('w8a8_over_ort_int8'), '.2f', 7)} {_f(r.get('w8a8_attn8_over_ort_int8'), '.2f', 10)} "
                     f"{_f(r.get('fp32_over_ort_fp32'), '.2f', 8)} {_f(r.get('int8_peak_gops'), '.1f', 6)} "
                     f"{_pct(frac, 5)} {_pct(frac_at8, 7)} "
                     f"{_pct(r.get('ort_int8_frac_of_int8_peak'), 5)} {_pct(r.get('half_ort_int8_needs_frac_of_int8_peak'), 5)}"
                     f" | {', '.join(r.get('misses', []))}")
    return lines


def format_agreement(agreement: Mapping[str, Mapping[str, Any]]) -> List[str]:
    lines = []
    for model, a in agreement.items():
        parts = []
        for rt in DISPLAY:
            v = a.get(rt)
            if not v or "top1_agree" not in v:
                continue
            flag = "" if v.get("ok", True) else "  <-- MISMATCH"
            parts.append(f"{ABBREV[rt]} top1 {v['top1_agree']:.2f} max|d| {v['max_abs_diff']:.2g}{flag}")
        lines.append(f"{SHORT.get(model, model)} vs torch-fp32 on {a.get('images')} images "
                     f"(logit std {a.get('logit_std', float('nan')):.3f}): " + "; ".join(parts))
    return lines


def plot(configs: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Optional[str]:
    """Grouped bars of ms/image per runtime for each (model, batch, threads); one panel per
    model, log scale. Written atomically. Returns None, or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as e:
        return f"matplotlib unavailable: {e}"
    models = [m for m in MODELS if any(c["model"] == m for c in configs)] or \
        sorted({c["model"] for c in configs})
    rts = [rt for rt in DISPLAY if any("ms_per_image" in (c["cells"].get(rt) or {}) for c in configs)]
    colors = {"pyruntime-fp32": "#1f4e9c", "pyruntime-w8a8": "#3b82f6", "pyruntime-w8a8-attn8": "#0ea5e9",
              "pyruntime-w4a8": "#93c5fd",
              "torch-fp32": "#b45309", "torch-int8": "#fbbf24",
              "ort-fp32": "#166534", "ort-int8": "#22c55e", "ort-int4": "#a7f3d0", "executorch": "#7c3aed"}
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5.2), squeeze=False)
    width = 0.8 / max(1, len(rts))
    for ax, model in zip(axes[0], models):
        mc = [c for c in configs if c["model"] == model]
        xs = np.arange(len(mc))
        for i, rt in enumerate(rts):
            ys = [(c["cells"].get(rt) or {}).get("ms_per_image", np.nan) for c in mc]
            bars = ax.bar(xs - 0.4 + width * (i + 0.5), ys, width, label=rt, color=colors.get(rt),
                          edgecolor="black", linewidth=0.3)
            for b, y in zip(bars, ys):
                if np.isfinite(y):
                    ax.text(b.get_x() + b.get_width() / 2, y * 1.04, f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                            ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(xs, [f"batch {c['batch']}\n{c['threads']} thread{'s' if c['threads'] > 1 else ''}" for c in mc])
        ax.set_yscale("log")
        ax.set_ylabel("ms per image (median, lower is better)")
        ax.set_title(model)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_axisbelow(True)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 1.6)  # room for the value labels
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        # label the 2..9 ticks too when the panel spans little more than a decade
        ax.yaxis.set_minor_formatter(plain if hi * 1.6 / lo < 30 else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(rts), 5 if len(models) == 1 else 9)
    legend_rows = math.ceil(len(rts) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.045 * legend_rows + 0.01, 1, 0.95 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return None


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
