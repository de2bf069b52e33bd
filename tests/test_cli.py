"""The CLI: pipe-friendly stdout, a parseable --verbose summary, one-line errors with exit 2."""

import os
import subprocess
import sys

import pytest

from mlx_qspec.cli import default_model_path
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


def test_default_model_auto_decodes_plainly_on_cpu_and_drafts_stay_exact():
    """On MLX-CPU a verify of k rows costs ~k steps, so the default ``auto`` must measure
    that and decode plainly; an explicit draft gives plain decoding's text (plain reads its
    prompt from stdin, ``--prompt -``: the same prompt, the same text)."""
    auto = _run("--prompt", PROMPT, "--max-tokens", "10", "--verbose")
    plain = _run("--prompt", "-", "--max-tokens", "10", "--draft", "none", stdin=PROMPT)
    spec = _run("--prompt", PROMPT, "--max-tokens", "10", "--draft", "a8-g32", "--verbose")
    # mlx-lm's --draft-model (the model itself: every draft accepted), and a cascade of the
    # lookup (with its flags) below a self-draft.
    twin = _run("--prompt", PROMPT, "--max-tokens", "10", "--draft-model",
                str(default_model_path()), "--verbose")
    ngram = _run("--prompt", PROMPT, "--max-tokens", "10", "--draft", "ngram>a8-g32",
                 "--ngram-min", "2", "--num-draft-tokens", "6", "--verbose")
    for out in (auto, plain, spec, twin, ngram):
        assert out.returncode == 0, out.stderr
    assert "Paris" in plain.stdout
    assert auto.stdout == spec.stdout == plain.stdout == twin.stdout == ngram.stdout
    fields = _summary(twin.stderr)
    assert fields["draft"] == "draft-model" and float(fields["acceptance"]) == 1.0
    assert _summary(ngram.stderr)["draft"] == "ngram>a8-g32"
    assert plain.stderr == ""
    fields = auto_fields = _summary(auto.stderr)
    assert fields["draft"] == "none"
    assert fields["auto_reason"].startswith(
        ("verify_cost_grows_with_rows", "not_timed_yet", "draft_too_costly", "acceptance_too_low",
         "measured_not_faster"))
    assert float(fields["measured_speedup"]) > 0
    assert int(fields["bytes_per_token"]) == int(fields["verify_bytes_per_token"]) > 0
    fields = _summary(spec.stderr)
    for key in ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps",
                "peak_memory_gb", "acceptance", "tokens_per_verify", "draft_bytes_per_token",
                "verify_bytes_per_token", "bytes_per_token", "plain_bytes_per_token"):
        assert key in fields, key
    assert fields["draft"] == "a8-g32"
    assert fields["generation_tokens"] == auto_fields["generation_tokens"]
    assert fields["finish_reason"] == auto_fields["finish_reason"]
    assert int(fields["drafted"]) > 0 and float(fields["acceptance"]) > 0.5
    # An activation draft reads the same weights: drafts plus verifies read more than plain.
    assert int(fields["bytes_per_token"]) > int(fields["plain_bytes_per_token"])


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
        (["--draft", "a5"], "unknown draft term"),
        (["--draft", "a8+a4"], "two ways"),
        (["--kv-mode", "int4"], "--kv-mode"),
        (["--kv-mode", "nested", "--kv-bits", "8"], "--kv-bits applies to --kv-mode fp"),
        (["--draft-p-min", "1.5"], "--draft-p-min"),
        (["--draft", "a8+kv-upper"], "pass --kv-mode nested"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens"),
        (["--num-draft-tokens", "33"], "--num-draft-tokens: must be an integer from 1 to 32"),
        (["--model", "no-such-org/no-such-model"], "not in the Hugging Face cache"),
        (["--max-kv-size", "64", "--kv-mode", "nested", "--draft", "a8"],
         "--max-kv-size applies to --kv-mode fp only"),
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


