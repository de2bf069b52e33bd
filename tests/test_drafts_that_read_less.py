"""Drafts that read fewer bytes: the upper plane of a nested KV cache (``kv-upper``) and of
8-bit weights (``w-upper``), alone and combined (greedy output equals plain decoding with
the same KV mode: test_exactness.py); p-min; nested weights verify bit for bit as the 8-bit
layer; the precision of a forward never outlives it nor crosses threads; bytes are counted
from what is read."""

import threading

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from helpers import build_tiny_model
from mlx_qspec import kernels, precision, reads
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.drafts.grammar import parse_precision as parse
from mlx_qspec.precision import reading
from mlx_qspec.quant.linear import QSpecLinear
from mlx_qspec.decoder import VERIFY_ROWS, SpecStats
from mlx_qspec.hooks import install
from mlx_qspec.speculative import speculative_generate_step

BLOCK = 32  # the tiny model's head dim: key blocks and value groups of 32
PROMPT = [(7 * i + 3) % 256 for i in range(100)]  # > 2 blocks: planes hold tokens already
MAX_TOKENS = 40  # generation crosses another flush


@pytest.fixture(scope="module")
def model():
    """Tiny llama with an 8-bit LM head and embedding (what w-upper halves)."""
    return build_tiny_model(head_bits=8)


def plain(model, kv_mode, prompt=PROMPT, max_tokens=MAX_TOKENS):
    """mlx-lm's own loop over the same layers, attention and cache kind: the reference."""
    install(model)
    cache = make_cache(model, kv_mode, BLOCK, BLOCK)
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                        prompt_cache=cache)]


def spec(model, draft, gamma, kv_mode, **kw):
    stats = SpecStats()
    cache = make_cache(model, kv_mode, BLOCK, BLOCK)
    out = [t for t, _, _ in speculative_generate_step(
        mx.array(PROMPT), model, draft=draft, num_draft_tokens=gamma, max_tokens=MAX_TOKENS,
        prompt_cache=cache, stats=stats, prefill_step_size=48, **kw)]
    return out, stats, cache


def test_draft_p_min_ends_blocks_early_and_stays_exact(model):
    out, st, _ = spec(model, "kv-upper", 8, "nested", draft_p_min=0.9)
    assert out == plain(model, "nested")
    assert st.drafted < 8 * st.verify_passes  # some blocks ended before γ


def test_a_leftover_precision_does_not_leak_into_the_verify(model):
    """The old failure: a mode left set on the model turned every verify into a draft."""
    ref = plain(model, "fp")
    with reading(parse("a4")):
        out, _, _ = spec(model, "w-upper", 4, "fp")
        assert precision.current() == parse("a4")
    assert out == ref


