"""Speculation with a sliding window: SpeculativeRotatingKVCache gives every query what
mlx-lm's RotatingKVCache gives plain decoding, and can be rewound at any time."""

import random
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache

from conftest import build_tiny_model
from mlx_qspec.generate import main, stream_generate
from mlx_qspec.kv_cache import REWIND_SLOTS, SpeculativeRotatingKVCache, make_rotating_cache
from mlx_qspec.speculative import (
    MAX_DRAFT_TOKENS,
    SpecStats,
    plain_generate_step,
    prepare,
    speculative_generate_step,
)

P = 160  # positions in the one-hot tests


def _feed(cache, start, n):
    """Append positions start…start+n−1 and return, for each, the positions its query saw:
    uniform attention (zero keys) over one-hot values marks exactly the visible ones."""
    mask = cache.make_mask(n)
    k, v = cache.update_and_fetch(mx.zeros((1, 1, n, 8)), mx.eye(P)[start : start + n][None, None])
    out = mx.fast.scaled_dot_product_attention(mx.zeros((1, 1, n, 8)), k, v, scale=1.0, mask=mask)
    return [frozenset(np.nonzero(np.array(row) > 1e-6)[0].tolist()) for row in out[0, 0]]


@pytest.mark.parametrize("keep, prompt, step", [(0, 10, 256), (4, 40, 256), (4, 40, 4), (0, 40, 4)])
def test_every_query_sees_what_plain_rotating_decoding_shows_it(keep, prompt, step):
    """Prefill, then random draft/verify/rewind blocks (up to γ = 32): each emitted position
    saw exactly the positions mlx-lm's RotatingKVCache shows its one-token step — the window
    slides (position ≥ W) and, with a small ``step``, old positions are dropped."""
    W = 24
    ref = RotatingKVCache(W, keep)
    want = _feed(ref, 0, prompt) + [s for p in range(prompt, P) for s in _feed(ref, p, 1)]
    assert want[P - 1] != frozenset(range(P))  # the window slid
    cache = SpeculativeRotatingKVCache(W, keep)
    cache.step = step
    assert _feed(cache, 0, prompt) == want[:prompt]  # mlx-lm's prefill window, kept as is
    rng, p, max_len = random.Random(keep + step), prompt, 0
    while p < P:
        k = min(rng.choice([0, 1, 4, 8, MAX_DRAFT_TOKENS]), P - p - 1)
        for j in range(k):  # the drafts' positions, rewound before the verify
            _feed(cache, p + j, 1)
        assert cache.trim(k) == k
        got = _feed(cache, p, k + 1)
        n = rng.randint(0, k)
        cache.trim(k - n)
        assert got[: n + 1] == want[p : p + n + 1], f"block at {p}, {k} drafts"
        p += n + 1
        max_len = max(max_len, cache.keys.shape[2])
    if step < 256:
        assert cache.start > 0 and max_len <= keep + W + REWIND_SLOTS + MAX_DRAFT_TOKENS + step


def test_trim_then_reappend_equals_never_drafting():
    """Long past the wrap, a rewind of REWIND_SLOTS works and leaves the cache as if the
    rewound positions had never been appended; deeper than what is stored is an error."""
    W, keep = 16, 4
    a, b = SpeculativeRotatingKVCache(W, keep), SpeculativeRotatingKVCache(W, keep)
    a.step = b.step = 8
    x = mx.random.normal((1, 2, 200, 8))
    for p in range(100):
        a.update_and_fetch(x[..., p : p + 1, :], x[..., p : p + 1, :])
        b.update_and_fetch(x[..., p : p + 1, :], x[..., p : p + 1, :])
    junk = mx.random.normal((1, 2, REWIND_SLOTS, 8))
    for j in range(REWIND_SLOTS):
        a.update_and_fetch(junk[..., j : j + 1, :], junk[..., j : j + 1, :])
    assert a.is_trimmable() and a.trim(REWIND_SLOTS) == REWIND_SLOTS
    q = mx.random.normal((1, 2, 8, 8))
    for p in list(range(100, 140, 8)) + list(range(140, 150)):  # verify blocks, then steps
        n = 8 if p < 140 else 1
        outs = []
        for c in (a, b):
            mask = c.make_mask(n)
            k, v = c.update_and_fetch(x[..., p : p + n, :], x[..., p : p + n, :])
            outs.append(mx.fast.scaled_dot_product_attention(q[..., :n, :], k, v, scale=1.0,
                                                             mask=mask))
        assert a.offset == b.offset
        assert mx.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cannot trim"):
        a.trim(a.offset - a.start + 1)


@pytest.fixture(scope="module")
def tiny():
    return prepare(build_tiny_model())


W, PROMPT, T = 24, 40, 100


