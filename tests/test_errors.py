"""A user mistake is one line and exit 2; a bug is not dressed up as one: it keeps its
traceback and exits 1, so it gets reported instead of blamed on the user."""

import importlib
import subprocess
import sys

import pytest

from helpers import refused
from mlx_qspec.errors import ModelError, UserError

# The commands' code (where their names are bound), not the functions of the same name that
# mlx_qspec exports.
MODEL = sys.executable  # a file that exists (checked before loading); load itself is replaced
generate = importlib.import_module("mlx_qspec.commands.generate")
convert = importlib.import_module("mlx_qspec.commands.convert")


def boom(exc):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


@pytest.mark.parametrize("exc", [UserError("bad thing"), ModelError("bad model")])
def test_user_errors_exit_2_in_one_line(exc, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load", boom(exc))
    line = refused(capsys, generate.main, "--model", MODEL, "--prompt", "hi")
    assert line == f"mlx_qspec.generate: error: {exc}"


def test_bad_flag_exits_2(capsys):
    assert "unrecognized arguments: --no-such-flag" in refused(capsys, generate.main, "--no-such-flag")


@pytest.mark.parametrize("exc", [RuntimeError("internal"), KeyError("internal"),
                                 ValueError("an internal invariant")])
def test_generate_lets_bugs_through(exc, monkeypatch):
    """Not a SystemExit(2): the original exception reaches the interpreter."""
    monkeypatch.setattr(generate, "load", boom(exc))
    with pytest.raises(type(exc)):
        generate.main(["--model", MODEL, "--prompt", "hi"])


def test_convert_lets_a_bug_value_error_through(monkeypatch, tmp_path):
    """convert tells them apart completely: a plain ValueError is a bug there."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(convert, "load_gguf", boom(ValueError("internal")))
    with pytest.raises(ValueError, match="internal"):
        convert.main(["--model", str(tmp_path / "m.gguf"), "--mlx-path", str(tmp_path / "out")])


@pytest.mark.parametrize("module, patch, argv", [
    ("generate", "load", ["--model", MODEL, "--prompt", "hi"]),
    ("convert", "load_gguf", ["--model", sys.executable, "--mlx-path", "/nonexistent/out"]),
])
def test_a_bug_exits_1_with_its_traceback(module, patch, argv):
    """As a user sees it: exit status 1 and the traceback, not 'error:' and exit 2."""
    code = (f"import importlib, sys\nm = importlib.import_module('mlx_qspec.commands.{module}')\n"
            f"def {patch}(*a, **k): raise RuntimeError('internal bug')\n"
            f"m.{patch} = {patch}\n"
            f"m.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "RuntimeError: internal bug" in proc.stderr
    assert "error: internal bug" not in proc.stderr
