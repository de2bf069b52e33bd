"""mlx_qspec.generate as a drop-in for mlx_lm.generate: its flags with mlx-lm's meaning, every
user mistake one line and exit 2 (before any model loads where no model is needed), Ctrl-C
and a closed pipe ending cleanly, honest timings, marked rotated directories, the samplers.

Most runs are in-process (``main(argv)``) on the tiny GGUF of ``test_gguf_reference``
(one token per UTF-8 byte, so token counts are arithmetic); a few go through a subprocess
where only the real process can show it (argv bytes, signals, pipes).
"""

import importlib
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import apply_xtc
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load as mlx_lm_load

from mlx_qspec import load
from mlx_qspec.cache_prompt import main as cache_prompt_main
from mlx_qspec.cli import progress
from mlx_qspec.command import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from mlx_qspec.generate import main, stream_generate
from mlx_qspec.loader import ROTATED_PREFIX
from mlx_qspec.sampling import make_sampler, xtc_cut
from helpers import assert_one_line, default_sigint, refused, run_command, run_main, summary
from helpers.sampling import chi2_pvalue, random_logprobs

PROMPT = "Name three colours."
# the module, not the function of the same name the package exports
generate_module = importlib.import_module("mlx_qspec.generate")


# ---------------------------------------------------------------- mistakes before loading
BEFORE_LOAD = [
    (["--temp", "nan"], "argument --temp: must be a finite number >= 0, got nan"),
    (["--temp", "inf"], "--temp: must be a finite number >= 0, got inf"),
    (["--top-p", "1.5"], "--top-p: must be a finite number in [0, 1], got 1.5"),
    (["--top-p", "-0.1"], "--top-p: must be a finite number in [0, 1], got -0.1"),
    (["--min-p", "2"], "--min-p: must be a finite number in [0, 1]"),  # also at --temp 0
    (["--min-p", "2", "--temp", "0.7"], "--min-p"),
    (["--xtc-probability", "1.5"], "--xtc-probability"),
    (["--xtc-threshold", "0.6"], "--xtc-threshold: must be a finite number in [0, 0.5]"),
    (["--min-tokens-to-keep", "0"], "--min-tokens-to-keep: must be an integer >= 1"),
    (["--top-k", "-1"], "--top-k: must be an integer >= 0"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 18446744073709551615, got -1"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "x"], "--seed: must be an integer, got 'x'"),
    (["--kv-group-size", "32"], "--kv-group-size 32 applies with --kv-bits only"),
    (["--quantized-kv-start", "10"], "--quantized-kv-start 10 applies with --kv-bits only"),
    (["--kv-bits", "8", "--quantized-kv-start", "-1"], "--quantized-kv-start: must be an integer >= 0"),
    (["--max-tokens", "0"], "argument --max-tokens/-m: must be an integer >= 1 (or -1), got 0"),
    (["--max-tokens", "-2"], "--max-tokens/-m"),
    (["--max-tokens", "-5"], "--max-tokens"),
    (["--temp", "-0.5"], "--temp"),
    (["--kv-bits", "3"], "--kv-bits"),
    (["--kv-bits", "16"], "--kv-bits"),
    (["--kv-mode", "int4"], "--kv-mode"),
    (["--kv-mode", "nested", "--kv-bits", "8"], "--kv-bits applies to --kv-mode fp"),
    (["--max-kv-size", "64", "--kv-mode", "nested", "--draft", "a8"],
     "--max-kv-size applies to --kv-mode fp only"),
    (["--kv-group-size", "48"], "--kv-group-size"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens"),
    (["--num-draft-tokens", "33"], "--num-draft-tokens: must be an integer from 1 to 32, got 33"),
    (["--draft-p-min", "nan"], "--draft-p-min: must be a number in [0, 1)"),
    (["--draft-p-min", "1.5"], "--draft-p-min"),
    (["--prefill-step-size", "0"], "--prefill-step-size: must be an integer >= 1"),
    (["--verbose", "maybe"], "--verbose: must be True or False, got 'maybe'"),
    (["--chat-template-config", "{oops"], "--chat-template-config: is not valid JSON"),
    (["--chat-template-config", "[1]"], "--chat-template-config: must be a JSON object"),
    (["--chat-template-config", '{"add_generation_prompt": false}'],
     "--chat-template-config: cannot set add_generation_prompt"),
    (["--draft", "a5"], "--draft a5: unknown draft term"),
    (["--draft", "a8+a4"], "two ways"),
    (["--draft", "a8+kv-upper"], "pass --kv-mode nested"),
    (["--adapter-path", "/no/such/adapter"], "--adapter-path '/no/such/adapter' is not a directory"),
    (["--prompt-cache-file", "/no/such.safetensors"], "--prompt-cache-file '/no/such.safetensors' does not exist"),
    (["--prompt-cache-file", "/dev/null", "--max-kv-size", "64"], "--max-kv-size cannot change the cache"),
    (["--prompt", " \n "], "the prompt is empty"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   "], "prompt is empty"),
    (["--system-prompt", "\udcff"], "--system-prompt is not valid UTF-8 (byte 0xff at character 0)"),
]


@pytest.mark.parametrize("args, message", BEFORE_LOAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_mistakes_fail_before_the_model_loads(args, message, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(generate_module, "load", no_load)
    code, out, err = run_main(capsys, main, *(["--prompt", "hi"] if "--prompt" not in args else []), *args)
    assert_one_line(code, err, message)
    assert out == ""


def test_draft_list_names_auto_and_none(capsys, monkeypatch):
    line = refused(capsys, main, "--prompt", "hi", "--draft", "bogus")
    assert "--draft bogus" in line and "a8-g32" in line and "none / auto" in line, line


def test_mistakes_through_the_real_cli(tmp_path):
    """Bytes that are not UTF-8 in argv and on stdin (Latin-1 ``café``), a seed below zero, a
    model that does not exist: one line, exit 2, no traceback, in a real process (run side by
    side)."""
    runs = [
        (["--prompt", b"caf\xe9"], None, ["--prompt is not valid UTF-8 (byte 0xe9 at character 3)"]),
        (["--prompt", "-"], b"caf\xe9 au lait", ["stdin is not valid UTF-8 (byte 0xe9 at offset 3)"]),
        (["--seed", "-1"], None, ["--seed"]),
        (["--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"], None, ["nope.gguf", "does not exist"]),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-m", "mlx_qspec.generate", *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for args, _, _ in runs]
    for proc, (_, stdin, words) in zip(procs, runs):
        out, err = proc.communicate(stdin, timeout=120)
        assert_one_line(proc.returncode, err.decode(), *words)
        assert out == b""


def test_mistakes_found_after_loading(capsys, tiny_gguf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = refused(capsys, main, "--model", "no-such-org/no-such-model", "--prompt", "hi")
    assert "not in the Hugging Face cache" in line
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "2")
    line = refused(capsys, main, *base, "--top-k", "100000", "--temp", "0.5")
    assert "--top-k must be below the vocabulary size" in line and "100000" in line
    assert "--extra-eos-token 'no-such-token' is not a token" in refused(
        capsys, main, *base, "--extra-eos-token", "no-such-token")


def test_bad_model_directory_is_named(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("not a model")
    assert "not a model directory" in refused(capsys, main, "--model", str(tmp_path), "--prompt", "hi")
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    line = refused(capsys, main, "--model", str(tmp_path), "--prompt", "hi")
    assert str(tmp_path / "config.json") in line and "not valid JSON" in line
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    line = refused(capsys, main, "--model", str(tmp_path), "--prompt", "hi")
    assert str(tmp_path / "config.json") in line and "no model_type" in line


def test_help_says_which_drafts_a_model_can_run(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Which of them a model can run depends on the model" in out
    for flag in ("--adapter-path", "--trust-remote-code", "--extra-eos-token", "--prefill-response",
                 "--xtc-probability", "--xtc-threshold", "--min-tokens-to-keep",
                 "--chat-template-config", "--prefill-step-size", "--prompt-cache-file"):
        assert flag in out, flag


# ---------------------------------------------------------------- flags, with mlx-lm's meaning
TURN = 1 + len(b"user\n") + 1 + 1  # <|im_start|> user\n … <|im_end|> \n
GENERATION = 1 + len(b"assistant\n")


def test_verbose_true_false_and_bare(capsys, tiny_gguf):
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "3", "--draft", "none")
    code, out_false, err = run_main(capsys, main, *base, "--verbose", "F")
    assert code == 0 and err == ""
    for flag in (("--verbose", "True"), ("--verbose",)):
        code, out, err = run_main(capsys, main, *base, *flag)
        assert code == 0 and out == out_false
        lines = err.strip().splitlines()
        assert lines[0].startswith(f"Prompt: {len(PROMPT.encode()) + TURN + GENERATION} tokens, ")
        assert lines[1].startswith("Generation: 3 tokens, ") and lines[2].startswith("Peak memory:")
        assert summary(err)["generation_tokens"] == "3"


def test_prefill_response_opens_the_assistant_turn(capsys, tiny_gguf):
    """``--prefill-response`` continues the assistant's turn from it: no generation prompt,
    no end of turn after it."""
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--draft", "none", "--verbose",
            "--max-tokens", "1")
    _, _, err = run_main(capsys, main, *base, "--prefill-response", "Red,")
    assistant = 1 + len(b"assistant\n") + len(b"Red,")  # <|im_start|>assistant\nRed, (open)
    assert int(summary(err)["prompt_tokens"]) == len(PROMPT.encode()) + TURN + assistant


def test_extra_eos_token_stops_generation(capsys, tiny_gguf):
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "8", "--draft", "a8-g32",
            "--verbose")
    _, _, err = run_main(capsys, main, *base)
    assert summary(err)["finish_reason"] == "length"
    model, tokenizer = load(tiny_gguf)
    tokens = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True)
    third = [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens=3)][2]
    _, _, err = run_main(capsys, main, *base, "--extra-eos-token", str(third))
    fields = summary(err)
    assert fields["finish_reason"] == "stop" and int(fields["generation_tokens"]) <= 3


def test_prompt_cache_file_plain_and_speculative(capsys, tiny_gguf, tmp_path):
    """A cached prefix (cache_prompt) + a query: only the query's tokens are processed, and
    speculative greedy output equals plain output from the same file."""
    file = str(tmp_path / "prefix.safetensors")
    context = "Colours: red, green, blue. "
    capsys.readouterr()
    cache_prompt_main(["--model", tiny_gguf, "--prompt", context, "--prompt-cache-file", file])
    assert "Saving..." in capsys.readouterr().err
    query = "Which?"
    outs = []
    for draft in ("none", "a8-g32"):
        code, out, err = run_main(capsys, main, "--model", tiny_gguf, "--prompt-cache-file", file,
                                  "--prompt", query, "--max-tokens", "10", "--draft", draft,
                                  "--verbose")
        assert code == 0, err
        # the cached prefix holds the template up to the user's text; the rest is the query,
        # the end of the turn and the generation prompt
        assert int(summary(err)["prompt_tokens"]) == len(query) + 2 + GENERATION
        outs.append(out)
    assert outs[0] == outs[1]
    other = tmp_path / "other.gguf"
    other.write_bytes(b"")  # it exists: refused for the cache before it is read
    assert "is not the model that made the cache" in refused(
        capsys, main, "--model", str(other), "--prompt-cache-file", file, "--prompt", query)


def test_adapter_path_speculates_exactly(capsys, tiny_gguf, tmp_path):
    """A LoRA adapter (mlx-lm's format) changes the output, and with it speculative greedy
    output still equals plain output."""
    model, _ = load(tiny_gguf)
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(3)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())
               if "lora_" in k}
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}))
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "10")
    _, without, _ = run_main(capsys, main, *base, "--draft", "none")
    _, plain, _ = run_main(capsys, main, *base, "--draft", "none", "--adapter-path", str(tmp_path))
    code, spec, err = run_main(capsys, main, *base, "--draft", "a8-g32", "--adapter-path", str(tmp_path))
    assert code == 0, err
    assert spec == plain != without


