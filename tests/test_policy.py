"""pyruntime.policy: schema, round trips, shorthands, resolution and every validation error."""
from __future__ import annotations

import json
import os

import pytest

from pyruntime.errors import PolicyError
from pyruntime.policy import (POLICY_VERSION, ExitPolicy, GatePolicy, LayerPolicy, Policy, PredictorPolicy,
                              layer_block)

DEPTH = 4


def names(depth: int = DEPTH, exits=(), dist: bool = False) -> list:
    out = ["patch_embed"]
    for i in range(depth):
        out += [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
        if i in exits:
            out.append(f"exits.{i}.fc")
    return out + ["head"] + (["head_dist"] if dist else [])


def full_policy() -> Policy:
    return Policy(
        layers={
            "blocks.*": LayerPolicy(w_bits=8),
            "blocks.0.attn.qkv": LayerPolicy(w_bits=4, a_bits=6, block_size=64),
            "blocks.1.mlp.fc1": LayerPolicy(w_bits=8, scale="static", static_scale=0.05),
            "blocks.2.mlp.fc2": LayerPolicy(w_bits=8, scale="predicted"),
        },
        exits=[ExitPolicy(block=1, rule="confidence", threshold=0.8), ExitPolicy(block=2, rule="margin", threshold=0.3)],
        predictor=PredictorPolicy(block=1, chunk=64, coeffs={"blocks.2.mlp.fc2": [0.01, 0.02, -0.001]}),
        default=LayerPolicy(w_bits=32),
        name="mixed",
        meta={"calibration": {"images": 512}},
    )


# --- serialisation -------------------------------------------------------------------------

def test_json_round_trip():
    p = full_policy()
    q = Policy.from_json(p.to_json())
    assert q == p
    d = json.loads(p.to_json())
    assert d["version"] == 1  # the oldest version that holds it (no int8 attention)
    assert set(d) == {"version", "name", "default", "layers", "exits", "predictor", "meta"}
    p.attn_bits = 8
    assert json.loads(p.to_json())["version"] == POLICY_VERSION == 2


def test_save_load_atomic(tmp_path):
    p = full_policy()
    path = tmp_path / "policy.json"
    p.save(path)
    assert Policy.load(path) == p
    assert os.listdir(tmp_path) == ["policy.json"]  # no temporary file left behind
    p2 = Policy.shorthand("w4a8")
    p2.save(path)  # overwrite
    assert Policy.load(path) == p2


def test_defaults_fill_optional_keys():
    p = Policy.from_json('{"version": 1, "layers": {"head": {"w_bits": 8}}}')
    assert p.layers["head"] == LayerPolicy(w_bits=8, a_bits=8, scale="dynamic", static_scale=None, block_size=32)
    assert p.default == LayerPolicy(w_bits=32) and p.exits == [] and p.predictor is None


# --- shorthands -------------------------------------------------------------------------------

def test_shorthand_fp32():
    resolved = Policy.shorthand("fp32").resolve(names(), DEPTH)
    assert all(lp.w_bits == 32 for lp in resolved.values())


@pytest.mark.parametrize("short, bits", [("w8a8", 8), ("w4a8", 4)])
def test_shorthand_uniform_block_linears(short, bits):
    p = Policy.shorthand(short)
    assert p.name == short and p.exits == [] and p.predictor is None
    layer_names = names(exits=(1,), dist=True)
    resolved = Policy(layers=p.layers, exits=[ExitPolicy(1, "confidence", 0.9)]).resolve(layer_names, DEPTH)
    for name, lp in resolved.items():
        if name.startswith("blocks."):
            assert (lp.w_bits, lp.a_bits, lp.scale) == (bits, 8, "dynamic")
        else:  # patch_embed, head, head_dist, exits.1.fc stay fp32
            assert lp.w_bits == 32, name


@pytest.mark.parametrize("short, bits", [("w8a8-attn8", 8), ("w4a8-attn8", 4)])
def test_attn8_shorthands_add_int8_attention(short, bits):
    p = Policy.shorthand(short)
    base = Policy.shorthand(short.split("-")[0])
    assert p.attn_bits == 8 and base.attn_bits == 32
    assert p.layers == base.layers and p.name == short


def test_attention_bits_round_trip_and_version():
    p = Policy.shorthand("w8a8-attn8")
    d = p.to_dict()
    assert d["version"] == 2 and d["attention"] == {"bits": 8}
    assert Policy.from_json(p.to_json()) == p
    plain = Policy.shorthand("w8a8").to_dict()
    assert plain["version"] == 1 and "attention" not in plain  # still readable by version-1 readers


@pytest.mark.parametrize("bits", [4, 16, True, "8"])
def test_attention_bits_rejected(bits):
    with pytest.raises(PolicyError, match="attention bits"):
        Policy(attn_bits=bits)


def test_unknown_shorthand():
    with pytest.raises(PolicyError, match="w8a8"):
        Policy.shorthand("int3")


# --- resolution ---------------------------------------------------------------------------------

def test_exact_name_beats_pattern():
    r = full_policy().resolve(names(exits=(1, 2)), DEPTH)
    assert r["blocks.0.attn.qkv"].w_bits == 4
    assert r["blocks.0.attn.proj"].w_bits == 8
    assert r["blocks.3.mlp.fc2"].w_bits == 8
    assert r["patch_embed"].w_bits == 32 and r["exits.2.fc"].w_bits == 32


def test_two_patterns_on_one_layer_is_an_error():
    p = Policy(layers={"blocks.*": LayerPolicy(8), "*.attn.*": LayerPolicy(4)})
    with pytest.raises(PolicyError, match="several patterns"):
        p.resolve(names(), DEPTH)


def test_layer_block():
    assert layer_block("patch_embed", 4) == -1
    assert layer_block("blocks.2.mlp.fc1", 4) == 2
    assert layer_block("exits.1.fc", 4) == 1
    assert layer_block("head", 4) == 4 and layer_block("head_dist", 4) == 4
    assert layer_block("blocks.3.attns.1.qkv", 4) == 3  # any family's linear inside block 3
    assert layer_block("attn_pool.kv", 4) == 4
    for bad in ("blocks.x.attn.qkv", "blocks.1", "norm", "exits.1.norm", "blocks.1..fc1"):
        with pytest.raises(PolicyError, match="is not a linear layer name pyruntime knows"):
            layer_block(bad, 4)


# --- validation errors -----------------------------------------------------------------------------

def _with(**kw) -> Policy:
    base = dict(layers={}, exits=[], predictor=None)
    base.update(kw)
    return Policy(**base)


@pytest.mark.parametrize("policy, match", [
    (_with(layers={"blocks.9.attn.qkv": LayerPolicy(8)}), "lacks"),
    (_with(layers={"head_dist": LayerPolicy(8)}), "lacks"),
    (_with(layers={"stages.*": LayerPolicy(8)}), "lacks"),
    (_with(layers={"exits.1.fc": LayerPolicy(8)}), "lacks"),  # no exit at block 1 in the policy
    (_with(exits=[ExitPolicy(DEPTH - 1, "confidence", 0.5)]), "out of range"),
    (_with(exits=[ExitPolicy(DEPTH + 3, "confidence", 0.5)]), "out of range"),
    (_with(exits=[ExitPolicy(1, "confidence", 0.5), ExitPolicy(1, "margin", 0.2)]), "two exits"),
    (_with(layers={"blocks.2.attn.proj": LayerPolicy(8, scale="predicted")}), "no predictor"),
    (_with(layers={"blocks.2.attn.proj": LayerPolicy(8, scale="predicted")},
           predictor=PredictorPolicy(1, 16, {"blocks.3.attn.proj": [1.0]})), "no coeffs"),
    (_with(layers={"blocks.1.attn.proj": LayerPolicy(8, scale="predicted")},
           predictor=PredictorPolicy(1, 16, {"blocks.1.attn.proj": [1.0]})), "not before"),
    (_with(layers={"patch_embed": LayerPolicy(8, scale="predicted")},
           predictor=PredictorPolicy(0, 16, {"patch_embed": [1.0]})), "not before"),
    (_with(predictor=PredictorPolicy(DEPTH, 16, {})), "out of range"),
    (_with(predictor=PredictorPolicy(0, 16, {"blocks.7.mlp.fc1": [1.0]})), "lacks"),
])
def test_validate_rejects(policy, match):
    with pytest.raises(PolicyError, match=match):
        policy.validate(names(), DEPTH)


def test_predicted_layer_after_predictor_is_valid():
    p = _with(layers={"blocks.2.attn.proj": LayerPolicy(8, scale="predicted"), "head": LayerPolicy(8, scale="predicted")},
              predictor=PredictorPolicy(1, 16, {"blocks.2.attn.proj": [0.1, 0.01], "head": [0.2]}))
    p.validate(names(), DEPTH)


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=5), "w_bits"),
    (dict(w_bits=16), "w_bits"),
    (dict(w_bits=True), "integer"),
    (dict(w_bits=8, a_bits=3), "a_bits"),
    (dict(w_bits=8, a_bits=9), "a_bits"),
    (dict(w_bits=8, scale="minmax"), "scale"),
    (dict(w_bits=8, scale="static"), "static_scale"),
    (dict(w_bits=8, scale="static", static_scale=0.0), "static_scale"),
    (dict(w_bits=8, scale="static", static_scale=-1.0), "static_scale"),
    (dict(w_bits=8, scale="static", static_scale=float("nan")), "finite"),
    (dict(w_bits=4, block_size=48), "block_size"),
    (dict(w_bits=4, block_size=0), "block_size"),
    # finite in float64, not in float32: the quantiser's float32(1/s) would be Inf or 0
    (dict(w_bits=8, scale="static", static_scale=1e-40), "finite float32 reciprocal"),
    (dict(w_bits=8, scale="static", static_scale=1e300), "finite as a float32"),
    (dict(w_bits=8, static_scale=1e39), "finite as a float32"),
])
def test_layer_policy_rejects(kwargs, match):
    with pytest.raises(PolicyError, match=match):
        LayerPolicy(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block=1, rule="confidence", threshold=1.5), r"\[0, 1\]"),
    (dict(block=1, rule="confidence", threshold=-0.1), r"\[0, 1\]"),
    (dict(block=1, rule="margin", threshold=2.0), r"\[0, 1\]"),
    (dict(block=1, rule="entropy", threshold=0.5), "rule"),
    (dict(block=-1, rule="confidence", threshold=0.5), ">= 0"),
])
def test_exit_policy_rejects(kwargs, match):
    with pytest.raises(PolicyError, match=match):
        ExitPolicy(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block=0, chunk=0, coeffs={}), "chunk"),
    (dict(block=0, chunk=8, coeffs={"head": []}), "non-empty"),
    (dict(block=0, chunk=8, coeffs={"head": [float("inf")]}), "finite"),
    (dict(block=0, chunk=8, coeffs={"head": [0.1, 1e300]}), "finite as a float32"),
    (dict(block=0, chunk=8, coeffs={"head": [-3.5e38]}), "finite as a float32"),
])
def test_predictor_policy_rejects(kwargs, match):
    with pytest.raises(PolicyError, match=match):
        PredictorPolicy(**kwargs)


