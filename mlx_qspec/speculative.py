"""Self-speculative decoding: one model, one KV cache, read at two precisions.

Each block: the model read at the draft's precision (fewer weight, activation or KV bits)
proposes γ tokens, appending γ draft-precision positions to the cache; one verify forward
at full precision over ``[last, d1..dγ]`` rewrites those positions and scores every draft;
the accepted prefix plus one verify token are emitted and the cache is trimmed to the
accepted length. The loop sets the precision of every forward it builds (never relying on
an ambient one). Greedy output equals plain decoding token for token; at temperature > 0
the speculative-sampling rule keeps the verify's distribution exactly.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    generate_step,
    generation_stream,
    maybe_quantize_kv_cache,
)
from mlx_lm.models.cache import ArraysCache, CacheList, can_trim_prompt_cache, trim_prompt_cache
from . import attention, cost, drafts, kernels, layer_skip, precision, reads, recurrent
from .drafts import Cascade, DraftModel
from .errors import UserError
from .kv_cache import (
    MAX_DRAFT_TOKENS,
    NestedKVCache,
    WINDOWS,
    SpeculativeRotatingKVCache,
    check_kv_bits,
    make_rewindable,
    make_rotating_cache,
)
from .precision import FULL_PRECISION, Precision
from .quant.linear import install
from .ngram import Ngram
from .quant.modes import AUTO, NONE, auto_candidates
from .sampling import accept, resolve_sampler

DEFAULT_DRAFT_TOKENS = 4  # γ of an explicit draft when none is given
# Verify rows per forward: within the row count the verify kernel takes, a verify row is
# computed on the same kernel path as a one-token decode step (γ ≥ 16 needs two forwards).
VERIFY_CHUNK = kernels.MAX_M


@dataclass
class SpecStats:
    """Counts, times and bytes read of one generation, filled in as the generator goes.

    ``acceptance`` α = accepted ÷ drafted; ``tokens_per_verify`` τ = emitted ÷ verify
    passes (1 … γ+1). Times are host wall-clock seconds per phase (drafting waits for its
    tokens, so the split is real). ``draft_reads`` / ``verify_reads`` count the bytes the
    draft and verify forwards read (:mod:`mlx_qspec.reads`); a plain step reads what one
    verify forward reads at the same context. ``auto_reason`` says what ``auto`` chose and
    why. Runs that share one object add up.
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
    auto_reason: str = ""
    # Cascades: per checking level, [proposals from the levels below, proposals it kept].
    level_counts: dict = field(default_factory=dict)
    draft_reads: reads.ReadCounter = field(default_factory=reads.ReadCounter)
    verify_reads: reads.ReadCounter = field(default_factory=reads.ReadCounter)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.verify_passes if self.verify_passes else 0.0

    def bytes_per_token(self, half: bool = False) -> dict:
        """Bytes read per emitted token: by the drafts, the verifies, both, and by plain
        decoding at the same context (``half``: float arrays counted as a Mac's float16)."""
        n = lambda c: c.bytes_f16() if half else c.bytes()  # noqa: E731
        per = lambda b: b / self.emitted if self.emitted else 0.0  # noqa: E731
        v = self.verify_reads
        return {
            "draft": per(n(self.draft_reads)),
            "verify": per(n(v)),
            "total": per(n(self.draft_reads) + n(v)),
            "plain": n(v) / v.forwards if v.forwards else 0.0,
        }

    def __str__(self):
        b = self.bytes_per_token()
        return (f"SpecStats(draft={self.draft}, acceptance={self.acceptance:.3f}, "
                f"tokens_per_verify={self.tokens_per_verify:.3f}, drafted={self.drafted}, "
                f"accepted={self.accepted}, verify_passes={self.verify_passes}, "
                f"bytes_per_token={b['total']:.0f}, plain_bytes_per_token={b['plain']:.0f})")

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.endswith("_reads")}
        d.update(acceptance=self.acceptance, tokens_per_verify=self.tokens_per_verify)
        d.update({f"{k}_bytes_per_token": v for k, v in self.bytes_per_token().items()})
        d.update({f"{k}_bytes_per_token_f16": v for k, v in self.bytes_per_token(True).items()})
        return d


