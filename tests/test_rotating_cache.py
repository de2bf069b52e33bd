"""Speculation with a sliding window: SpeculativeRotatingKVCache gives every query what
mlx-lm's RotatingKVCache gives plain decoding, and can be rewound at any time."""

import copy
import random
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma3_text
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from helpers import build_tiny_model
from mlx_qspec import hooks, precision
from mlx_qspec.commands import server
from mlx_qspec.api import stream_generate
from mlx_qspec.batch import Job
from mlx_qspec.caches import kv_mode
from mlx_qspec.decoder import SpecStats, prefill
from mlx_qspec.drafts.cascade import DraftModel
from mlx_qspec.errors import UserError
from mlx_qspec.generate import main
from mlx_qspec.kv_cache import (
    MAX_DRAFT_TOKENS,
    REWIND_SLOTS,
    SpeculativeRotatingKVCache,
    make_cache,
    make_generation_cache,
    make_rotating_cache,
)
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

P = 160  # positions in the one-hot tests


def _feed(cache, start, n, window=None):
    """Append positions start…start+n−1 and return, for each, the positions its query saw
    (the model's mask made with ``window_size=window``): uniform attention (zero keys) over
    one-hot values marks exactly the visible ones."""
    mask = cache.make_mask(n, window_size=window)
    k, v = cache.update_and_fetch(mx.zeros((1, 1, n, 8)), mx.eye(P)[start : start + n][None, None])
    out = mx.fast.scaled_dot_product_attention(mx.zeros((1, 1, n, 8)), k, v, scale=1.0, mask=mask)
    return [frozenset(np.nonzero(np.array(row) > 1e-6)[0].tolist()) for row in out[0, 0]]


@pytest.mark.parametrize("keep, prompt, step, window", [
    (0, 10, 256, None), (4, 40, 256, None), (4, 40, 4, None), (0, 40, 4, None),
    (0, 40, 4, 24), (4, 40, 4, 24), (0, 40, 4, 25), (0, 40, 4, 16)])
def test_every_query_sees_what_plain_rotating_decoding_shows_it(keep, prompt, step, window):
    """Prefill, then random draft/verify/rewind blocks (up to γ = 32): each emitted position
    saw exactly the positions mlx-lm's RotatingKVCache shows its one-token step — the window
    slides (position ≥ W) and, with a small ``step``, old positions are dropped. A model's
    ``window_size`` (gemma3's, the cache's own size; plamo3's, one more) acts as in mlx-lm."""
    W = 24
    ref = RotatingKVCache(W, keep)
    want = _feed(ref, 0, prompt, window) + [
        s for p in range(prompt, P) for s in _feed(ref, p, 1, window)]
    assert want[P - 1] != frozenset(range(P))  # the window slid
    cache = SpeculativeRotatingKVCache(W, keep)
    cache.step = step
    assert _feed(cache, 0, prompt, window) == want[:prompt]  # mlx-lm's prefill window
    rng, p, max_len = random.Random(keep + step), prompt, 0
    while p < P:
        k = min(rng.choice([0, 1, 4, 8, MAX_DRAFT_TOKENS]), P - p - 1)
        for j in range(k):  # the drafts' positions, rewound before the verify
            _feed(cache, p + j, 1, window)
        assert cache.trim(k) == k
        got = _feed(cache, p, k + 1, window)
        n = rng.randint(0, k)
        cache.trim(k - n)
        assert got[: n + 1] == want[p : p + n + 1], f"block at {p}, {k} drafts"
        p += n + 1
        max_len = max(max_len, cache.keys.shape[2])
    if step < 256:
        assert cache.start > 0 and max_len <= keep + W + REWIND_SLOTS + MAX_DRAFT_TOKENS + step


@pytest.mark.parametrize("keep", [0, 4])
def test_trim_then_reappend_equals_never_drafting(keep):
    """Long past the wrap, a rewind of REWIND_SLOTS works and leaves the cache as if the
    rewound positions had never been appended; one so deep that the next query would miss
    positions it sees is an error, even while those stored are above the new offset."""
    W = 16
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
    deepest = a.offset - a.start - (W - 1 - keep)  # past it, a query would miss positions
    assert deepest >= REWIND_SLOTS + keep
    with pytest.raises(ValueError, match="cannot trim"):
        a.trim(deepest + 1)
    assert a.trim(deepest) == deepest


