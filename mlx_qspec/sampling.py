"""Samplers whose distribution the rejection rule can read.

Speculative sampling needs p and q themselves (after temperature and the filters), not only
a draw from them; :class:`Sampler` samples exactly as mlx-lm's sampler does and exposes
the distribution it draws from.
"""

import math
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    categorical_sampling,
    greedy_sampler,
)

from .errors import UserError
from .settings import check

def xtc_cut(logprobs: mx.array, threshold: float, special_tokens: Sequence[int]) -> mx.array:
    """mlx-lm's XTC cut without its coin (``apply_xtc`` at probability 1, which would draw
    from the global key): every token above ``threshold`` but the least likely of them is
    removed, special tokens never are."""
    probs = mx.softmax(logprobs, -1)
    mask = probs > mx.where(probs > threshold, probs, mx.inf).min(axis=-1, keepdims=True)
    if special_tokens:
        mask[..., list(special_tokens)] = False
    return mx.where(mask, -mx.inf, logprobs)


class Sampler:
    """An mlx-lm sampler (log-probs → token) that also exposes the distribution it draws from.

    The rejection rule needs p and q themselves, after temperature and the
    top-p / min-p / XTC / top-k filters; an opaque sampler function cannot give them.
    Filters run in mlx-lm's order through mlx-lm's own functions, so a draw equals
    ``mlx_lm.sample_utils.make_sampler``'s draw for the same key. XTC flips a coin per
    step: the distribution drawn from is the mixture ``(1 − π)·plain + π·cut``.
    """

    def __init__(self, temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0,
                 xtc_probability=0.0, xtc_threshold=0.1, xtc_special_tokens=None):
        for name, value in (("temp", temp), ("top_p", top_p), ("min_p", min_p),
                            ("xtc_probability", xtc_probability),
                            ("xtc_threshold", xtc_threshold), ("top_k", top_k),
                            ("min_tokens_to_keep", min_tokens_to_keep)):
            check(name, value)
        self.temp = float(temp)
        self.xtc_probability = float(xtc_probability)
        self.xtc_threshold = float(xtc_threshold)
        self.xtc_special_tokens = list(xtc_special_tokens or [])
        # mlx-lm's chain: top-p, min-p, (XTC), top-k
        self.before_xtc: List[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:
            self.before_xtc.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.before_xtc.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
        self.after_xtc: List[Callable[[mx.array], mx.array]] = []
        if top_k > 0:
            self.after_xtc.append(lambda x: apply_top_k(x, top_k))

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @staticmethod
    def _chain(filters, logprobs):
        for f in filters:
            logprobs = f(logprobs)
        return logprobs

    def _scaled(self, x: mx.array) -> mx.array:
        x = self._chain(self.after_xtc, x) * (1.0 / self.temp)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def distribution(self, logprobs: mx.array) -> mx.array:
        """Normalized log-probabilities of the distribution :meth:`__call__` samples (temp > 0),
        in float32 whatever the model's dtype: the rejection rule's p/q ratio would carry
        ~0.4 % error in bfloat16 (a no-op for float32 logprobs)."""
        x = self._chain(self.before_xtc, logprobs.astype(mx.float32))
        pi = self.xtc_probability
        plain = self._scaled(x) if pi < 1 else None
        if pi == 0:
            return plain
        cut = self._scaled(xtc_cut(x, self.xtc_threshold, self.xtc_special_tokens))
        if pi == 1:
            return cut
        return mx.logaddexp(plain + math.log1p(-pi), cut + math.log(pi))

    def __call__(self, logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """A draw, as mlx-lm's sampler draws it from the global generator; with ``key`` (a
        request's own), the same draw from that key (XTC's coin from a split of it)."""
        if self.greedy:
            return greedy_sampler(logprobs)
        x = self._chain(self.before_xtc, logprobs)
        if key is None:
            if self.xtc_probability > 0:
                x = apply_xtc(x, self.xtc_probability, self.xtc_threshold,
                              self.xtc_special_tokens)
            return categorical_sampling(self._chain(self.after_xtc, x), self.temp)
        if self.xtc_probability > 0:
            coin, key = mx.random.split(key)
            cut = xtc_cut(x, self.xtc_threshold, self.xtc_special_tokens)
            x = mx.where(mx.random.uniform(key=coin) > self.xtc_probability, x, cut)
        return mx.random.categorical(self._chain(self.after_xtc, x) * (1.0 / self.temp), key=key)


# Drop-in for ``mlx_lm.sample_utils.make_sampler`` that speculative sampling can read (same
# parameters); out-of-range values raise UserError (a ValueError) here, not at the first draw.
make_sampler = Sampler


def resolve_sampler(sampler) -> Optional[Sampler]:
    """None for greedy; a :class:`Sampler` at temp > 0; ValueError for opaque samplers."""
    if sampler is None or sampler is greedy_sampler:
        return None
    if isinstance(sampler, Sampler):
        return None if sampler.greedy else sampler
    raise UserError(
        f"speculative decoding cannot read the distribution of sampler {sampler!r}; "
        "build it with mlx_qspec.make_sampler(temp=..., top_p=..., ...)"
    )


def accept(lp: mx.array, drafts: mx.array, q: list, dist: Optional[Sampler], next_key=None):
    """The rejection rule over one verify block: ``(accept flags for the k drafts, the token
    to emit after each accepted prefix length)``. ``lp``: the verify's k+1 log-prob rows;
    ``q[i]``: the distribution draft i was drawn from (None: a point mass on it). Greedy
    (``dist`` None): accept while the argmax agrees. Otherwise accept d with probability
    min(1, p(d)/q(d)), resample a rejection from normalize(max(0, p − q)), and draw a
    bonus token from p after k accepts — p and q in float32. ``next_key``: a function giving
    a fresh PRNG key per draw (a request's own seed), or None for the global generator."""
    if dist is None:
        targets = mx.argmax(lp, axis=-1)
        return targets[:-1] == drafts, targets
    key = next_key or (lambda: None)
    k = drafts.size
    p = dist.distribution(lp)
    if k == 0:
        return mx.array([], mx.bool_), mx.random.categorical(p, key=key())
    vocab = mx.arange(p.shape[-1])
    q = mx.concatenate([
        qi if qi is not None else mx.where(vocab == drafts[i], 0.0, -mx.inf)[None]
        for i, qi in enumerate(q)
    ])
    rows = mx.arange(k)
    pd, qd = mx.exp(p[rows, drafts]), mx.exp(q[rows, drafts])
    ok = mx.random.uniform(shape=(k,), key=key()) * qd < pd
    resid = mx.maximum(mx.exp(p[:k]) - mx.exp(q), 0)
    has_mass = resid.sum(axis=-1, keepdims=True) > 0
    fix = mx.random.categorical(mx.where(has_mass, mx.log(resid), p[:k]), key=key())
    bonus = mx.random.categorical(p[k:], key=key())
    return ok, mx.concatenate([fix, bonus])