def check_num_draft_tokens(n) -> int:
    """γ must be an integer in 1..32: ValueError naming the value otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_TOKENS:
        raise UserError(
            f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {n!r}"
        )
    return n


def check_draft_p_min(p) -> float:
    """``draft_p_min`` is a probability in [0, 1): ValueError naming the value otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise UserError(f"draft_p_min must be a number in [0, 1), got {p!r}")
    return float(p)


def prepare(model: nn.Module) -> nn.Module:
    """Everything the loop and plain decoding read through: QSpec layers, our attention,
    skippable blocks."""
    install(model)
    attention.install(model)
    layer_skip.install(model)
    recurrent.install(model)
    return model


class _FullPrecision:
    """``model`` read at full precision, each forward's reads counted in ``counter``: for
    mlx-lm's ``generate_step``, which calls the model and nothing else of it."""

    def __init__(self, model, counter: reads.ReadCounter):
        self.model, self.counter = model, counter

    def __call__(self, inputs, *args, **kwargs):
        with precision.reading(FULL_PRECISION), reads.counting(self.counter):
            return self.model(inputs, *args, **kwargs)


def prefill(model, tokens: mx.array, cache, step: int, after=None):
    """Feed ``tokens`` into ``cache`` at full precision in chunks of ``step``, as mlx-lm's
    ``generate_step`` does with a prompt's first n − 1 tokens (same chunks, same cache).
    Rewindable windows see the chunks as prompt chunks, the blocks after them as verifies."""
    windows = [c for c in cache if isinstance(c, SpeculativeRotatingKVCache)]
    for c in windows:
        c.decoding = False
    while tokens.size:
        n = min(step, tokens.size)
        with precision.reading(FULL_PRECISION):
            model(tokens[:n][None], cache=cache)
        if after is not None:
            after()
        mx.eval([c.state for c in cache])
        _commit(cache)
        tokens = tokens[n:]
        mx.clear_cache()
    for c in windows:
        c.decoding = True


def decode_plainly(y, model, cache, *, max_tokens, stats, history=None, sampler=None,
                   logits_processors=None, **kwargs):
    """mlx-lm's own ``generate_step`` from an already prefilled cache, yielding
    ``(token, logprobs, False)``: plain decoding, pipelined as mlx-lm pipelines it. Every
    forward is a one-token step counted in ``stats.verify_reads``; logits processors see
    ``history`` (the tokens before ``y``) as if generate_step had prefilled them itself."""
    if logits_processors and history is not None and history.size:
        logits_processors = [
            lambda toks, logits, proc=proc: proc(mx.concatenate([history, toks]), logits)
            for proc in logits_processors
        ]
    counted = _FullPrecision(model, stats.verify_reads)
    for tok, lp in generate_step(y, counted, max_tokens=max_tokens, sampler=sampler,
                                 logits_processors=logits_processors, prompt_cache=cache, **kwargs):
        stats.emitted += 1
        stats.verify_passes += 1
        yield tok, lp, False


def plain_generate_step(prompt: mx.array, model: nn.Module, *, prompt_cache=None,
                        prefill_step_size: int = 2048, stats: Optional["SpecStats"] = None,
                        **kwargs):
    """Plain decoding through the same layers and attention as speculation: the prompt's
    first n − 1 tokens prefilled here in mlx-lm's chunks, then :func:`decode_plainly`.
    ``kwargs`` go to mlx-lm's ``generate_step`` (sampler, logits_processors, kv_bits, …)."""
    model = prepare(model)
    max_kv_size = kwargs.pop("max_kv_size", None)  # the window stream_generate gives it too
    cache = (make_rotating_cache(model, max_kv_size, rewindable=False) if prompt_cache is None
             else prompt_cache)
    check_kv_bits(cache, kwargs.get("kv_bits"))
    stats = SpecStats(draft="none") if stats is None else stats
    quantize = lambda: maybe_quantize_kv_cache(  # noqa: E731
        cache, kwargs.get("quantized_kv_start", DEFAULT_QUANTIZED_KV_START),
        kwargs.get("kv_group_size", 64), kwargs.get("kv_bits"))
    t0 = time.perf_counter()
    prompt = prompt.astype(mx.uint32)
    prefill(model, prompt[:-1], cache, prefill_step_size, quantize)
    stats.prefill_time += time.perf_counter() - t0
    yield from decode_plainly(prompt[-1:], model, cache, stats=stats, history=prompt[:-1],
                              **kwargs)


