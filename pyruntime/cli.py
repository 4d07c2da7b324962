"""The ``pyruntime`` command line: convert, run, inspect, bench, demo, calibrate, eval, exits.

Every sub-command is a function ``cmd_<name>(args) -> int``; :func:`main` parses and
dispatches. Bad input of any kind -- an option out of range, a path that is missing, a
directory or unreadable, a file that is not what it should be, a missing optional extra --
ends as one line ``pyruntime <command>: error: <problem>`` on stderr and exit status 2, never
a traceback: argparse types (below) check what can be checked before anything loads, and
:func:`main` turns the library's exceptions for bad input into that line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import MissingDependency, require_extra
from .modelfile import safetensors_metadata

# --- argument types: each names the problem in argparse's one-line error ----------------------

def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts of runs, images, batch, top-k ...)."""
    v = _integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up runs, seeds, block indices, rounds ...)."""
    v = _integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return v


def thread_count(text: str) -> int:
    """1 .. the runtime's cap on threads (``_core.limits()['max_threads']``)."""
    from . import _core

    v, cap = positive_int(text), int(_core.limits()["max_threads"])
    if v > cap:
        raise argparse.ArgumentTypeError(f"{v} threads exceed pyruntime's cap of {cap} (max_threads)")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v:g}")
    return v


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (held-out fractions)."""
    v = _finite(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {v:g}")
    return v


def percentile(text: str) -> float:
    v = _finite(text)
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"must lie in (0, 100], got {v:g}")
    return v


def input_file(text: str) -> str:
    """An existing, readable file (not a directory)."""
    p = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not p.is_file():  # a FIFO or device: opening one can block or read forever
        raise argparse.ArgumentTypeError(f"{text} is not a regular file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {e.strerror}") from None
    return text


def output_file(text: str) -> str:
    """A path a file can be written to: not empty, not a directory, in a writable directory."""
    if not text:
        raise argparse.ArgumentTypeError("empty output path")
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file path")
    parent = p.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} is not writable")
    return text


def optional_output_file(text: str) -> Optional[str]:
    """:func:`output_file`, or '' for none."""
    return output_file(text) if text else None


def work_directory(text: str) -> str:
    """A directory, or a path where one can be made (not an existing file)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def _require(option: str, check, text: str):
    """An argument type applied after parsing (where its check must wait for another one)."""
    try:
        return check(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"argument {option}: {e}") from None


def image_source(text: str) -> str:
    """A ``.npy`` file or a folder of images."""
    if Path(text).is_dir():
        return text
    input_file(text)
    if Path(text).suffix.lower() != ".npy":
        raise argparse.ArgumentTypeError(f"{text}: expected a .npy file or a folder of images")
    return text


def run_input(text: str) -> str:
    """What ``run`` takes: a ``.npy``, an ``.npz``, an image file or a folder (of images, or of
    one sub-folder per class)."""
    from .imagedata import IMAGE_EXTENSIONS

    if Path(text).is_dir():
        return text
    input_file(text)
    if Path(text).suffix.lower() not in (".npy", ".npz") + IMAGE_EXTENSIONS:
        raise argparse.ArgumentTypeError(f"{text}: expected a .npy file or a folder of images, an .npz with "
                                         f"'images' and 'labels', or image files ({', '.join(IMAGE_EXTENSIONS)})")
    return text


def policy_spec(text: str) -> str:
    """A policy shorthand (fp32, w8a8, ...) or a policy JSON file."""
    from .policy import SHORTHANDS

    if text in SHORTHANDS:
        return text
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a policy shorthand {list(SHORTHANDS)} nor an "
                                         f"existing file")
    return input_file(text)


# --- checks of files that need more than their existence -----------------------------------------

def check_reference_checkpoint(path: Optional[str]) -> None:
    """A checkpoint in the reference model's format (what ``convert reference`` and
    ``calibrate`` read); None is the shipped one."""
    if path is None:
        return
    from .reference import FORMAT, read_metadata

    fmt = safetensors_metadata(path).get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path} is not a reference-format checkpoint (metadata 'format' is {fmt!r}, expected "
                         f"{FORMAT!r}); a timm state dict converts with: pyruntime convert <timm-model> OUT "
                         f"--checkpoint {path}")
    try:
        meta = read_metadata(path)
    except ValueError as e:
        raise ValueError(f"{path}: corrupt reference metadata ({e})") from None
    missing = [k for k in ("timm_kwargs", "mean", "std") if k not in meta]
    if missing:
        raise ValueError(f"{path}: reference checkpoint metadata misses {missing}")


