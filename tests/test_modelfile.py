"""pyruntime.modelfile: round trip, and a clear FormatError for every way a file can be bad."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from _graphs import W4A8, W8A8, random_tensors, tiny_graph
from pyruntime import modelfile
from pyruntime.errors import FormatError
from pyruntime.modelfile import (FORMAT_VERSION, KEY_HEADER_SHA256, MAGIC, graph_layer_names, graph_layer_shapes, pack_int4,
                                 read_header, read_model, unpack_int4, with_ops, write_model)

POLICY = json.dumps({"version": 1, "name": "test"})
PROVENANCE = {"source": "unit-test", "checkpoint_sha256": None}


def mixed_graph() -> dict:
    return tiny_graph(
        exits=[{"block": 0, "rule": "confidence", "threshold": 0.7}],
        layers={"blocks.0.attn.qkv": W8A8, "blocks.1.mlp.fc1": W4A8, "patch_embed": W4A8},
    )


@pytest.fixture
def model(tmp_path):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    path = tmp_path / "m.pyrt"
    write_model(path, graph, tensors, POLICY, PROVENANCE)
    return path, graph, tensors


def header_of(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def seal(header):
    """Give an edited header a valid checksum, so the reader's later checks are reached."""
    meta = header["__metadata__"]
    meta[KEY_HEADER_SHA256] = modelfile.header_digest(meta, {k: v for k, v in header.items() if k != "__metadata__"})


def rewrite_header(path, edit, sealed=True):
    """Apply ``edit(header)`` (then, unless ``sealed`` is False, re-seal it) and write the file
    back with the new header length."""
    header, data = header_of(path)
    edit(header)
    if sealed:
        seal(header)
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def write_raw(path, graph, tensors, **meta_overrides):
    """A safetensors file with pyruntime metadata but none of write_model's checks: sealed
    (format version 3 or later) unless the overrides name an older version, which has no
    checksum; the graph gets its op list when the version (default: the current) has one."""
    version = int(meta_overrides.get("pyruntime.format_version", FORMAT_VERSION))
    meta = {
        "pyruntime.magic": MAGIC,
        "pyruntime.format_version": str(FORMAT_VERSION),
        "pyruntime.graph": json.dumps(with_ops(graph) if version >= 4 else graph),
        "pyruntime.policy": POLICY,
        "pyruntime.provenance": json.dumps(PROVENANCE),
        "pyruntime.checksums": json.dumps({k: modelfile._crc32(v) for k, v in tensors.items()}),
    }
    meta.update(meta_overrides)
    save_file(tensors, str(path), metadata=meta)
    if int(meta["pyruntime.format_version"]) >= 3:
        rewrite_header(path, lambda h: None)


# --- round trip -------------------------------------------------------------------------------

def test_round_trip(model):
    path, graph, tensors = model
    g, t, policy_json, provenance = read_model(path)
    assert g == with_ops(graph) and "ops" not in graph
    assert policy_json == POLICY and provenance == PROVENANCE
    assert set(t) == set(tensors)
    for k in tensors:
        assert t[k].dtype == tensors[k].dtype
        np.testing.assert_array_equal(t[k], tensors[k])


def test_metadata_keys(model):
    path, _, tensors = model
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["pyruntime.magic"] == "pyruntime-vit"
    assert meta["pyruntime.format_version"] == "4"
    assert len(meta[KEY_HEADER_SHA256]) == 64 and int(meta[KEY_HEADER_SHA256], 16) >= 0
    checksums = json.loads(meta["pyruntime.checksums"])
    assert set(checksums) == set(tensors)
    assert all(isinstance(v, int) and 0 <= v < 2 ** 32 for v in checksums.values())


def test_read_header_reads_no_tensors(model):
    path, graph, _ = model
    assert read_header(path).graph == with_ops(graph)