class _AdaptiveGamma:
    """γ for each block from the cost table and a running acceptance estimate (``auto``);
    γ = 0 (a plain step) once the model says drafting no longer pays."""

    def __init__(self, table, draft: str, prior: float, gammas):
        self.table, self.draft, self.gammas = table, draft, gammas
        self.estimate = cost.AcceptanceEstimate(prior)
        self.off = False

    def __call__(self) -> int:
        if self.off:
            return 0
        choice = cost.choose(self.table, {self.draft: self.estimate.value}, gammas=self.gammas)
        self.off = choice.draft is None
        return choice.gamma

    def update(self, drafted: int, accepted: int):
        """A block is ``accepted`` agreements and, if it was cut, one disagreement: drafts
        after the first rejection were never compared (counting them would make the
        per-token agreement the cost model expects look lower than it is)."""
        if drafted:
            self.estimate.update(accepted + (accepted < drafted), accepted)


def kv_mode_of(cache) -> str:
    """``nested``, ``8bit`` or ``fp``: how the cache stores K/V (what ``kv-upper`` needs) in
    its full-attention layers (sliding-window layers stay float windows in every mode)."""
    full = [c for c in cache if not isinstance(c, (*WINDOWS, ArraysCache, CacheList))]
    if full and all(isinstance(c, NestedKVCache) for c in full):
        return "nested"
    return "8bit" if full and all(hasattr(c, "bits") for c in full) else "fp"


def auto_priors(model, kv_mode: str) -> dict[str, float]:
    """The drafts ``auto`` weighs, with their prior acceptance: the n-gram lookup, the
    precision drafts whose terms were measured, and the layer-skip sets calibrated for this
    model before (``--draft skip-<share>`` calibrates one), alone and with ``kv-upper``."""
    priors = {drafts.NGRAM: cost.PRIOR_ACCEPTANCE[drafts.NGRAM]}
    for name in auto_candidates(model, kv_mode):
        if all(t in cost.PRIOR_ACCEPTANCE for t in precision.parse(name).terms):
            priors[name] = cost.prior_acceptance(name)
    for found in layer_skip.cached_calibrations(model):
        name = Precision(skip=found.skip).name
        priors[name] = found.agreement
        if kv_mode == "nested":
            priors[name + "+kv-upper"] = found.agreement * cost.PRIOR_ACCEPTANCE["kv-upper"]
    return priors


