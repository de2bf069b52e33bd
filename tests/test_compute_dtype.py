"""Compute dtypes: a GGUF model computes in half precision where Metal runs (its float32
norms cast, its quantization scales kept as stored, k-quants' float32 included) and in
float32 on the CPU; the rejection rule's p and q are float32 whatever the model's dtype.

Metal is only pretended here (``mx.metal.is_available`` patched): these tests check which
dtype the loader decides on, not Metal compute."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

import mlx_qspec
from mlx_qspec import loader
from mlx_qspec.convert import convert
from mlx_qspec.quant.linear import compute_dtype, install
from mlx_qspec.sampling import Sampler
from helpers.gguf_raw import tiny_llama as tiny_32_value_llama  # Q4_0 / Q4_1 / Q8_0, float16 scales
from helpers.gguf_kquants import Q4_K_M
from helpers.gguf_kquants import tiny_llama as tiny_k_quant_llama  # Q4_K / Q5_K / Q6_K / Q5_0


@pytest.fixture
def metal(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)


def _model(path, **kwargs):
    return mlx_qspec.load(path, **kwargs)[0]


def _split(model):
    """(quantization scales/biases, other floating parameters) as {path: dtype}."""
    quant, other = {}, {}
    for k, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            (quant if k.endswith((".scales", ".biases")) else other)[k] = p.dtype
    return quant, other


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory):
    return tiny_k_quant_llama(tmp_path_factory.mktemp("dtype") / "km.gguf", Q4_K_M)


@pytest.fixture(scope="module")
def qwen2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dtype") / "qwen2.gguf"
    tiny_32_value_llama(path, arch="qwen2")  # F32 norms and F32 q/k/v biases
    return path


def test_k_quant_gguf_on_metal_casts_norms_keeps_scales(metal, k_quant_file):
    assert loader.default_dtype() is None
    model = _model(k_quant_file, lazy=True)
    quant, other = _split(model)
    norms = [k for k in other if "norm" in k]
    assert norms and all(other[k] == mx.float16 for k in norms), other
    assert set(other.values()) == {mx.float16}
    # Q4_K / Q5_K / Q6_K scales and biases stay float32 (d·sc needs 17 mantissa bits);
    # the Q5_0 layers' stay float16, as stored
    layer = "model.layers.0"
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        assert quant[f"{layer}.{name}.scales"] == mx.float32, name
        assert quant[f"{layer}.{name}.biases"] == mx.float32, name
    assert quant["model.embed_tokens.scales"] == mx.float32
    assert quant[f"{layer}.self_attn.o_proj.scales"] == mx.float16
    _, other = _split(_model(k_quant_file, dtype=None, lazy=True))  # dtype=None: as stored
    assert set(other.values()) == {mx.float32}


def test_k_quant_weights_are_the_files_values_on_metal(metal, k_quant_file, monkeypatch):
    """Casting the norms leaves every quantized weight bit for bit as stored in the file;
    the norms are the file's values rounded to float16."""
    on_metal = dict(tree_flatten(_model(k_quant_file).parameters()))
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    stored = dict(tree_flatten(_model(k_quant_file, dtype=None).parameters()))
    assert on_metal.keys() == stored.keys()
    for k, p in on_metal.items():
        want = stored[k].astype(mx.float16) if k.endswith("norm.weight") else stored[k]
        assert p.dtype == want.dtype and mx.array_equal(p, want).item(), k


def test_32_value_gguf_on_metal_takes_the_scales_dtype(metal, qwen2_file):
    model = _model(qwen2_file, lazy=True)
    quant, other = _split(model)
    assert set(quant.values()) == {mx.float16}
    assert set(other.values()) == {mx.float16}, other  # norms and the layers' own biases
    assert any(k.endswith("q_proj.bias") for k in other)
    assert loader.half_dtype(model) == mx.float16


def test_bfloat16_scales_give_bfloat16(metal, qwen2_file):
    model = _model(qwen2_file, dtype=None, lazy=True)
    model.update(tree_unflatten([(k, p.astype(mx.bfloat16)) for k, p in
                                        tree_flatten(model.parameters()) if k.endswith(".scales")]))
    assert loader.half_dtype(model) == mx.bfloat16
    loader.cast_float32_to_half(model)
    _, other = _split(model)
    assert set(other.values()) == {mx.bfloat16}


def test_cpu_keeps_float32_everywhere(monkeypatch, k_quant_file, qwen2_file):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert loader.default_dtype() == mx.float32
    for path in (k_quant_file, qwen2_file):
        quant, other = _split(_model(path, lazy=True))
        assert set(quant.values()) | set(other.values()) == {mx.float32}, path


def test_mlx_directory_on_metal_keeps_stored_dtypes(metal, tmp_path):
    """Only GGUF models are cast: an mlx directory keeps what it stores (float32 here)."""
    src = tmp_path / "t.gguf"
    tiny_32_value_llama(src)
    out = convert(str(src), str(tmp_path / "mlx"), dtype="float32")
    _, other = _split(_model(out, lazy=True))
    assert set(other.values()) == {mx.float32}


# ---------------------------------------------------------------- the rejection rule in float32

@pytest.mark.parametrize("filters", [{}, dict(top_p=0.9), dict(top_k=20), dict(min_p=0.05)])
def test_distribution_of_bfloat16_is_float32_of_the_upcast(filters):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 3, (3, 97)).astype(np.float32)).astype(mx.bfloat16)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampler = Sampler(temp=0.7, **filters)
    got = sampler.distribution(lp)
    want = sampler.distribution(lp.astype(mx.float32))
    assert got.dtype == mx.float32
    assert mx.array_equal(got, want).item()


def test_distribution_of_float32_unchanged():
    """float32 logprobs: the same arithmetic as before the cast was added, bit for bit."""
    rng = np.random.default_rng(1)
    lp = mx.array(rng.normal(0, 3, (2, 64)).astype(np.float32))
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    x = lp * (1.0 / 0.8)
    assert mx.array_equal(Sampler(temp=0.8).distribution(lp),
                          x - mx.logsumexp(x, axis=-1, keepdims=True)).item()


def test_k_quant_model_on_metal_computes_in_half(metal, k_quant_file, monkeypatch):
    """Loaded for Metal (norms cast, float32 k-quant scales kept), the model's residual
    stream, KV cache and logits stay float16 through our layers: neither the embedding's
    float32-scaled rows nor a float32-scaled matmul promotes them. (Run on the CPU: only
    the dtypes are checked.)"""
    model = _model(k_quant_file)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)  # compute on the CPU
    install(model)
    assert compute_dtype(model) == mx.float16
    cache = make_prompt_cache(model)
    logits = model(mx.array([[1, 2, 3]]), cache=cache)
    assert logits.dtype == mx.float16
    assert {c.state[0].dtype for c in cache} == {mx.float16}
    stored = _model(k_quant_file, dtype=None)  # float32 throughout: nothing to cast
    assert compute_dtype(install(stored)) == mx.float32
    assert stored(mx.array([[1, 2, 3]])).dtype == mx.float32