@pytest.mark.parametrize("doc, match", [
    ({"version": 3}, "newer than this pyruntime supports"),
    ({"version": 1, "attention": {"bits": 8}}, "needs version 2"),
    ({"version": 2, "attention": {"bits": 4}}, "attention bits"),
    ({"version": 2, "attention": {"bits": 8, "softmax": "int"}}, "unknown key"),
    ({"version": 2, "attention": {}}, "missing"),
    ({"version": 0}, "version"),
    ({}, "version"),
    ({"version": 1, "bits": 8}, "unknown key"),
    ({"version": 1, "layers": {"head": {"w_bits": 8, "abits": 8}}}, "unknown key"),
    ({"version": 1, "exits": [{"block": 0, "rule": "margin", "threshold": 0.5, "gate": 1}]}, "unknown key"),
    ({"version": 1, "exits": [{"block": 0, "rule": "margin"}]}, "missing"),
    ({"version": 1, "predictor": {"block": 0, "chunk": 4, "coeffs": {}, "degree": 2}}, "unknown key"),
    ({"version": 1, "default": {"a_bits": 8}}, "missing"),
    ({"version": 1, "layers": []}, "object"),
])
def test_from_json_rejects(doc, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_json(json.dumps(doc))


def test_exit_thresholds_beyond_float32_are_out_of_range():
    with pytest.raises(PolicyError, match=r"\[0, 1\]"):
        ExitPolicy(block=0, threshold=1e300)
    with pytest.raises(PolicyError, match="finite"):
        ExitPolicy(block=0, threshold=float("nan"))


@pytest.mark.parametrize("kw, match", [
    (dict(lam=1e39), "finite as a float32"),
    (dict(lam=1e30, cost={"0": [0.0, 1e10, 0.0]}), "times the cost"),  # each finite, the product not
    (dict(cost={"0": [0.0, 1e300, 0.0]}), "finite as a float32"),
])
def test_gate_values_must_be_finite_in_float32(kw, match):
    with pytest.raises(PolicyError, match=match):
        GatePolicy(**kw)


def test_static_scale_at_the_float32_bounds_is_valid():
    LayerPolicy(w_bits=8, scale="static", static_scale=3e-39)
    LayerPolicy(w_bits=8, scale="static", static_scale=3.4e38)


def test_from_json_rejects_bad_json():
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{version: 1")
    with pytest.raises(PolicyError, match="nested too deeply"):  # was a RecursionError
        Policy.from_json("[" * 100_000)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        LayerPolicy(w_bits=3)
