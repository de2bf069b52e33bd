"""The generation API: ``generate`` / ``stream_generate``, mlx-lm's, speculating.

Same arguments, same prompt handling (no chat template; the CLI applies it), same responses,
plus the decoding settings (:class:`~mlx_qspec.settings.Settings`: ``draft=``,
``num_draft_tokens=``, ``kv_mode=``, …) as keyword arguments or one ``settings=`` value. With
no draft, tokens come from mlx-lm's own ``generate_step`` through our layers, so plain output
is mlx-lm's output.
"""

import sys
import time
from dataclasses import dataclass
from typing import Any, Generator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as _MLXGenerationResponse
from mlx_lm.generate import wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import settings as settings_module
from .decoder import SpecStats
from .drafts.cascade import resolve
from .drafts.grammar import NONE
from .errors import UserError
from .kernels import backend
from .speculative import plain_generate_step, speculative_generate_step
from .vocabulary import check_token_ids, vocabulary_size


@dataclass
class GenerationResponse(_MLXGenerationResponse):
    """mlx-lm's response plus the statistics so far (:class:`SpecStats`: the draft used,
    acceptance, tokens per verify, bytes read per token)."""

    stats: Optional[Any] = None


def _encode_prompt(tokenizer: TokenizerWrapper, prompt, vocab_size: Optional[int]) -> mx.array:
    """As mlx-lm: a string gets special tokens unless it already starts with BOS. Token ids
    given as such are checked against the vocabulary (UserError naming the bad one)."""
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_special))
    ids = prompt.tolist() if isinstance(prompt, mx.array) else prompt
    if isinstance(ids, (int, float)) or isinstance(prompt, mx.array) and prompt.ndim != 1:
        raise UserError(f"the prompt must be a string or a flat list of token ids, got shape "
                        f"{tuple(getattr(prompt, 'shape', ()))}")
    return mx.array(check_token_ids(ids, vocab_size, "prompt"), mx.uint32)


def _token_generator(model, tokenizer, prompt, max_tokens, kwargs, given):
    """``(its stats, whether it is plain, the generator of (token, logprobs, from_draft))``."""
    s = settings_module.resolve(kwargs, **given)
    kwargs.pop("prompt_progress_callback", None)
    stats = kwargs.pop("stats", None) or SpecStats()
    if s.plain and kwargs.get("draft_model") is None:  # it makes its own cache
        for name in ("draft_model", "draft_head", "cached_tokens"):
            kwargs.pop(name, None)
        stats.draft = NONE
        return stats, True, plain_generate_step(prompt, model, max_tokens=max_tokens, stats=stats,
                                            settings=s, **kwargs)
    s = s.but(draft=resolve(model, tokenizer, s.draft))  # skip-<share>: calibrated blocks
    return stats, False, speculative_generate_step(prompt, model, draft=s.draft,
                                               max_tokens=max_tokens, stats=stats,
                                               settings=s, **kwargs)


