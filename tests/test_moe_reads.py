"""A mixture of experts is counted as it reads: the dense weights plus, per expert layer,
the experts its rows route to (the union over a verify's rows), in bytes computed from the
saved weight files and the routes taken; mxfp4 experts (gpt-oss) alike. Affine experts take
part in activation drafts; the expected number of distinct experts a k-row forward reads."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import switch_layers

from helpers.hybrid_models import build, save
from mlx_qspec import cost, moe, reads
from mlx_qspec.caches import rewind
from mlx_qspec.decoder import SpecStats, prefill
from mlx_qspec.drafts.grammar import parse_precision
from mlx_qspec.hooks import install
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.precision import reading
from mlx_qspec.quant.linear import CountedQuantizedLinear, QSpecSwitchLinear
from mlx_qspec.speculative import speculative_generate_step

PROMPT = [5, 77, 140, 3, 250, 19, 64, 8]
ROWS = [12, 200, 7, 45, 90]


def _file_bytes(path):
    """Per linear (path prefix): its codes, scales and biases as saved — what a matmul reads
    of it (an additive output bias aside)."""
    arrays = {}
    for f in sorted(path.glob("model*.safetensors")):
        arrays.update(mx.load(str(f)))
    prefixes = [key.removesuffix(".scales") for key in arrays if key.endswith(".scales")]
    return {p: [arrays[p + s] for s in (".weight", ".scales", ".biases") if p + s in arrays] for p in prefixes}


def _prefilled(model):
    cache = make_cache(model, "fp")
    prefill(model, mx.array(PROMPT), cache, step=16)
    return cache


@pytest.fixture
def routes(monkeypatch):
    """The routing indices each expert layer was called with, taken at mlx-lm's SwitchGLU."""
    seen, original = [], switch_layers.SwitchGLU.__call__

    def call(self, x, indices):
        seen.append(indices)
        return original(self, x, indices)

    monkeypatch.setattr(switch_layers.SwitchGLU, "__call__", call)
    return seen


@pytest.mark.parametrize("name, mode", [("qwen3_moe", "affine"), ("gpt_oss", "mxfp4")])
def test_the_counter_reads_the_routed_experts(name, mode, tmp_path, routes):
    files = _file_bytes(save(name, tmp_path / name, mode))
    expert = {p: a for p, a in files.items() if ".experts." in p or ".switch_mlp." in p}
    dense = [a for p, a in files.items() if p not in expert and "embed" not in p]
    per_expert = {}  # expert layer → bytes of one expert (all its projections)
    for p, arrays in expert.items():
        layer = p.rsplit(".", 1)[0]
        per_expert[layer] = per_expert.get(layer, 0) + sum(a.nbytes for a in arrays) / arrays[0].shape[0]
    assert mode == "affine" or all(a[1].dtype == mx.uint8 for a in expert.values())  # mxfp4 scales
    model = install(build(name, experts_mode=mode))
    cache = _prefilled(model)
    dense_bytes = sum(a.nbytes for arrays in dense for a in arrays)
    for rows in ([ROWS[0]], ROWS):  # a decode step, a verify of five rows
        routes.clear()
        with reads.counting(reads.ReadCounter()) as counter:
            mx.eval(model(mx.array([rows]), cache=cache))
        assert len(routes) == len(per_expert)
        routed = sum(np.unique(np.array(r)).size * b for r, b in zip(routes, per_expert.values()))
        assert counter.bytes(reads.WEIGHTS) == dense_bytes + routed
        for c in cache:
            c.trim(len(rows))
    # the verify read more experts than its first row alone would have
    assert any(np.unique(np.array(r)).size > np.unique(np.array(r[:, :1])).size for r in routes)
    assert QSpecSwitchLinear in {type(m) for _, m in model.named_modules()}