def check_state_dict_file(path: Optional[str]) -> None:
    """What convert's checkpoint loader reads: .safetensors (checked here) or .pth/.pt/.bin
    (checked by torch.load, after torch is imported)."""
    if path is None:
        return
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        safetensors_metadata(path)
    elif suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"checkpoint {path} must be .safetensors, .pth, .pt or .bin")


def _load_images(path: str) -> np.ndarray:
    """A ``.npy`` array (uint8 [B, H, W(, C)] or normalised float32 [B, C, H, W]) or a folder of
    image files (decoded with Pillow, if installed)."""
    p = Path(path)
    x = _load_npy(p) if p.is_file() else _load_image_folder(p)
    if x.dtype not in (np.uint8, np.float32):
        raise ValueError(f"{path}: images must be uint8 [B, H, W(, C)] or float32 [B, C, H, W], got {x.dtype}")
    return x


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as e:  # numpy's errors for a corrupt or empty file
        raise ValueError(f"{p}: not a readable .npy array ({e or type(e).__name__})") from None


def _load_image_folder(p: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading an image folder needs Pillow (pip install pillow); or pass a .npy array") from None
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"})
    if not files:
        raise ValueError(f"no image files in {p}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im))
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ValueError(f"{f}: cannot decode image ({e})") from None
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {p} differ in shape ({sorted(shapes)}); one folder must hold one size")
    return np.stack(images)


def cmd_convert(args) -> int:
    from .convert import as_policy

    if args.source == "reference" and args.exits:  # the reference checkpoint carries its own exit heads
        raise ValueError("the reference checkpoint carries its own exit heads; --exits does not apply")
    if args.source == "reference" and (args.model_kwargs is not None or args.random_weights):
        raise ValueError("the reference model takes neither --model-kwargs nor --random-weights")
    if args.source == "reference":
        check_reference_checkpoint(args.checkpoint)
    else:
        check_state_dict_file(args.checkpoint)
    if args.exits:
        safetensors_metadata(_require("--exits", input_file, args.exits))
    policy = as_policy(args.policy)  # a bad policy is named before torch is needed
    require_extra("convert", "pyruntime convert")
    if args.source == "reference":  # the shipped reference ViT (or --checkpoint in its format), exits included
        from .reference import convert_reference

        out = convert_reference(args.out, policy, path=args.checkpoint)
    else:
        from .convert import convert, load_timm

        # load_timm names what it adapted (position embeddings resampled, random weights);
        # convert then loads the checkpoint into that model again, for its provenance.
        model, _, notes = load_timm(args.source, args.model_kwargs, args.checkpoint, args.random_weights)
        for note in notes:
            print(f"note: {note}")
        out = convert(model, args.out, checkpoint=args.checkpoint, policy=policy, exits=args.exits)
    print(f"wrote {out}")
    return 0


def _has_class_folders(p: Path) -> bool:
    return p.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(p))


def _run_inputs(paths: List[str], model):
    """(images for Model.run, a name per image, labels or None, class names or None) from
    ``run``'s inputs: one ``.npy``; one ``.npz`` or one folder of class sub-folders (labelled,
    through :func:`pyruntime.imagedata.read_dataset`); or image files and flat folders of them
    (any sizes: Model.run resizes them as the model's preprocessing says)."""
    from .imagedata import IMAGE_EXTENSIONS, _decode, _pil, read_dataset

    first = Path(paths[0])
    labelled = first.suffix.lower() in (".npy", ".npz") or _has_class_folders(first)
    if labelled and len(paths) > 1:
        raise ValueError(f"{first} must be the only input: pass image files and flat folders together, or one "
                         f".npy, .npz or folder of class sub-folders")
    if first.suffix.lower() == ".npy" and first.is_file():
        x = _load_images(str(first))
        return x, [str(i) for i in range(len(x))], None, None
    if labelled:
        d = read_dataset(first, model.preprocessing, num_classes=int(model.arch["num_classes"]))
        return d.images, [str(i) for i in range(len(d))], d.labels, d.classes
    files: List[Path] = []
    for p in map(Path, paths):
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if p.is_dir() else [p]
        if p.is_dir() and not found:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {p}")
        files += found
    Image = _pil()
    return [_decode(f, model.input_shape[0], Image) for f in files], [f.name for f in files], None, None


def _class_name(c: int, classes) -> str:
    return f"{c} ({classes[c]})" if classes is not None and c < len(classes) and classes[c] != str(c) else str(c)


def _write_npy(path: str, array: np.ndarray, inputs) -> None:
    """``array`` as a float32 .npy at ``path``, atomically (never over an input or a non-file)."""
    import io

    from ._atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue(), inputs=inputs)