def _plain(model, prompt, cache, max_tokens):
    """mlx-lm's greedy plain decoding on ``cache``."""
    return [t for t, _ in generate_step(prompt, model, max_tokens=max_tokens, prompt_cache=cache)]


def _speculate(model, prompt, cache, max_tokens, draft="a8", gamma=4, stats=None):
    return [t for t, *_ in speculative_generate_step(
        prompt, model, draft=draft, num_draft_tokens=gamma, max_tokens=max_tokens,
        prompt_cache=cache, stats=stats)]


@pytest.fixture(scope="module")
def tiny():
    return hooks.install(build_tiny_model())


W, PROMPT, T = 24, 40, 100


@pytest.fixture(scope="module")
def plain_windowed(tiny):
    """mlx-lm's plain decoding with what ``make_prompt_cache(model, W)`` builds."""
    prompt = mx.arange(3, 3 + PROMPT).astype(mx.uint32)
    ref = _plain(tiny, prompt, [RotatingKVCache(W, 4) for _ in tiny.layers], T)
    full = _plain(tiny, prompt, None, T)
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
    assert _speculate(tiny, prompt, cache, T, draft, gamma, stats) == ref
    assert stats.accepted > 0
    if draft == "a8":  # on this model a8 drafts are sometimes rejected: verifies rewound
        assert stats.drafted > stats.accepted
    assert cache[0].start > 0 and cache[0].keys.shape[2] <= 4 + W + REWIND_SLOTS + 2 * 16 + 8


def test_plain_and_speculative_loops_without_a_cache_apply_the_window(tiny, plain_windowed):
    """Given ``max_kv_size`` and no cache, the API's plain loop decodes on the same window as
    mlx-lm's rotating cache (mlx-lm's own make_prompt_cache would ignore it on llama), and
    ``speculative_generate_step`` builds it too (it built an unbounded cache) and keeps plain
    decoding's output on it."""
    prompt, ref = plain_windowed
    out = [t for t, *_ in plain_generate_step(prompt, tiny, max_tokens=T, max_kv_size=W)]
    assert out == ref
    stats = SpecStats()
    out = [t for t, *_ in speculative_generate_step(prompt, tiny, draft="a8", num_draft_tokens=4,
                                                    max_tokens=T, max_kv_size=W, stats=stats)]
    assert out == ref and stats.accepted > 0


def test_keep_zero_window(tiny):
    """mlx-lm's ``RotatingKVCache(max_size)`` default (keep 0), prompt shorter than W."""
    prompt = mx.arange(3, 13).astype(mx.uint32)
    ref = _plain(tiny, prompt, [RotatingKVCache(W) for _ in tiny.layers], T)
    cache = [SpeculativeRotatingKVCache(W) for _ in tiny.layers]
    assert _speculate(tiny, prompt, cache, T, "a8-g32", 8) == ref


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
    made = []
    monkeypatch.setattr("mlx_qspec.kv_cache.make_rotating_cache",
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
    assert _speculate(tiny, prompt, cache, T, "auto", None, stats) == ref and stats.auto_reason


def test_a_next_prompt_on_a_wrapped_window_is_prefilled_as_plain_decoding_does(tiny):
    """A chat's next turn: after decoding, its prompt chunk (8 tokens, within a verify's
    size) gets mlx-lm's prompt-chunk view of the wrapped keep-4 window, not a verify's."""
    first, second = mx.arange(3, 3 + PROMPT), mx.arange(50, 58)
    plain = [RotatingKVCache(W, 4) for _ in tiny.layers]
    ref = _plain(tiny, first, plain, 20), _plain(tiny, second, plain, 30)  # both turns fed
    cache = make_rotating_cache(tiny, W)
    out = _speculate(tiny, first, cache, 20)
    with precision.reading(precision.FULL_PRECISION):  # the chat feeds the last token
        tiny(mx.array([[out[-1]]]), cache=cache)
    assert (out, _speculate(tiny, second, cache, 30)) == ref


# A model that builds its own windows: gemma3's sliding layers are mlx-lm RotatingKVCaches.
GW, GT = 12, 60  # the sliding window; tokens generated after a 20-token prompt
SRKV = SpeculativeRotatingKVCache


@pytest.fixture(scope="module")
def gemma():
    """A 4-bit gemma3_text with random weights: layers 0 and 1 slide over GW positions,
    layer 2 attends to everything. The LM head is a permutation of the embedding and the
    post-norms scale the blocks' outputs up, so context matters and a8 drafts miss."""
    mx.random.seed(0)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=128, num_hidden_layers=3, intermediate_size=256,
        num_attention_heads=4, head_dim=32, num_key_value_heads=2, vocab_size=256,
        query_pre_attn_scalar=32, sliding_window=GW, sliding_window_pattern=3, rms_norm_eps=1e-5)
    model = gemma3_text.Model(args)
    model.lm_head.weight = model.model.embed_tokens.weight[mx.random.permutation(256)]
    for layer in model.layers:
        layer.post_attention_layernorm.weight = mx.full((128,), 15.0)
        layer.post_feedforward_layernorm.weight = mx.full((128,), 15.0)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return hooks.install(model)


