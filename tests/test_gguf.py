"""The GGUF reader on a tiny llama this file writes itself: quantized tensors kept
bit for bit, config and tokenizer rebuilt from metadata, convert → stock mlx-lm gives
the same logits, and every kind of bad file is a one-line error."""

import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load

from helpers import assert_one_line, model_error, run_command
from helpers.gguf_raw import (
    BOS_ID, CONTEXT, EOS_ID, EPS, FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, THETA, tiny_llama, vocab,
    write_gguf,
)
from helpers.gguf_reference import dequantized
import mlx_qspec
from mlx_qspec.commands import convert as convert_module
from mlx_qspec.convert import convert
from mlx_qspec.errors import ModelError

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected, header_bytes = tiny_llama(path)
    model, tokenizer, config = mlx_qspec.load(path, return_config=True)
    return path, expected, model, tokenizer, config, header_bytes


PROMPT = mx.array([[BOS_ID, 40, 71, 120, 7, 200, 3, 258, 259, 33, 80, EOS_ID]])


# ---------------------------------------------------------------- (a) weights and config


def test_quantized_tensors_are_kept_bit_exact(tiny):
    _, expected, model, _, _, _ = tiny
    seen, modules = set(), dict(model.named_modules())
    for name, (type_name, values) in expected.items():
        module = modules[name]
        if type_name in ("Q4_0", "Q4_1", "Q8_0"):
            assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)), name
            assert (module.group_size, module.bits) == (32, 8 if type_name == "Q8_0" else 4), name
            seen.add(type_name)
        else:
            assert not hasattr(module, "scales"), name
        assert np.array_equal(dequantized(module), values), f"{name} ({type_name}) differs"
    assert seen == {"Q4_0", "Q4_1", "Q8_0"}


def test_config_from_metadata(tiny):
    _, _, model, tokenizer, config, _ = tiny
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == LAYERS == len(model.layers)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert (config["hidden_size"], config["intermediate_size"]) == (HIDDEN, FFN)
    assert config["head_dim"] == HIDDEN // HEADS
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True and not hasattr(model, "lm_head")
    assert config["rope_theta"] == THETA and config["rms_norm_eps"] == pytest.approx(EPS)
    assert config["max_position_embeddings"] == CONTEXT
    assert config["vocab_size"] == len(vocab()[0])
    attn = model.layers[0].self_attn
    assert (attn.n_heads, attn.n_kv_heads) == (HEADS, KV_HEADS)
    assert attn.rope.traditional is True and attn.rope.base == THETA
    # The majority linear type is the default; the others are per-module overrides.
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert q["model.layers.0.self_attn.v_proj"] == {"group_size": 32, "bits": 8}
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert EOS_ID in tokenizer.eos_token_ids


def test_forward_gives_finite_logits(tiny):
    _, _, model, _, _, _ = tiny
    logits = model(PROMPT)
    assert logits.shape == (1, PROMPT.shape[1], len(vocab()[0]))
    if not mx.metal.is_available():  # MLX-CPU computes in float32 (float16 is ~35x slower)
        assert logits.dtype == mx.float32
    assert mx.isfinite(logits).all().item()
    assert mx.std(logits).item() > 0


def test_untied_float_head(tmp_path):
    """An F16 output head stays a plain float Linear next to the quantized embedding."""
    path = tmp_path / "untied.gguf"
    expected, _ = tiny_llama(path, tied=False, seed=1)
    model, _, config = mlx_qspec.load(path, return_config=True)
    assert config["tie_word_embeddings"] is False
    assert config["quantization"]["lm_head"] is False
    assert isinstance(model.lm_head, nn.Linear) and not hasattr(model.lm_head, "scales")
    assert np.array_equal(dequantized(model.lm_head), expected["lm_head"][1])
    assert mx.isfinite(model(PROMPT)).all().item()


# ---------------------------------------------------------------- (b) tokenizer


def test_qwen2_gguf_matches_stock_mlx_lm(tmp_path):
    """qwen2 GGUFs keep the NeoX RoPE layout (no Q/K permutation) and their q/k/v biases."""
    path = tmp_path / "qwen2.gguf"
    expected, _ = tiny_llama(path, arch="qwen2", seed=3)
    model, _, config = mlx_qspec.load(path, dtype=mx.float32, return_config=True)
    assert config["model_type"] == "qwen2" and config["rope_traditional"] is False
    bias = "model.layers.1.self_attn.k_proj.bias"
    assert np.array_equal(np.array(model.layers[1].self_attn.k_proj.bias), expected[bias][1])
    convert(str(path), str(tmp_path / "mlx"), dtype="float32")
    stock, _ = mlx_lm_load(str(tmp_path / "mlx"))
    assert mx.array_equal(model(PROMPT), stock(PROMPT)).item()


