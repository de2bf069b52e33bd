"""The self-speculative loop beyond the exactness matrix (test_exactness.py): long drafts
verified in chunks, the shared cache ending as plain decoding leaves it, EOS mid-block,
logits processors, kv_bits switching, and sampling keeping the verify's distribution."""

from itertools import islice

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

from helpers import build_tiny_model
from helpers.sampling import assert_fits, joint, sample_first_tokens
from mlx_qspec import precision
from mlx_qspec.drafts.grammar import parse_precision as parse
from mlx_qspec.precision import reading
from mlx_qspec.quant.linear import install, is_installed
from mlx_qspec.sampling import make_sampler
from mlx_qspec.decoder import SpecStats
from mlx_qspec.speculative import speculative_generate_step

PROMPTS = [
    [5, 77, 140, 3, 250, 19, 64, 8],
    [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    [42],
]
MAX_TOKENS = 21  # ends inside a block for every γ > 1 and mid-pair for γ = 1


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def plain(model, prompt, max_tokens, **kw):
    return [(t, lp) for t, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kw)]


def spec(model, prompt, **kw):
    stats = SpecStats()
    out = list(speculative_generate_step(mx.array(prompt), model, stats=stats, **kw))
    return out, stats


def plain_cache(model, tokens):
    """The cache plain decoding leaves after feeding ``tokens``: prefill, then one at a time."""
    cache = make_prompt_cache(model)
    model(mx.array(tokens[:-1])[None], cache=cache)
    for t in tokens[-1:]:
        model(mx.array([[t]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def kv_gap(a, b):
    """Largest |difference| between two caches' live keys/values (lengths must match)."""
    assert [c.offset for c in a] == [c.offset for c in b]
    return max(
        mx.abs(x[..., : ca.offset, :] - y[..., : cb.offset, :]).max().item()
        for ca, cb in zip(a, b)
        for x, y in ((ca.keys, cb.keys), (ca.values, cb.values))
    )


@pytest.mark.parametrize("gamma", [17, 32])
def test_long_drafts_verify_in_chunks_and_stay_exact(model, gamma):
    ref = plain(model, PROMPTS[0], 60)
    out, st = spec(model, PROMPTS[0], draft="a8-g32", num_draft_tokens=gamma, max_tokens=60)
    assert [t for t, _, _ in out] == [t for t, _ in ref]
    assert all(mx.array_equal(a[1], b[1]) for a, b in zip(out, ref))
    assert st.tokens_per_verify > 10  # one verify pass per block, however many forwards


def test_cache_after_run_equals_plain_decoding(model):
    prompt = PROMPTS[0]
    cache = make_prompt_cache(model)
    out, st = spec(model, prompt, draft="a4", num_draft_tokens=4, max_tokens=MAX_TOKENS,
                   prompt_cache=cache)
    assert 0 < st.accepted < st.drafted
    tokens = prompt + [t for t, _, _ in out][:-1]
    assert cache[0].offset == len(tokens)
    assert kv_gap(cache, plain_cache(model, tokens)) < 1e-5
    # The test can tell: K/V the draft wrote differ from the verify's by far more.
    install(model)
    with reading(parse("a4")):
        drafted = plain_cache(model, tokens)
    assert kv_gap(drafted, plain_cache(model, tokens)) > 1e-2


def test_eos_inside_an_accepted_block(model):
    """A consumer that stops at EOS mid-block gets plain decoding's tokens and a cache that
    holds exactly what it was shown; the model is back in verify mode."""
    prompt = PROMPTS[1]
    full, _ = spec(model, prompt, draft="a8-g32", num_draft_tokens=8, max_tokens=40)
    toks = [t for t, _, _ in full]
    j = next(i for i, (t, _, d) in enumerate(full) if d and t not in toks[:i] and
             i + 1 < len(full) and full[i + 1][2])
    eos = toks[j]

    cache = make_prompt_cache(model)
    gen = speculative_generate_step(mx.array(prompt), model, draft="a8-g32",
                                    num_draft_tokens=8, max_tokens=40, prompt_cache=cache)
    got = []
    for t, _, _ in gen:
        got.append(t)
        if t == eos:
            break
    gen.close()
    ref = [t for t, _ in plain(model, prompt, 40)]
    assert got == ref[: j + 1] and got[-1] == eos
    assert precision.current().is_full
    tokens = prompt + got[:-1]
    assert kv_gap(cache, plain_cache(model, tokens)) < 1e-5


def test_unbounded_max_tokens_and_logits_processors_stay_exact(model):
    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=6)
    ref = [t for t, _ in plain(model, PROMPTS[0], 30, logits_processors=procs)]
    assert ref != [t for t, _ in plain(model, PROMPTS[0], 30)]  # the penalty matters
    gen = speculative_generate_step(mx.array(PROMPTS[0]), model, draft="a4-g16",
                                    num_draft_tokens=4, max_tokens=-1, logits_processors=procs)
    assert [t for t, _, _ in islice(gen, 30)] == ref
    gen.close()


@pytest.mark.parametrize("start", [0, 13, 20])
def test_quantized_kv_cache_stays_exact_across_the_switch(model, start):
    """With --kv-bits the cache turns quantized mid-generation; a verify block that
    straddled the switch would read float K/V where plain decoding reads quantized."""
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=start)
    ref = plain(model, PROMPTS[0], 30, **kv)
    cache = make_prompt_cache(model)
    out, _ = spec(model, PROMPTS[0], draft="a4", num_draft_tokens=4, max_tokens=30,
                  prompt_cache=cache, **kv)
    assert [t for t, _, _ in out] == [t for t, _ in ref]
    assert all(mx.array_equal(a[1], b[1]) for a, b in zip(out, ref))
    assert all(hasattr(c, "bits") for c in cache)


def test_sampler_draws_like_mlx_lm():
    lp = mx.log(mx.softmax(mx.random.normal((3, 256)) * 3, axis=-1))
    for kw in (dict(temp=0.7, top_p=0.9), dict(temp=1.2, min_p=0.05, top_k=20), dict(temp=0)):
        mx.random.seed(7)
        ours = make_sampler(**kw)(lp)
        mx.random.seed(7)
        assert mx.array_equal(ours, mlx_lm_make_sampler(**kw)(lp)), kw


def test_speculative_sampling_keeps_the_verify_distribution(model):
    """Chi-square of the first three tokens against the verify's exact joint distribution;
    the same samples must be far from the draft's own distribution (the test has power)."""
    prompt, steps, n = PROMPTS[0], 3, 800
    sampler = make_sampler(temp=1.0, top_k=4)
    p_joint = joint(model, prompt, sampler, steps)
    q_joint = joint(model, prompt, sampler, steps, parse("a4"))

    counts, stats = sample_first_tokens(model, prompt, sampler, steps, n, seed=1234)
    assert_fits(counts, n, p_joint, q_joint, stats)


def test_bad_arguments_fail_before_any_compute():
    model = build_tiny_model()
    prompt = mx.array(PROMPTS[0])
    cases = [
        (dict(draft="a5"), "'a5'"),
        (dict(draft="none"), "'none'"),
        (dict(draft="a8", num_draft_tokens=0), "got 0"),
        (dict(draft="a8", num_draft_tokens=33), "got 33"),
        (dict(draft="a8", num_draft_tokens=2.0), "got 2.0"),
        (dict(draft="a8", sampler=mlx_lm_make_sampler(temp=0.8)), "make_sampler"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            speculative_generate_step(prompt, model, **kw)
    odd = build_tiny_model(hidden_size=96, intermediate_size=160)
    with pytest.raises(ValueError, match="a8-g64"):
        speculative_generate_step(prompt, odd, draft="a8-g64")
    assert not is_installed(model) and not is_installed(odd)


def test_real_model_greedy_equals_plain_decode(smollm2):
    """SmolLM2-135M Q4_1: the default draft drafts well and changes nothing."""
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The Python Software Foundation is a non-profit organization that")
    ref = [t for t, _ in plain(model, prompt, 10)]
    out, st = spec(model, prompt, draft="a8-g32", num_draft_tokens=4, max_tokens=10)
    assert [t for t, _, _ in out] == ref
    assert st.acceptance > 0.5 and st.verify_passes < 10