# ---------------------------------------------------------------- signals, pipes, progress
def _endless(tiny_gguf):
    """A run that prints until stopped: the tiny model, no token limit, EOS never reached
    (greedy on this model and prompt)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_qspec.generate", "--model", tiny_gguf, "--prompt", PROMPT,
         "--max-tokens", "-1", "--draft", "a8-g32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        preexec_fn=default_sigint)


def test_ctrl_c_keeps_the_output_and_exits_130(tiny_gguf):
    proc = _endless(tiny_gguf)
    first = proc.stdout.read1(1)  # generation has started
    assert first
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err == b"", err  # no traceback
    assert rest.endswith(b"\n")


def test_closed_pipe_ends_quietly(tiny_gguf):
    proc = _endless(tiny_gguf)
    assert proc.stdout.read1(1)
    proc.stdout.close()  # the reader goes away, as `| head -c 1` does
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == EXIT_BROKEN_PIPE
    assert err == b"", err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_lines_in_a_log_and_a_bar_on_a_terminal():
    log, tty = io.StringIO(), _Terminal()
    for i in range(1, 31):
        progress("loading", i, 30, log)
        progress("loading", i, 30, tty)
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [f"loading {i}/30" for i in range(3, 31, 3)]
    assert tty.getvalue().count("\r") == 30 and tty.getvalue().endswith("30/30\n")


# ---------------------------------------------------------------- convert
def test_convert_refuses_an_impossible_destination_before_loading(tiny_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_command("convert", "--model", tiny_gguf, "--mlx-path", str(blocker / "out"))
    assert_one_line(proc.returncode, proc.stderr, f"--mlx-path '{blocker / 'out'}': cannot create it")


def test_rotated_directory_is_refused_by_stock_mlx_lm(tiny_gguf, tmp_path):
    out = tmp_path / "rotated"
    proc = run_command("convert", "--model", tiny_gguf, "--mlx-path", str(out), "--rotate",
                       "--rotate-method", "rtn")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ROTATED_PREFIX + "llama"
    with pytest.raises(ValueError, match=f"Model type {ROTATED_PREFIX}llama not supported"):
        mlx_lm_load(str(out))
    model, tokenizer, loaded = load(out, return_config=True)
    assert loaded["model_type"] == "llama" and loaded["qspec"]["rotation"]
    assert len(list(stream_generate(model, tokenizer, "hi", max_tokens=3))) == 3


# ---------------------------------------------------------------- timings
def test_timings_of_a_draft_are_those_of_plain_decoding(smollm2):
    """mlx-lm's definitions: prompt time ends when the first generated token is known,
    generation tokens/s counts from there. With a draft both stay within a factor of 4 of
    plain decoding's on the same run, also for an output shorter than one draft block
    (there the first block used to count as prompt time and the rest as instantaneous)."""
    model, tokenizer = smollm2
    prompt = tokenizer.encode("Write a long story about a dragon who learns to paint.")
    last = {}
    for draft in ("none", "a8-g32", "none", "a8-g32"):  # the first two warm up
        last[draft] = list(stream_generate(model, tokenizer, prompt, max_tokens=5, draft=draft,
                                           num_draft_tokens=4))[-1]
    plain, spec = last["none"], last["a8-g32"]
    assert plain.generation_tokens == spec.generation_tokens == 5
    assert spec.stats.drafted > 0
    for field in ("prompt_tps", "generation_tps"):
        ratio = getattr(spec, field) / getattr(plain, field)
        assert 0.25 < ratio < 4, (field, getattr(spec, field), getattr(plain, field))


# ---------------------------------------------------------------- sampling
def test_sampler_draws_like_mlx_lm_with_min_tokens_to_keep_and_xtc():
    lp = mx.log(mx.softmax(mx.random.normal((3, 256), key=mx.random.key(1)) * 3, axis=-1))
    for kw in (dict(temp=0.8, min_p=0.3, min_tokens_to_keep=5),
               dict(temp=0.9, top_p=0.95, xtc_probability=0.5, xtc_threshold=0.05,
                    xtc_special_tokens=[3], top_k=40)):
        for seed in range(2):
            mx.random.seed(seed)
            ours = make_sampler(**kw)(lp)
            mx.random.seed(seed)
            assert mx.array_equal(ours, mlx_lm_make_sampler(**kw)(lp)), kw


def test_xtc_cut_is_mlx_lm_xtc_at_probability_1():
    lp = random_logprobs(64, seed=2)
    for threshold, special in ((0.02, []), (0.05, [0, 5]), (0.4, [])):
        ours = xtc_cut(lp, threshold, special)
        assert mx.array_equal(ours, apply_xtc(lp, 1.0, threshold, special)).item()
    assert mx.isinf(xtc_cut(lp, 0.02, [])).sum().item() > 0  # the cut removes tokens here


def test_xtc_distribution_is_the_mixture_mlx_lm_samples():
    """3 000 draws of mlx-lm's own XTC sampler against ``Sampler.distribution`` (the
    mixture (1 − π)·plain + π·cut); the same draws are far from the plain distribution and
    from the cut one alone, so the test can tell."""
    n, V = 3000, 24
    lp = random_logprobs(V, seed=5)
    kw = dict(temp=0.8, xtc_probability=0.4, xtc_threshold=0.05, min_p=0.01)
    mx.random.seed(11)
    sampler = mlx_lm_make_sampler(**kw)  # one XTC coin per call: one row per call
    draws = [sampler(lp).item() for _ in range(n)]
    counts = Counter(draws)
    dist = lambda **k: dict(enumerate(np.exp(np.array(  # noqa: E731
        make_sampler(**{**kw, **k}).distribution(lp), np.float64))[0]))
    assert chi2_pvalue(counts, dist(), n) > 1e-3
    assert chi2_pvalue(counts, dist(xtc_probability=0.0), n) < 1e-6
    assert chi2_pvalue(counts, dist(xtc_probability=1.0), n) < 1e-6


def test_stats_print_acceptance_and_tokens_per_verify(tiny_gguf):
    model, tokenizer = load(tiny_gguf)
    response = list(stream_generate(model, tokenizer, "hello", max_tokens=6, draft="a8-g32"))[-1]
    text = str(response.stats)
    assert f"acceptance={response.stats.acceptance:.3f}" in text
    assert f"tokens_per_verify={response.stats.tokens_per_verify:.3f}" in text