def stream_generate(model: nn.Module, tokenizer, prompt: Union[str, mx.array, List[int]],
                    max_tokens: int = 256, draft: Optional[str] = None,
                    num_draft_tokens: Optional[int] = None, kv_mode: Optional[str] = None,
                    **kwargs) -> Generator[GenerationResponse, None, None]:
    """Yield :class:`GenerationResponse` objects as text is generated.

    ``draft``: ``None`` / ``"none"`` for plain decoding, a draft name (``"a8"``,
    ``"w-upper"``, ``"a8-g32+kv-upper"``, ``"ngram>a8-g32"``, …) for self-speculative
    decoding with ``num_draft_tokens`` drafted tokens per verify pass (default 4), or
    ``"auto"``: the cost model picks a draft and γ, or plain decoding where none pays.
    ``kv_mode``: ``"fp"`` (mlx-lm's cache), ``"8bit"`` or ``"nested"`` (8-bit as two 4-bit
    planes; ``kv-upper`` drafts read the upper one). Other keyword arguments: the other
    settings (``kv_bits``, ``max_kv_size``, ``draft_p_min``, ``ngram``, ``seed``, …, or all of
    them as ``settings=``), and mlx-lm's ``sampler``, ``logits_processors``,
    ``prompt_cache``, plus ``draft_model`` (a smaller model proposing below ``draft``; alone
    with ``draft="none"``), ``draft_head`` (the directory of a head trained for the model,
    for ``draft="head"``; ``auto`` weighs it) and ``cached_tokens`` (the ids already in
    ``prompt_cache``).
    """
    if max_tokens == 0:
        raise UserError("Maximum number of tokens must be non-zero (use -1 for no limit).")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode_prompt(tokenizer, prompt, vocabulary_size(model))
    if prompt.size == 0:
        raise UserError("The prompt is empty.")
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    given = dict(draft=draft, num_draft_tokens=num_draft_tokens, kv_mode=kv_mode)  # None: not given
    stats, plain, token_generator = _token_generator(model, tokenizer, prompt, max_tokens,
                                                        kwargs, given)

    def response(n, token, logprobs, from_draft, finish_reason=None):
        return GenerationResponse(
            text=detokenizer.last_segment, token=token, logprobs=logprobs,
            from_draft=from_draft, prompt_tokens=prompt.size, prompt_tps=prompt_tps,
            generation_tokens=n + 1, generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason,
            stats=stats,
        )

    with wired_limit(model):
        tic = time.perf_counter()
        for n, (token, logprobs, from_draft) in enumerate(token_generator):
            if n == 0:
                # mlx-lm's prompt time ends when the first token is known. A draft's first
                # block makes several known at once, after drafting them: there the prompt
                # time ends with the prefill and the block counts as generation (else a
                # block-long output would take no time at all).
                prompt_time = time.perf_counter() - tic if plain else stats.prefill_time
                prompt_tps = prompt.size / prompt_time
                tic += prompt_time
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if (n + 1) == max_tokens:
                break
            yield response(n, token, logprobs, from_draft)
        token_generator.close()
        detokenizer.finalize()
        finish_reason = "stop" if token in tokenizer.eos_token_ids else "length"
        yield response(n, token, logprobs, from_draft, finish_reason)


def generate(model: nn.Module, tokenizer, prompt: Union[str, List[int]], verbose: bool = False,
             **kwargs) -> str:
    """Generate a complete response; arguments as :func:`stream_generate`.
    ``verbose`` streams the text to stdout and a summary line to stderr."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print(flush=True)
        print(summary_line(response), file=sys.stderr)
    return text


def summary_line(response: GenerationResponse) -> str:
    """One ``key=value`` line that scripts parse. Bytes are counted reads per emitted token
    (this machine's dtypes): the drafts', the verifies', both, and plain decoding's."""
    stats = response.stats
    fields = {
        "prompt_tokens": response.prompt_tokens,
        "prompt_tps": f"{response.prompt_tps:.3f}",
        "generation_tokens": response.generation_tokens,
        "generation_tps": f"{response.generation_tps:.3f}",
        "peak_memory_gb": f"{response.peak_memory:.3f}",
        "finish_reason": response.finish_reason,
        "kernels": backend(),
        "draft": stats.draft,
    }
    if stats.auto_reason:
        fields["auto_reason"] = stats.auto_reason
    if stats.measured_speedup is not None:
        fields["measured_speedup"] = f"{stats.measured_speedup:.3f}"
    if stats.drafted or stats.draft != NONE:
        fields.update({k: getattr(stats, k)
                       for k in ("num_draft_tokens", "drafted", "accepted", "verify_passes")})
        fields.update({k: f"{getattr(stats, k):.3f}" for k in ("acceptance", "tokens_per_verify")})
    per_token = stats.bytes_per_token()
    fields.update(
        draft_bytes_per_token=f"{per_token['draft']:.0f}",
        verify_bytes_per_token=f"{per_token['verify']:.0f}",
        bytes_per_token=f"{per_token['total']:.0f}",
        plain_bytes_per_token=f"{per_token['plain']:.0f}",
    )
    return " ".join(f"{k}={v}" for k, v in fields.items())
