"""The draft/verify linear: one weight copy, verify identical to QuantizedLinear, draft
identical to the activation-quantized reference, mode names and validation."""

import gc

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from conftest import TINY, build_tiny_model
from mlx_qspec import kernels
from mlx_qspec.quant.activations import fake_quantize_activations
from mlx_qspec.quant.linear import QSpecLinear, find_switch, install, set_mode
from mlx_qspec.quant.modes import (
    DRAFT_MODES,
    DraftMode,
    check_draft,
    default_draft,
    draft_help,
    draftable_layers,
    parse_draft,
    supported_draft_modes,
)

TOKENS = mx.array([[3, 17, 200, 45, 9, 128, 77]])


def _param_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _qspec_layers(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QSpecLinear)]


def test_draft_mode_adds_no_weight_copy(tiny_model):
    """Memory accounting: installing and running a draft allocates nothing that lasts."""
    originals = draftable_layers(tiny_model)  # kept alive: a copy would now cost memory
    params_before = {k: id(v) for k, v in tree_flatten(tiny_model.parameters())}
    param_bytes = _param_bytes(tiny_model)
    gc.collect()
    mem_before = mx.get_active_memory()

    switch = install(tiny_model)
    mx.eval(tiny_model.parameters())
    with switch.drafting(DraftMode(4, 32)):
        mx.eval(tiny_model(TOKENS))
    mx.eval(tiny_model(TOKENS))
    gc.collect()
    grown = mx.get_active_memory() - mem_before

    layers = _qspec_layers(tiny_model)
    linear_bytes = sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes for _, m in layers)
    assert len(layers) == len(originals) == 2 * 7
    assert grown < 0.05 * linear_bytes, (grown, linear_bytes)
    assert _param_bytes(tiny_model) == param_bytes
    assert {k: id(v) for k, v in tree_flatten(tiny_model.parameters())} == params_before


def test_verify_equals_quantized_linear_and_draft_equals_reference(tiny_model):
    plain = tiny_model(TOKENS)
    ql = tiny_model.model.layers[0].mlp.up_proj
    x = mx.random.normal((1, 5, ql.weight.shape[1] * 32 // ql.bits))
    ref_verify = ql(x)

    switch = install(tiny_model)
    layer = tiny_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QSpecLinear) and layer.weight is ql.weight
    assert mx.array_equal(layer(x), ref_verify)
    assert mx.array_equal(tiny_model(TOKENS), plain)

    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
    for mode in (DraftMode(8), DraftMode(4, 16), DraftMode(4)):
        with switch.drafting(mode):
            y = layer(x)
        expect = kernels.act_quant_matmul(
            x, layer.weight, layer.scales, layer.biases, group_size=32, bits=4,
            act_bits=mode.act_bits, act_group_size=mode.act_group_size,
        )
        assert mx.array_equal(y, expect)
        dense = fake_quantize_activations(x, mode.act_bits, mode.act_group_size) @ w.T
        assert mx.allclose(y, dense, atol=1e-4, rtol=1e-4)
        assert not mx.allclose(y, ref_verify, atol=1e-4)
    assert switch.draft is None


def test_mode_switch_rebuilds_nothing_and_spares_head_and_embedding(tiny_model):
    switch = install(tiny_model)
    modules = [id(m) for _, m in tiny_model.named_modules()]
    assert install(tiny_model) is switch and find_switch(tiny_model) is switch
    verify_logits = tiny_model(TOKENS)
    assert set_mode(tiny_model, "a4") is switch and switch.draft == DraftMode(4)
    draft_logits = tiny_model(TOKENS)
    assert set_mode(tiny_model, "none") is switch and switch.draft is None
    assert [id(m) for _, m in tiny_model.named_modules()] == modules
    assert not mx.allclose(verify_logits, draft_logits, atol=1e-3)
    assert mx.array_equal(tiny_model(TOKENS), verify_logits)
    assert type(tiny_model.lm_head) is nn.QuantizedLinear
    assert type(tiny_model.model.embed_tokens) is nn.QuantizedEmbedding
    assert all(m.switch is switch for _, m in _qspec_layers(tiny_model))


class _Wrapper(nn.Module):
    """Holds its linear as a child, as the rotated model's online-Hadamard wrapper does."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def __call__(self, x):
        return self.linear(mx.hadamard_transform(x))


def test_install_reaches_linears_wrapped_in_online_hadamards(tiny_model):
    attn = tiny_model.model.layers[0].self_attn
    attn.o_proj = _Wrapper(attn.o_proj)
    switch = install(tiny_model)
    assert isinstance(attn.o_proj.linear, QSpecLinear)
    x = mx.random.normal((1, 2, 128))
    verify = attn.o_proj(x)
    with switch.drafting(DraftMode(4)):
        assert not mx.allclose(attn.o_proj(x), verify, atol=1e-4)


def test_names_parse_round_trip_and_help_lists_them():
    assert parse_draft("none") is None and parse_draft(None) is None
    assert parse_draft("A8-G32") == DraftMode(8, 32)
    for name, mode in DRAFT_MODES.items():
        assert parse_draft(name) == mode and mode.name == name
    assert len(DRAFT_MODES) == 10
    lines = draft_help().splitlines()
    assert [line.split(":")[0] for line in lines] == ["auto", "none", *DRAFT_MODES]


@pytest.mark.parametrize("bad", ["a5", "a8-g48", "a4-g256", "w4a8", "", "a8-g"])
def test_unknown_draft_mode_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        parse_draft(bad)


def test_draft_mode_the_model_cannot_run_is_rejected():
    model = build_tiny_model(hidden_size=96, intermediate_size=160)
    with pytest.raises(ValueError, match=r"a8-g64.*64 does not divide the input size 96"):
        check_draft(model, "a8-g64")
    with pytest.raises(ValueError, match=r"a4-g64"):
        set_mode(model, "a4-g64")
    assert find_switch(model) is None  # rejected before anything was installed
    names = [m.name for m in supported_draft_modes(model)]
    assert names == ["a8", "a8-g16", "a8-g32", "a4", "a4-g16", "a4-g32"]
    assert default_draft(model) == check_draft(model, "auto") == DraftMode(8, 32)

    dense = llama.Model(llama.ModelArgs.from_dict(TINY))
    assert default_draft(dense) is None
    with pytest.raises(ValueError, match="no.*quantized|none"):
        check_draft(dense, "a8")


def test_default_draft_follows_the_weight_group():
    model = llama.Model(llama.ModelArgs.from_dict(TINY))
    nn.quantize(model, group_size=64, bits=4)
    assert default_draft(model) == DraftMode(8, 64)
