"""mlx-lm's generator functions on the decoder, at batch 1 on the model's own caches.

:func:`speculative_generate_step` yields ``(token, logprobs, from_draft)`` as mlx-lm's does,
drafting as the settings say (an explicit draft at a fixed γ, or ``auto``'s policy);
:func:`plain_generate_step` is plain decoding — mlx-lm's ``generate_step`` through the same
layers and attention as every verify (one kernel path). Both prefill the prompt's first
n − 1 tokens in mlx-lm's chunks and check every argument before any compute. Speculation
leaves the cache holding the prompt and every emitted token but the last; plain decoding
leaves what mlx-lm's pipelined ``generate_step`` leaves (it runs a step ahead of its yields).
"""

import time
from pathlib import Path
from typing import Callable, Generator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import can_trim_prompt_cache

from . import hooks, recurrent, settings as settings_module
from .caches import kv_mode, position, rewind
from .decoder import Decoder, Row, SpecStats, prefill, quantize_kv
from .drafts.auto import NOT_REWINDABLE, AutoPolicy
from .drafts.cascade import Cascade, DraftModel, build
from .drafts.grammar import NONE
from .errors import UserError
from .heads.level import head_level, heads_available
from .kv_cache import check_kv_bits, make_generation_cache, make_rewindable
from .policy import FixedGamma
from .precision import Precision
from .sampling import resolve_sampler
from .settings import Settings


