"""What a newcomer hit (issue 26): each command a new user tried that gave a traceback, a
late check, a message naming the wrong thing or a progress line that lied, pinned."""

import io
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_qspec
from helpers import build_tiny_model, default_sigint, refused
from helpers.gguf_reference import MHA, write_gguf
from mlx_qspec import decoder
from mlx_qspec.bench import main as bench_main
from mlx_qspec.cache_prompt import main as cache_prompt_main
from mlx_qspec.chat import main as chat_main
from mlx_qspec.cli import default_model_path
from mlx_qspec.commands import bench, cache_prompt, chat, generate, server
from mlx_qspec.controller import Controller
from mlx_qspec.convert import main as convert_main
from mlx_qspec.drafts import layer_skip
from mlx_qspec.generate import main as generate_main
from mlx_qspec.train_head import main as train_head_main


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory) -> str:
    """A tiny GGUF with three blocks: the fewest a skip draft can choose from."""
    path = tmp_path_factory.mktemp("three") / "three.gguf"
    write_gguf(path, replace(MHA, layers=3), seed=1, embed_std=0.2)
    return str(path)


def test_a_cache_dir_that_cannot_be_written_degrades_to_memory_with_one_line(
        three_blocks, tmp_path, monkeypatch, capsys):
    """A read-only home, a sandbox or a full disk must not stop decoding: the rebuilt
    tokenizer, the skip calibration and auto's measured costs all stay in memory, with one
    line naming the folder; the second run of the process still finds the calibration."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(blocker))  # the cache dir is a regular file
    for draft in ("skip-0.5", "auto", "skip-0.5"):
        generate_main(["--model", three_blocks, "--prompt", "hello", "--max-tokens", "4",
                       "--draft", draft])
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 3
    assert err.count("cannot write to the cache folder") == 1 and str(blocker) in err
    assert err.count("skip calibration (forwards) 0/") == 1  # kept in memory: calibrated once
    assert "Traceback" not in err


def test_a_skip_share_on_a_model_too_small_is_refused_before_calibrating(tiny_gguf, capsys):
    line = refused(capsys, generate_main, "--model", tiny_gguf, "--prompt", "hi", "--draft", "skip-0.5")
    assert "has 2 blocks; a skip draft needs at least 3" in line


@pytest.mark.parametrize("command", ["generate", "chat", "cache_prompt", "convert", "server"])
def test_ctrl_c_while_the_imports_run_exits_130_without_a_traceback(command):
    """The seconds spent importing MLX, mlx-lm and transformers are the command's too: Ctrl-C
    there ends it as later (exit 130), not with a KeyboardInterrupt traceback. The signal is
    sent once MLX's first module has been imported (-X importtime says when)."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", f"mlx_qspec.{command}", "--help"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seen = []
    for line in proc.stderr:
        seen.append(line.decode())
        if seen[-1].split("|")[-1].strip().startswith("mlx."):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    err = "".join(seen) + err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "mlx_qspec.commands." not in "".join(seen)  # sent while the code was importing
    assert out.decode() == "\n"  # one line ended: nothing else printed


def test_skip_calibration_shows_progress_counted_after_each_forward(monkeypatch):
    """``skip-<share>`` calibrates for minutes on a CPU: it reports 0/total at once, then
    each forward once it has run (the count never runs ahead of the work)."""
    model = build_tiny_model(num_hidden_layers=5)
    forwards, seen = [], []
    call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__",
                        lambda self, *a, **k: forwards.append(1) or call(self, *a, **k))
    tokens = mx.array([[(7 * i) % 256 for i in range(24)]])
    layer_skip.calibrate(model, tokens, 0.4, lambda done, total: seen.append((done, total,
                                                                              len(forwards))))
    total = seen[0][1]
    assert [d for d, _, _ in seen] == list(range(total + 1))
    assert total == len(forwards) == 5 + 4 + 3  # reference, 4 single blocks, 2 greedy steps
    assert all(done == ran for done, _, ran in seen)


