"""End-to-end checks on the real test model: GGUF loading matches stock mlx-lm on the
converted directory token for token, the rebuilt tokenizer, hub ids from the local cache."""

from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_qspec import generate, load, stream_generate
from mlx_qspec.convert import convert
from mlx_qspec.errors import ModelError
from mlx_qspec.cli import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def ours(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    return Path(smollm2_dir)


def _chat(tokenizer, text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_greedy_tokens_equal_stock_mlx_lm_on_converted_dir(ours, converted):
    model, tokenizer = ours
    ref_model, ref_tokenizer = mlx_lm.load(str(converted))
    for text in PROMPTS:
        prompt = _chat(tokenizer, text)
        assert prompt == _chat(ref_tokenizer, text)
        got = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]
        want = [r.token for r in mlx_lm.stream_generate(ref_model, ref_tokenizer, prompt, max_tokens=12)]
        assert got == want, text
        assert len(got) >= 3


def test_generate_returns_coherent_text(ours):
    model, tokenizer = ours
    text = generate(model, tokenizer, _chat(tokenizer, PROMPTS[0]), max_tokens=10)
    assert "Paris" in text


def test_stream_generate_response_fields(ours):
    model, tokenizer = ours
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
def test_gguf_tokenizer_round_trips(ours, text):
    _, tokenizer = ours
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


def test_special_tokens_are_single_ids(ours):
    _, tokenizer = ours
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.encode("12", add_special_tokens=False) == [
        tokenizer.convert_tokens_to_ids("1"),
        tokenizer.convert_tokens_to_ids("2"),
    ]


def test_chat_template_matches_converted_dir(ours, converted):
    _, tokenizer = ours
    ref = load_tokenizer(converted)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi ünïcode"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    for msgs in (messages, messages[1:2]):
        assert tokenizer.apply_chat_template(msgs, add_generation_prompt=True) == ref.apply_chat_template(
            msgs, add_generation_prompt=True
        )
        assert tokenizer.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(
            msgs, tokenize=False
        )


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


def test_hub_id_loads_from_local_cache_only(converted, tmp_path, monkeypatch, ours):
    import huggingface_hub.constants as hf_constants

    _hub_cache(tmp_path, "mlx-community/SmolLM2-test", converted)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load("mlx-community/SmolLM2-test")
    prompt = _chat(tokenizer, PROMPTS[0])
    ours_model, ours_tokenizer = ours
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


def test_convert_refuses_non_empty_destination(gguf_path, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(ModelError, match="exists and is not empty"):
        convert(str(gguf_path), str(dest))
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "precious"


def test_api_rejects_zero_tokens_and_empty_prompt(ours):
    model, tokenizer = ours
    with pytest.raises(ValueError, match="non-zero"):
        generate(model, tokenizer, "hi", max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [], max_tokens=3)
