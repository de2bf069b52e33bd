"""The CLI on the default model: pipe-friendly stdout, a parseable --verbose summary (its
user mistakes, one line and exit 2, are test_cli_parity's)."""

from helpers import run_command, summary
from mlx_qspec.cli import default_model_path

PROMPT = "What is the capital of France?"


def test_default_model_auto_decodes_plainly_on_cpu_and_drafts_stay_exact():
    """On MLX-CPU a verify of k rows costs ~k steps, so the default ``auto`` must measure
    that and decode plainly; an explicit draft gives plain decoding's text (plain reads its
    prompt from stdin, ``--prompt -``: the same prompt, the same text)."""
    verbose = ("generate", "--prompt", PROMPT, "--max-tokens", "10", "--verbose")
    auto = run_command(*verbose)
    plain = run_command("generate", "--prompt", "-", "--max-tokens", "10", "--draft", "none", stdin=PROMPT)
    spec = run_command(*verbose, "--draft", "a8-g32")
    # mlx-lm's --draft-model (the model itself: every draft accepted), and a cascade of the
    # lookup (with its flags) below a self-draft.
    twin = run_command(*verbose, "--draft-model", str(default_model_path()))
    ngram = run_command(*verbose, "--draft", "ngram>a8-g32", "--ngram-min", "2", "--num-draft-tokens", "6")
    for out in (auto, plain, spec, twin, ngram):
        assert out.returncode == 0, out.stderr
    assert "Paris" in plain.stdout
    assert auto.stdout == spec.stdout == plain.stdout == twin.stdout == ngram.stdout
    fields = summary(twin.stderr)
    assert fields["draft"] == "draft-model" and float(fields["acceptance"]) == 1.0
    assert summary(ngram.stderr)["draft"] == "ngram>a8-g32"
    assert plain.stderr == ""
    fields = auto_fields = summary(auto.stderr)
    assert fields["draft"] == "none"
    assert fields["auto_reason"].startswith(
        ("verify_cost_grows_with_rows", "not_timed_yet", "draft_too_costly", "acceptance_too_low",
         "measured_not_faster"))
    assert float(fields["measured_speedup"]) > 0
    assert int(fields["bytes_per_token"]) == int(fields["verify_bytes_per_token"]) > 0
    fields = summary(spec.stderr)
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