def test_int4_pack_round_trip():
    rng = np.random.default_rng(1)
    for K in (1, 7, 32, 33):
        q = rng.integers(-8, 8, size=(3, K)).astype(np.int8)
        packed = pack_int4(q)
        assert packed.dtype == np.uint8 and packed.shape == (3, (K + 1) // 2)
        np.testing.assert_array_equal(unpack_int4(packed, K), q)
    # value + 8, even k in the low nibble
    np.testing.assert_array_equal(pack_int4(np.array([[-8, 7, 0]])), np.array([[0xF0, 0x88]], dtype=np.uint8))


def test_layer_names_and_shapes():
    g = tiny_graph(exits=[{"block": 0, "rule": "margin", "threshold": 0.1}], dist_token=True)
    names = graph_layer_names(g)
    assert names == ["patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                     "blocks.0.mlp.fc2", "exits.0.fc", "blocks.1.attn.qkv", "blocks.1.attn.proj",
                     "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head", "head_dist"]
    shapes = graph_layer_shapes(g)
    assert shapes["patch_embed"] == (8, 16) and shapes["blocks.0.attn.qkv"] == (24, 8)
    assert shapes["blocks.1.mlp.fc2"] == (8, 16) and shapes["exits.0.fc"] == (3, 8) and shapes["head_dist"] == (3, 8)


# --- damaged files ----------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100])
def test_truncated(model, keep):
    path = model[0]
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(FormatError, match="truncated"):
        read_model(path)


def test_flipped_byte_fails_checksum_naming_tensor(model):
    path, _, tensors = model
    header, _ = header_of(path)
    name = "blocks.1.mlp.fc1.weight.q4"
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little") + header[name]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    raw[start + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"checksum mismatch in tensor 'blocks\.1\.mlp\.fc1\.weight\.q4'"):
        read_model(path)


def test_newer_version(model):
    path = model[0]
    newer = FORMAT_VERSION + 1
    rewrite_header(path, lambda h: h["__metadata__"].update({"pyruntime.format_version": str(newer)}))
    with pytest.raises(FormatError, match=rf"format version {newer} is newer than this pyruntime supports "
                                          rf"\({FORMAT_VERSION}\); upgrade pyruntime"):
        read_model(path)


def test_every_file_is_written_as_version_4(tmp_path):
    graph = tiny_graph()
    tensors = random_tensors(graph)
    graph["attention"] = {"bits": 8}
    path = tmp_path / "a8.pyrt"
    write_model(path, graph, tensors, POLICY, PROVENANCE)
    h = read_header(path)
    assert h.version == 4 and h.graph["attention"] == {"bits": 8} and h.graph["ops"] == with_ops(graph)["ops"]
    graph["attention"] = {"bits": 32}
    write_model(tmp_path / "a32.pyrt", graph, tensors, POLICY, PROVENANCE)
    assert read_header(tmp_path / "a32.pyrt").version == 4


def test_version_1_file_cannot_claim_int8_attention(tmp_path):
    graph = tiny_graph()
    tensors = random_tensors(graph)
    graph["attention"] = {"bits": 8}
    write_raw(tmp_path / "m.pyrt", graph, tensors, **{"pyruntime.format_version": "1"})
    with pytest.raises(FormatError, match="needs version 2"):
        read_model(tmp_path / "m.pyrt")


@pytest.mark.parametrize("magic", ["pyruntime-cnn", None])
def test_wrong_magic(model, magic):
    path = model[0]

    def edit(h):
        if magic is None:
            del h["__metadata__"]["pyruntime.magic"]
        else:
            h["__metadata__"]["pyruntime.magic"] = magic

    rewrite_header(path, edit)
    with pytest.raises(FormatError, match="not a pyruntime model"):
        read_model(path)


def test_plain_safetensors_is_not_a_model(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(FormatError, match="not a pyruntime model"):
        read_model(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "junk.pyrt"
    blob = b"{not json" + b" " * 7
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(FormatError, match="not valid JSON"):
        read_model(path)


def test_header_length_implausible(tmp_path):
    path = tmp_path / "huge.pyrt"
    path.write_bytes((2 ** 40).to_bytes(8, "little") + b"x" * 64)
    with pytest.raises(FormatError, match="implausible"):
        read_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "nope.pyrt")


def test_graph_json_corrupt(model):
    path = model[0]
    rewrite_header(path, lambda h: h["__metadata__"].update({"pyruntime.graph": "{"}))
    with pytest.raises(FormatError, match="pyruntime.graph"):
        read_model(path)


def test_safetensors_errors_are_wrapped(model):
    path = model[0]
    rewrite_header(path, lambda h: h["blocks.0.norm1.weight"].update({"dtype": "Q9"}))
    with pytest.raises(FormatError, match=str(path.name)):
        read_model(path)


# --- graph / tensor consistency ------------------------------------------------------------------

def test_missing_tensor(tmp_path):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    del tensors["blocks.1.norm2.bias"]
    path = tmp_path / "m.pyrt"
    write_raw(path, graph, tensors)
    with pytest.raises(FormatError, match=r"missing tensor 'blocks\.1\.norm2\.bias'"):
        read_model(path)


def test_unknown_extra_tensor(tmp_path):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    tensors["blocks.0.secret"] = np.zeros(4, np.float32)
    path = tmp_path / "m.pyrt"
    write_raw(path, graph, tensors)
    with pytest.raises(FormatError, match="does not use"):
        read_model(path)


@pytest.mark.parametrize("name, bad", [
    ("blocks.0.attn.qkv.weight.q8", np.zeros((24, 8), np.float32)),      # wrong dtype
    ("blocks.0.attn.qkv.weight.scale", np.ones(23, np.float32)),         # wrong shape
    ("pos_embed", np.zeros((1, 4, 8), np.float32)),                       # missing the cls position
    ("blocks.1.mlp.fc1.weight.q4", np.zeros((16, 8), np.uint8)),          # K/2 = 4 bytes, not 8
])
def test_misshaped_tensor(tmp_path, name, bad):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    tensors[name] = bad
    path = tmp_path / "m.pyrt"
    write_raw(path, graph, tensors)
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        read_model(path)


def test_int8_minus_128_rejected(tmp_path):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    tensors["blocks.0.attn.qkv.weight.q8"][0, 0] = -128
    path = tmp_path / "m.pyrt"
    write_raw(path, graph, tensors)
    with pytest.raises(FormatError, match="-128"):
        read_model(path)


def test_qkv_bias_follows_arch(tmp_path):
    graph = tiny_graph(qkv_bias=False)
    tensors = random_tensors(graph)
    assert "blocks.0.attn.qkv.bias" not in tensors
    write_model(tmp_path / "ok.pyrt", graph, tensors, POLICY, PROVENANCE)
    tensors["blocks.0.attn.qkv.bias"] = np.zeros(24, np.float32)
    with pytest.raises(FormatError, match="does not use"):
        write_model(tmp_path / "bad.pyrt", graph, tensors, POLICY, PROVENANCE)


def test_other_biases_optional(tmp_path):
    graph = tiny_graph()
    tensors = random_tensors(graph)
    for k in ["patch_embed.bias", "blocks.0.mlp.fc2.bias", "head.bias"]:
        del tensors[k]
    write_model(tmp_path / "m.pyrt", graph, tensors, POLICY, PROVENANCE)
    assert "head.bias" not in read_model(tmp_path / "m.pyrt")[1]


def _edit(graph, fn):
    fn(graph)
    return graph


@pytest.mark.parametrize("make, match", [
    (lambda: _edit(tiny_graph(), lambda g: g["layers"].pop("blocks.1.mlp.fc2")), "linear layers"),
    (lambda: _edit(tiny_graph(), lambda g: g["layers"].update({"blocks.7.mlp.fc2": dict(W8A8)})), "linear layers"),
    (lambda: _edit(tiny_graph(), lambda g: g["layers"].update({"blocks.7.mlp.fc2": g["layers"].pop("head")})),
     r"misses \['head'\] / has unknown \['blocks.7.mlp.fc2'\]"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"depth": 3})), "linear layers"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"depth": 10 ** 12})), "max_depth"),  # fails fast
    (lambda: _edit(tiny_graph(), lambda g: g["layers"]["head"].pop("block_size")), "exactly the keys"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"act": "gelu"})), "unknown keys"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].pop("eps")), "eps"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"img_size": [9, 8]})), "multiple of the patch"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"num_heads": 3})), "num_heads"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"global_pool": "max"})), "token\\|avg\\|map"),
    (lambda: _edit(tiny_graph(), lambda g: g["arch"].update({"cls_token": False})), "class token"),
    (lambda: _edit(tiny_graph(), lambda g: g["preprocess"].update({"mean": [0.5, 0.5]})), "mean"),
    (lambda: tiny_graph(exits=[{"block": 1, "rule": "confidence", "threshold": 0.5}]), "out of range"),
    (lambda: tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 1.5}]), r"\[0, 1\]"),
    (lambda: tiny_graph(layers={"blocks.1.attn.qkv": dict(W8A8, scale="predicted")}), "no predictor"),
    (lambda: tiny_graph(layers={"head": dict(W8A8, scale="static")}), "static_scale"),
    (lambda: _edit(tiny_graph(), lambda g: g.update({"extra": 1})), "graph keys"),
    (lambda: _edit(tiny_graph(), lambda g: g.update({"attention": {"bits": 4}})), "attention bits must be 8 or 32"),
    (lambda: _edit(tiny_graph(), lambda g: g.update({"attention": {"bits": True}})), "attention bits must be 8 or 32"),
    (lambda: _edit(tiny_graph(), lambda g: g.update({"attention": {"bits": 8, "mode": "x"}})), "graph.attention must be"),
    (lambda: _edit(tiny_graph(), lambda g: g.update({"attention": 8})), "graph.attention must be"),
])
def test_inconsistent_graph(tmp_path, make, match):
    graph = make()
    path = tmp_path / "m.pyrt"
    with pytest.raises(FormatError, match=match):
        modelfile.check_graph(graph)
    with pytest.raises(FormatError):
        write_model(path, graph, {}, POLICY, PROVENANCE)
    assert not path.exists()