@pytest.fixture(scope="module")
def gemma_plain(gemma):
    """mlx-lm's plain decoding on the model's own caches, and that the window matters."""
    prompt = mx.arange(3, 23).astype(mx.uint32)
    ref = _plain(gemma, prompt, gemma.make_cache(), GT)
    gemma.model.window_size = 10**6  # the same model attending to everything
    try:
        assert _plain(gemma, prompt, [KVCache() for _ in gemma.layers], GT) != ref
    finally:
        gemma.model.window_size = GW
    return prompt, ref


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("draft", ["a8", "ngram"])
def test_sliding_layers_speculate_exactly(gemma, gemma_plain, monkeypatch, gamma, draft):
    """The model's fresh RotatingKVCaches become rewindable windows (in the caller's list),
    and greedy speculation is mlx-lm's plain decoding token for token while they wrap."""
    monkeypatch.setattr(SRKV, "step", 8)  # drop old positions often
    prompt, ref = gemma_plain
    cache, stats = gemma.make_cache(), SpecStats()
    assert _speculate(gemma, prompt, cache, GT, draft, gamma, stats) == ref
    assert [type(c) for c in cache] == [SRKV, SRKV, KVCache]
    assert all(c.max_size == GW and c.keep == 0 and c.start > 0 for c in cache[:2])
    if draft == "a8":  # drafts accepted, and at γ ≥ 4 some rejected
        assert stats.accepted > 0 and (gamma == 1 or stats.drafted > stats.accepted)


def test_a_sliding_window_draft_model_rewinds_or_starts_over(gemma, gemma_plain, monkeypatch):
    """A draft model with sliding layers drafts on rewindable windows; a context that
    diverges further back than its windows still hold starts its cache over. The output is
    plain decoding's, and drafts were both accepted and rejected."""
    monkeypatch.setattr(SRKV, "step", 8)  # drop old positions often
    prompt, ref = gemma_plain
    layers = gemma.model.layers
    saved = [layer.post_feedforward_layernorm.weight for layer in layers]
    for layer in layers:  # the same model, its feed-forward outputs scaled: a near-miss draft
        layer.post_feedforward_layernorm.weight = mx.full((128,), 14.0)
    try:
        draft_model = DraftModel(copy.deepcopy(gemma))
    finally:
        for layer, w in zip(layers, saved):
            layer.post_feedforward_layernorm.weight = w
    assert isinstance(draft_model.cache[0], SRKV)
    stats = SpecStats()
    out = [t for t, *_ in speculative_generate_step(
        prompt, gemma, draft="none", draft_model=draft_model, num_draft_tokens=8,
        max_tokens=GT, stats=stats)]
    assert out == ref
    assert 0 < stats.accepted < stats.drafted
    context = prompt.tolist()[:5] + [7]  # diverges 70 positions back: past any window's reach
    assert draft_model.catch_up(context) == context
    assert all(c.offset == 0 for c in draft_model.cache) and draft_model.tokens == []


def test_a_cached_wrapped_mlx_lm_window_is_not_reused_for_the_same_prompt(gemma, gemma_plain):
    """The server's prompt cache holding plain decoding's wrapped mlx-lm window for exactly
    this prompt cannot feed its last token again (that window trims nothing): it starts
    afresh rather than feed the token twice."""
    from mlx_qspec.batch import PromptCache

    prompt, _ = gemma_plain
    cache = gemma.make_cache()
    gemma(prompt[None], cache=cache)
    assert cache[0].offset > GW and not cache[0].is_trimmable()
    store = PromptCache(gemma, "fp", 4, None)
    store.store(prompt.tolist(), cache)
    fresh, cached = store.fetch(prompt.tolist())
    assert cached == 0 and all(c.offset == 0 for c in fresh)


