"""The CLI and API, asserting specific values rather than ranges that hold by definition.

``mlx_qspec.generate.main`` runs in-process (the model load is the cost, not the
interpreter). The real test model (SmolLM2-135M Q4_1) is used for five runs of 12 tokens;
everything about prompts, templates and seeds runs on a tiny GGUF written by
``conftest``'s ``tiny_gguf`` — its tokenizer has no merges, so every UTF-8 byte is
one token and the expected prompt token counts are arithmetic, not a tokenizer call.
``--draft`` is always explicit (what ``auto`` resolves to depends on the platform).
"""

import mlx.core as mx
import pytest

from helpers import summary
from mlx_qspec import load
from mlx_qspec.generate import main, stream_generate
from mlx_qspec.settings import Settings

STORY = "Write a long story about a dragon who learns to paint."
REAL_TOKENS = 12
# Measured on this prompt at 12 tokens, γ = 4 (MLX-CPU): acceptance 0.750 (9 of 12 drafts
# kept, 3 verify passes; at 16 tokens 0.688). The floor sits ~0.1 below.
A8_G32_ACCEPTANCE_FLOOR = 0.65


def run_cli(capsys, *args):
    """(stdout, summary fields) of one in-process CLI run with --verbose."""
    capsys.readouterr()
    main([*args, "--verbose"])
    out, err = capsys.readouterr()
    return out, summary(err)


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def real_runs():
    """Filled by the first test that needs each run, so no run happens twice."""
    return {}


def real(capsys, runs, key, *args):
    if key not in runs:
        runs[key] = run_cli(capsys, "--prompt", STORY, "--max-tokens", str(REAL_TOKENS), *args)
    return runs[key]


def test_speculative_greedy_values(capsys, real_runs):
    out, f = real(capsys, real_runs, "spec", "--draft", "a8-g32", "--temp", "0")
    assert f["draft"] == "a8-g32"
    assert int(f["num_draft_tokens"]) == 4
    assert int(f["generation_tokens"]) == REAL_TOKENS and f["finish_reason"] == "length"
    drafted, accepted, passes = int(f["drafted"]), int(f["accepted"]), int(f["verify_passes"])
    # each verify pass emits its accepted drafts plus one token of its own
    assert accepted + passes == REAL_TOKENS
    assert float(f["acceptance"]) == pytest.approx(accepted / drafted, abs=1e-3)
    assert float(f["tokens_per_verify"]) == pytest.approx(REAL_TOKENS / passes, abs=1e-3)
    assert float(f["acceptance"]) >= A8_G32_ACCEPTANCE_FLOOR
    assert passes < REAL_TOKENS / 2  # more than two tokens per verify on average
    assert "dragon" in out.lower() or "once upon a time" in out.lower()


def test_temp_0_equals_draft_none(capsys, real_runs):
    spec_out, _ = real(capsys, real_runs, "spec", "--draft", "a8-g32", "--temp", "0")
    plain_out, f = real(capsys, real_runs, "plain", "--draft", "none", "--temp", "0")
    assert f["draft"] == "none"
    assert int(f["generation_tokens"]) == REAL_TOKENS
    assert spec_out == plain_out


def test_top_k_1_at_temperature_1_equals_greedy(capsys, real_runs):
    """Speculative *sampling* with top-k 1: p and q are one-hot, so the output is greedy's
    and a draft is kept exactly when greedy keeps it — the same counts as at --temp 0."""
    greedy_out, g = real(capsys, real_runs, "spec", "--draft", "a8-g32", "--temp", "0")
    out, f = real(capsys, real_runs, "topk1", "--draft", "a8-g32", "--temp", "1", "--top-k", "1",
                  "--seed", "3")
    assert out == greedy_out
    assert (f["drafted"], f["accepted"], f["verify_passes"]) == (
        g["drafted"], g["accepted"], g["verify_passes"])