def test_reader_rejects_inconsistent_graph(model):
    path = model[0]

    def edit(h):
        g = json.loads(h["__metadata__"]["pyruntime.graph"])
        g["exits"][0]["block"] = 5
        h["__metadata__"]["pyruntime.graph"] = json.dumps(g)

    rewrite_header(path, edit)
    with pytest.raises(FormatError, match="out of range"):
        read_model(path)


# --- atomic writes ----------------------------------------------------------------------------

def test_write_leaves_no_temp_file_and_normal_permissions(model):
    path = model[0]
    assert os.listdir(path.parent) == [path.name]
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_failed_write_does_not_clobber(model):
    path, graph, tensors = model
    before = path.read_bytes()
    bad = dict(tensors)
    del bad["head.weight"]
    with pytest.raises(FormatError, match="missing tensor 'head.weight'"):
        write_model(path, graph, bad, POLICY, PROVENANCE)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_crash_mid_write_does_not_clobber(model, monkeypatch):
    path, graph, tensors = model
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_model(path, graph, tensors, POLICY, PROVENANCE)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_policy_json_must_be_json(tmp_path):
    graph = tiny_graph()
    with pytest.raises(ValueError):
        write_model(tmp_path / "m.pyrt", graph, random_tensors(graph), "{", PROVENANCE)
    assert not (tmp_path / "m.pyrt").exists()


