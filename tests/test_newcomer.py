"""What a newcomer hit (issue 26): each command a new user tried that gave a traceback, a
late check, a message naming the wrong thing or a progress line that lied, pinned."""

import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

import mlx.core as mx

from helpers import build_tiny_model, default_sigint
from helpers.gguf_reference import MHA, write_gguf
from mlx_qspec.drafts import layer_skip
from mlx_qspec.generate import main as generate_main


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory) -> str:
    """A tiny GGUF with three blocks: the fewest a skip draft can choose from."""
    path = tmp_path_factory.mktemp("three") / "three.gguf"
    write_gguf(path, replace(MHA, layers=3), seed=1, embed_std=0.2)
    return str(path)


def _error_line(capsys) -> str:
    """The one line a refused command printed (asserted to be one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


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
    with pytest.raises(SystemExit) as exc:
        generate_main(["--model", tiny_gguf, "--prompt", "hi", "--draft", "skip-0.5"])
    assert exc.value.code == 2
    assert "has 2 blocks; a skip draft needs at least 3" in _error_line(capsys)


@pytest.mark.parametrize("command", ["generate", "chat", "cache_prompt", "convert"])
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
