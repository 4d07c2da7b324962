"""The ``pyruntime`` command line: convert, run, inspect, bench, demo, calibrate.

Every sub-command is a function ``cmd_<name>(args) -> int``; :func:`main` parses and
dispatches, turning the library's ValueError/FileNotFoundError into a one-line message and
exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np


def _load_images(path: str) -> np.ndarray:
    """A ``.npy`` array (uint8 [B, H, W(, C)] or normalised float32 [B, C, H, W]) or a folder of
    image files (decoded with Pillow, if installed)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.is_dir():
        try:
            from PIL import Image
        except ImportError:
            raise ValueError("reading an image folder needs Pillow (pip install pillow); or pass a .npy array") from None
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"})
        if not files:
            raise ValueError(f"no image files in {p}")
        return np.stack([np.asarray(Image.open(f)) for f in files])
    raise ValueError(f"{path}: expected a .npy file or a folder of images")


def cmd_convert(args) -> int:
    if args.source == "reference":  # the shipped reference ViT (or --checkpoint in its format), exits included
        from .reference import convert_reference

        if args.exits:
            raise ValueError("the reference checkpoint carries its own exit heads; --exits does not apply")
        out = convert_reference(args.out, args.policy, path=args.checkpoint)
        print(f"wrote {out}")
        return 0
    from .convert import convert

    out = convert(args.source, args.out, checkpoint=args.checkpoint, policy=args.policy, exits=args.exits)
    print(f"wrote {out}")
    return 0


def cmd_run(args) -> int:
    from .runtime import load

    model = load(args.model, num_threads=args.threads)
    x = _load_images(args.images)
    r = model.run(x)
    probs = np.exp(r.logits - r.logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i in range(len(r.logits)):
        top = np.argsort(-probs[i])[: args.top_k]
        best = ", ".join(f"{c}:{probs[i, c]:.3f}" for c in top)
        print(f"image {i}: class {top[0]}  [{best}]  exit block {r.exit_block[i]}  {r.bops[i] / 1e9:.3f} GBOPs")
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
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyruntime", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a timm ViT (+ checkpoint, exits, policy) to a model file")
    c.add_argument("source", help="timm model name, or 'reference' for the shipped reference ViT (exit heads "
                                  "included; --checkpoint: another checkpoint in its format)")
    c.add_argument("out", help="output model file")
    c.add_argument("--checkpoint", help=".pth/.safetensors state dict (may also hold exits.* heads)")
    c.add_argument("--policy", default="fp32", help="fp32 | w8a8 | w4a8 | w8a8-attn8 | w4a8-attn8 | path to a policy JSON")
    c.add_argument("--exits", help="safetensors file of exit heads (exits.<b>.norm/fc.*)")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("run", help="run images (a .npy or a folder) and print predictions")
    r.add_argument("model")
    r.add_argument("images")
    r.add_argument("--threads", type=int)
    r.add_argument("--top-k", type=int, default=3)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="print a model file's version, layers, bits, exits, size, BOPs")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="latency percentiles, per-op time, exit histogram, load time")
    b.add_argument("model")
    b.add_argument("--images", help=".npy or folder; default random inputs")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int)
    b.add_argument("--isa")
    b.add_argument("--runs", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--profile", action="store_true", help="per-op times naming the ISA")
    b.add_argument("--top", type=int, default=25, help="ops listed by --profile")
    b.add_argument("--latency-table", metavar="OUT.json",
                   help="with --profile: measure per-layer latency at each of --precisions (MODEL must be fp32) "
                        "and write the table calibrators use for cost 'latency'")
    b.add_argument("--precisions", default="fp32,w8a8,w4a8", help="for --latency-table: comma-separated of "
                                                                   "fp32, w8a8, w4a8")
    b.add_argument("--no-int8-attention", dest="int8_attention", action="store_false",
                   help="for --latency-table: time attention in fp32 only (by default int8 attention is timed "
                        "too, in one more interleaved W8A8 run)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the README's main job on the shipped reference model")
    d.add_argument("--json", help="also write the table as JSON to this path")
    d.add_argument("--plot", default="demo.png", help="PNG of accuracy against BOPs and latency")
    d.add_argument("--limit", type=int, help="use only the first N test images")
    d.add_argument("--threads", type=int)
    d.add_argument("--workdir", help="where converted files go (default: a temporary directory)")
    d.set_defaults(func=cmd_demo)

    from .calibrate.cli import add_parser as add_calibrate_parser

    add_calibrate_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"pyruntime {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