def test_kv_bits_8_speculative_equals_plain(capsys, real_runs):
    """--kv-bits 8 through the CLI, the cache turning quantized mid-generation (prompt 42
    tokens, switch at 48, inside the 12 generated): the speculative output equals plain's
    with the same cache."""
    kv = ("--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "48", "--temp", "0")
    spec_out, f = real(capsys, real_runs, "kv-spec", "--draft", "a8-g32", *kv)
    plain_out, p = real(capsys, real_runs, "kv-plain", "--draft", "none", *kv)
    assert int(p["prompt_tokens"]) < 48 < int(p["prompt_tokens"]) + REAL_TOKENS
    assert f["draft"] == "a8-g32" and p["draft"] == "none"
    assert int(f["generation_tokens"]) == int(p["generation_tokens"]) == REAL_TOKENS
    assert spec_out == plain_out


# ---------------------------------------------------------------- a tiny GGUF
PROMPT = "Name three colours."
TEMPLATE_TOKENS = {  # tokens the template adds around a turn's content
    # <|im_start|> role "\n" … <|im_end|> "\n": 3 specials/newline + role + its newline
    "user": 1 + len(b"user\n") + 1 + 1,
    "system": 1 + len(b"system\n") + 1 + 1,
    "generation": 1 + len(b"assistant\n"),
}


def test_prompt_token_counts(capsys, tiny_gguf):
    base = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "1", "--draft", "none")
    _, raw = run_cli(capsys, *base, "--ignore-chat-template")
    assert int(raw["prompt_tokens"]) == len(PROMPT.encode())
    _, chat = run_cli(capsys, *base)
    assert int(chat["prompt_tokens"]) == (
        len(PROMPT.encode()) + TEMPLATE_TOKENS["user"] + TEMPLATE_TOKENS["generation"])
    system = "Answer in one word, in French."
    _, sys_ = run_cli(capsys, *base, "--system-prompt", system)
    assert int(sys_["prompt_tokens"]) - int(chat["prompt_tokens"]) == (
        len(system.encode()) + TEMPLATE_TOKENS["system"])


@pytest.mark.parametrize("draft", ["a8-g32", "none"])
def test_seed_reproducibility(capsys, tiny_gguf, draft):
    args = ("--model", tiny_gguf, "--prompt", PROMPT, "--max-tokens", "10", "--draft", draft,
            "--temp", "1")
    a, fa = run_cli(capsys, *args, "--seed", "7")
    b, _ = run_cli(capsys, *args, "--seed", "7")
    c, _ = run_cli(capsys, *args, "--seed", "8")
    assert fa["draft"] == draft
    assert a == b
    assert a != c


def test_api_stats_of_a_speculative_run(tiny_gguf):
    model, tokenizer = load(tiny_gguf)
    prompt = tokenizer.encode("hello there")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=10, draft="a8-g32",
                                     num_draft_tokens=3))
    plain = list(stream_generate(model, tokenizer, prompt, max_tokens=10, draft="none"))
    last = responses[-1]
    assert [r.token for r in responses] == [r.token for r in plain]
    assert last.finish_reason == plain[-1].finish_reason
    n = last.generation_tokens
    assert n == len(responses) == len(plain) and last.prompt_tokens == len(prompt)
    st = last.stats
    assert st.draft == "a8-g32" and st.num_draft_tokens == 3
    assert last.finish_reason == "length"  # this model and prompt: no EOS in 10 greedy tokens
    assert n == 10 and st.emitted == 10 and st.accepted + st.verify_passes == 10
    assert st.drafted <= 3 * st.verify_passes and 0 < st.accepted <= st.drafted
    assert sum(r.from_draft for r in responses) == st.accepted
    ps = plain[-1].stats  # plain decoding drafts nothing (its stats, where given, say so)
    assert ps is None or (ps.draft == "none" and ps.drafted == ps.accepted == 0)
    assert all(isinstance(r.logprobs, mx.array) for r in responses)


def test_api_setting_names_beside_settings_change_them(tiny_gguf):
    """``draft=``, ``num_draft_tokens=`` and other setting names passed beside ``settings=``
    override it (they were dropped, or a TypeError)."""
    model, tokenizer = load(tiny_gguf)
    prompt = tokenizer.encode("hello there")
    base = Settings(draft="none", num_draft_tokens=2)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=10, draft="a8-g32",
                                     num_draft_tokens=3, settings=base))
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10,
                                              settings=base)]
    st = responses[-1].stats
    assert st.draft == "a8-g32" and st.num_draft_tokens == 3 and st.drafted > 0
    assert [r.token for r in responses] == plain
    windowed = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10,
                                                 settings=base, max_kv_size=6)]
    assert windowed == [r.token for r in stream_generate(model, tokenizer, prompt,
                                                         max_tokens=10, max_kv_size=6)]
    assert windowed != plain  # the window slides: the setting took effect
    with pytest.raises(ValueError, match="kv_bits applies to kv_mode fp only"):
        next(stream_generate(model, tokenizer, prompt, max_tokens=2,
                             settings=Settings(kv_mode="8bit"), kv_bits=8))


@pytest.mark.parametrize("prompt", [[1, -5], [1, 10**6], mx.array([1, 10**6]), [1, 2.0]])
def test_api_token_ids_outside_the_vocabulary_are_refused(tiny_gguf, prompt):
    model, tokenizer = load(tiny_gguf)
    with pytest.raises(ValueError, match=r"prompt\[1\] must be"):
        next(stream_generate(model, tokenizer, prompt, max_tokens=2))