def test_two_threads_do_not_see_each_others_precision(model):
    x = mx.array([PROMPT[:9]])
    install(model)
    expected = {}
    for name in ("verify", "a4"):
        with reading(precision.FULL_PRECISION if name == "verify" else parse(name)):
            expected[name] = model(x)
    assert not mx.array_equal(expected["verify"], expected["a4"]).item()
    start, errors = threading.Barrier(2), []

    def run(name):
        try:
            start.wait()
            for _ in range(5):
                with reading(precision.FULL_PRECISION if name == "verify" else parse(name)):
                    y = model(x)
                mx.eval(y)
                assert mx.array_equal(y, expected[name]).item(), name
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("verify", "a4", "verify")[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_nested_weights_verify_bit_for_bit_with_the_same_memory():
    stock = build_tiny_model(head_bits=8)
    head, emb = stock.lm_head, stock.model.embed_tokens
    assert head.bits == 8 and emb.bits == 8
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    ids = mx.array([[1, 5, 255]])
    ref_head, ref_emb = head(x), emb(ids)
    ref_logits = stock(ids)
    head_bytes = sum(v.nbytes for _, v in tree_flatten(head.parameters()))
    w8 = head.weight
    install(stock)
    nested = stock.lm_head
    assert isinstance(nested, QSpecLinear) and "weight" not in nested
    assert sum(v.nbytes for _, v in tree_flatten(nested.parameters())) == head_bytes
    assert mx.array_equal(kernels.merge_planes(nested.upper, nested.lower), w8).item()
    assert mx.array_equal(nested(x), ref_head).item()
    assert mx.array_equal(stock.model.embed_tokens(ids), ref_emb).item()
    assert mx.array_equal(stock(ids), ref_logits).item()

    full, upper = reads.ReadCounter(), reads.ReadCounter()
    with reads.counting(full):
        nested(x)
    with reading(parse("w-upper")), reads.counting(upper):
        y = nested(x)
    assert upper.ints[reads.WEIGHTS] * 2 == full.ints[reads.WEIGHTS]  # half the code bytes
    # The draft reads the missing lower plane as its mid-point 7.5: each weight is off by
    # at most 7.5 of its 8-bit steps — and the bound is tight enough to catch a wrong plane.
    w = mx.dequantize(w8, head.scales, head.biases, group_size=32, bits=8)
    err = mx.abs(y - x @ w.T)
    bound = mx.abs(x) @ (7.5 * mx.abs(mx.repeat(head.scales, 32, axis=1))).T
    assert (err <= bound * 1.001 + 1e-5).all().item()
    assert (err > 1e-3).any().item()


def test_kv_upper_reads_fewer_bytes_than_the_verify(model):
    _, st, _ = spec(model, "kv-upper", 4, "nested")
    d, v = st.draft_reads, st.verify_reads
    assert d.bytes(reads.WEIGHTS) / d.forwards == v.bytes(reads.WEIGHTS) / v.forwards
    # per forward the draft reads the upper plane only of the packed codes (and the same
    # scales, mins and float buffer, which dominate at this tiny context)
    assert 0.45 < (d.ints[reads.KV] / d.forwards) / (v.ints[reads.KV] / v.forwards) < 0.55
    assert d.bytes(reads.KV) / d.forwards < v.bytes(reads.KV) / v.forwards
    per_token = st.bytes_per_token()
    assert per_token["total"] == pytest.approx(per_token["draft"] + per_token["verify"])
    assert per_token["plain"] == pytest.approx(v.bytes() / v.forwards)


def test_nested_cache_memory_equals_an_8bit_cache_plus_the_buffer(model):
    _, _, nested = spec(model, "kv-upper", 4, "nested")
    eight = make_cache(model, "8bit", BLOCK, BLOCK)
    install(model)
    model(mx.array([PROMPT + [1] * (nested[0].offset - len(PROMPT))]), cache=eight)
    c, e = nested[0], eight[0]
    assert c.offset == e.offset and c.nq >= 3
    buffer = c.state[4].nbytes + c.state[9].nbytes  # the float keys and values not yet nested
    per_token_8bit = sum(a[..., : e.offset, :].nbytes for t in (e.keys, e.values) for a in t) / e.offset
    assert c.nbytes - buffer == per_token_8bit * c.quantized


def test_every_row_count_of_a_verify_takes_the_one_token_kernel_path(monkeypatch):
    """Exactness on Metal rests on a one-token step and every verify row running the same
    kernel: the loop verifies in chunks the small-M kernel takes, and the dispatcher sends
    every such row count to it (larger ones, prefill only, to MLX)."""
    assert VERIFY_ROWS <= kernels.MAX_M
    calls = []
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "metal_verify_matmul", lambda x, *a, **k: calls.append(x.shape[0]) or x)
    w, s, b = mx.quantize(mx.random.normal((64, 128)), group_size=32, bits=4)
    for m in range(1, kernels.MAX_M + 2):
        kernels.verify_matmul(mx.zeros((m, 128)), w, s, b, group_size=32)
    assert calls == list(range(1, kernels.MAX_M + 1))


@pytest.mark.parametrize("verify_cost, expect_draft", [
    ({1: 1.0, 9: 1.1}, True),  # flat: a Mac's memory-bound verify
    ({1: 1.0, 9: 9.0}, False),  # ∝ rows: MLX-CPU
])
def test_auto_follows_the_cost_model_and_stays_exact(model, monkeypatch, verify_cost, expect_draft):
    """``auto`` on given cost tables: drafts (adapting γ) where the verify is flat, decodes
    plainly where it grows with rows — greedy output equal to plain decoding either way."""
    from mlx_qspec import controller, cost

    def prior(m, cache, names, step_bytes=None):
        return controller.Costs.from_table(dict(verify_cost), {n: 0.5 for n in names}, "measured")
    monkeypatch.setattr(cost, "prior", prior)
    out, st, _ = spec(model, "auto", None, "nested")
    assert out == plain(model, "nested")
    if expect_draft:  # the first blocks draft; what this CPU then measures decides the rest
        assert st.drafted > 0 and st.auto_reason.endswith(";costs=measured")
    else:
        assert st.draft == "none" and st.drafted == 0
        assert st.auto_reason.startswith("verify_cost_grows_with_rows")


def test_kv_upper_through_the_metal_kernels_equals_plain(mac):
    """As a Mac runs it: the verify and nested-weight matmuls and the nested-cache attention
    kernel (emulated), for every plain step and every verify row. The prompt fills the
    planes (a prefill over more than 16 rows takes MLX's path on both sides alike) and the
    generation crosses another flush."""
    from tools.msl_emulator import recording

    model = build_tiny_model(head_bits=8)
    prompt = PROMPT[:90]  # offset 90 → 102 crosses the flush at 96
    with recording() as runs:
        ref = plain(model, "nested", prompt, max_tokens=12)
    assert {"w4a16_verify", "nested_matmul_verify", "nested_attention_verify"} <= {n for n, _ in runs}
    stats = SpecStats()
    with recording() as runs:
        out = [t for t, _, _ in speculative_generate_step(
            mx.array(prompt), model, draft="w-upper+kv-upper", num_draft_tokens=4, max_tokens=12,
            prompt_cache=make_cache(model, "nested", BLOCK, BLOCK), stats=stats)]
    assert {"nested_matmul_draft", "nested_attention_draft"} <= {n for n, _ in runs}
    assert out == ref
    assert stats.accepted > 0 and stats.verify_passes < 12
