"""The draft/verify linear: one weight copy, verify identical to QuantizedLinear, draft
identical to the activation-quantized reference, mode names and validation."""

import gc

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import base, llama

from helpers import TINY, build_tiny_model
from mlx_qspec import hooks, kernels, precision
from mlx_qspec.drafts.grammar import TERMS, draft_help
from mlx_qspec.drafts.grammar import parse_precision as parse
from mlx_qspec.precision import Precision, reading
from mlx_qspec.quant.activations import fake_quantize_activations
from mlx_qspec.quant.linear import QSpecEmbedding, QSpecLinear, install, is_installed
from mlx_qspec.drafts.auto import activation_draft
from mlx_qspec.drafts.cascade import check_draft
from mlx_qspec.quant.modes import draftable_layers

TOKENS = mx.array([[3, 17, 200, 45, 9, 128, 77]])


def _param_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _qspec_layers(model):
    """The linears whose activations a draft quantizes (the LM head's stay full)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QSpecLinear) and m.act_draft]


def test_draft_mode_adds_no_weight_copy(tiny_model):
    """Memory accounting: installing and running a draft allocates nothing that lasts."""
    originals = draftable_layers(tiny_model)  # kept alive: a copy would now cost memory
    params_before = {k: id(v) for k, v in tree_flatten(tiny_model.parameters())}
    param_bytes = _param_bytes(tiny_model)
    gc.collect()
    mem_before = mx.get_active_memory()

    install(tiny_model)
    mx.eval(tiny_model.parameters())
    with reading(parse("a4-g32")):
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

    install(tiny_model)
    layer = tiny_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QSpecLinear) and layer.weight is ql.weight
    assert mx.array_equal(layer(x), ref_verify)
    assert mx.array_equal(tiny_model(TOKENS), plain)

    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
    for mode in (Precision(act_bits=8), Precision(act_bits=4, act_group_size=16), Precision(act_bits=4)):
        with reading(mode):
            y = layer(x)
        expect = kernels.act_quant_matmul(
            x, layer.weight, layer.scales, layer.biases, group_size=32, bits=4,
            act_bits=mode.act_bits, act_group_size=mode.act_group_size,
        )
        assert mx.array_equal(y, expect)
        dense = fake_quantize_activations(x, mode.act_bits, mode.act_group_size) @ w.T
        assert mx.allclose(y, dense, atol=1e-4, rtol=1e-4)
        assert not mx.allclose(y, ref_verify, atol=1e-4)
    assert precision.current().is_full


def test_precision_rebuilds_nothing_and_spares_the_heads_activations(tiny_model):
    head_in = mx.random.normal((1, 3, 128))
    head_ref = tiny_model.lm_head(head_in)
    emb_ref = tiny_model.model.embed_tokens(TOKENS)
    install(tiny_model)
    modules = [id(m) for _, m in tiny_model.named_modules()]
    install(tiny_model)
    assert [id(m) for _, m in tiny_model.named_modules()] == modules
    verify_logits = tiny_model(TOKENS)
    with reading(parse("a4")):
        draft_logits = tiny_model(TOKENS)
        assert mx.array_equal(tiny_model.lm_head(head_in), head_ref)  # the head reads full x
    assert not mx.allclose(verify_logits, draft_logits, atol=1e-3)
    assert mx.array_equal(tiny_model(TOKENS), verify_logits)  # nothing outlived the block
    assert isinstance(tiny_model.lm_head, QSpecLinear) and not tiny_model.lm_head.act_draft
    assert isinstance(tiny_model.model.embed_tokens, QSpecEmbedding)
    assert mx.array_equal(tiny_model.model.embed_tokens(TOKENS), emb_ref)


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
    install(tiny_model)
    assert isinstance(attn.o_proj.linear, QSpecLinear)
    x = mx.random.normal((1, 2, 128))
    verify = attn.o_proj(x)
    with reading(parse("a4")):
        assert not mx.allclose(attn.o_proj(x), verify, atol=1e-4)


def test_names_parse_round_trip_compose_and_help_lists_them():
    assert check_draft(None, "none") is None
    assert parse("A8-G32") == Precision(act_bits=8, act_group_size=32)
    for term in TERMS:
        assert parse(term).name == term
    combo = parse("kv-upper+a8-g32+w-upper")
    assert combo == Precision(weights="upper", act_bits=8, act_group_size=32, kv="upper")
    assert combo.name == "a8-g32+w-upper+kv-upper" and parse(combo.name) == combo
    assert len(TERMS) == 12
    lines = draft_help().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["auto", "none", *TERMS]


@pytest.mark.parametrize("bad, message", [  # an unknown term is named; two on one axis
    *((bad, repr(bad)) for bad in ["a5", "a8-g48", "a4-g256", "w4a8", "", "a8-g", "kv-lower"]),
    ("a8+a4", "activations two ways"),
    ("kv-upper+kv-upper", "kv two ways"),
    ("w-upper+a8-g32+w-upper", "w two ways"),
])
def test_bad_draft_names_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse(bad)


def test_draft_the_model_cannot_run_is_rejected():
    model = build_tiny_model(hidden_size=96, intermediate_size=160)
    with pytest.raises(ValueError, match=r"a8-g64.*64 does not divide the input size 96"):
        check_draft(model, "a8-g64")
    assert not is_installed(model)  # rejected before anything was installed
    assert activation_draft(model) == "a8-g32"
    with pytest.raises(ValueError, match="--kv-mode nested"):
        check_draft(model, "kv-upper", "fp")
    assert check_draft(model, "a8+kv-upper", "nested") == Precision(act_bits=8, kv="upper")
    with pytest.raises(ValueError, match="no 8-bit layers"):
        check_draft(model, "w-upper")

    dense = llama.Model(llama.ModelArgs.from_dict(TINY))
    assert activation_draft(dense) is None
    with pytest.raises(ValueError, match="no.*quantized|none"):
        check_draft(dense, "a8")
    nn.quantize(dense, group_size=64, bits=4)
    assert activation_draft(dense) == "a8-g64"  # the activation draft follows the weight group


def test_hooks_install_and_uninstall_leave_the_model_as_it_was(tiny_model):
    """hooks.install puts QSpec layers, skippable blocks and our attention in; uninstall
    gives back the very modules and classes (and the attention, once no model uses it)."""
    leaves = lambda: dict(tree_flatten(tiny_model.leaf_modules(), is_leaf=nn.Module.is_module))  # noqa: E731
    before, block = leaves(), type(tiny_model.layers[0])
    ref = tiny_model(TOKENS)
    hooks.install(hooks.install(tiny_model))
    assert is_installed(tiny_model) and type(tiny_model.layers[0]) is not block
    assert llama.scaled_dot_product_attention.original is base.scaled_dot_product_attention
    assert mx.array_equal(tiny_model(TOKENS), ref)
    hooks.uninstall(tiny_model)
    assert not is_installed(tiny_model) and type(tiny_model.layers[0]) is block
    assert all(leaves()[path] is m for path, m in before.items())
    others = hooks._attention_users.get(llama.__name__)
    assert (llama.scaled_dot_product_attention is base.scaled_dot_product_attention) != bool(others)
    assert mx.array_equal(tiny_model(TOKENS), ref)


def test_collective_counting_installs_once_and_uninstalls():
    """Every mx.distributed collective calls the counter first (installed twice: still once),
    and uninstall gives each back the function it wrapped (distributed.counting installs it
    again whenever it counts, so another test's install is undone here first)."""
    hooks.uninstall_collective_counting()
    before = {name: getattr(mx.distributed, name, None) for name in hooks.COLLECTIVES}
    calls = []
    hooks.install_collective_counting(lambda: calls.append(1))
    hooks.install_collective_counting(lambda: calls.append(2))
    try:
        x = mx.ones((3,))
        assert mx.array_equal(mx.distributed.all_sum(x), before["all_sum"](x))  # one process
        assert calls == [1]
    finally:
        hooks.uninstall_collective_counting()
    assert {name: getattr(mx.distributed, name, None) for name in hooks.COLLECTIVES} == before
