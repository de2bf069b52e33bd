"""The GGUF reader on a tiny llama this file writes itself: quantized tensors kept
bit for bit, config and tokenizer rebuilt from metadata, convert → stock mlx-lm gives
the same logits, and every kind of bad file is a one-line error."""

import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import byte_symbols
import mlx_qspec
from mlx_qspec.convert import convert
from mlx_qspec.errors import ModelError

# ---------------------------------------------------------------- a tiny GGUF v3 writer

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 64, 2, 128, 4, 2
EPS, THETA, CONTEXT = 1e-5, 10000.0, 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID, BOS_ID = 2, 1
MERGES = ["t h", "th e", "Ġ the", "h e", "l l", "he ll", "hell o", "1 2"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q2_K": 10}
# Linear layers by type: both Q4 flavours and Q8_0 in every block, so the
# per-module quantization overrides are exercised too.
BLOCK_TYPES = {
    "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_0",
    "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0",
}
MLX_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def vocab():
    """Special tokens first (as SmolLM2), then the 256 byte symbols, then merge results."""
    tokens = SPECIALS + byte_symbols()
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def _quant_values(rng, n_blocks):
    """Per-block f16 scales spread over several octaves, so rounding mistakes show."""
    return (rng.uniform(0.002, 0.05, n_blocks) * rng.choice([1, 4], n_blocks)).astype(np.float16)


def encode(rng, type_name, shape):
    """Random data of ``type_name`` for an MLX-order ``shape``: (GGUF bytes, exact float32 values)."""
    if type_name == "F32":
        x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return x.tobytes(), x
    if type_name == "F16":
        x = rng.normal(0, 0.05, shape).astype(np.float16)
        return x.tobytes(), x.astype(np.float32)
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    nb = rows * cols // 32
    d = _quant_values(rng, nb)
    if type_name == "Q8_0":
        q = rng.integers(-128, 128, (nb, 32), dtype=np.int8)
        blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
        values = q.astype(np.float32) * d.astype(np.float32)[:, None]
    else:
        q = rng.integers(0, 16, (nb, 32), dtype=np.uint8)
        packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)  # low nibble: 0..15, high: 16..31
        if type_name == "Q4_0":
            head = d.view(np.uint8).reshape(nb, 2)
            values = (q.astype(np.float32) - 8) * d.astype(np.float32)[:, None]
        elif type_name == "Q4_1":
            m = rng.uniform(-0.3, 0.0, nb).astype(np.float16)
            head = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2)], 1)
            values = q.astype(np.float32) * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]
        else:  # Q2_K: only declared, never decoded (an unsupported type)
            return rng.integers(0, 256, rows * cols // 256 * 84, dtype=np.uint8).tobytes(), None
        blocks = np.concatenate([head, packed], axis=1)
    return blocks.tobytes(), values.reshape(shape)


def _pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(v):
    """(GGUF value type, bytes) for a Python metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _pack_string(v)
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_pack_string(x) for x in v)
        return 9, struct.pack("<IQ", 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(v)


def write_gguf(path, metadata, tensors):
    """A GGUF v3 file: ``tensors`` is ``[(name, MLX shape, type name, data bytes)]``."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        vtype, payload = _pack_value(value)
        out += _pack_string(key) + struct.pack("<I", vtype) + payload
    offset, data = 0, bytearray()
    for name, shape, type_name, blob in tensors:
        out += _pack_string(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *shape[::-1])  # fastest-first
        out += struct.pack("<IQ", TYPE_IDS[type_name], offset)
        data += blob + bytes(-len(blob) % 32)
        offset = len(data)
    out += bytes(-len(out) % 32)
    Path(path).write_bytes(bytes(out + data))
    return len(out)


def tiny_llama(path, *, arch="llama", tied=True, pre="smollm", override=None, seed=0, ffn=FFN):
    """Write a tiny llama GGUF; returns ``{mlx parameter path: (type, float32 values)}``."""
    rng = np.random.default_rng(seed)
    tokens, types = vocab()
    metadata = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.context_length": CONTEXT,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.block_count": LAYERS,
        f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.layer_norm_rms_epsilon": EPS,
        f"{arch}.rope.freq_base": THETA,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    head_dim = HIDDEN // HEADS
    shapes = {
        "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (ffn, HIDDEN), "ffn_up": (ffn, HIDDEN), "ffn_down": (HIDDEN, ffn),
    }
    specs = [("token_embd.weight", "model.embed_tokens", (len(tokens), HIDDEN), "Q8_0")]
    for i in range(LAYERS):
        specs.append((f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm", (HIDDEN,), "F32"))
        for k, shape in shapes.items():
            specs.append((f"blk.{i}.{k}.weight", f"model.layers.{i}.{MLX_NAMES[k]}", shape, BLOCK_TYPES[k]))
            if arch == "qwen2" and k in ("attn_q", "attn_k", "attn_v"):  # qwen2: q/k/v biases
                specs.append((f"blk.{i}.{k}.bias", f"model.layers.{i}.{MLX_NAMES[k]}.bias", shape[:1], "F32"))
        specs.append((f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm", (HIDDEN,), "F32"))
    specs.append(("output_norm.weight", "model.norm", (HIDDEN,), "F32"))
    if not tied:
        specs.append(("output.weight", "lm_head", (len(tokens), HIDDEN), "F16"))
    tensors, expected = [], {}
    for gguf_name, mlx_name, shape, type_name in specs:
        type_name, shape = (override or {}).get(gguf_name, (type_name, shape))
        blob, values = encode(rng, type_name, shape)
        tensors.append((gguf_name, shape, type_name, blob))
        expected[mlx_name] = (type_name, values)
    header_bytes = write_gguf(path, metadata, tensors)
    return expected, header_bytes


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected, header_bytes = tiny_llama(path)
    model, tokenizer, config = mlx_qspec.load(path, return_config=True)
    return path, expected, model, tokenizer, config, header_bytes


def module_at(model, dotted):
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def dequantized(module):
    """The values a loaded module stores, as float32 numpy (dequantized in float32, where
    they are exact whatever dtype the scales are kept in)."""
    if hasattr(module, "scales"):
        f32 = mx.float32
        w = mx.dequantize(module.weight, module.scales.astype(f32), module.biases.astype(f32),
                          group_size=module.group_size, bits=module.bits)
    else:
        w = module.weight
    return np.array(w.astype(mx.float32))


PROMPT = mx.array([[BOS_ID, 40, 71, 120, 7, 200, 3, 258, 259, 33, 80, EOS_ID]])


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"mlx_qspec.{module}", *args],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------- (a) weights and config


def test_quantized_tensors_are_kept_bit_exact(tiny):
    _, expected, model, _, _, _ = tiny
    seen = set()
    for name, (type_name, values) in expected.items():
        module = module_at(model, name)
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
    from mlx_lm.utils import load as mlx_lm_load

    from mlx_qspec.convert import convert

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
    from mlx_lm.utils import load as mlx_lm_load

    path, _, _, tokenizer, _, _ = tiny
    out = tmp_path / "converted"
    proc = cli("convert", "--model", str(path), "--mlx-path", str(out), "--dtype", "float32")
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
    proc = cli("convert", "--model", str(path), "--mlx-path", str(out), "--rotate")
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
    proc = cli("convert", "--model", str(path), "--mlx-path", str(tmp_path / "out"), "--rotate")
    assert_one_line_error(proc, "intermediate_size 352")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (d) bad input


@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    """``{case: (path, words the error must contain)}``."""
    good = tiny[0]
    d = tmp_path_factory.mktemp("bad")
    blob = good.read_bytes()
    files = {}

    data_cut = d / "cut_data.gguf"
    data_cut.write_bytes(blob[: len(blob) - 3000])
    files["truncated data"] = (data_cut, ["truncated"])

    header_cut = d / "cut_header.gguf"
    header_cut.write_bytes(blob[: tiny[5] // 2])
    files["truncated header"] = (header_cut, ["truncated"])

    foreign = d / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 this is a zip, not a model " * 10)
    files["not gguf"] = (foreign, ["not a GGUF file"])

    q2k = d / "q2k.gguf"
    tiny_llama(q2k, override={"blk.1.ffn_down.weight": ("Q2_K", (HIDDEN, 256))})
    files["q2_k"] = (q2k, ["blk.1.ffn_down.weight", "Q2_K"])

    mamba = d / "mamba.gguf"
    tiny_llama(mamba, arch="mamba")
    files["mamba"] = (mamba, ["mamba", "not supported"])

    huge = d / "huge_string.gguf"  # a key length of 2^63 bytes: no read is attempted
    huge.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + bytes(64))
    files["huge string length"] = (huge, ["truncated"])

    unaligned = d / "alignment0.gguf"
    write_gguf(unaligned, {"general.alignment": 0}, [])
    files["zero alignment"] = (unaligned, ["general.alignment"])
    return files


def test_bad_files_raise_model_error(bad_files):
    for case, (path, words) in bad_files.items():
        with pytest.raises(ModelError) as info:
            mlx_qspec.load(path)
        message = str(info.value)
        assert "\n" not in message, case
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
    assert_one_line_error(cli(module, *args), *words)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_non_empty_destination(tiny, tmp_path):
    dest = tmp_path / "existing"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    (dest / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert_one_line_error(
        cli("convert", "--model", str(tiny[0]), "--mlx-path", str(dest)), str(dest), "not empty"
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    with pytest.raises(ModelError):
        convert(str(tiny[0]), str(dest))
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
