"""Samplers whose distribution the rejection rule can read.

Speculative sampling needs p and q themselves (after temperature and the filters), not only
a draw from them; :class:`Sampler` samples exactly as mlx-lm's sampler does and exposes
the distribution it draws from.
"""

from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    categorical_sampling,
    greedy_sampler,
)

from .errors import UserError


class Sampler:
    """An mlx-lm sampler (log-probs → token) that also exposes the distribution it draws from.

    The rejection rule needs p and q themselves, after temperature and the
    top-p / min-p / top-k filters; an opaque sampler function cannot give them.
    Filters run in mlx-lm's order, so sampling equals ``mlx_lm.sample_utils.make_sampler``.
    """

    def __init__(self, temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
        self.temp = float(temp)
        self.filters: List[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.filters.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def filter(self, logprobs: mx.array) -> mx.array:
        for f in self.filters:
            logprobs = f(logprobs)
        return logprobs

    def distribution(self, logprobs: mx.array) -> mx.array:
        """Normalized log-probabilities of the distribution :meth:`__call__` samples (temp > 0),
        in float32 whatever the model's dtype: the rejection rule's p/q ratio would carry
        ~0.4 % error in bfloat16 (a no-op for float32 logprobs)."""
        x = self.filter(logprobs.astype(mx.float32)) * (1.0 / self.temp)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return greedy_sampler(logprobs)
        return categorical_sampling(self.filter(logprobs), self.temp)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Sampler:
    """Drop-in for ``mlx_lm.sample_utils.make_sampler`` that speculative sampling can read."""
    return Sampler(temp, top_p, min_p, min_tokens_to_keep, top_k)


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
