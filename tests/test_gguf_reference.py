"""The GGUF path against a model built from the test's own tensor values.

The file is written by llama.cpp's own Python package (``gguf.GGUFWriter``), its tensors
quantized by ``gguf.quants`` (Q4_0, Q4_1, Q8_0) after permuting the Q and K rows exactly as
llama.cpp's converter does for RoPE (``LlamaModel.permute`` in convert_hf_to_gguf.py). The
reference is mlx-lm's llama with standard (non-traditional) RoPE built directly from the
original, un-permuted tensors, each dequantized with ``gguf.quants.dequantize`` — nothing
on the reference side goes through ``mlx_qspec.gguf`` or ``mlx_qspec.convert``. So a
mapping mistake shared by our reader and our converter (Q and K swapped, the RoPE layout,
a norm on the wrong side) shows here, where a comparison of the two against each other
would pass it.

Also: our reader's tensors, dequantized in float32, equal ``gguf.quants.dequantize`` of
the same file bytes (read back with ``gguf.GGUFReader``) bit for bit.
"""

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

from helpers.gguf_reference import (
    BITS, BLOCK, BOS_ID, GQA, MHA, RTOL, file_tensors, permute, reference_llama, relative_gap,
    unpermute, write_gguf,
)
import mlx_qspec
from mlx_qspec import gguf as our_gguf
from mlx_qspec.convert import convert

PROMPT = mx.array([[BOS_ID, 40, 71, 120, 7, 200, 3, 258, 150, 33, 80, 99, 12, 64, 250, 31]])


def logits_of(model):
    return np.array(model(PROMPT).astype(mx.float32), np.float64)[0]


@pytest.fixture(scope="module", params=[MHA, GQA], ids=["mha-tied", "gqa-untied"])
def written(request, tmp_path_factory):
    cfg = request.param
    path = tmp_path_factory.mktemp("gguf_ref") / "tiny.gguf"
    reference = write_gguf(path, cfg)
    return cfg, path, reference


def test_permute_roundtrip():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 2, 3):
        p = permute(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute(p, heads), w)
    # llama.cpp interleaves a head's two halves: GGUF row (h, i, j) is HF row (h, j, i)
    p = permute(np.arange(8.0)[:, None], 1)
    assert p[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---------------------------------------------------------------- tensors, bit for bit
def _gguf_to_mlx(name):
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{BLOCK[parts[2]][0]}.{parts[3]}"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
            "output": "lm_head"}[parts[0]] + "." + parts[1]


def _dequantize_ours(get, base, qtype):
    """Our stored triple (or float) for ``base`` dequantized in float32."""
    if qtype in BITS:
        f32 = mx.float32
        w = mx.dequantize(get(f"{base}.weight"), get(f"{base}.scales").astype(f32),
                          get(f"{base}.biases").astype(f32), group_size=32, bits=BITS[qtype])
    else:
        w = get(f"{base}.weight")
    return np.array(w.astype(mx.float32))


def test_reader_tensors_equal_gguf_dequantize_bit_for_bit(written):
    cfg, path, _ = written
    ours = our_gguf.load_weights(path)
    params = dict(tree_flatten(mlx_qspec.load(path)[0].parameters()))
    seen = []
    for name, qtype, expected in file_tensors(path):
        base = _gguf_to_mlx(name)[: -len(".weight")]
        for label, get in (("reader", ours.__getitem__), ("loaded model", params.__getitem__)):
            got = _dequantize_ours(get, base, qtype)
            assert got.shape == expected.shape, (label, name, got.shape, expected.shape)
            assert np.array_equal(got, expected), f"{label}: {name} differs from gguf's dequantize"
        seen.append(qtype)
    assert len(seen) == sum(not k.endswith((".scales", ".biases")) for k in ours)
    assert set(seen) >= {Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F32}


# ---------------------------------------------------------------- forward
def test_forward_equals_model_built_from_the_tensors(written):
    cfg, path, reference = written
    ref = logits_of(reference_llama(cfg, reference))
    ours = logits_of(mlx_qspec.load(path)[0])
    gap = relative_gap(ours, ref)
    assert gap <= RTOL, f"relative logit gap {gap:.3g}"
    # The comparison has power: mistakes of the mapping give gaps orders of magnitude larger.
    permuted = dict(reference)  # Q/K left in GGUF's row order under standard RoPE
    for i in range(cfg.layers):
        for proj, heads in (("q_proj", cfg.heads), ("k_proj", cfg.kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            permuted[key] = permute(reference[key], cfg.heads, heads)
    assert relative_gap(logits_of(reference_llama(cfg, permuted)), ref) > 100 * RTOL
    if cfg.heads == cfg.kv_heads:
        swapped = dict(reference)
        for i in range(cfg.layers):
            q, k = (f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qk")
            swapped[q], swapped[k] = reference[k], reference[q]
        assert relative_gap(logits_of(reference_llama(cfg, swapped)), ref) > 100 * RTOL


def test_converted_directory_equals_model_built_from_the_tensors(written, tmp_path):
    """``mlx_qspec.convert`` → stock mlx-lm loads the directory → the same logits as the
    model built from the tensors (the converter's mapping checked independently too)."""
    cfg, path, reference = written
    out = convert(str(path), str(tmp_path / "mlx"), dtype="float32")
    model, _ = mlx_lm_load(str(out))
    gap = relative_gap(logits_of(model), logits_of(reference_llama(cfg, reference)))
    assert gap <= RTOL, f"relative logit gap {gap:.3g}"
