"""GGUF coverage beyond the SmolLM2 file: tensor types, tokenizer kinds, RoPE scaling.

Tensor types against llama.cpp's own dequantizer (``gguf.quants``), files written with
``gguf.GGUFWriter``. Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 data comes from
``gguf.quants.quantize``; it cannot quantize k-quants, so Q4_K / Q5_K blocks are random bytes
(every 6-bit scale and min occurs) with finite f16 super-scales, and Q6_K blocks come from a
small quantizer here. Exact mappings must equal ``gguf.quants.dequantize`` bit for bit in
float32; Q6_K (no group 16 in MLX) has a measured error bound. Tokenizers against
tokenizers trained here by other libraries; RoPE scaling honoured or refused.
"""

import io
import json
import textwrap
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from gguf import GGMLQuantizationType as Q
from mlx_lm.models.rope_utils import YarnRoPE
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import load_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import mlx_qspec
from helpers import byte_symbols, gguf_writer, model_error, write_gguf_file
from helpers.gguf_kquants import (
    FFN, HEADS, HIDDEN, LAYERS, Q4_K_M, q6_k_blocks, random_k_blocks, tiny_llama,
)
from helpers.gguf_reference import RTOL, Config, dequantized, file_tensors, reference_llama, relative_gap
from mlx_qspec import gguf as our_gguf
from mlx_qspec.convert import convert
from mlx_qspec.errors import ModelError

ROWS, COLS = 48, 512
EXACT = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4, Q.Q5_K: 5}