@pytest.fixture(scope="module")
def plain_windowed(tiny):
    """mlx-lm's plain decoding with what ``make_prompt_cache(model, W)`` builds."""
    prompt = mx.arange(3, 3 + PROMPT).astype(mx.uint32)
    ref = [t for t, _ in generate_step(prompt, tiny, max_tokens=T,
                                       prompt_cache=[RotatingKVCache(W, 4) for _ in tiny.layers])]
    full = [t for t, _ in generate_step(prompt, tiny, max_tokens=T)]
    assert ref != full  # the window slides and changes the text
    return prompt, ref


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("draft", ["a8", "a8-g32"])
def test_greedy_speculation_equals_plain_rotating_decoding(tiny, plain_windowed, gamma, draft):
    prompt, ref = plain_windowed
    cache = [SpeculativeRotatingKVCache(W, 4) for _ in tiny.layers]
    for c in cache:
        c.step = 8  # drop old positions often
    stats = SpecStats()
    out = [t for t, *_ in speculative_generate_step(
        prompt, tiny, draft=draft, num_draft_tokens=gamma, max_tokens=T, prompt_cache=cache,
        stats=stats)]
    assert out == ref
    assert stats.accepted > 0
    if draft == "a8":  # on this model a8 drafts are sometimes rejected: verifies rewound
        assert stats.drafted > stats.accepted
    assert cache[0].start > 0 and cache[0].keys.shape[2] <= 4 + W + REWIND_SLOTS + 2 * 16 + 8


def test_plain_generate_step_applies_the_window_too(tiny, plain_windowed):
    """The API's plain loop given ``max_kv_size`` decodes on the same window as mlx-lm's
    rotating cache (mlx-lm's own make_prompt_cache would ignore it on llama)."""
    prompt, ref = plain_windowed
    out = [t for t, *_ in plain_generate_step(prompt, tiny, max_tokens=T, max_kv_size=W)]
    assert out == ref


def test_keep_zero_window(tiny):
    """mlx-lm's ``RotatingKVCache(max_size)`` default (keep 0), prompt shorter than W."""
    prompt = mx.arange(3, 13).astype(mx.uint32)
    ref = [t for t, _ in generate_step(prompt, tiny, max_tokens=T,
                                       prompt_cache=[RotatingKVCache(W) for _ in tiny.layers])]
    cache = [SpeculativeRotatingKVCache(W) for _ in tiny.layers]
    out = [t for t, *_ in speculative_generate_step(
        prompt, tiny, draft="a8-g32", num_draft_tokens=8, max_tokens=T, prompt_cache=cache)]
    assert out == ref


def test_make_rotating_cache_windows_every_full_attention_layer(tiny):
    caches = make_rotating_cache(tiny, 32)
    assert [type(c) for c in caches] == [SpeculativeRotatingKVCache] * len(tiny.layers)
    assert all(c.max_size == 32 and c.keep == 4 for c in caches)
    assert all(type(c) is RotatingKVCache for c in make_rotating_cache(tiny, 32, rewindable=False))
    assert all(type(c) is KVCache for c in tiny.make_cache())  # what mlx-lm would leave


def test_api_and_cli_max_kv_size_with_a_draft_keep_plain_decodings_window(smollm2, capsys,
                                                                         monkeypatch):
    """A window (16) shorter than the prompt: plain decoding gets mlx-lm's rotating cache, a
    draft the rewindable one, and the same tokens — through the API and through the CLI
    (which no longer refuses or drops the draft)."""
    gen = sys.modules["mlx_qspec.generate"]  # the package's ``generate`` is the function
    made = []
    monkeypatch.setattr(gen, "make_rotating_cache",
                        lambda *a, **kw: made.append(make_rotating_cache(*a, **kw)) or made[-1])
    model, tokenizer = smollm2
    text = "Write a long story about a cat."
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    assert len(prompt) > 16
    run = lambda **kw: list(stream_generate(model, tokenizer, prompt, max_tokens=8, **kw))  # noqa: E731
    plain = run(draft="none", max_kv_size=16)
    spec = run(draft="a8-g32", num_draft_tokens=4, max_kv_size=16)
    assert [r.token for r in spec] == [r.token for r in plain] and spec[-1].stats.drafted > 0
    assert [{type(c) for c in caches} for caches in made] == [
        {RotatingKVCache}, {SpeculativeRotatingKVCache}]
    assert made[1][0].offset > 16  # the window slid

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--prompt", text, "--max-tokens", "8", "--max-kv-size", "16", "--verbose"]
    main([*args, "--draft", "a8-g32"])
    out, err = capsys.readouterr()
    assert out == "".join(r.text for r in plain) + "\n"
    fields = dict(f.split("=", 1) for f in err.strip().splitlines()[-1].split())
    assert fields["draft"] == "a8-g32" and int(fields["drafted"]) > 0
    assert {type(c) for c in made[2]} == {SpeculativeRotatingKVCache}
    with pytest.raises(SystemExit) as exc:
        main([*args, "--kv-mode", "nested", "--draft", "a8"])
    assert exc.value.code == 2
    assert "--max-kv-size applies to --kv-mode fp only" in capsys.readouterr().err


def test_auto_calibrates_and_decodes_on_the_window(tiny, plain_windowed):
    """``auto`` times forwards on the prefilled rotating cache and rewinds them; whatever it
    picks, the tokens are plain rotating decoding's."""
    prompt, ref = plain_windowed
    cache = make_rotating_cache(tiny, W)
    stats = SpecStats()
    out = [t for t, *_ in speculative_generate_step(
        prompt, tiny, draft="auto", max_tokens=T, prompt_cache=cache, stats=stats)]
    assert stats.auto_reason and out == ref