def test_tokenizer_round_trips_and_keeps_specials(tiny):
    _, _, _, tokenizer, _, _ = tiny
    tokens = vocab()[0]
    for text in ["hello the world", "  spaces\tand\nnewlines ", "über naïve 12 345 🙂 ☃", "x"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # merges apply; 'smollm' splits digits before BPE, so the '1 2' merge never fires
    assert tokenizer.encode(" the", add_special_tokens=False) == [tokens.index("Ġthe")]
    assert tokenizer.encode("hello", add_special_tokens=False) == [tokens.index("hello")]
    assert tokenizer.encode("12", add_special_tokens=False) == [tokens.index("1"), tokens.index("2")]
    ids = tokenizer.encode("<|im_start|>user<|im_end|><|endoftext|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-2:] == [2, 0] and len(ids) == 2 + len("user") + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user"


def test_gpt2_pre_tokenizer_merges_digits(tmp_path):
    path = tmp_path / "gpt2pre.gguf"
    tiny_llama(path, pre="gpt2")
    _, tokenizer = mlx_qspec.load(path)
    assert tokenizer.encode("12", add_special_tokens=False) == [vocab()[0].index("12")]


def test_rebuilt_tokenizer_is_cached_per_vocabulary(tmp_path, monkeypatch):
    """The tokenizer rebuilt from a GGUF is kept under MLX_QSPEC_CACHE: a second load of the
    same vocabulary (any file) rebuilds nothing and tokenizes alike; another vocabulary
    (another pre-tokenizer) gets its own folder; with no writable cache a load still works."""
    from mlx_qspec import gguf as our_gguf

    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path / "cache"))
    for name, pre in (("a.gguf", "smollm"), ("b.gguf", "smollm"), ("c.gguf", "gpt2")):
        tiny_llama(tmp_path / name, pre=pre, seed=len(name))
    built = []
    write = our_gguf.write_tokenizer
    monkeypatch.setattr(our_gguf, "write_tokenizer", lambda *a: built.append(a[1]) or write(*a))
    ids = lambda path: mlx_qspec.load(path)[1].encode("12 hello")  # noqa: E731
    first = ids(tmp_path / "a.gguf")
    assert ids(tmp_path / "a.gguf") == ids(tmp_path / "b.gguf") == first
    assert ids(tmp_path / "c.gguf") != first  # gpt2's split keeps "12" whole
    assert built == [tmp_path / "a.gguf", tmp_path / "c.gguf"]
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path / "not_a_dir"))
    assert ids(tmp_path / "a.gguf") == first