def test_a_filled_mlx_lm_window_converts_exactly(gemma, gemma_plain):
    """A prompt cache mlx-lm filled and wrapped (a prefill, then one-token steps: its buffer
    rotated mid-way) cannot be trimmed; speculation converts it and goes on as plain
    decoding would."""
    prompt, ref = gemma_plain
    cache = gemma.make_cache()
    prefill(gemma, prompt[:-1], cache, 2048)  # generate_step's prefill, then its steps
    for t in [prompt[-1].item(), *ref[:8]]:
        gemma(mx.array([[t]]), cache=cache)
    assert not cache[0].is_trimmable() and 0 < cache[0]._idx < GW
    assert _speculate(gemma, mx.array(ref[8:9]), cache, GT - 9) == ref[9:]


def test_max_kv_size_windows_the_full_attention_layers_only(gemma, gemma_plain):
    """``max_kv_size`` bounds the global layer; the sliding ones keep their smaller window.
    Plain decoding (ours and mlx-lm's on those caches) and speculation agree."""
    prompt, ref = gemma_plain
    M = 24
    want = _plain(gemma, prompt, [RotatingKVCache(GW), RotatingKVCache(GW), RotatingKVCache(M, 4)],
                  GT)
    assert want != ref
    assert [t for t, *_ in plain_generate_step(prompt, gemma, max_tokens=GT, max_kv_size=M)] == want
    cache = make_generation_cache(gemma, max_kv_size=M)
    assert [(c.max_size, c.keep) for c in cache] == [(GW, 0), (GW, 0), (M, 4)]
    assert _speculate(gemma, prompt, cache, GT, gamma=8) == want


def test_kv_modes_with_sliding_layers(gemma, gemma_plain):
    """8bit quantizes the global layer and keeps the windows float (speculation equals plain
    decoding on the same caches); nested (kv-upper has no window to read) and kv_bits
    (mlx-lm cannot quantize a window) are refused."""
    prompt, _ = gemma_plain
    cache = make_cache(gemma, "8bit")
    assert [type(c) for c in cache] == [RotatingKVCache, RotatingKVCache, QuantizedKVCache]
    assert kv_mode(cache) == "8bit"  # what its full-attention layers hold
    want = _plain(gemma, prompt, cache, GT)
    assert _speculate(gemma, prompt, make_cache(gemma, "8bit"), GT) == want
    made = [t for t, _, _ in speculative_generate_step(prompt, gemma, draft="a8", kv_mode="8bit",
                                                       num_draft_tokens=4, max_tokens=GT)]
    assert made == want  # the cache it makes when given none: its windows rewindable too
    with pytest.raises(UserError, match="nested needs full attention in every layer"):
        make_cache(gemma, "nested")
    with pytest.raises(UserError, match="kv_bits cannot quantize a sliding-window cache"):
        speculative_generate_step(prompt, gemma, draft="a8", kv_bits=8)
    with pytest.raises(UserError, match="kv_bits cannot quantize a sliding-window cache"):
        next(plain_generate_step(prompt, gemma, kv_bits=8))


def test_server_serves_sliding_window_models_one_at_a_time(gemma, gemma_plain, smollm2,
                                                            monkeypatch):
    """A ragged batch cache holds no window: the server routes such a model to the
    batch-1 decoders, whose greedy text is plain decoding's — also for a repeated request,
    served from the first one's (converted) cache. kv_bits is refused at start."""
    monkeypatch.setattr(server, "load", lambda path: (gemma, smollm2[1]))
    flags = ["--draft", "a8", "--max-context", "256"]
    with pytest.raises(UserError, match="kv_bits cannot quantize"):
        server.build(server.setup_arg_parser().parse_args([*flags, "--kv-bits", "8"]))
    _, engine = server.build(server.setup_arg_parser().parse_args(flags))
    prompt, ref = gemma_plain
    try:
        assert not engine.batched  # each request decoded at batch 1
        for _ in range(2):
            ids, done = [], threading.Event()

            def deliver(event):
                ids.extend(entry["id"] for entry in event.get("logprobs", []))
                assert event["type"] != "error", event
                if event["type"] == "done":
                    done.set()

            engine.submit(Job(prompt.tolist(), GT, deliver, logprobs=True))
            assert done.wait(120)
            assert ids == ref
    finally:
        engine.stop()