def test_a_prompt_cache_is_refused_for_another_model_at_the_same_path(tmp_path, capsys):
    """The cache records the model it was made with; another model saved at the same path
    (here the same shapes, other weights) is refused in one line, not decoded on."""
    model, file = tmp_path / "m.gguf", str(tmp_path / "s.safetensors")
    write_gguf(model, MHA, seed=1, embed_std=0.2)
    cache_prompt_main(["--model", str(model), "--prompt", "Colours:", "--prompt-cache-file", file])
    args = ["--model", str(model), "--prompt-cache-file", file, "--prompt", "Which?",
            "--max-tokens", "3"]
    generate_main(args)  # the same model: accepted
    write_gguf(model, MHA, seed=2, embed_std=0.2)
    line = refused(capsys, generate_main, *args)
    assert "was made with another model" in line and "cache_prompt" in line
    write_gguf(model, replace(MHA, layers=3), seed=1, embed_std=0.2)
    assert "was made with another model" in refused(capsys, generate_main, *args)


def test_cache_prompt_checks_its_file_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache_prompt, "load", lambda *a, **k: pytest.fail("loaded first"))
    (tmp_path / "d.safetensors").mkdir()
    for main, path, says in (
            (cache_prompt_main, tmp_path / "no" / "c.safetensors", f"'{tmp_path / 'no'}' does not exist"),
            (cache_prompt_main, tmp_path, "must end in .safetensors"),
            (cache_prompt_main, tmp_path / "d.safetensors", "is a directory"),
            (generate_main, tmp_path / "d.safetensors", "is a directory")):
        line = refused(capsys, main, "--prompt", "hi", "--prompt-cache-file", str(path))
        assert says in line, line


def test_prefill_progress_is_reported_after_the_chunk_is_evaluated(monkeypatch):
    """MLX is lazy: a chunk's work is done when it is evaluated. cache_prompt's progress came
    before (431/431 printed, then minutes of silence)."""
    model = build_tiny_model()
    events = []
    evaluate = mx.eval
    monkeypatch.setattr(decoder.mx, "eval", lambda *a: events.append("eval") or evaluate(*a))
    decoder.prefill(model, mx.arange(10, dtype=mx.uint32), make_prompt_cache(model), 4,
                    after=lambda: events.append("after"),
                    progress=lambda done, total: events.append((done, total)))
    assert events == ["after", "eval", (4, 10), "after", "eval", (8, 10), "after", "eval",
                      (10, 10)]


@pytest.fixture
def junk_adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


