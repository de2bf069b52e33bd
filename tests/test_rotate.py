"""Rotation is exact before re-quantization, and the saved directory reloads to the same model."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load_model

from mlx_qspec.drafts.grammar import parse_precision as parse
from mlx_qspec.precision import reading
from mlx_qspec.quant.linear import QSpecLinear, install
from mlx_qspec.quant.hadamard import (
    OnlineHadamard, apply_online_rotations, hadamard_factors, hadamard_size_ok,
)
from mlx_qspec.calibration_text import calibration_tokens
from mlx_qspec.rotate import (
    build_model, check_residual, check_rotatable, residual_rotation, rotate_model, rotate_weights,
    rotated_config, save_rotated,
)

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              rms_norm_eps=1e-5, tie_word_embeddings=True, rope_traditional=True)


def tiny_model(quantized: bool):
    """Random tiny llama with non-trivial norm gains (so fusing them is tested)."""
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.RMSNorm):
            m.weight = mx.random.uniform(0.5, 2.0, m.weight.shape)
    if quantized:
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda p, m: {"group_size": 32, "bits": 8}
                    if p.endswith("embed_tokens") else hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    return model


TOKENS = mx.array([[3, 17, 200, 45, 9, 128, 77, 1, 250, 60, 33, 5]])


@pytest.mark.parametrize("residual", ["hadamard", "random"])
@pytest.mark.parametrize("quantized", [False, True])
def test_float_rotation_preserves_logits(residual, quantized):
    model = tiny_model(quantized)
    ref = model(TOKENS)
    cfg = rotated_config(CONFIG, residual=residual, seed=0, method="rtn")
    cfg.pop("quantization")
    rot = build_model(rotate_weights(model, CONFIG, residual=residual, progress=False), cfg)
    assert isinstance(rot.model.layers[0].self_attn.o_proj, OnlineHadamard)
    out = rot(TOKENS)
    assert mx.abs(out - ref).max().item() < 1e-3 * mx.abs(ref).max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).all().item()


def test_residual_rotation_is_orthogonal_and_seeded():
    for kind in ("hadamard", "random"):
        q = residual_rotation(576, kind, seed=3)
        assert mx.allclose(q @ q.T, mx.eye(576), atol=1e-4).item()
        assert mx.array_equal(q, residual_rotation(576, kind, seed=3)).item()
        assert not mx.allclose(q, residual_rotation(576, kind, seed=4)).item()


def test_saved_directory_reloads_to_in_memory_model(tmp_path):
    model = tiny_model(True)
    weights, cfg = rotate_model(model, CONFIG, method="rtn", progress=False)
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    assert weights["lm_head.scales"].shape == (256, 64 // 32)
    mem = build_model(weights, cfg)
    # Re-quantized, the rotated model is close to, not equal to, the original.
    ref, out = model(TOKENS), mem(TOKENS)
    assert mx.abs(out - ref).max().item() < 0.5 * mx.abs(ref).max().item()

    # Written with mlx-lm's own save functions, loaded with its loader, then patched.
    save_rotated(tmp_path, weights, cfg)
    assert "o_proj.linear" not in (tmp_path / "model.safetensors.index.json").read_text()
    loaded, loaded_cfg = load_model(tmp_path)
    assert isinstance(loaded.lm_head, nn.QuantizedLinear) and loaded.lm_head.bits == 8
    assert not isinstance(loaded.model.layers[0].mlp.down_proj, OnlineHadamard)
    apply_online_rotations(loaded, loaded_cfg)
    apply_online_rotations(loaded, loaded_cfg)  # idempotent
    down = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down.linear, nn.QuantizedLinear)
    assert mx.array_equal(loaded(TOKENS), out).item()

    # The draft/verify layer swap finds the linear inside the Hadamard wrapper.
    install(loaded)
    assert isinstance(loaded.model.layers[0].self_attn.o_proj.linear, QSpecLinear)
    assert mx.array_equal(loaded(TOKENS), out).item()
    with reading(parse("a4")):
        drafted = loaded(TOKENS)
    assert not mx.array_equal(drafted, out).item()
    assert (drafted.argmax(-1) == out.argmax(-1)).mean().item() > 0.5


def test_gptq_beats_rtn_on_its_calibration_data():
    model = tiny_model(True)
    calib = mx.random.randint(0, 256, (4, 32), key=mx.random.key(0))
    ref = model(calib)
    errs = {}
    for method in ("rtn", "gptq"):
        w, cfg = rotate_model(model, CONFIG, method=method, calibration=calib, progress=False)
        assert cfg["qspec"]["rotation"]["method"] == method
        errs[method] = mx.mean((build_model(w, cfg)(calib) - ref) ** 2).item()
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("key, value, word", [
    ("intermediate_size", 1000, "intermediate_size 1000"),
    ("intermediate_size", 11 * 32, "intermediate_size 352"),
    ("head_dim", 24 + 12, "head_dim 36"),
    ("hidden_size", 80, "multiple of the quantization group"),
    ("model_type", "gemma3", "gemma3"),
    ("mlp_bias", True, "mlp_bias"),
    ("qspec", {"rotation": {"seed": 0}}, "already rotated"),
])
def test_check_rotatable_rejects(key, value, word):
    with pytest.raises(ValueError, match=word):
        check_rotatable({**CONFIG, key: value})
    with pytest.raises(ValueError, match=word):  # before any compute
        rotate_model(None, {**CONFIG, key: value}, progress=False)


def test_hadamard_size_rule_matches_mlx():
    for n in (1, 2, 12, 20, 24, 28, 40, 56, 64, 96, 1536, 8192):
        assert hadamard_size_ok(n)
        mx.eval(mx.hadamard_transform(mx.ones((1, n))))
    for n in (3, 6, 9, 36, 44, 576, 1000):
        assert not hadamard_size_ok(n)
    check_rotatable({**CONFIG, "hidden_size": 576, "num_attention_heads": 9,
                     "intermediate_size": 1536})


def test_kronecker_hadamard_for_sizes_mlx_does_not_take():
    assert hadamard_factors(576) == (12, 48)
    assert hadamard_factors(1536) == (1536,)
    assert hadamard_factors(11 * 32) is None
    h = residual_rotation(576, "hadamard") * 24  # a ±1 matrix: a true Hadamard of order 576
    assert mx.array_equal(mx.abs(mx.round(h)), mx.ones_like(h)).item()
    assert mx.allclose(h, mx.round(h), atol=1e-4).item()
    check_residual({**CONFIG, "hidden_size": 352}, "random")
    with pytest.raises(ValueError, match="hidden_size 352"):
        check_residual({**CONFIG, "hidden_size": 352}, "hadamard")


def test_calibration_and_method_errors():
    byte_tokenizer = SimpleNamespace(encode=lambda text: list(text.encode()))
    calib = calibration_tokens(byte_tokenizer, samples=3, length=64)
    assert calib.shape == (3, 64) and calib.dtype == mx.int32
    with pytest.raises(ValueError, match="calibration token ids"):
        rotate_model(tiny_model(True), CONFIG, method="gptq", progress=False)
    with pytest.raises(ValueError, match="'awq'"):
        rotate_model(tiny_model(True), CONFIG, method="awq", progress=False)