# --- header checksum (format version 3) ---------------------------------------------------------

@pytest.mark.parametrize("old, new", [
    (b'"num_heads\\":2', b'"num_heads\\":1'),          # two bits: the attention splits differently
    (b'"eps\\":1e-06', b'"eps\\":1e-04'),              # LayerNorm changes silently
    (b'\\"threshold\\":0.7', b'\\"threshold\\":0.3'),    # exits fire on other images
    (b'"pyruntime.format_version":"4"', b'"pyruntime.format_version":"1"'),  # no skipping the check
    (b'"dtype":"F32"', b'"dtype":"I32"'),              # the tensor table is covered too
])
def test_flipped_header_bytes_fail_the_header_checksum(model, old, new):
    path = model[0]
    raw = path.read_bytes()
    assert raw.count(old) >= 1 and len(old) == len(new)
    path.write_bytes(raw.replace(old, new, 1))
    with pytest.raises(FormatError, match="header checksum mismatch"):
        read_model(path)


def test_version_3_without_header_checksum_is_rejected(model):
    path = model[0]
    rewrite_header(path, lambda h: h["__metadata__"].pop(KEY_HEADER_SHA256), sealed=False)
    with pytest.raises(FormatError, match="header_sha256' is missing"):
        read_model(path)


@pytest.mark.parametrize("version, attention", [("1", None), ("2", None), ("2", {"bits": 8})])
def test_old_versions_without_header_checksum_still_load(tmp_path, version, attention):
    graph = mixed_graph()
    if attention:
        graph["attention"] = attention
    tensors = random_tensors(graph)
    path = tmp_path / f"v{version}.pyrt"
    write_raw(path, graph, tensors, **{"pyruntime.format_version": version})  # the old layout, by hand
    assert KEY_HEADER_SHA256 not in header_of(path)[0]["__metadata__"]
    g, t, _, _ = read_model(path)
    assert g == with_ops(graph) and read_header(path).version == int(version)