def test_experts_take_part_in_activation_drafts():
    model = install(build("qwen3_moe"))
    layer = model.model.layers[0].mlp.switch_mlp.gate_proj
    assert isinstance(layer, QSpecSwitchLinear)
    x = mx.random.normal((3, 1, 1, 128))
    idx = mx.array([[0, 3], [1, 3], [7, 2]])
    full = layer(x, idx)
    with reading(parse_precision("a8-g32")):
        draft = layer(x, idx)
    assert not mx.array_equal(full, draft) and mx.allclose(full, draft, atol=0.05 * mx.abs(full).max().item())
    # sorted rows (mlx-lm's SwitchGLU for long prompts) give the same values as unsorted ones
    order = mx.argsort(idx.flatten())
    xs = x.reshape(3, 1, 128)[order // 2]
    ys = layer(xs, idx.flatten()[order], sorted_indices=True)
    assert mx.allclose(ys.reshape(6, -1), full.reshape(6, -1)[order], atol=1e-5)


def test_non_affine_linears_are_counted():
    model = build("gpt_oss")
    head = nn.QuantizedLinear(128, 256, bias=False, group_size=32, bits=4, mode="mxfp4")
    model.lm_head = head
    install(model)
    assert isinstance(model.lm_head, CountedQuantizedLinear)
    with reads.counting(reads.ReadCounter()) as counter:
        model.lm_head(mx.zeros((1, 1, 128)))
    assert counter.bytes(reads.WEIGHTS) == head.weight.nbytes + head.scales.nbytes
    assert counter.ints[reads.WEIGHTS] == counter.bytes(reads.WEIGHTS)  # uint8 scales: as stored


def test_expected_distinct_experts():
    assert moe.expected_distinct(8, 2, 1) == 2
    assert moe.expected_distinct(128, 8, 5) == pytest.approx(128 * (1 - (1 - 8 / 128) ** 5))
    assert moe.expected_distinct(128, 8, 5) < 5 * 8


def test_forward_expert_bytes_of_the_routed_experts():
    model = install(build("qwen3_moe"))
    layers = moe.expert_layers(model, half=False)
    assert [x.experts for x in layers] == [8, 8] and all(x.top_k == 2 for x in layers)
    per = {}
    for m in (m for _, m in model.named_modules() if isinstance(m, QSpecSwitchLinear)):
        per[m.route_key] = per.get(m.route_key, 0) + (m.weight.nbytes + m.scales.nbytes + m.biases.nbytes) / 8
    assert {x.key: x.expert_bytes for x in layers} == per
    assert moe.forward_expert_bytes(layers, 1) == sum(2 * b for b in per.values())


def _step_reads(model, cache) -> reads.ReadCounter:
    """A one-row full-precision forward's reads at the cache's context (rewound after)."""
    with reads.counting(reads.ReadCounter()) as counter:
        mx.eval(model(mx.array([ROWS[:1]]), cache=cache))
    rewind(cache, len(PROMPT))
    return counter


def test_a_modeled_five_row_verify_reads_more_expert_bytes_than_a_step():
    """auto's prior on a Mac (cost.ForwardShape): a step reads what the counter counts of a
    one-row forward (the router's top-k experts per layer), a verify of 5 rows the expected
    distinct experts of 5 rows' choices, so its modeled cost grows with its rows."""
    model = install(build("qwen3_moe"))
    cache = _prefilled(model)
    shape = cost.forward_shape(model, cache)
    assert shape is not None and len(shape.experts) == 2
    assert shape.bytes(1) == pytest.approx(_step_reads(model, cache).bytes())
    experts = sum((moe.expected_distinct(8, 2, 5) - 2) * x.expert_bytes for x in shape.experts)
    kv = shape.kv * 4 / (len(PROMPT) + 1)
    assert shape.bytes(5) == pytest.approx(shape.bytes(1) + experts + kv)
    assert shape.bytes(5) > 1.2 * shape.bytes(1)
    dense = replace(shape, experts=[])  # the same forward were its experts read like weights
    for chip in ("M1", "M3 Max"):
        grows = shape.seconds(5, chip) - shape.seconds(1, chip)
        assert grows > dense.seconds(5, chip) - dense.seconds(1, chip)
    costs = cost.modeled(model, cache, ["ngram"], "M3 Max")
    assert costs is not None and costs.row > 0


def test_plain_bytes_per_token_on_a_mixture_are_a_steps_not_a_verifys():
    """A verify forward of several rows reads the union of their experts; plain decoding's
    bytes per token (the stats' ``plain``) are what a one-row step reads: each verify forward
    less the experts beyond a row's own."""
    model = install(build("qwen3_moe"))
    one = _step_reads(model, _prefilled(model)).bytes(reads.WEIGHTS)
    stats = SpecStats()
    list(speculative_generate_step(mx.array(PROMPT * 2), model, draft="ngram", num_draft_tokens=4,
                                   max_tokens=10, stats=stats))
    v = stats.verify_reads
    assert stats.drafted > 0 and v.bytes(reads.WEIGHTS) > v.forwards * one
    assert v.bytes(reads.WEIGHTS) - v.beyond_step[0] - v.beyond_step[1] == v.forwards * one
    assert stats.bytes_per_token()["plain"] == pytest.approx(v.step_bytes() / v.forwards)
    assert stats.bytes_per_token()["plain"] < v.bytes() / v.forwards