def resolve_auto(model, cache, num_draft_tokens: Optional[int], stats: "SpecStats", ngram: Ngram):
    """``auto`` on a prefilled cache: calibrate forward costs at this context (cached per
    model, device and context; the lookup costs no forward), then pick the draft and γ the
    cost model favours, or none. Returns ``(cascade or None, gamma policy)`` and records
    the choice in ``stats``."""
    why = recurrent.unsupported(model)
    if why:
        stats.draft, stats.auto_reason = "none", "recurrent_state_not_rewindable"
        return None, None
    kv_mode = kv_mode_of(cache)
    priors = auto_priors(model, kv_mode)
    gamma_max = num_draft_tokens or max(cost.GAMMAS)
    gammas = tuple(g for g in cost.GAMMAS if g <= gamma_max)
    table = cost.calibrate_cached(model, cache, [n for n in priors if n != drafts.NGRAM])
    table.draft[drafts.NGRAM] = 0.0
    choice = cost.choose(table, priors, gammas=gammas)
    stats.draft, stats.auto_reason = choice.draft or "none", f"{choice.reason};costs={table.source}"
    if choice.draft is None:
        return None, None
    cascade = drafts.check(model, choice.draft, kv_mode, ngram)
    return cascade, _AdaptiveGamma(table, choice.draft, priors[choice.draft], gammas)


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    draft: "str | Precision | Cascade",
    num_draft_tokens: Optional[int] = None,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    draft_p_min: float = 0.0,
    ngram: Ngram = Ngram(),
    cached_tokens: Sequence[int] = (),
    draft_model: Optional[nn.Module] = None,
    stats: Optional[SpecStats] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)`` like mlx-lm's ``speculative_generate_step``.

    ``draft`` is a draft name (``'a8'``, ``'w-upper'``, ``'a8-g32+kv-upper'``,
    ``'skip-3,14'``, ``'ngram'``, a cascade ``'ngram>a8-g32'``, …), a :class:`Precision`,
    or ``'auto'``: after the prefill the cost model picks a draft and adapts γ
    (≤ ``num_draft_tokens``, default 8) to the acceptance it sees, or decodes plainly where
    no draft pays (``stats.auto_reason`` says why). An explicit draft runs
    ``num_draft_tokens`` (default 4) per block, fewer where the draft's top probability
    falls below ``draft_p_min`` or the n-gram lookup finds no more. ``ngram`` sets the
    lookup, which searches ``cached_tokens`` (the ids already in ``prompt_cache``), the
    prompt and the output. ``draft_model`` (a smaller model with the same tokenizer, or a
    :class:`DraftModel`) proposes below ``draft``'s levels (``draft='none'``: alone). QSpec layers, skippable blocks and our attention are installed on ``model`` if
    needed. ``max_tokens < 0`` never stops on its own. ``prompt_cache`` (one trimmable
    cache per layer, or a window: mlx-lm's ``RotatingKVCache`` is swapped in the list for a
    rewindable one; a :class:`NestedKVCache` list for ``kv-upper``) is updated in place:
    when the generator ends it holds the prompt and every emitted token but the last.
    ``logprobs`` are the verify's (after ``logits_processors``), as plain decoding gives
    them. Bad arguments raise UserError (a ValueError) here, before any compute.
    """
    # The model's windows (sliding layers, max_kv_size), mlx-lm's or fresh, made rewindable.
    cache = make_rotating_cache(model) if prompt_cache is None else make_rewindable(prompt_cache)
    check_kv_bits(cache, kv_bits)
    auto = isinstance(draft, str) and draft.strip().lower() == AUTO
    if draft_model is not None and not isinstance(draft_model, DraftModel):
        draft_model = DraftModel(prepare(draft_model))
    if draft_model is None and (draft is None or str(draft).strip().lower() == NONE):
        raise UserError(f"speculative decoding needs a draft, got {draft!r}")
    if auto and draft_model is not None:
        raise UserError("--draft auto weighs self-drafts only; with a draft model pass --draft none or a level")
    cascade = None if auto else drafts.check(model, draft, kv_mode_of(cache), ngram, draft_model)
    if num_draft_tokens is not None:
        check_num_draft_tokens(num_draft_tokens)
    draft_p_min = check_draft_p_min(draft_p_min)
    dist = resolve_sampler(sampler)
    if not can_trim_prompt_cache(cache):
        types = {type(c).__name__ for c in cache if not c.is_trimmable()}
        raise UserError(f"speculative decoding needs a trimmable prompt cache, got {types}")
    if not auto and (why := recurrent.unsupported(model)):
        raise UserError(f"cannot speculate: {why}")
    if draft_model is not None and (why := recurrent.unsupported(draft_model.model)):
        raise UserError(f"cannot draft with the draft model: {why}")
    if prompt.size == 0:
        raise UserError("the prompt is empty")
    stats = SpecStats() if stats is None else stats
    if not auto:
        stats.draft = cascade.name
    stats.num_draft_tokens = num_draft_tokens or (0 if auto else DEFAULT_DRAFT_TOKENS)
    return _generate(
        prompt, prepare(model), cascade or AUTO, num_draft_tokens, max_tokens,
        dist, logits_processors, cache, prefill_step_size, kv_bits, kv_group_size,
        quantized_kv_start, draft_p_min, ngram, list(cached_tokens), stats,
    )


def _commit(cache):
    """Tell every cache that keeps a rewind point (recurrent state) that all it holds is settled."""
    for c in cache:
        if hasattr(c, "commit"):
            c.commit()


def _trim_to(cache, offset: int):
    """Every layer's cache back to ``offset`` positions (a skipped block has fewer already)."""
    for c in cache:
        if c.offset > offset:
            c.trim(c.offset - offset)


