"""End-to-end checks on the real test model: GGUF loading matches stock mlx-lm on the
converted directory token for token, the rebuilt tokenizer, hub ids from the local cache."""

from pathlib import Path

import huggingface_hub.constants as hf_constants
import mlx_lm
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_qspec import generate, load, stream_generate
from mlx_qspec.errors import ModelError

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
]


def _chat(tokenizer, text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_greedy_tokens_equal_stock_mlx_lm_on_converted_dir(smollm2, smollm2_dir):
    model, tokenizer = smollm2
    ref_model, ref_tokenizer = mlx_lm.load(smollm2_dir)
    for text in PROMPTS:
        prompt = _chat(tokenizer, text)
        assert prompt == _chat(ref_tokenizer, text)
        got = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]
        want = [r.token for r in mlx_lm.stream_generate(ref_model, ref_tokenizer, prompt, max_tokens=12)]
        assert got == want, text
        assert len(got) >= 3


def test_generate_returns_coherent_text(smollm2):
    model, tokenizer = smollm2
    text = generate(model, tokenizer, _chat(tokenizer, PROMPTS[0]), max_tokens=10)
    assert "Paris" in text


def test_stream_generate_response_fields(smollm2):
    model, tokenizer = smollm2
    responses = list(stream_generate(model, tokenizer, "The sea is", max_tokens=5))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.generation_tokens == len(responses)
    assert last.prompt_tokens == len(tokenizer.encode("The sea is"))
    assert last.peak_memory > 0 and last.generation_tps > 0 and last.prompt_tps > 0
    # Plain decoding: no drafts, one verify-precision step per token, its reads counted.
    assert last.stats.draft == "none" and last.stats.drafted == 0
    assert last.stats.emitted == len(responses) == last.stats.verify_passes
    per_token = last.stats.bytes_per_token()
    assert per_token["draft"] == 0 and per_token["verify"] > 0 and per_token["plain"] > 0


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! 12345",
        "Ünïcödé — 日本語のテキスト, emoji 🙂 and ßpäces   tabs\tnew\nlines",
        "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}\n",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_gguf_tokenizer_round_trips(smollm2, text):
    _, tokenizer = smollm2
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


def test_special_tokens_are_single_ids(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.encode("12", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(d)
                                                                for d in "12"]


def test_chat_template_matches_converted_dir(smollm2, smollm2_dir):
    _, tokenizer = smollm2
    ref = load_tokenizer(Path(smollm2_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi ünïcode"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    for msgs in (messages, messages[1:2]):
        for kw in (dict(add_generation_prompt=True), dict(tokenize=False)):
            assert tokenizer.apply_chat_template(msgs, **kw) == ref.apply_chat_template(msgs, **kw)


def _hub_cache(root, repo_id, files_from):
    """A huggingface_hub cache holding ``repo_id`` at one snapshot, as ``hf download`` leaves it."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        (snapshot / f.name).symlink_to(f)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_local_cache_only(smollm2_dir, tmp_path, monkeypatch, smollm2):
    _hub_cache(tmp_path, "mlx-community/SmolLM2-test", Path(smollm2_dir))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load("mlx-community/SmolLM2-test")
    prompt = _chat(tokenizer, PROMPTS[0])
    ours_model, ours_tokenizer = smollm2
    got = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=6)]
    want = [r.token for r in stream_generate(ours_model, ours_tokenizer, prompt, max_tokens=6)]
    assert got == want

    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        load("mlx-community/no-such-model")


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(ModelError, match="neither a model directory nor a GGUF"):
        load(str(tmp_path / "notes.txt"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no model.*safetensors"):
        load(str(half))
    (half / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (half / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="cannot load the model"):
        load(str(half))


def test_api_rejects_zero_tokens_and_empty_prompt(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="non-zero"):
        generate(model, tokenizer, "hi", max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [], max_tokens=3)