# --- deeply nested JSON ---------------------------------------------------------------------------

def test_deeply_nested_header_is_a_format_error(tmp_path):
    path = tmp_path / "deep.pyrt"
    blob = b"[" * 100_000
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(FormatError, match="nested too deeply"):
        read_model(path)


@pytest.mark.parametrize("key", ["pyruntime.graph", "pyruntime.policy", "pyruntime.provenance", "pyruntime.checksums"])
def test_deeply_nested_metadata_is_a_format_error(model, key):
    path = model[0]
    rewrite_header(path, lambda h: h["__metadata__"].update({key: "[" * 100_000 + "]" * 100_000}))
    with pytest.raises(FormatError, match="nested too deeply"):
        read_model(path)


@pytest.mark.parametrize("depth", [500, 990])  # parses, but is deep enough to trip a later walk
def test_nested_just_parseable_is_never_a_recursion_error(model, depth):
    path = model[0]
    rewrite_header(path, lambda h: h["__metadata__"].update({"pyruntime.provenance": "[" * depth + "]" * depth}))
    with pytest.raises(FormatError):
        read_model(path)


def test_non_integer_version_and_offsets_are_format_errors(model):
    path = model[0]
    rewrite_header(path, lambda h: h["__metadata__"].update({"pyruntime.format_version": 1e400}))
    with pytest.raises(FormatError, match="not an integer"):
        read_model(path)
    def huge_offset(h):
        h["__metadata__"]["pyruntime.format_version"] = "3"
        h["head.weight"]["data_offsets"][1] = float("inf")  # JSON Infinity

    rewrite_header(path, huge_offset)
    with pytest.raises(FormatError, match="data_offsets"):
        read_model(path)


# --- float32-sane values -----------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize("edit, match", [
    (lambda g: g["preprocess"].update({"mean": [1e300]}), "preprocess.mean"),
    (lambda g: g["preprocess"].update({"mean": [NAN]}), "preprocess.mean"),
    (lambda g: g["preprocess"].update({"mean": [1e5]}), "preprocess.mean"),      # pixels would merge in float32
    (lambda g: g["preprocess"].update({"std": [1e-50]}), "preprocess.std"),      # 0 in float32
    (lambda g: g["preprocess"].update({"std": [1e-40]}), "preprocess.std"),      # 1/std is Inf in float32
    (lambda g: g["preprocess"].update({"std": [1e300]}), "preprocess.std"),
    (lambda g: g["preprocess"].update({"std": [NAN]}), "preprocess.std"),
    (lambda g: g["preprocess"].update({"std": [0]}), "preprocess.std"),
    (lambda g: g["arch"].update({"eps": 1e300}), "eps"),
    (lambda g: g["arch"].update({"eps": 2.0}), "eps"),                            # flattens every LayerNorm
    (lambda g: g["arch"].update({"eps": 1e-50}), "eps"),                          # 0 in float32
    (lambda g: g["arch"].update({"eps": NAN}), "eps"),
    (lambda g: g["layers"]["head"].update({"w_bits": 8, "scale": "static", "static_scale": 1e-40}), "static_scale"),
    (lambda g: g["layers"]["head"].update({"static_scale": 1e300}), "static_scale"),
    (lambda g: g.update({"predictor": {"block": 0, "chunk": 4, "coeffs": {"head": [1e300]}}}), "predictor coeff"),
])
def test_values_must_be_sane_in_float32(tmp_path, edit, match):
    graph = tiny_graph()
    edit(graph)
    with pytest.raises(FormatError, match=match):
        modelfile.check_graph(graph)
    path = tmp_path / "m.pyrt"  # and a sealed file holding it is refused by the reader
    modelfile._save(path, graph, random_tensors(tiny_graph()), POLICY, PROVENANCE)
    with pytest.raises(FormatError, match=match):
        read_model(path)


