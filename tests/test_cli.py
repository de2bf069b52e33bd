"""The CLI: pipe-friendly stdout, a parseable --verbose summary, one-line errors with exit 2."""

import os
import subprocess
import sys

import pytest

from mlx_qspec.generate import main

PROMPT = "What is the capital of France?"


def _run(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlx_qspec.generate", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=600,
    )


def _summary(stderr):
    last = stderr.strip().splitlines()[-1]
    return dict(field.split("=", 1) for field in last.split())


def test_default_model_speculative_equals_plain_and_summary_parses():
    spec = _run("--prompt", PROMPT, "--max-tokens", "10", "--verbose")
    plain = _run("--prompt", PROMPT, "--max-tokens", "10", "--draft", "none")
    assert spec.returncode == 0, spec.stderr
    assert plain.returncode == 0, plain.stderr
    assert "Paris" in spec.stdout
    assert spec.stdout == plain.stdout
    assert plain.stderr == ""
    fields = _summary(spec.stderr)
    for key in ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps",
                "peak_memory_gb", "acceptance", "tokens_per_verify"):
        assert key in fields, key
    assert int(fields["generation_tokens"]) >= 1
    assert 0.0 <= float(fields["acceptance"]) <= 1.0
    assert 1.0 <= float(fields["tokens_per_verify"]) <= 5.0
    assert fields["draft"] != "none"


def test_prompt_from_stdin():
    out = _run("--prompt", "-", "--max-tokens", "6", "--draft", "none", stdin=PROMPT)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    out = _run("--model", str(tmp_path / "nope.gguf"), "--prompt", "hi")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "nope.gguf" in out.stderr and "does not exist" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "-5"], "--max-tokens"),
        (["--temp", "-0.5"], "--temp"),
        (["--kv-bits", "3"], "--kv-bits"),
        (["--kv-bits", "16"], "--kv-bits"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "   "], "prompt is empty"),
        (["--draft", "a5"], "unknown draft mode"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens"),
        (["--num-draft-tokens", "33"], "num_draft_tokens"),
        (["--model", "no-such-org/no-such-model"], "not in the Hugging Face cache"),
        (["--max-kv-size", "64", "--draft", "a8"], "--max-kv-size cannot be combined"),
        (["--kv-group-size", "48"], "--kv-group-size"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(args, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        main(["--prompt", "hi", *args] if "--prompt" not in args else args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path), "--prompt", "hi"])
    assert exc.value.code == 2
    assert "not a model directory" in capsys.readouterr().err