def speculative_generate_step(
    prompt: mx.array, model: nn.Module, *, draft: "str | Precision | Cascade",
    max_tokens: int = 256, sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None, prompt_cache: Optional[list] = None,
    cached_tokens: Sequence[int] = (), draft_model: Optional[nn.Module] = None,
    draft_head=None, stats: Optional[SpecStats] = None, **values,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)`` like mlx-lm's ``speculative_generate_step``.

    ``draft`` is a draft name (``'a8'``, ``'w-upper'``, ``'a8-g32+kv-upper'``,
    ``'skip-3,14'``, ``'ngram'``, a cascade ``'ngram>a8-g32'``, …), a :class:`Precision`, a
    :class:`Cascade`, or ``'auto'``: after the prefill the cost model picks a draft and adapts
    γ (≤ ``num_draft_tokens``, default 8) to the acceptance it sees, or decodes plainly where
    no draft pays (``stats.auto_reason`` says why). An explicit draft runs
    ``num_draft_tokens`` (default 4) per block, fewer where its top probability falls below
    ``draft_p_min`` or the lookup finds no more. ``values`` are the other decoding settings
    (:class:`~mlx_qspec.settings.Settings`: ``num_draft_tokens``, ``draft_p_min``, ``ngram``,
    ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``, ``prefill_step_size``, ``seed``
    — the key of the draws at temperature > 0; ``kv_mode`` and ``max_kv_size`` shape the
    cache made when ``prompt_cache`` is None). The lookup searches ``cached_tokens`` (the ids
    already in ``prompt_cache``), the prompt and the output. ``draft_model`` (a smaller model
    with the same tokenizer, or a :class:`DraftModel`) proposes below ``draft``'s levels
    (``draft='none'``: alone). ``draft_head``: the head of the ``head`` level (its
    directory, or a :class:`~mlx_qspec.heads.level.HeadDraft`); ``auto`` weighs it too, and
    the model's own MTP layers where it has them. ``max_tokens < 0`` never stops on its own. ``prompt_cache``
    (one trimmable cache per layer, or a window: mlx-lm's ``RotatingKVCache`` is swapped in
    the list for a rewindable one; a ``NestedKVCache`` list for ``kv-upper``) is updated in
    place. ``logprobs`` are the verify's (after ``logits_processors``). Bad arguments raise
    UserError (a ValueError) here, before any compute.
    """
    named = not isinstance(draft, (Precision, Cascade))
    if prompt_cache is None:  # the settings' cache (KV mode, window)
        s = _settings(values, draft=draft if named else NONE)
        cache = make_generation_cache(model, s.kv_mode, s.max_kv_size)
    else:  # the cache's KV mode
        cache = make_rewindable(prompt_cache, model)
        s = _settings(values, kv_mode=kv_mode(cache), draft=draft if named else NONE)
    check_kv_bits(cache, s.kv_bits)
    if draft_model is not None and not isinstance(draft_model, DraftModel):
        draft_model = DraftModel(hooks.install(draft_model))
    if draft_model is None and named and s.draft.none:
        raise UserError(f"speculative decoding needs a draft, got {draft!r}")
    if s.draft.auto and draft_model is not None:
        raise UserError("--draft auto weighs self-drafts only; with a draft model pass "
                        "--draft none or a level")
    if isinstance(draft_head, (str, Path)):
        draft_head = head_level(model, draft_head)
    cascade = None if s.draft.auto else build(model, draft if not named else s.draft,
                                             kv_mode(cache), s.ngram, draft_model, draft_head)
    dist = resolve_sampler(sampler)
    # auto on a model whose recurrent state cannot be rewound decodes plainly (explicit
    # drafts were refused by ``build``): mlx-lm's generate_step, on mlx-lm's caches
    unrewindable = cascade is None and recurrent.unsupported(model) is not None
    if not unrewindable and not can_trim_prompt_cache(cache):
        types = {type(c).__name__ for c in cache if not c.is_trimmable()}
        raise UserError(f"speculative decoding needs a trimmable prompt cache, got {types}")
    if prompt.size == 0:
        raise UserError("the prompt is empty")
    row = Row.new(prompt[-1].item(), dist, s.seed, max_tokens, stats, logits_processors)
    if unrewindable:
        row.stats.draft, row.stats.auto_reason = NONE, NOT_REWINDABLE
        row.stats.num_draft_tokens = s.num_draft_tokens or 0
        return _generate(prompt, hooks.install(model), cache, row, s, None, None, plain=True)
    return _generate(prompt, hooks.install(model), cache, row, s, cascade,
                     list(cached_tokens), draft_head=draft_head)


def plain_generate_step(prompt: mx.array, model: nn.Module, *, max_tokens: int = 256,
                        sampler=None, logits_processors=None, prompt_cache=None,
                        stats: Optional[SpecStats] = None, **values):
    """Plain decoding through the same layers and attention as speculation: the prompt's
    first n − 1 tokens prefilled in mlx-lm's chunks, then mlx-lm's own ``generate_step``.
    ``values``: the KV settings (``kv_bits``, ``max_kv_size``, …), ``prefill_step_size``,
    ``seed`` (the key of its draws)."""
    s = _settings(values)
    cache = (make_generation_cache(model, s.kv_mode, s.max_kv_size, plain=True)
             if prompt_cache is None else prompt_cache)
    check_kv_bits(cache, s.kv_bits)
    row = Row.new(prompt[-1].item(), sampler, s.seed, max_tokens,
                  SpecStats(draft=NONE) if stats is None else stats, logits_processors)
    return _generate(prompt, hooks.install(model), cache, row, s, None, None, plain=True)


def _settings(values: dict, **given) -> Settings:
    """The settings of ``values`` (:func:`~mlx_qspec.settings.resolve`); nothing else may be
    among them."""
    s = settings_module.resolve(values, **given)
    if values:
        raise TypeError(f"unexpected keyword arguments: {', '.join(values)}")
    return s


def _generate(prompt, model, cache, row: Row, s: Settings, cascade, cached_tokens, *,
              plain: bool = False, draft_head=None):
    """Prefill, the policy, then the decoder's blocks; the cache left holding the prompt
    and every yielded token but the last, however the consumer stops."""
    prompt = prompt.astype(mx.uint32)
    if row.processors:
        row.history = prompt
    emitted = 0
    with mx.stream(generation_stream):
        t0 = time.perf_counter()
        start = None if plain else position(cache)  # (mlx-lm's recurrent caches count none)
        keep_hidden = not plain and (cascade.reads_hidden if cascade is not None
                                     else heads_available(model, draft_head))
        hidden = [] if keep_hidden else None
        prefill(model, prompt[:-1], cache, s.prefill_step_size, lambda: quantize_kv(cache, s),
                hidden)
        if hidden:
            row.keep_hidden(mx.concatenate(hidden, axis=1)[0])
        if plain:
            policy = None
        elif cascade is None:
            policy = AutoPolicy(model, cache, s.ngram, s.num_draft_tokens, draft_head)
        else:
            policy = FixedGamma(cascade, s.gamma)
        if policy is not None and policy.reads_context:
            row.context = cached_tokens + prompt.tolist()
        row.stats.prefill_time += time.perf_counter() - t0
        decoder = Decoder(model, cache, [row], policy, s, keep_hidden=keep_hidden)
        if plain:  # the cache as mlx-lm's generate_step leaves it
            yield from decoder.decode_plainly(settle=False)
            return
        try:
            for out in decoder.generate():
                emitted += 1
                yield out
        finally:
            rewind(cache, start + prompt.size + emitted - 1)
            decoder.close()