def _generate(
    prompt, model, cascade, num_draft_tokens, max_tokens, dist, logits_processors, cache,
    prefill_step_size, kv_bits, kv_group_size, quantized_kv_start, draft_p_min, ngram,
    cached_tokens, stats,
):
    """The loop behind :func:`speculative_generate_step`, its arguments already checked."""
    quantize_cache = lambda: maybe_quantize_kv_cache(  # noqa: E731
        cache, quantized_kv_start, kv_group_size, kv_bits
    )
    history = None  # prompt + emitted tokens, kept only for logits processors
    seen = None  # the same as a list, kept only for the n-gram lookup

    def forward(tokens, at: Precision, counter):
        """One forward at precision ``at``, its reads counted in ``counter``."""
        with precision.reading(at), reads.counting(counter):
            return model(tokens[None], cache=cache)[0]

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

    def context_after(tokens):
        """History extended by ``tokens`` (ints or arrays), for logits processors."""
        if not logits_processors:
            return None
        return mx.concatenate([history, mx.array([int(t) for t in tokens], mx.uint32)])

    def check(y, proposed, q, at: Precision, counter, rows_at_once, before=()):
        """Score ``[y, *proposed]`` (after ``before``, this block's tokens so far) at ``at``
        (``rows_at_once`` rows per forward) and apply
        the rejection rule: ``(kept, tokens emitted, their logprobs at ``at``)``, the
        emitted tokens being the kept proposals and one more drawn at ``at``. The cache
        keeps the positions of y and the kept proposals."""
        k = len(proposed)
        base = cache[0].offset
        drafts = mx.array(proposed, mx.uint32) if k else mx.array([], mx.uint32)
        inputs = mx.concatenate([y, drafts])
        logits = mx.concatenate([
            forward(inputs[i : i + rows_at_once], at, counter)
            for i in range(0, k + 1, rows_at_once)
        ])
        lp = logprobs_of(logits, context_after([*before, *proposed]))
        ok, targets = accept(lp, drafts, q, dist)
        mx.eval(ok, targets, lp)
        ok, targets = ok.tolist(), targets.tolist()
        n = ok.index(False) if False in ok else k
        with reads.counting(counter, forward=False):  # a recurrent state's replay reads
            _trim_to(cache, base + n + 1)
        return n, [int(t) for t in proposed[:n]] + [targets[n]], lp

    def draw(lp):
        """One draft token from a draft's log-probs ``lp`` and the distribution it was drawn
        from, or None where its top probability is below ``draft_p_min`` (llama.cpp's
        --draft-p-min: an unsure draft ends the block)."""
        qi = lp if dist is None else dist.distribution(lp)
        if draft_p_min and math.exp(qi.max().item()) < draft_p_min:
            return None
        t = mx.argmax(qi, axis=-1) if dist is None else mx.random.categorical(qi)
        return t.item(), qi

    def propose(levels, y, k, drafted):
        """Up to ``k`` tokens from the cascade ``levels`` (cheapest first) after ``y``,
        ``drafted`` (ints) already proposed before it in this block, and the distribution
        each was drawn from (None: a point mass). The top level's forwards append to the
        cache; the caller trims."""
        *lower, top = levels
        if isinstance(top, Ngram):
            proposed = top.propose(seen + drafted, k)
            return proposed, [None] * len(proposed)
        if isinstance(top, DraftModel):
            return propose_by_draft_model(top, y, k, drafted)
        tokens, q = [], []
        while len(tokens) < k:
            base = cache[0].offset
            offered, offered_q = propose(lower, y, k - len(tokens), drafted + tokens) if lower else ([], [])
            _trim_to(cache, base)  # what the lower levels' forwards appended
            if offered:
                n, out, lp = check(y, offered, offered_q, top, stats.draft_reads, VERIFY_CHUNK,
                                   drafted + tokens)
                counts = stats.level_counts.setdefault(top.name, [0, 0])
                counts[0] += len(offered)
                counts[1] += n
                qi = lp[: n + 1] if dist is None else dist.distribution(lp[: n + 1])
            else:
                lp = logprobs_of(forward(y, top, stats.draft_reads)[-1:],
                                 context_after(drafted + tokens))
                drawn = draw(lp)
                if drawn is None:
                    break
                t, qi = drawn
                out = [t]
            tokens += out
            q += [qi[i : i + 1] for i in range(len(out))]
            y = mx.array(out[-1:], mx.uint32)
        return tokens[:k], q[:k]

    def propose_by_draft_model(level, y, k, drafted):
        """k tokens from a separate model, autoregressively on its own cache."""
        pending = level.catch_up(seen + drafted)
        tokens, q = [], []
        for _ in range(k):
            with precision.reading(FULL_PRECISION), reads.counting(stats.draft_reads):
                logits = level.model(mx.array(pending, mx.uint32)[None], cache=level.cache)[0, -1:]
            level.tokens += pending
            drawn = draw(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            if drawn is None:
                break
            t, qi = drawn
            tokens.append(t)
            q.append(qi)
            pending = [t]
        return tokens, q

    levels = None if cascade == AUTO else list(cascade.levels)
    ntoks = 0
    with mx.stream(generation_stream):
        t0 = time.perf_counter()
        start = cache[0].offset
        prefill(model, prompt[:-1].astype(mx.uint32), cache, prefill_step_size, quantize_cache)
        y = prompt[-1:].astype(mx.uint32)
        adaptive = None
        if cascade == AUTO:
            cascade, adaptive = resolve_auto(model, cache, num_draft_tokens, stats, ngram)
            levels = None if cascade is None else list(cascade.levels)
        stats.prefill_time += time.perf_counter() - t0
        gamma_of = adaptive or (lambda: num_draft_tokens or DEFAULT_DRAFT_TOKENS)
        if logits_processors:
            history = prompt.astype(mx.uint32)
        if levels and cascade.reads_context:
            seen = cached_tokens + prompt.tolist()
        limit = math.inf if max_tokens < 0 else max_tokens
        try:
            if levels is None:  # auto found no draft that pays: mlx-lm's pipelined plain loop
                for out in decode_plainly(
                    y, model, cache, max_tokens=max_tokens, stats=stats,
                    history=prompt[:-1].astype(mx.uint32), sampler=dist,
                    logits_processors=logits_processors, kv_bits=kv_bits,
                    kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                ):
                    ntoks += 1
                    yield out
                return
            while ntoks < limit:
                _commit(cache)  # the previous block's tokens are out: it is settled
                k = int(max(0, min(gamma_of(), limit - ntoks - 1, room(cache, kv_bits, quantized_kv_start))))
                t0 = time.perf_counter()
                offset = cache[0].offset
                drafted, q = propose(levels, y, k, []) if k else ([], [])
                _trim_to(cache, offset)
                k = len(drafted)
                t1 = time.perf_counter()
                n, out, lp = check(y, drafted, q, FULL_PRECISION, stats.verify_reads, VERIFY_CHUNK)
                quantize_cache()
                if adaptive:
                    adaptive.update(k, n)
                stats.draft_time += t1 - t0
                stats.verify_time += time.perf_counter() - t1
                stats.drafted += k
                stats.accepted += n
                stats.verify_passes += 1
                if logits_processors:
                    history = context_after(out)
                if seen is not None:
                    seen += out
                y = mx.array(out[-1:], mx.uint32)
                for i, tok in enumerate(out):
                    ntoks += 1
                    stats.emitted += 1
                    yield tok, lp[i], i < n
        finally:
            extra = cache[0].offset - (start + prompt.size + ntoks - 1)
            trim_prompt_cache(cache, max(extra, 0))


def room(cache, kv_bits, quantized_kv_start) -> int:
    """Drafts the next block may hold so that no verify block straddles a change in how the
    cache reads earlier positions (plain decoding would read them two ways)."""
    k = min((c.room() for c in cache if hasattr(c, "room")), default=MAX_DRAFT_TOKENS)
    if kv_bits is not None and cache[0].offset < quantized_kv_start:
        k = min(k, quantized_kv_start - 1 - cache[0].offset)
    return k
