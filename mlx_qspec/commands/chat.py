"""``python -m mlx_qspec.chat``: the interactive loop of ``mlx_lm.chat``, speculating.

As mlx-lm's, each turn feeds only its own messages (the system prompt, if any, and the
user's) through the chat template, on top of one KV cache kept for the conversation; ``r``
clears it, ``q`` (or end of input) leaves. The cache after a turn holds what mlx-lm's
holds (the prompt and every generated token, the last one included), so a speculative
conversation stays token for token the plain one, turn after turn.
"""

import sys
import termios
from contextlib import contextmanager
from typing import Generator

import mlx.core as mx
from mlx_lm.cli_ui import ChatUI, _make_theme, print_chat_help, print_header_panel
from rich.console import Console

from ..api import GenerationResponse, stream_generate
from ..caches import commit, position, rewind
from ..cli import (
    add_draft_args,
    add_sampling_args,
    check_before_load,
    check_text_args,
    decoding_parser,
    default_model_path,
    integer,
    load_drafts,
    run_cli,
)
from ..decoder import forward
from ..drafts.grammar import NONE
from ..errors import UserError
from ..kv_cache import make_generation_cache
from ..loader import load
from ..settings import Settings
from .. import recurrent

DEFAULT_MAX_TOKENS = 256
DEFAULT_SEED = 0  # mlx_lm.chat seeds 0


def setup_arg_parser():
    parser = decoding_parser("mlx_qspec.chat", "Chat with an LLM, decoding with exactly-lossless "
                             "self-speculation (the flags of mlx_lm.chat, plus the draft's). "
                             "Commands: q exit, r reset, h help.")
    add_sampling_args(parser)
    parser.set_defaults(seed=DEFAULT_SEED)
    parser.add_argument("--max-tokens", "-m", type=integer(1, also=-1),
                        default=DEFAULT_MAX_TOKENS,
                        help="Maximum number of tokens to generate per turn (-1: no limit)")
    parser.add_argument("--system-prompt", default=None,
                        help="System prompt to be used for the chat template")
    add_draft_args(parser)
    return parser


class Conversation:
    """One KV cache across turns, and the turns' generation on top of it."""

    def __init__(self, model, tokenizer, args, settings: Settings):
        """``settings``: those ``args`` give, as :func:`cli.check_before_load` returned them."""
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.sampler, self.draft_model, self.draft_head, self.settings = load_drafts(
            args, settings, model, tokenizer)  # (the head: one head cache per chat)
        self.turns = 0  # each turn draws from its own key: the seed + the turn's number
        self.reset()

    def reset(self):
        s = self.settings
        plain = s.plain and self.draft_model is None
        self.cache = make_generation_cache(self.model, s.kv_mode, s.max_kv_size, plain)
        self.tokens: list[int] = []  # what the cache holds: the ngram draft looks up in it

    @property
    def offset(self) -> int:
        return position(self.cache)

    def prompt_tokens(self, query: str) -> list:
        """This turn's tokens: mlx_lm.chat's messages through the chat template."""
        messages = [] if self.args.system_prompt is None else [
            {"role": "system", "content": self.args.system_prompt}]
        messages.append({"role": "user", "content": query})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def reply(self, query: str) -> Generator[GenerationResponse, None, None]:
        """Stream the answer to ``query``; the cache then holds the turn, last token included."""
        start, tokens = self.offset, self.prompt_tokens(query)
        response, emitted = None, []
        seed = self.settings.seed
        settings = self.settings.but(seed=None if seed is None else (seed + self.turns) % 2**63)
        self.turns += 1
        for response in stream_generate(
            self.model, self.tokenizer, tokens, max_tokens=self.args.max_tokens,
            settings=settings, sampler=self.sampler, prompt_cache=self.cache,
            cached_tokens=self.tokens, draft_model=self.draft_model, draft_head=self.draft_head,
        ):
            emitted.append(response.token)
            yield response
        # Plain decoding (mlx-lm's generate_step) has already fed the last token it yielded;
        # the speculative loop leaves it out. Feed it, as plain decoding's one-row step does.
        missing = start + len(tokens) + response.generation_tokens - self.offset
        if missing == 1:
            forward(self.model, mx.array([[response.token]]), self.cache)
            mx.eval([c.state for c in self.cache])
            commit(self.cache)
        elif missing != 0:
            raise RuntimeError(f"the cache is {missing} tokens short after a turn")
        self.tokens = self.tokens + list(tokens) + emitted

    def rewind(self, offset: int) -> bool:
        """Back to ``offset`` (an interrupted turn leaves no trace), or False where the cache
        cannot go back (a window that has moved on)."""
        try:
            rewind(self.cache, offset)
        except ValueError:
            return False
        self.tokens = self.tokens[:offset]
        return all(c.offset == offset for c in self.cache if hasattr(c, "offset"))