@pytest.mark.parametrize("argv, says", [
    (["--draft", "kv-upper"], "pass --kv-mode nested"),
    (["--draft", "bogus"], "unknown draft term 'bogus'"),
    (["--kv-mode", "nested", "--max-kv-size", "64"], "--max-kv-size applies to --kv-mode fp"),
    (["--adapter-path", "JUNK"], "adapter_config.json: no num_layers"),
    (["--draft-head", "/no/such/head"], "--draft-head '/no/such/head' is not a directory"),
])
def test_chat_checks_what_generate_checks_before_loading(argv, says, junk_adapter, capsys,
                                                         monkeypatch):
    """With stdin at its end too: the mistake is one line and exit 2, before any model
    loads or the chat shows its prompt (it exited 0 at end of input and never said)."""
    monkeypatch.setattr(chat, "load", lambda *a, **k: pytest.fail("loaded first"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    argv = [junk_adapter if a == "JUNK" else a for a in argv]
    line = refused(capsys, chat_main, *argv)
    assert says in line and line.startswith("mlx_qspec.chat: error:"), line


def test_a_junk_adapter_is_named_before_loading(junk_adapter, capsys, monkeypatch):
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("loaded first"))
    line = refused(capsys, generate_main, "--adapter-path", junk_adapter)
    assert f"{junk_adapter}/adapter_config.json: no num_layers" in line
    assert "SimpleNamespace" not in line


def test_settings_refused_after_loading_name_their_flags(tiny_gguf, capsys):
    """A window too small for the positions it keeps is found when the cache is made: the
    message names --max-kv-size, not the Python name."""
    line = refused(capsys, generate_main, "--model", tiny_gguf, "--max-kv-size", "2",
                    "--draft", "a8")
    assert line.startswith("mlx_qspec.generate: error: --max-kv-size must exceed"), line


def test_a_gguf_is_recognised_by_its_magic_whatever_its_extension(tiny_gguf, tmp_path):
    renamed = tmp_path / "model.txt"
    shutil.copy(tiny_gguf, renamed)
    outs = [mlx_qspec.generate(*mlx_qspec.load(str(path)), "hello", max_tokens=4)
            for path in (tiny_gguf, renamed)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv, says", [
    (["--model", "GGUF", "--mlx-path", "FILE"], "is a file; name a directory"),
    (["--model", "GGUF", "--mlx-path", ""], "--mlx-path is empty"),
    (["--model", "GGUF", "--mlx-path", "   "], "--mlx-path is empty"),
    ([], ""),  # argparse's errors
    (["--model", "m.gguf", "--q-bits", "7"], ""),
    (["--model", "m.gguf", "--bogus"], ""),
])
def test_convert_says_what_is_wrong_in_one_line(argv, says, tiny_gguf, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    argv = [{"GGUF": tiny_gguf, "FILE": str(tmp_path / "f")}.get(a, a) for a in argv]
    line = refused(capsys, convert_main, *argv)
    assert line.startswith("mlx_qspec.convert: error:") and says in line, line


def test_help_and_readme_say_what_happens(capsys):
    """Repo ids download (as mlx-lm's); the default model can be named from Python."""
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "downloaded on first use" in text and "from the local cache" not in text
    assert "mlx_qspec.default_model_path()" in text
    assert mlx_qspec.default_model_path() == default_model_path()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "load(default_model_path())" in readme and "2–5 tokens/s" in readme


def _read_pty(fd: int, seen: bytearray, done, timeout: float = 60) -> None:
    """Read the terminal's output into ``seen`` until ``done(seen)`` (or until the child
    closes the terminal, where ``done`` is None)."""
    end = time.monotonic() + timeout
    while done is None or not done(seen):
        assert time.monotonic() < end, bytes(seen[-400:])
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                assert done is None, bytes(seen[-400:])
                return
            seen += chunk


def _shows(marker: bytes, after: int = 0):
    return lambda seen: marker in seen[after:]


def test_chat_q_typed_while_an_answer_streams_is_neither_echoed_nor_the_next_message(tiny_gguf):
    """At a terminal: 'q' typed during an answer used to show inside the answer and then end
    the chat as if typed at the next prompt. It is dropped: the chat waits for a message."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_qspec.chat", "--model", tiny_gguf, "--max-tokens", "300",
         "--draft", "none"], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="80", TERM="dumb"))
    os.close(slave)
    seen, question, marker = bytearray(), b"Name three colours.\r\n", b"\xe2\x80\xba"
    try:
        _read_pty(master, seen, _shows(marker))  # the prompt
        os.write(master, b"Name three colours.\n")
        _read_pty(master, seen, _shows(question))  # echoed as typed
        start = seen.index(question) + len(question)
        _read_pty(master, seen, lambda seen: len(seen) > start + 16)  # the answer streams ...
        assert b"tok/s" not in seen[start:]  # (still streaming)
        os.write(master, b"q\n")  # ... and q is typed
        _read_pty(master, seen, _shows(b"tok/s", start))  # the answer ended
        stats = seen.index(b"tok/s", start)
        answer = bytes(seen[start:stats])
        _read_pty(master, seen, _shows(marker, stats))  # the next prompt
        time.sleep(1.0)
        assert proc.poll() is None, bytes(seen[-400:])  # the typed q did not end the chat
        os.write(master, b"h\n")
        _read_pty(master, seen, _shows(b"commands", stats), timeout=30)
        helped = seen.index(b"commands", stats)
        _read_pty(master, seen, _shows(marker, helped), timeout=30)  # (keys typed before the
        os.write(master, b"q\n")                                    # prompt are dropped)
        _read_pty(master, seen, None, timeout=30)  # to the end: bye
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0 and b"bye" in seen[stats:]
    assert b"q\r\n" not in answer


def test_paths_named_by_flags_are_checked_before_loading_and_name_the_flag(tmp_path, capsys):
    """--draft-model nope.gguf said "model path 'nope.gguf' does not exist" once the model
    had loaded (which model?); train_head --out where nothing can be made was a traceback."""
    line = refused(capsys, generate_main, "--draft-model", str(tmp_path / "nope.gguf"))
    assert line.endswith(f"--draft-model '{tmp_path / 'nope.gguf'}' does not exist")
    (tmp_path / "f").write_text("")
    line = refused(capsys, train_head_main, "--out", str(tmp_path / "f" / "head"))
    assert f"--out '{tmp_path / 'f' / 'head'}': cannot create it" in line
    line = refused(capsys, train_head_main, "--model", str(tmp_path / "nope.gguf"), "--out",
                    str(tmp_path / "new"))  # the model before --out is made
    assert line.endswith(f"--model '{tmp_path / 'nope.gguf'}' does not exist")
    assert not (tmp_path / "new").exists()
    assert refused(capsys, train_head_main, "--out", str(tmp_path / "new"), "--seq-len", "0"
                    ).endswith("argument --seq-len: must be an integer >= 1, got 0")


def test_bench_makes_its_report_folder_before_the_work(tmp_path, capsys, monkeypatch):
    """It wrote the report only after minutes of checks and timings, and a folder it could
    not make was a traceback then; its argparse errors were several lines."""
    monkeypatch.setattr(bench, "load", lambda *a, **k: pytest.fail("loaded first"))
    (tmp_path / "f").write_text("")
    for out, says in ((tmp_path / "f" / "r", "cannot create it"), (tmp_path / "f", "is a file")):
        assert says in refused(capsys, bench_main, "--out", str(out))
    assert refused(capsys, bench_main, "--bogus").startswith("mlx_qspec.bench: error:")


def test_auto_does_not_blame_acceptance_for_a_draft_it_never_timed():
    """A short run on a CPU (no roofline, nothing stored) times plain decoding and stops
    before trying a draft: it said acceptance_too_low(a8-g32_0.97) — untrue. It says the
    draft was not timed yet; once timed, what it measured."""
    controller = Controller({"a8-g32": 0.97, "ngram": 0.44})
    for _ in range(2):  # plain decoding timed first (a warm-up, then timed; 0.2 s a token) ...
        action = controller.next()
        assert action.draft is None
        controller.report(action, 0, 0, action.steps, 0.2 * action.steps)
    assert controller.reason == "not_timed_yet(a8-g32);costs=timed"  # ... and the run ends
    assert "acceptance_too_low" not in controller.reason


def test_the_server_checks_the_paths_it_is_given_before_loading(monkeypatch, capsys):
    """As generate and chat: a wrong --draft-model or --draft-head costs no model load."""
    monkeypatch.setattr(server, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for flags, words in ((["--draft-model", "/nope.gguf"], "--draft-model '/nope.gguf' does not exist"),
                         (["--draft-head", "/nope"], "--draft-head '/nope' is not a directory")):
        assert words in refused(capsys, server.main, *flags)


@pytest.mark.parametrize("flag", ["--kv-group-size", "--quantized-kv-start"])
def test_every_command_refuses_a_kv_flag_without_kv_bits(monkeypatch, capsys, tmp_path, flag):
    """generate refused --kv-group-size 32 alone; the server and cache_prompt take the same
    flags and ignored it: all three refuse it now, before loading."""
    for module in (cache_prompt, server):
        monkeypatch.setattr(module, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    file = str(tmp_path / "c.safetensors")
    for main, argv in ((generate_main, ["--prompt", "hi"]), (server.main, []),
                       (cache_prompt_main, ["--prompt", "hi", "--prompt-cache-file", file])):
        line = refused(capsys, main, *argv, flag, "32")
        assert f"{flag} 32 applies with --kv-bits only" in line, line


def test_cache_prompt_writes_where_it_checked(tiny_gguf, tmp_path, monkeypatch):
    """--prompt-cache-file ~/c.safetensors (quoted, or as --flag=~/…: no shell expands it)
    was checked as $HOME/c.safetensors and then saved to ./~/c.safetensors."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cache_prompt_main(["--model", tiny_gguf, "--prompt", "hi", "--prompt-cache-file",
                       "~/c.safetensors"])
    assert (tmp_path / "c.safetensors").is_file() and not (tmp_path / "work" / "~").exists()