def write(path, tensors):
    """``tensors``: [(qtype, raw numpy data)] written as blk.i.ffn_up.weight, (ROWS, COLS)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for i, (qtype, data) in enumerate(tensors):
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(f"blk.{i}.ffn_up.weight", data)
        else:
            w.add_tensor(f"blk.{i}.ffn_up.weight", data.reshape(ROWS, -1), raw_dtype=qtype)
    write_gguf_file(w)


def ours_float32(weights, i):
    """Our tensor ``i`` dequantized in float32 (where an exact mapping is exact)."""
    base = f"model.layers.{i}.mlp.up_proj"
    w = weights[f"{base}.weight"]
    if f"{base}.scales" not in weights:
        return np.array(w.astype(mx.float32)), None
    s, b = weights[f"{base}.scales"], weights[f"{base}.biases"]
    bits = w.shape[-1] * 32 // COLS
    assert s.shape == (ROWS, COLS // 32)
    return np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                                  group_size=32, bits=bits)), bits


@pytest.fixture(scope="module")
def values():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
    x[: ROWS // 3] += 0.02  # row offsets: the minima of Q4_1 / Q5_1 matter
    return rng, x


def test_exact_types_equal_gguf_dequantize_bit_for_bit(values, tmp_path):
    rng, x = values
    n_k = ROWS * COLS // 256
    tensors = [(t, random_k_blocks(rng, t, n_k) if t in (Q.Q4_K, Q.Q5_K) else gguf.quants.quantize(x, t))
               for t in EXACT]
    tensors += [(Q.F32, x), (Q.F16, x.astype(np.float16)), (Q.BF16, gguf.quants.quantize(x, Q.BF16))]
    path = tmp_path / "exact.gguf"
    write(path, tensors)
    weights = our_gguf.load_weights(path)
    for i, ((qtype, _), (_, _, expected)) in enumerate(zip(tensors, file_tensors(path))):
        got, bits = ours_float32(weights, i)
        assert bits == EXACT.get(qtype), qtype.name
        assert np.array_equal(got, expected), f"{qtype.name} differs from gguf's dequantize"
    assert weights["model.layers.9.mlp.up_proj.weight"].dtype == mx.bfloat16


def test_q6_k_is_8_bit_group_32_with_measured_error(values, tmp_path):
    """Q6_K loads as 8-bit group 32: exact where a group's two sub-block scales allow it,
    else within half an 8-bit step; measured against Q6_K's own quantization error."""
    _, x = values
    blocks = x.reshape(-1, 256)
    path = tmp_path / "q6k.gguf"
    write(path, [(Q.Q6_K, q6_k_blocks(blocks)), (Q.Q6_K, q6_k_blocks(blocks, equal_pairs=True))])
    weights = our_gguf.load_weights(path)
    (_, _, general), (_, _, exact_pairs) = file_tensors(path)
    got, bits = ours_float32(weights, 1)
    assert bits == 8 and np.array_equal(got, exact_pairs)
    got, _ = ours_float32(weights, 0)
    ours_err = got - general
    own_err = general - x  # Q6_K's own error against the original values
    ratio = np.sqrt(np.mean(ours_err**2) / np.mean(own_err**2))
    group = general.reshape(ROWS, -1, 32)
    half_step = (group.max(axis=2) - group.min(axis=2)) / 255 / 2
    worst = np.abs(ours_err.reshape(ROWS, -1, 32)).max(axis=2)
    assert (worst <= half_step * 1.001).all()  # 1.001: float32 rounding of scale * code + bias
    # measured: the extra RMS error is 0.21 of Q6_K's own (so 2 % more error in all), max
    # half an 8-bit step; on these weights (std 0.05), extra RMS 2.2e-4, max 6.1e-4
    assert 0.1 < ratio < 0.25, ratio


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.IQ4_XS])
def test_unsupported_types_are_one_line_errors(qtype, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "bad.gguf"
    write(path, [(qtype, random_k_blocks(rng, qtype, ROWS * COLS // 256))])
    message = model_error(our_gguf.read_header, path)
    assert qtype.name in message and "blk.0.ffn_up.weight" in message


def test_q4_k_m_style_llama_loads_through_mlx_lm(tmp_path):
    """A tiny llama typed as a Q4_K_M file (Q4_K, Q6_K for ffn_down and the embedding, plus
    Q5_K / Q5_0; Q6_K with paired sub-block scales, so exact too): each module holds gguf's
    values bit for bit, the forward matches mlx-lm's llama built from gguf's floats, and
    the converted directory gives stock mlx-lm the same logits."""
    path = tiny_llama(tmp_path / "km.gguf", Q4_K_M)
    model, _, config = mlx_qspec.load(path, dtype=mx.float32, return_config=True)
    q = config["quantization"]
    layer = "model.layers.0"
    assert (q["bits"], q[f"{layer}.mlp.down_proj"]["bits"], q[f"{layer}.self_attn.v_proj"]["bits"],
            q["model.embed_tokens"]["bits"]) == (4, 8, 5, 8)
    modules, reference = dict(model.named_modules()), {}
    for gguf_name, _, expected in file_tensors(path):
        name = our_gguf.ARCHITECTURES["llama"].mlx_name(gguf_name)
        module = modules[name[: -len(".weight")]]
        assert np.array_equal(dequantized(module), expected), gguf_name
        reference[name] = expected
    ref = reference_llama(Config(hidden=HIDDEN, layers=LAYERS, ffn=FFN, heads=HEADS, kv_heads=HEADS),
                          reference, traditional=True)
    prompt = mx.array([[0, 40, 71, 120, 7, 200, 3, 250, 33]])
    a, b = np.array(model(prompt)), np.array(ref(prompt))
    gap = relative_gap(a, b)
    assert np.isfinite(a).all() and gap < RTOL, gap  # float32 rounding only
    # convert → stock mlx-lm reads the same triples (4-, 5- and 8-bit layers side by side)
    stock, _ = mlx_lm_load(str(convert(str(path), str(tmp_path / "mlx"), dtype="float32")))
    assert mx.array_equal(stock(prompt), model(prompt)).item()


# ---------------------------------------------------------------- tokenizers
# Each kind: a tiny vocabulary trained here by an independent library (sentencepiece for the
# SentencePiece kinds, tokenizers' BPE trainer with the model's published split regex for the
# byte-level kinds), written into GGUF metadata as llama.cpp's converter writes it, rebuilt by
# our reader; ids must equal the reference tokenizer's.
TEXTS = [
    "Hello world, this is plain ASCII text.",
    "über naïve café — 日本語 🙂 ☃ ∑x²",
    "def f(x):\n    return x**2  # 2024 12345\n\t\tend",
    "  leading spaces and  double  spaces ",
]
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def corpus():
    """Training text that does not change with this project: stdlib sources, numbers, Unicode."""
    text = Path(textwrap.__file__).read_text() + Path(json.__file__).read_text()
    text += "\n".join(f"in {y} there were {n} items, 1000 and 12345"
                      for y, n in zip(range(1990, 2030), range(7, 400, 9)))
    text += "\nüber naïve café 日本語 — ∑ ✓\n" * 5
    return [line for line in text.splitlines() if line.strip()]


def our_tokenizer(tmp_path, arch, metadata):
    """Our tokenizer from a GGUF that gguf's writer writes (``metadata``: ``{writer method
    without 'add_': value}``) and our reader reads."""
    path = tmp_path / "tok.gguf"
    write_gguf_file(gguf_writer(path, arch, metadata.items()))
    out = tmp_path / "tok"
    out.mkdir()
    our_gguf.write_tokenizer(our_gguf.read_header(path)[0], path, out)
    (out / "config.json").write_text('{"model_type": "llama"}')
    return load_tokenizer(out)


def sentencepiece_metadata(**trainer):
    """A SentencePiece BPE model trained on ``corpus()``, as llama.cpp's converter stores it."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=700, model_type="bpe",
        byte_fallback=True, user_defined_symbols=SPECIALS, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's, Gemma's
        **trainer)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i) in SPECIALS else 1 for i in range(n)]
    return sp, {
        "tokenizer_model": "llama", "token_list": [sp.id_to_piece(i) for i in range(n)],
        "token_scores": [float(sp.get_score(i)) for i in range(n)], "token_types": types,
        "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unk_token_id": sp.unk_id(),
    }


@pytest.mark.parametrize("arch,trainer", [
    ("llama", {}),
    ("llama", dict(add_dummy_prefix=False)),  # stored as tokenizer.ggml.add_space_prefix false
    # Gemma's SentencePiece: no dummy prefix, digits split
    ("gemma3", dict(add_dummy_prefix=False, split_digits=True)),
], ids=["llama", "llama-no-prefix", "gemma3"])
def test_sentencepiece_ids_equal_sentencepiece(arch, trainer, tmp_path):
    sp, metadata = sentencepiece_metadata(**trainer)
    if arch == "llama" and trainer.get("add_dummy_prefix") is False:
        metadata["add_space_prefix"] = False
    ours = our_tokenizer(tmp_path, arch, metadata)
    for text in TEXTS:
        expected = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.encode(text) == [sp.bos_id()] + expected, text  # llama.cpp adds BOS
        assert ours.decode(expected) == sp.decode(expected), text
    # Special tokens are matched whole (control ones too, unlike sentencepiece), and each text
    # piece between them is encoded on its own, as llama.cpp does.
    im_start, im_end = (sp.piece_to_id(t) for t in SPECIALS)
    text = f"{SPECIALS[0]}user\n 12 hi{SPECIALS[1]}</s>x"
    expected = [im_start, *sp.encode("user\n 12 hi"), im_end, sp.eos_id(), *sp.encode("x")]
    assert ours.encode(text, add_special_tokens=False) == expected
    assert len(ours) == sp.get_piece_size()


# The split regexes as published in the models' own tokenizer.json files.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("arch,pre,split", [("llama", "llama-bpe", LLAMA3_SPLIT),
                                            ("qwen2", "qwen2", QWEN2_SPLIT)])
def test_byte_level_bpe_ids_equal_reference(arch, pre, split, tmp_path):
    def splitting(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    ref = Tokenizer(models.BPE())
    ref.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *SPECIALS]
    # Trained with llama-3's split (so it has multi-digit tokens), encoded with the one under test.
    ref.pre_tokenizer = splitting(LLAMA3_SPLIT)
    ref.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ref.pre_tokenizer = splitting(split)
    data = ref.to_str()
    model = json.loads(data)["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ours = our_tokenizer(tmp_path, arch, {
        "tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
        "token_types": [3 if t in specials else 1 for t in tokens], "eos_token_id": 0,
        "add_bos_token": False,
    })
    assert any(t.isdigit() and len(t) > 1 for t in tokens)  # digit merges: the splits differ on them
    for text in TEXTS + [f"{SPECIALS[0]}user\n 12345 hi{SPECIALS[1]}<|endoftext|>"]:
        expected = ref.encode(text).ids
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
    assert len(ours) == len(tokens)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(ModelError, match="pre-tokenizer 'made-up'"):
        our_tokenizer(tmp_path, "llama", {"tokenizer_model": "gpt2", "tokenizer_pre": "made-up",
                                          "token_list": byte_symbols()})


# ---------------------------------------------------------------- RoPE scaling
R = gguf.RopeScalingType


@pytest.mark.parametrize("extra,expected", [
    ({}, None),
    ({"rope_scaling_type": R.NONE}, None),
    ({"rope_scaling_type": R.LINEAR, "rope_scaling_factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"rope_scaling_type": R.YARN, "rope_scaling_factor": 4.0, "rope_scaling_orig_ctx_len": 32,
      "rope_scaling_yarn_beta_fast": 16.0},
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0}),
], ids=["absent", "none", "linear", "yarn"])
def test_rope_scaling_is_honoured(extra, expected, tmp_path):
    model, _, config = mlx_qspec.load(tiny_llama(tmp_path / "r.gguf", Q4_K_M, **extra), return_config=True)
    assert config.get("rope_scaling") == expected
    rope = model.layers[0].self_attn.rope
    if expected is None or expected["type"] == "linear":
        assert rope.scale == (1 / expected["factor"] if expected else 1.0)
    else:
        assert isinstance(rope, YarnRoPE)


@pytest.mark.parametrize("extra,words", [
    ({"rope_scaling_type": R.LONGROPE, "rope_scaling_factor": 4.0}, ["longrope"]),
    ({"rope_scaling_type": R.YARN, "rope_scaling_factor": 4.0}, ["yarn"]),  # no original context
    ({"rope_scaling_type": R.YARN, "rope_scaling_factor": 4.0, "rope_scaling_orig_ctx_len": 32,
      "rope_scaling_yarn_log_mul": 0.1}, ["yarn_log_multiplier"]),
    ({"rope_dimension_count": 32}, ["partial RoPE"]),
], ids=["longrope", "yarn-without-context", "yarn-log-multiplier", "partial"])
def test_rope_scaling_not_reproducible_is_refused(extra, words, tmp_path):
    path = tiny_llama(tmp_path / "r.gguf", Q4_K_M, **extra)
    message = model_error(mlx_qspec.load, path)
    assert all(w in message for w in words), message