def cmd_run(args) -> int:
    from .runtime import load

    model = load(args.model, num_threads=args.threads)
    images, names, labels, classes = _run_inputs(args.images, model)
    x = images if isinstance(images, np.ndarray) else model.preprocess(images)
    inputs = [args.model] + [p for p in args.images if isinstance(p, str)]
    r = model.run(x, tokens=args.tokens is not None)
    for path, array in ((args.features, r.features), (args.tokens, r.tokens)):
        if path is not None:
            _write_npy(path, array, inputs)
    probs = np.exp(r.logits - r.logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i in range(len(r.logits)):
        top = np.argsort(-probs[i])[: args.top_k]
        best = ", ".join(f"{c}:{probs[i, c]:.3f}" for c in top)
        name = "" if names[i] == str(i) else f" {names[i]}"
        label = "" if labels is None else f"  label {_class_name(int(labels[i]), classes)}"
        print(f"image {i}:{name} class {_class_name(int(top[0]), classes)}  [{best}]{label}  exit block "
              f"{r.exit_block[i]}  {r.bops[i] / 1e9:.3f} GBOPs")
    if labels is not None:
        correct = int((r.predictions == labels).sum())
        print(f"top-1: {correct}/{len(labels)} = {100 * correct / len(labels):.2f}%")
    return 0


def cmd_inspect(args) -> int:
    from . import bops
    from .modelfile import attention_bits, graph_layer_names, graph_layer_shapes, layer_precision, read_header

    h = read_header(args.model)
    g, a = h.graph, h.graph["arch"]
    size = Path(args.model).stat().st_size
    print(f"file:        {args.model} ({size / 1e6:.2f} MB)")
    print(f"format:      version {h.version} (pyruntime safetensors container)")
    print(f"arch:        ViT depth {a['depth']}, dim {a['embed_dim']}, heads {a['num_heads']}, mlp {a['mlp_hidden']}, "
          f"img {a['img_size']}, patch {a['patch_size']}, chans {a['in_chans']}, classes {a['num_classes']}, "
          f"pool {a['global_pool']}")
    print(f"provenance:  {json.dumps(h.provenance, sort_keys=True)}")
    exits = g.get("exits") or []
    print("exits:       " + (", ".join(f"after block {e['block']} (QuEE gate)" if e["rule"] == "gate" else
                                        f"after block {e['block']} ({e['rule']} >= {e['threshold']:g})"
                                        for e in exits) or "none"))
    if g.get("predictor"):
        print(f"predictor:   statistic after block {g['predictor']['block']}, chunk {g['predictor']['chunk']}")
    if g.get("gates"):
        gt = g["gates"]
        costs = ", ".join(f"block {b}: {c}" for b, c in gt["cost"].items())
        print(f"gates:       lambda {gt['lambda']:g}, top-{gt['topk']} + entropy -> {gt['hidden']} -> 3; "
              f"costs (exit, full, reduced) {costs}; {len(gt['reduced'])} layers with reduced copies (':lo')")
    ab = attention_bits(g)
    print(f"attention:   q.k^T and attn.v on {'fp32' if ab == 32 else 'int8'} operands")
    shapes, lb = graph_layer_shapes(g, reduced=True), bops.layer_bops(g, reduced=True)
    print(f"{'layer':28s} {'N x K':>12s} {'w':>3s} {'a':>3s} {'scale':>9s} {'GBOPs':>9s}")
    for name in graph_layer_names(g, reduced=True):
        lp = layer_precision(g, name)
        N, K = shapes[name]
        a_bits = "-" if lp["w_bits"] == 32 else lp["a_bits"]
        scale = "-" if lp["w_bits"] == 32 else lp.get("scale", "dynamic")
        print(f"{name:28s} {f'{N}x{K}':>12s} {lp['w_bits']:>3} {a_bits:>3} {scale:>9s} {lb[name] / 1e9:9.4f}")
    print(f"static BOPs: {bops.static(g) / 1e9:.3f} G per image (full depth, every exit head evaluated)")
    return 0


def _percentiles(ts: List[float]) -> str:
    q = np.percentile(np.asarray(ts) * 1e3, [50, 90, 99])
    return f"p50 {q[0]:.2f} ms  p90 {q[1]:.2f} ms  p99 {q[2]:.2f} ms  (min {min(ts) * 1e3:.2f} ms, {len(ts)} runs)"


def _print_latency_table(table) -> None:
    """Per-layer ms at each profiled precision (and the ratio to fp32), the fixed parts, and
    the totals of a uniform model at each precision."""
    from .latency import uniform_graph
    from .modelfile import set_attention_bits

    bits = table.w_bits
    ratios = [b for b in bits if b != 32] if 32 in bits else []
    head = "".join(f"{f'w{b} ms':>10s}" for b in bits) + "".join(f"{f'w{b}/fp32':>9s}" for b in ratios)
    print(f"latency table ({table.meta.get('isa', '?')}, batch 1, median of {table.meta.get('runs', '?')} runs):")
    print(f"  {'layer':28s}{head}")
    for name, per in table.layers.items():
        ms = "".join(f"{per[b] * 1e3:10.4f}" for b in bits)
        print(f"  {name:28s}{ms}" + "".join(f"{per[b] / per[32]:9.2f}" if per[32] else f"{'-':>9s}" for b in ratios))
    print(f"  fixed (non-linear ops): embed {table.embed * 1e3:.4f} ms; blocks "
          + " ".join(f"{s * 1e3:.4f}" for s in table.blocks) + " ms")
    for a, per in table.attention.items():
        print(f"  attention ({'fp32' if a == 32 else f'int{a}'}) per block: " + " ".join(f"{s * 1e3:.4f}" for s in per)
              + " ms")
    exits = range(table.arch["depth"] - 1)
    for a in table.attention:
        for b in bits:
            full = set_attention_bits(uniform_graph(table.arch, b, exits), a)
            bare = set_attention_bits(uniform_graph(table.arch, b), a)
            print(f"  total w{b}{'' if a == 32 else f' + int{a} attention'}: {table.static(full) * 1e3:.4f} ms/image "
                  f"with every exit head, {table.static(bare) * 1e3:.4f} ms without exits")


def _write_latency_table(args, x: np.ndarray, model) -> None:
    from .latency import profile_latency

    images = x if x.dtype == np.float32 else model.preprocess(x)
    table = profile_latency(args.model, [p.strip() for p in args.precisions.split(",")], runs=args.runs,
                            warmup=args.warmup, num_threads=args.threads, isa=args.isa,
                            images=images if args.images else None, int8_attention=args.int8_attention)
    table.save(args.latency_table)
    _print_latency_table(table)
    print(f"wrote {args.latency_table}")


def cmd_bench(args) -> int:
    from .runtime import load

    if args.latency_table and not args.profile:
        raise ValueError("--latency-table is measured by --profile: pass both")
    t0 = time.perf_counter()
    model = load(args.model, num_threads=args.threads, isa=args.isa)
    load_s = time.perf_counter() - t0
    if args.images:
        x = _load_images(args.images)[: args.batch]
    else:
        C, H, W = model.input_shape
        x = np.random.default_rng(0).standard_normal((args.batch, C, H, W)).astype(np.float32)
    t1 = time.perf_counter()
    r = model.run(x)
    first_s = time.perf_counter() - t1
    for _ in range(args.warmup):
        model.run(x)
    ts = []
    for _ in range(args.runs):
        t = time.perf_counter()
        r = model.run(x)
        ts.append(time.perf_counter() - t)
    print(f"model:     {args.model}  batch {len(x)}  threads {args.threads or 'default'}  ISA {r.isa}")
    print(f"load:      {load_s * 1e3:.1f} ms (read + validate + pack); first run {first_s * 1e3:.1f} ms")
    print(f"latency:   {_percentiles(ts)}  = {np.median(ts) * 1e3 / len(x):.2f} ms/image")
    hist = np.bincount(r.exit_block, minlength=model.depth)
    print("exits:     " + "  ".join(f"b{b}:{n}" for b, n in enumerate(hist) if n))
    print(f"BOPs:      {r.bops.mean() / 1e9:.3f} G per image (mean)")
    if args.profile:
        model.profile(True)
        for _ in range(args.runs):
            model.run(x)
        times = model.layer_times()
        total = sum(times.values())
        print(f"per-op time over {args.runs} runs (ISA {r.isa}), slowest first:")
        for name, s in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {name:32s} {s / args.runs * 1e3:8.3f} ms  {100 * s / total:5.1f}%")
        if args.latency_table:
            _write_latency_table(args, x, model)
    return 0


def cmd_demo(args) -> int:
    require_extra("convert", "pyruntime demo")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MissingDependency("pyruntime demo --plot needs matplotlib, which is not installed: "
                                    "pip install matplotlib, or pass --plot '' for no plot") from None
    from .demo import main as demo_main

    return demo_main(args)


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (the usage is one ``--help`` away); sub-parsers inherit this."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .exits import add_model_arguments, add_parser as add_exits_parser

    p = _Parser(prog="pyruntime", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a timm ViT (+ checkpoint, exits, policy) to a model file")
    c.add_argument("source", help="timm model name, or 'reference' for the shipped reference ViT (exit heads "
                                  "included; --checkpoint: another checkpoint in its format)")
    c.add_argument("out", type=output_file, help="output model file")
    add_model_arguments(c)
    c.add_argument("--policy", type=policy_spec, default="fp32",
                   help="fp32 | w8a8 | w4a8 | w8a8-attn8 | w4a8-attn8 | path to a policy JSON")
    c.add_argument("--exits", help="safetensors file of exit heads (exits.<b>.norm/fc.*)")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("run", help="run images (.npy, .npz, image files or a folder) and print predictions")
    r.add_argument("model", type=input_file)
    r.add_argument("images", type=run_input, nargs="+",
                   help="a .npy (uint8 [B, H, W(, C)] or normalised float32 [B, C, H, W]); an .npz with 'images' and "
                        "'labels' or a folder of class sub-folders (labels and class names printed); or image "
                        "files and folders of them, any size (resized as the model's preprocessing says)")
    r.add_argument("--threads", type=thread_count)
    r.add_argument("--top-k", type=positive_int, default=3)
    r.add_argument("--features", type=output_file, default=None, metavar="OUT.npy",
                   help="also write the pooled pre-logits features [B, D] (timm's forward_head(pre_logits=True); "
                        "an image that exited: its exit head's) as float32 .npy")
    r.add_argument("--tokens", type=output_file, default=None, metavar="OUT.npy",
                   help="also write every token after the final norm [B, T, D] (timm's forward_features; an image "
                        "that exited: its tokens at the exit through the final norm) as float32 .npy")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="print a model file's version, layers, bits, exits, size, BOPs")
    i.add_argument("model", type=input_file)
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="latency percentiles, per-op time, exit histogram, load time")
    b.add_argument("model", type=input_file)
    b.add_argument("--images", type=image_source, help=".npy or folder; default random inputs")
    b.add_argument("--batch", type=positive_int, default=1)
    b.add_argument("--threads", type=thread_count)
    b.add_argument("--isa")
    b.add_argument("--runs", type=positive_int, default=20)
    b.add_argument("--warmup", type=non_negative_int, default=3)
    b.add_argument("--profile", action="store_true", help="per-op times naming the ISA")
    b.add_argument("--top", type=positive_int, default=25, help="ops listed by --profile")
    b.add_argument("--latency-table", type=output_file, metavar="OUT.json",
                   help="with --profile: measure per-layer latency at each of --precisions (MODEL must be fp32) "
                        "and write the table calibrators use for cost 'latency'")
    b.add_argument("--precisions", default="fp32,w8a8,w4a8", help="for --latency-table: comma-separated of "
                                                                   "fp32, w8a8, w4a8")
    b.add_argument("--no-int8-attention", dest="int8_attention", action="store_false",
                   help="for --latency-table: time attention in fp32 only (by default int8 attention is timed "
                        "too, in one more interleaved W8A8 run)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the README's main job on the shipped reference model")
    d.add_argument("--json", type=output_file, help="also write the table as JSON to this path")
    d.add_argument("--plot", type=optional_output_file, default="demo.png",
                   help="PNG of accuracy against BOPs and latency ('' for none)")
    d.add_argument("--limit", type=positive_int, help="use only the first N test images")
    d.add_argument("--threads", type=thread_count)
    d.add_argument("--workdir", type=work_directory, help="where converted files go (default: a temporary directory)")
    d.set_defaults(func=cmd_demo)

    from .calibrate.cli import add_parser as add_calibrate_parser
    from .evaluate import add_parser as add_eval_parser

    add_calibrate_parser(sub)
    add_eval_parser(sub)
    add_exits_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    """The exception's message on one line; an OSError as 'path: reason'."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Parse and dispatch. Bad input reaches here as ValueError (FormatError and PolicyError
    included), OSError (a file that cannot be read or written) or MissingDependency, and ends
    as one line and status 2; Ctrl-C as status 130. Any other exception type is a bug in
    pyruntime, not bad input, and keeps its traceback so that it can be reported and fixed."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"pyruntime {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MissingDependency) as e:
        print(f"pyruntime {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
