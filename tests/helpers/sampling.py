"""Shared by the speculative-sampling distribution tests: draw the first tokens many times
from one prefilled cache, the exact joint distribution of those tokens, and Pearson's
chi-square between them; random log-probabilities for the samplers' own tests."""

import math
from collections import Counter

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_qspec.decoder import SpecStats
from mlx_qspec.precision import FULL_PRECISION, reading
from mlx_qspec.quant.linear import install
from mlx_qspec.speculative import speculative_generate_step


def sample_first_tokens(model, prompt, sampler, steps: int, n: int, seed: int,
                        draft="a4", gamma=2, **kw):
    """Counts of the first ``steps`` tokens over ``n`` speculative runs (one cache, rewound
    after each run), and their stats."""
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.random.seed(seed)
    counts, stats = Counter(), SpecStats()
    for _ in range(n):
        gen = speculative_generate_step(mx.array(prompt[-1:]), model, draft=draft,
                                        num_draft_tokens=gamma, max_tokens=steps,
                                        sampler=sampler, prompt_cache=cache, stats=stats, **kw)
        counts[tuple(t for t, _, _ in gen)] += 1
        trim_prompt_cache(cache, steps)
    assert cache[0].offset == len(prompt) - 1
    return counts, stats


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
    """Exact distribution of the first ``steps`` tokens, by enumerating the filtered support."""
    out = {(): 1.0}
    install(model)
    with reading(mode):
        for _ in range(steps):
            nxt = {}
            for prefix, pp in out.items():
                logits = model(mx.array([*prompt, *prefix])[None])[0, -1:]
                p = mx.exp(sampler.distribution(logits - mx.logsumexp(logits, -1, keepdims=True)))[0]
                for t, pt in enumerate(p.tolist()):
                    if pt > 0:
                        nxt[prefix + (t,)] = pp * pt
            out = nxt
    return out