class _UI(ChatUI):
    """mlx_lm.chat's UI under our name, with the draft's numbers after each turn; read from
    a pipe (not a terminal), it takes plain lines and ends at end of input; written to a file,
    it writes no colours."""

    def __init__(self, args, model_name: str):
        super().__init__(args)
        self._model_name = model_name
        if not sys.stdout.isatty():
            self._console = Console(theme=_make_theme(), highlight=False, color_system=None)

    def __enter__(self):
        a = self._args
        rows = [("model", self._model_name), ("draft", a.draft)]
        if a.adapter_path:
            rows.append(("adapter", str(a.adapter_path)))
        rows.append(("max tokens", f"{a.max_tokens:,}"))
        if a.system_prompt:
            sp = a.system_prompt
            rows.append(("system", sp if len(sp) <= 60 else sp[:57] + "..."))
        print_header_panel(self._console, "mlx_qspec.chat", rows)
        print_chat_help(self._console)
        return self

    def prompt(self) -> str:
        """The next message; UnicodeDecodeError where its bytes are not UTF-8. At a terminal,
        what was typed while the answer streamed is dropped first: a 'q' typed then must not
        end the chat as the next message."""
        if sys.stdin.isatty():
            termios.tcflush(sys.stdin.fileno(), termios.TCIFLUSH)
            return super().prompt()
        line = sys.stdin.buffer.readline()
        if not line:
            raise EOFError
        return line.decode("utf-8").rstrip("\n")

    def say_not_utf8(self, e: UnicodeDecodeError):
        self._console.print(f"  [ui.warn]ignored[/ui.warn] [ui.muted]the message is not valid "
                            f"UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
                            "[/ui.muted]")

    def end_turn(self, response):
        super().end_turn(response)
        stats = response.stats if response is not None else None
        if stats is not None and (stats.drafted or stats.draft != NONE):
            self._console.print(
                f"  [ui.muted]draft {stats.draft} · acceptance {stats.acceptance:.2f} · "
                f"{stats.tokens_per_verify:.2f} tokens per verify[/ui.muted]")

    def say_interrupted(self, kept: bool):
        what = "the answer was dropped" if kept else "context cleared"
        self._console.print(f"  [ui.warn]interrupted[/ui.warn] [ui.muted]{what}[/ui.muted]")


@contextmanager
def keys_not_echoed():
    """While an answer streams to a terminal, keys typed are not echoed into it (the
    prompt drops them after)."""
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # the local modes
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def run(args, parser) -> None:
    check_text_args(parser, args)
    settings = check_before_load(args)  # as generate: its mistakes before the model loads
    model_name = str(args.model or default_model_path())
    model, tokenizer = load(model_name, adapter_path=args.adapter_path,
                            trust_remote_code=args.trust_remote_code)
    recurrent.check_conversational(model, "mlx_qspec.chat")
    if not tokenizer.has_chat_template:
        raise UserError(f"the model {model_name} has no chat template; "
                        "use python -m mlx_qspec.generate")
    conversation = Conversation(model, tokenizer, args, settings)
    with _UI(args, model_name) as ui:
        while True:
            try:
                query = ui.prompt()
            except EOFError:
                query = "q"
            except UnicodeDecodeError as e:  # one bad message does not end the conversation
                ui.say_not_utf8(e)
                continue
            if query == "q":
                ui.say_bye()
                return
            if query == "r":
                conversation.reset()
                ui.say_reset()
                continue
            if query == "h":
                ui.say_help()
                continue
            start, response = conversation.offset, None
            try:
                with keys_not_echoed():
                    for response in conversation.reply(query):
                        ui.stream_token(response.text)
            except KeyboardInterrupt:  # this answer stops; the conversation goes on
                kept = conversation.rewind(start)
                if not kept:
                    conversation.reset()
                print()
                ui.say_interrupted(kept)
                continue
            ui.end_turn(response)


def main(argv=None):
    """Ctrl-C at the prompt leaves (exit 130); during an answer it stops that answer."""
    run_cli(setup_arg_parser(), argv, run)

