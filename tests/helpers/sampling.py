"""Shared by the speculative-sampling distribution tests: draw the first tokens many times
from one prefilled cache, the exact joint distribution of those tokens, and Pearson's
chi-square between them (the samples fit one distribution and not another); random
log-probabilities for the samplers' own tests."""

import copy
import math
from collections import Counter

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_qspec.decoder import SpecStats, prefill
from mlx_qspec.kv_cache import make_cache, make_rewindable
from mlx_qspec.precision import FULL_PRECISION, reading
from mlx_qspec.quant.linear import install
from mlx_qspec.speculative import speculative_generate_step


def sample_first_tokens(model, prompt, sampler, steps: int, n: int, seed: int,
                        draft="a4", gamma=2, copies=False, **kw):
    """Counts of the first ``steps`` tokens over ``n`` speculative runs (one cache, rewound
    after each run; ``copies``: each run on a copy of one prefilled cache, as a recurrent
    state rewinds only within the blocks since its last commit), and their stats."""
    if copies:
        start = make_rewindable(make_cache(model, "fp"), model)
        prefill(model, mx.array(prompt[:-1]), start, step=16)
    else:
        start = make_prompt_cache(model)
        model(mx.array(prompt[:-1])[None], cache=start)
    mx.random.seed(seed)
    counts, stats = Counter(), SpecStats()
    for _ in range(n):
        cache = copy.deepcopy(start) if copies else start
        gen = speculative_generate_step(mx.array(prompt[-1:]), model, draft=draft,
                                        num_draft_tokens=gamma, max_tokens=steps,
                                        sampler=sampler, prompt_cache=cache, stats=stats, **kw)
        counts[tuple(t for t, _, _ in gen)] += 1
        if not copies:
            trim_prompt_cache(cache, steps)
    assert start[0].offset == len(prompt) - 1
    return counts, stats


def assert_fits(counts: Counter, n: int, want: dict, far: dict, stats=None,
                acceptance=(0.1, 0.9), power=1e-6):
    """The ``n`` samples ``counts`` fit ``want`` (chi-square p > 1e-3) and not ``far`` (p <
    ``power``: the test has power); with ``stats``, both the accept and the residual paths
    ran (acceptance strictly inside ``acceptance``)."""
    if stats is not None:
        assert acceptance[0] < stats.acceptance < acceptance[1], stats.acceptance
    p_value, far_value = chi2_pvalue(counts, want, n), chi2_pvalue(counts, far, n)
    print(f"chi-square p-values: fits {p_value:.3g}, far {far_value:.3g}")
    assert p_value > 1e-3, p_value
    assert far_value < power, far_value


def random_logprobs(V: int, rows: int = 1, seed: int = 0, scale: float = 2.0) -> mx.array:
    """Log-probabilities over ``V`` tokens of ``rows`` random logit rows (normal × ``scale``)."""
    x = mx.random.normal((rows, V), key=mx.random.key(seed)) * scale
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def chi2_pvalue(counts: Counter, probs: dict, n: int) -> float:
    """Pearson chi-square p-value; cells expecting < 5 (and unseen outcomes) pooled;
    Wilson–Hilferty's normal approximation of the chi-square tail."""
    big = [k for k, p in probs.items() if p * n >= 5]
    obs = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
    exp = [probs[k] * n for k in big] + [n * (1 - sum(probs[k] for k in big))]
    if exp[-1] < 1e-9:
        if obs[-1]:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def joint(model, prompt, sampler, steps, mode=FULL_PRECISION):
    """Exact distribution of the first ``steps`` tokens, by enumerating the filtered support.
    ``sampler``: a Sampler, or a function from a row of log-probabilities to probabilities."""
    if hasattr(sampler, "distribution"):
        probs = lambda lp: mx.exp(sampler.distribution(lp))[0].tolist()  # noqa: E731
    else:
        probs = sampler
    out = {(): 1.0}
    install(model)
    with reading(mode):
        for _ in range(steps):
            nxt = {}
            for prefix, pp in out.items():
                logits = model(mx.array([*prompt, *prefix])[None])[0, -1:]
                for t, pt in enumerate(probs(logits - mx.logsumexp(logits, -1, keepdims=True))):
                    if pt > 0:
                        nxt[prefix + (t,)] = pp * pt
            out = nxt
    return out
