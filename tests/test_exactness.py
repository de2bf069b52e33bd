"""Exactness, as one matrix: greedy speculative decoding gives plain decoding's tokens, token
for token, for every kind of draft (activation precisions, the n-gram lookup, skipped
blocks, cascades, the upper planes of 8-bit weights and of a nested cache), γ, KV mode
(fp, 8bit, nested, kv_bits switching mid-generation) and cache kind (the model's own, a
rewindable window). Plain decoding — mlx-lm's generate_step through the same layers on the
same kind of cache — is computed once per setup, prompt and cache kind, and shared.

The server's column of the matrix is tests/test_server.py (the batched a8 engine, and
ngram, a cascade, nested kv-upper and a draft model served concurrently at batch 1)."""

import functools
from dataclasses import dataclass, field

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from helpers import build_tiny_model
from mlx_qspec import hooks, precision
from mlx_qspec.decoder import SpecStats
from mlx_qspec.drafts.grammar import TERMS
from mlx_qspec.kv_cache import make_cache, make_rotating_cache
from mlx_qspec.speculative import speculative_generate_step

BLOCK = 32  # the tiny models' head dim: nested key blocks and value groups of 32
WINDOW = 24  # a max_kv_size window shorter than every prompt
KV_BITS = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=100)  # switches mid-generation


@dataclass(frozen=True)
class Setup:
    """A tiny model, its prompts and how long each run is; ``logprobs``: the verify's
    log-probs are checked bit for bit too (fp cache, one kernel path on this backend)."""

    build: dict
    prompts: list
    max_tokens: int
    prefill_step_size: int = 2048
    logprobs: bool = False
    extra: dict = field(default_factory=dict)


SETUPS = {
    # Activation drafts: over three prompts drafts are both kept and cut (A4 disagrees
    # often), so the accept, correction and bonus paths all run; 21 tokens end inside a
    # block for every γ > 1 and mid-pair for γ = 1.
    "activations": Setup({}, [[5, 77, 140, 3, 250, 19, 64, 8], [200, *range(1, 18)], [42]], 21,
                         prefill_step_size=5, logprobs=True),
    # A prompt that repeats itself in part (the lookup finds matches), long enough that the
    # nested planes hold tokens before generation starts; 37 tokens end inside a block.
    "lookup": Setup({"num_hidden_layers": 4},
                    [[(7 * i + 3) % 256 for i in range(40)] * 2 + [5, 9, 11]], 37),
    # An 8-bit LM head and embedding (what w-upper halves); the nested buffer spills into
    # the planes before and during generation.
    "fewer-bytes": Setup({"head_bits": 8}, [[(7 * i + 3) % 256 for i in range(100)]], 40,
                         prefill_step_size=48),
}
ACTIVATION_DRAFTS = [t for t in TERMS if t.startswith("a")]
CASES = [
    *[("activations", d, "fp", g) for d in ACTIVATION_DRAFTS for g in (1, 2, 4, 8)],
    *[("lookup", d, "fp", g) for d in ("ngram", "skip-2", "ngram>skip-2") for g in (1, 4, 8)],
    ("lookup", "skip-1,3", "fp", 4),
    ("lookup", "ngram>a8-g32", "fp", 8),
    ("lookup", "skip-1,2>skip-2>a8", "fp", 4),
    ("lookup", "skip-2+kv-upper", "nested", 4),
    *[("lookup", "ngram>skip-3+kv-upper>kv-upper", "nested", g) for g in (1, 8)],
    ("lookup", "ngram>a8-g32", "window", 4),
    ("lookup", "skip-2", "8bit", 4),
    ("lookup", "ngram>a8", "kv_bits", 4),
    *[("fewer-bytes", d, kv, g) for d, kv in (
        ("kv-upper", "nested"), ("w-upper", "nested"), ("w-upper", "fp"),
        ("w-upper+kv-upper", "nested"), ("a8-g32+kv-upper", "nested")) for g in (1, 4, 8)],
]


@pytest.fixture(scope="module")
def models():
    return {name: hooks.install(build_tiny_model(**s.build)) for name, s in SETUPS.items()}


def cache_of(model, kind: str, plain: bool = False) -> list:
    """A fresh cache of ``kind`` (a window: mlx-lm's for plain decoding, ours for a draft)."""
    if kind == "window":
        return make_rotating_cache(model, WINDOW, rewindable=not plain)
    return make_cache(model, "fp" if kind == "kv_bits" else kind, BLOCK, BLOCK)


@pytest.fixture(scope="module")
def plain(models):
    """Plain decoding's ``[(token, logprobs)]`` per (setup, cache kind, prompt), each
    computed on first use only."""

    @functools.cache
    def of(setup: str, kind: str, i: int):
        s, model = SETUPS[setup], models[setup]
        return list(generate_step(
            mx.array(s.prompts[i]), model, max_tokens=s.max_tokens,
            prompt_cache=cache_of(model, kind, plain=True), prefill_step_size=s.prefill_step_size,
            **(KV_BITS if kind == "kv_bits" else {})))

    return of


@pytest.mark.parametrize("setup, draft, kind, gamma", CASES,
                         ids=[f"{s}-{d}-{k}-g{g}" for s, d, k, g in CASES])
def test_greedy_speculation_equals_plain_decoding(models, plain, setup, draft, kind, gamma):
    s, model = SETUPS[setup], models[setup]
    accepted = drafted = 0
    for i, prompt in enumerate(s.prompts):
        ref, stats, cache = plain(setup, kind, i), SpecStats(), cache_of(model, kind)
        out = list(speculative_generate_step(
            mx.array(prompt), model, draft=draft, num_draft_tokens=gamma,
            max_tokens=s.max_tokens, prompt_cache=cache, stats=stats,
            prefill_step_size=s.prefill_step_size, **(KV_BITS if kind == "kv_bits" else {})))
        assert [t for t, _, _ in out] == [t for t, _ in ref], (draft, gamma, i)
        if s.logprobs:
            assert all(mx.array_equal(lp, ref_lp) for (_, lp, _), (_, ref_lp) in zip(out, ref))
        assert stats.emitted == s.max_tokens == stats.accepted + stats.verify_passes
        assert sum(d for _, _, d in out) == stats.accepted <= stats.drafted <= gamma * stats.verify_passes
        assert stats.tokens_per_verify == pytest.approx(s.max_tokens / stats.verify_passes)
        assert {c.offset for c in cache} == {len(prompt) + s.max_tokens - 1}  # every block alike
        if ">" in draft:  # the middle levels checked what the levels below offered
            assert sum(n for n, _ in stats.level_counts.values()) > 0
        if kind == "nested" and setup == "fewer-bytes":
            assert all(c.nq >= 3 for c in cache)  # the planes hold most of the context
        if kind == "kv_bits":
            assert all(hasattr(c, "bits") for c in cache)  # the switch happened
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert drafted > 0 and (accepted > 0 or draft.startswith("skip") or "ngram" in draft)
    if draft.startswith("a4"):
        assert accepted < drafted
    assert precision.current().is_full
