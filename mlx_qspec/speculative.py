"""QSpec self-speculative decoding: one model, one KV cache, two ways of reading it.

Each block: the model in a draft mode (quantized activations) proposes γ tokens,
appending γ draft-precision positions to the cache; one verify forward over
``[last, d1..dγ]`` rewrites those positions at verify precision and scores every
draft; the accepted prefix plus one verify token are emitted and the cache is
trimmed to the accepted length. Greedy output equals plain decoding token for
token; at temperature > 0 the speculative-sampling rule keeps the verify's
distribution exactly.
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Generator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    generation_stream,
    maybe_quantize_kv_cache,
)
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    categorical_sampling,
    greedy_sampler,
)

from . import kernels
from .quant.linear import install
from .quant.modes import DraftMode, check_draft

MAX_DRAFT_TOKENS = 32
# Verify rows per forward: within the row count the verify kernel takes, a verify row is
# computed on the same kernel path as a one-token decode step (γ ≥ 16 needs two forwards).
VERIFY_CHUNK = kernels.MAX_M


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
        """Normalized log-probabilities of the distribution :meth:`__call__` samples (temp > 0)."""
        x = self.filter(logprobs) * (1.0 / self.temp)
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


@dataclass
class SpecStats:
    """Counts and times of one speculative run, filled in as the generator goes.

    ``acceptance`` α = accepted ÷ drafted; ``tokens_per_verify`` τ = emitted ÷ verify
    passes (1 … γ+1). Times are host wall-clock seconds per mode (drafting waits
    for its tokens, so the split is real, not just graph building). Runs that share
    one object add up.
    """

    draft: str = ""
    num_draft_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    emitted: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.verify_passes if self.verify_passes else 0.0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance": self.acceptance,
            "tokens_per_verify": self.tokens_per_verify,
        }


def check_num_draft_tokens(n) -> int:
    """γ must be an integer in 1..32: ValueError naming the value otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {n!r}"
        )
    return n


