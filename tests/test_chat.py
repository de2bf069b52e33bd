"""python -m mlx_qspec.chat: mlx_lm.chat's loop driven through stdin, and the conversation's
cache kept between turns so that a speculative conversation is the plain one token for token."""

import os
import signal
import subprocess
import sys
import threading

from mlx_qspec import load
from mlx_qspec.chat import Conversation, setup_arg_parser
from mlx_qspec.cli import check_before_load
from mlx_qspec.generate import stream_generate
from helpers import default_sigint

QUESTIONS = ["Name three colours.", "And three animals?"]


def chat(tiny_gguf, draft, max_tokens="12", **popen):
    """``python -m mlx_qspec.chat`` on the tiny model, its stdin, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_qspec.chat", "--model", tiny_gguf, "--max-tokens", max_tokens,
         "--draft", draft],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), **popen)


def answers(stdout: bytes) -> list:
    """The streamed answers: each turn's text before its stats line, without the UI's own
    lines (help, reset, ignored message, the draft's numbers)."""
    lines = stdout.decode().splitlines()
    body = lines[[i for i, line in enumerate(lines) if "commands" in line][0] + 1:]
    out, turn = [], []
    for line in body:
        if "tok/s" in line:
            out.append("\n".join(turn))
            turn = []
        elif not line.strip().startswith(("ignored", "commands", "reset",
                                          "draft ")):
            turn.append(line)
    return out


def test_chat_through_stdin_speculative_equals_plain(tiny_gguf):
    """Two turns, a message that is not UTF-8 (ignored, the chat goes on), ``h``, ``r`` and
    the first question again, then end of input: exit 0; the speculative transcript is the
    plain one; after ``r`` the first answer comes back (the reset cleared the context), and
    the second answer differs from what the first question alone gets."""
    script = ("\n".join([QUESTIONS[0], QUESTIONS[1]]) + "\n").encode() + b"caf\xe9\nh\nr\n" + (
        QUESTIONS[0] + "\n").encode()
    procs = {d: chat(tiny_gguf, d) for d in ("none", "a8-g32")}
    results = {d: p.communicate(script, timeout=120) for d, p in procs.items()}
    for d, (out, err) in results.items():
        assert procs[d].returncode == 0, err
        assert b"Traceback" not in err
        text = out.decode()
        assert "not valid UTF-8 (byte 0xe9 at offset 3)" in text and "context cleared" in text
        assert text.rstrip().endswith("bye")
    plain, spec = answers(results["none"][0]), answers(results["a8-g32"][0])
    assert len(plain) == 3
    assert spec == plain
    assert plain[2] == plain[0]
    assert "tokens per verify" in results["a8-g32"][0].decode()


def _args(*extra):
    return setup_arg_parser().parse_args(["--max-tokens", "10", *extra])


def _conversation(model, tokenizer, flags):
    args = _args(*flags)
    return Conversation(model, tokenizer, args, check_before_load(args))


def _tokens(responses):
    return [r.token for r in responses]


def test_second_turn_is_plain_decoding_of_the_whole_conversation(tiny_gguf):
    """The cache after turn 1 holds its prompt and every generated token (as mlx-lm's): turn
    2 with a draft equals plain decoding of turn 1 + its answer + turn 2 from scratch."""
    model, tokenizer = load(tiny_gguf)
    conversation = _conversation(model, tokenizer, ("--draft", "a8-g32"))
    history = []
    for question in QUESTIONS:
        prompt = conversation.prompt_tokens(question)
        answer = _tokens(conversation.reply(question))
        history += prompt
        reference = _tokens(stream_generate(model, tokenizer, history, max_tokens=10))
        assert answer == reference
        history += answer
        assert conversation.offset == len(history)


def test_an_interrupted_answer_leaves_no_trace(tiny_gguf):
    model, tokenizer = load(tiny_gguf)
    conversation = _conversation(model, tokenizer, ("--draft", "a8-g32"))
    first = _tokens(conversation.reply(QUESTIONS[0]))
    start = conversation.offset
    reply = conversation.reply(QUESTIONS[1])
    next(reply), next(reply)
    reply.close()  # what Ctrl-C does to the loop
    assert conversation.offset > start
    assert conversation.rewind(start) and conversation.offset == start
    fresh = _conversation(model, tokenizer, ("--draft", "none"))
    assert _tokens(fresh.reply(QUESTIONS[0])) == first
    assert _tokens(conversation.reply(QUESTIONS[1])) == _tokens(fresh.reply(QUESTIONS[1]))


def _read_until(stream, seen: bytearray, marker: bytes, after: bytes = b"") -> None:
    """Read into ``seen`` until ``marker`` shows after the last ``after`` (or anywhere)."""
    while marker not in (seen[seen.rfind(after) + len(after):] if after else seen):
        chunk = stream.read1(4096)
        assert chunk, bytes(seen)
        seen += chunk


def test_ctrl_c_stops_the_answer_then_leaves_at_the_prompt(tiny_gguf):
    """Ctrl-C during an answer (here an endless one) stops it and the chat goes on; at the
    prompt it leaves with exit 130; never a traceback."""
    proc = chat(tiny_gguf, "a8-g32", max_tokens="-1", preexec_fn=default_sigint)
    watchdog = threading.Timer(120, proc.kill)  # a chat stuck at its prompt fails, not hangs
    watchdog.start()
    seen = bytearray()
    proc.stdin.write(f"{QUESTIONS[0]}\n".encode())
    proc.stdin.flush()
    _read_until(proc.stdout, seen, b"help\n")
    assert proc.stdout.read1(4096)  # the answer streams
    proc.send_signal(signal.SIGINT)
    _read_until(proc.stdout, seen, b"interrupted")
    proc.stdin.write(b"h\n")
    proc.stdin.flush()
    _read_until(proc.stdout, seen, b"commands", after=b"interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    watchdog.cancel()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