def test_chat_template_applied(tiny):
    _, _, _, tokenizer, _, _ = tiny
    assert tokenizer.has_chat_template
    messages = [{"role": "user", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(1) == 2 and ids.count(2) == 1
    assert ids[:1] == [1] and vocab()[0].index("hello") in ids


# ---------------------------------------------------------------- (c) convert → stock mlx-lm


def test_convert_then_stock_mlx_lm_gives_same_logits(tiny, tmp_path):
    path, _, _, tokenizer, _, _ = tiny
    out = tmp_path / "converted"
    proc = run_command("convert", "--model", str(path), "--mlx-path", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    stock, stock_tokenizer = mlx_lm_load(str(out))
    for name, module in stock.named_modules():
        if hasattr(module, "scales"):
            assert module.scales.dtype == mx.float32, name
    ours = mlx_qspec.load(path, dtype=mx.float32)[0](PROMPT)
    theirs = stock(PROMPT)
    assert theirs.dtype == mx.float32
    assert mx.array_equal(ours, theirs).item()
    text = "<|im_start|>user\nhello the 12<|im_end|>"
    assert stock_tokenizer.encode(text) == tokenizer.encode(text)


def test_convert_rotate_loads_and_speculates_exactly(tiny, tmp_path):
    """--rotate writes a directory mlx_qspec loads with its online Hadamards, on which
    speculative greedy decoding equals plain decoding; the source's scale dtype is kept."""
    from mlx_qspec.generate import stream_generate
    from mlx_qspec.quant.hadamard import OnlineHadamard

    path = tiny[0]
    out = tmp_path / "rotated"
    proc = run_command("convert", "--model", str(path), "--mlx-path", str(out), "--rotate")
    assert proc.returncode == 0, proc.stderr
    assert mx.load(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    model, tokenizer, config = mlx_qspec.load(out, return_config=True)
    assert config["qspec"]["rotation"]["method"] == "gptq"
    assert isinstance(model.model.layers[0].mlp.down_proj, OnlineHadamard)
    prompt = PROMPT[0, :-1]
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]
    spec = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12,
                                             draft="a4-g32", num_draft_tokens=3)]
    assert spec == plain


def test_convert_rotate_rejects_unrotatable_sizes(tmp_path):
    path = tmp_path / "odd.gguf"
    tiny_llama(path, ffn=352)  # 11 * 32: no Hadamard of that size in MLX
    proc = run_command("convert", "--model", str(path), "--mlx-path", str(tmp_path / "out"), "--rotate")
    assert_one_line(proc.returncode, proc.stderr, "intermediate_size 352")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (d) bad input


@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    """``{case: (path, words the error must contain)}``."""
    d = tmp_path_factory.mktemp("bad")
    blob = tiny[0].read_bytes()
    for name, data in (("cut_data.gguf", blob[: len(blob) - 3000]), ("cut_header.gguf", blob[: tiny[5] // 2]),
                       ("foreign.gguf", b"PK\x03\x04 this is a zip, not a model " * 10),
                       # a key length of 2^63 bytes: no read is attempted
                       ("huge_string.gguf", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + bytes(64))):
        (d / name).write_bytes(data)
    tiny_llama(d / "q2k.gguf", override={"blk.1.ffn_down.weight": ("Q2_K", (HIDDEN, 256))})
    tiny_llama(d / "mamba.gguf", arch="mamba")
    write_gguf(d / "alignment0.gguf", {"general.alignment": 0}, [])
    return {"truncated data": (d / "cut_data.gguf", ["truncated"]),
            "truncated header": (d / "cut_header.gguf", ["truncated"]),
            "not gguf": (d / "foreign.gguf", ["not a GGUF file"]),
            "q2_k": (d / "q2k.gguf", ["blk.1.ffn_down.weight", "Q2_K"]),
            "mamba": (d / "mamba.gguf", ["mamba", "not supported"]),
            "huge string length": (d / "huge_string.gguf", ["truncated"]),
            "zero alignment": (d / "alignment0.gguf", ["general.alignment"])}


def test_bad_files_raise_model_error(bad_files):
    for case, (path, words) in bad_files.items():
        message = model_error(mlx_qspec.load, path)
        assert str(path) in message or path.name in message, (case, message)
        for word in words:
            assert word in message, (case, message)


def test_header_cut_anywhere_is_model_error(tiny, tmp_path):
    """Every cut inside the header (a sample of lengths) is a ModelError, never a crash."""
    blob, header_bytes = tiny[0].read_bytes(), tiny[5]
    path = tmp_path / "cut.gguf"
    for n in [0, 3, 4, 7, 15, 23, 40, *range(41, header_bytes, 97), header_bytes - 1]:
        path.write_bytes(blob[:n])
        with pytest.raises(ModelError):
            mlx_qspec.load(path)


@pytest.mark.parametrize("case,module", [("truncated data", "generate"), ("not gguf", "convert"),
                                         ("q2_k", "convert"), ("mamba", "generate")])
def test_cli_bad_file_is_one_line_exit_2(bad_files, case, module, tmp_path):
    path, words = bad_files[case]
    args = ["--model", str(path)]
    if module == "convert":
        args += ["--mlx-path", str(tmp_path / "out")]
    else:
        args += ["--prompt", "hi", "--max-tokens", "2", "--draft", "none"]
    proc = run_command(module, *args)
    assert_one_line(proc.returncode, proc.stderr, *words)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_non_empty_destination(tiny, tmp_path):
    dest = tmp_path / "existing"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    (dest / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    proc = run_command("convert", "--model", str(tiny[0]), "--mlx-path", str(dest))
    assert_one_line(proc.returncode, proc.stderr, str(dest), "not empty")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    with pytest.raises(ModelError, match="exists and is not empty"):
        convert(str(tiny[0]), str(dest))
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


@pytest.mark.parametrize("model, options, message", [
    ("org/not-cached", dict(rotate=True), "--rotate converts a GGUF file"),  # a hub id: a directory
    ("GGUF", dict(quantize=True), "is a GGUF file, quantized already: drop -q"),
    ("GGUF", dict(dtype="float8"), "--dtype must be one of"),
])
def test_convert_refuses_before_it_resolves_the_model(tiny, tmp_path, monkeypatch, model, options,
                                                      message):
    """Mistakes that need no model are found before a hub id would be downloaded."""
    def no_resolve(*a, **k):
        raise AssertionError("the model was resolved (a hub id downloaded) before the mistake was found")

    monkeypatch.setattr(convert_module, "resolve", no_resolve)
    model = str(tiny[0]) if model == "GGUF" else model
    assert message in model_error(convert, model, str(tmp_path / "out"), **options)
    assert not (tmp_path / "out").exists()