def _resolve_sampler(sampler) -> Optional[Sampler]:
    """None for greedy; a :class:`Sampler` at temp > 0; ValueError for opaque samplers."""
    if sampler is None or sampler is greedy_sampler:
        return None
    if isinstance(sampler, Sampler):
        return None if sampler.greedy else sampler
    raise ValueError(
        f"speculative decoding cannot read the distribution of sampler {sampler!r}; "
        "build it with mlx_qspec.speculative.make_sampler(temp=..., top_p=..., ...)"
    )


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    draft: "str | DraftMode",
    num_draft_tokens: int = 4,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    stats: Optional[SpecStats] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)`` like mlx-lm's ``speculative_generate_step``.

    ``draft`` is a draft-mode name (``'a8'``, ``'a4-g32'``, …) or :class:`DraftMode`;
    the QSpec layers are installed on ``model`` if needed and it is left in verify
    mode however the generator ends. ``max_tokens < 0`` never stops on its own.
    ``prompt_cache`` (one trimmable cache per layer) is updated in place: when the
    generator ends it holds the prompt and every emitted token but the last.
    ``logprobs`` are the verify's (after ``logits_processors``), as plain decoding
    gives them. Bad arguments raise ValueError here, before any compute.
    """
    mode = check_draft(model, draft)
    if mode is None:
        raise ValueError(f"speculative decoding needs a draft mode, got {draft!r}")
    gamma = check_num_draft_tokens(num_draft_tokens)
    dist = _resolve_sampler(sampler)
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    if not can_trim_prompt_cache(cache):
        types = {type(c).__name__ for c in cache if not c.is_trimmable()}
        raise ValueError(f"speculative decoding needs a trimmable prompt cache, got {types}")
    stats = SpecStats() if stats is None else stats
    stats.draft, stats.num_draft_tokens = mode.name, gamma
    return _generate(
        prompt, model, install(model), mode, gamma, max_tokens, dist,
        logits_processors, cache, prefill_step_size, kv_bits, kv_group_size,
        quantized_kv_start, stats,
    )


def _generate(
    prompt, model, switch, mode, gamma, max_tokens, dist, logits_processors, cache,
    prefill_step_size, kv_bits, kv_group_size, quantized_kv_start, stats,
):
    """The loop behind :func:`speculative_generate_step`, its arguments already checked."""
    quantize_cache = lambda: maybe_quantize_kv_cache(  # noqa: E731
        cache, quantized_kv_start, kv_group_size, kv_bits
    )
    history = None  # prompt + emitted tokens, kept only for logits processors

    def logprobs_of(logits, context):
        """Row i of ``logits`` scored in ``context`` extended by the first i inputs."""
        if logits_processors:
            rows = []
            for i in range(logits.shape[0]):
                row = logits[i : i + 1]
                for proc in logits_processors:
                    row = proc(context[: context.size - logits.shape[0] + 1 + i], row)
                rows.append(row)
            logits = mx.concatenate(rows)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def draft_block(y, k):
        """k draft tokens (and their distributions at temp > 0), appending k cache positions."""
        tokens, q = [], []
        with switch.drafting(mode):
            for _ in range(k):
                logits = model(y[None], cache=cache)[0, -1:]
                context = mx.concatenate([history, *tokens]) if logits_processors else None
                lp = logprobs_of(logits, context)
                if dist is None:
                    y = mx.argmax(lp, axis=-1)
                else:
                    q.append(dist.distribution(lp))
                    y = mx.random.categorical(q[-1])
                mx.async_eval(y)
                tokens.append(y)
        return tokens, q

    def accept(lp, drafts, q):
        """(accept flags for the k drafts, the token to emit after each prefix length)."""
        if dist is None:
            targets = mx.argmax(lp, axis=-1)
            return targets[:-1] == drafts, targets
        k = drafts.size
        p = dist.distribution(lp)
        if k == 0:
            return mx.array([], mx.bool_), mx.random.categorical(p)
        q = mx.concatenate(q)
        rows = mx.arange(k)
        pd, qd = mx.exp(p[rows, drafts]), mx.exp(q[rows, drafts])
        ok = mx.random.uniform(shape=(k,)) * qd < pd
        resid = mx.maximum(mx.exp(p[:k]) - mx.exp(q), 0)
        has_mass = resid.sum(axis=-1, keepdims=True) > 0
        fix = mx.random.categorical(mx.where(has_mass, mx.log(resid), p[:k]))
        bonus = mx.random.categorical(p[k:])
        return ok, mx.concatenate([fix, bonus])

    ntoks = 0
    with mx.stream(generation_stream):
        t0 = time.perf_counter()
        y = prompt.astype(mx.uint32)
        start = cache[0].offset
        while y.size > 1:
            n = min(prefill_step_size, y.size - 1)
            model(y[:n][None], cache=cache)
            quantize_cache()
            mx.eval([c.state for c in cache])
            y = y[n:]
            mx.clear_cache()
        if logits_processors:
            history = prompt.astype(mx.uint32)
        stats.prefill_time += time.perf_counter() - t0
        limit = math.inf if max_tokens < 0 else max_tokens
        try:
            while ntoks < limit:
                k = int(min(gamma, limit - ntoks - 1))
                if kv_bits is not None and cache[0].offset < quantized_kv_start:
                    # Plain decoding reads a position in float iff it precedes the
                    # switch to a quantized cache: no verify block straddles it.
                    k = min(k, quantized_kv_start - 1 - cache[0].offset)
                t0 = time.perf_counter()
                drafts, q = draft_block(y, k)
                if k:
                    # Wait for the drafts before queuing the verify: costs one graph build
                    # of idle device, buys a true per-mode time split (with the verify
                    # queued behind them, MLX-CPU reported the drafts done only late).
                    mx.eval(drafts)
                    trim_prompt_cache(cache, k)
                t1 = time.perf_counter()
                drafts = mx.concatenate(drafts) if k else mx.array([], mx.uint32)
                inputs = mx.concatenate([y, drafts.astype(mx.uint32)])
                logits = mx.concatenate([
                    model(inputs[None, i : i + VERIFY_CHUNK], cache=cache)[0]
                    for i in range(0, k + 1, VERIFY_CHUNK)
                ])
                context = mx.concatenate([history, drafts]) if logits_processors else None
                lp = logprobs_of(logits, context)
                ok, targets = accept(lp, drafts, q)
                mx.eval(ok, targets, lp)
                ok, targets, drafts = ok.tolist(), targets.tolist(), drafts.tolist()
                n = ok.index(False) if False in ok else k
                trim_prompt_cache(cache, k - n)
                quantize_cache()
                stats.draft_time += t1 - t0
                stats.verify_time += time.perf_counter() - t1
                stats.drafted += k
                stats.accepted += n
                stats.verify_passes += 1
                out = drafts[:n] + [targets[n]]
                if logits_processors:
                    history = mx.concatenate([history, mx.array(out, mx.uint32)])
                y = mx.array(out[-1:], mx.uint32)
                for i, tok in enumerate(out):
                    ntoks += 1
                    stats.emitted += 1
                    yield tok, lp[i], i < n
        finally:
            switch.draft = None
            extra = cache[0].offset - (start + prompt.size + ntoks - 1)
            trim_prompt_cache(cache, max(extra, 0))