def test_preprocess_bounds_are_inclusive():
    graph = tiny_graph()
    graph["preprocess"].update({"mean": [-1e4], "std": [1e-6]})
    graph["arch"]["eps"] = 1.0
    modelfile.check_graph(graph)


# --- the runtime's size limits, before any allocation -----------------------------------------------

LIM = modelfile.limits()


@pytest.mark.parametrize("make, match", [
    (lambda: tiny_graph(layers={"blocks.0.mlp.fc1": dict(W4A8, block_size=2 ** 20)}), "block_size 1048576 exceeds K=8"),
    (lambda: tiny_graph(layers={"blocks.0.mlp.fc1": dict(W4A8, block_size=2 ** 62)}), "block_size"),
    (lambda: tiny_graph(layers={"blocks.0.mlp.fc2": dict(W4A8, block_size=64)}), "exceeds K=16 rounded up to 32"),
    (lambda: tiny_graph(layers={"head": dict(W8A8, block_size=2 ** 70)}), "max_k"),  # unused, but must fit C++
    (lambda: tiny_graph(img_size=[64, 64], patch_size=[1, 1]), "4097 tokens"),        # 64 * 64 + cls
    (lambda: tiny_graph(img_size=[LIM["max_image_side"] * 2] * 2, patch_size=[2 ** 12] * 2), "max_image_side"),
    (lambda: tiny_graph(depth=LIM["max_depth"] + 1), "max_depth"),
    (lambda: tiny_graph(embed_dim=LIM["max_dim"] + 2, num_heads=2), "max_dim"),
    (lambda: tiny_graph(mlp_hidden=LIM["max_dim"] + 1), "max_dim"),
    (lambda: tiny_graph(img_size=[512, 512], patch_size=[512, 512], in_chans=1), "K=262144"),  # patch_dim
])
def test_size_limits(tmp_path, make, match):
    graph = make()
    with pytest.raises(FormatError, match=match):
        modelfile.check_graph(graph)
    path = tmp_path / "m.pyrt"
    modelfile._save(path, graph, {}, POLICY, PROVENANCE)  # no tensors: the graph check comes first
    with pytest.raises(FormatError, match=match):
        read_header(path)


def test_a_block_as_big_as_k_is_allowed(tmp_path):
    graph = tiny_graph(layers={"blocks.0.mlp.fc2": dict(W4A8, block_size=32)})  # K = 16, rounded up to 32
    write_model(tmp_path / "m.pyrt", graph, random_tensors(graph), POLICY, PROVENANCE)


def test_linear_tensors_refuses_a_huge_block_before_quantising():
    w = np.ones((4, 40), np.float32)
    with pytest.raises(FormatError, match="block_size 1152921504606846976 exceeds K=40 rounded up to 32"):
        modelfile.linear_tensors("blocks.0.mlp.fc1", w, None, modelfile.LayerPolicy(4, block_size=2 ** 60))
    assert modelfile.linear_tensors("x", w, None, modelfile.LayerPolicy(4, block_size=64))["x.weight.scale"].shape == (4, 1)


def test_zero_size_tensor_is_a_format_error_not_a_type_error(tmp_path):
    graph = mixed_graph()
    tensors = random_tensors(graph)
    tensors["blocks.0.empty"] = np.zeros((0, 3), np.float32)  # memoryview.cast used to raise TypeError here
    path = tmp_path / "m.pyrt"
    write_raw(path, graph, tensors)
    with pytest.raises(FormatError, match="does not use"):
        read_model(path)
