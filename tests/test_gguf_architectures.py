"""Qwen3, Gemma and Gemma 3 (text) GGUF files against mlx-lm models built from the test's own
tensors.

Each file is written with llama.cpp's ``gguf.GGUFWriter`` as llama.cpp's converter
(convert_hf_to_gguf.py) writes these architectures: Q / K rows in Hugging Face order (both use
NeoX RoPE, no permutation), head_dim in ``attention.key_length``, per-head q/k norms (Qwen3,
Gemma 3), for Gemma and Gemma 3 every norm weight stored as w + 1 (``Gemma3Model.norm_shift``,
``GemmaModel.modify_tensors``), and for Gemma 3 the sliding window in
``gemma3.attention.sliding_window`` (the pattern of 6 and the local RoPE base 10000 are
llama.cpp's code, not metadata). Tensors are Q8_0 / Q4_0 / Q4_1 (``gguf.quants.quantize``),
Q4_K (random blocks: gguf cannot quantize k-quants), F16 and F32.

The reference is mlx-lm's own class (``qwen3`` / ``gemma`` / ``gemma3_text``) loaded directly with the
Hugging Face-convention float weights w — each quantized tensor dequantized with
``gguf.quants.dequantize`` — and the configuration the test chose; nothing on the reference side
goes through ``mlx_qspec.gguf``.
"""

from dataclasses import dataclass, replace

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlx_lm.models import gemma, gemma3_text, qwen3
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import load as mlx_lm_load

import mlx_qspec
from mlx_qspec import gguf as our_gguf
from mlx_qspec.convert import convert
from helpers.gguf_reference import (
    BOS_ID, EOS_ID, RTOL, TOKEN_TYPES, TOKENS, dequantized, file_tensors, permute, relative_gap,
)
from helpers.gguf_kquants import random_k_blocks
from helpers import add_tensor, gguf_writer, model_error, write_gguf_file


@dataclass(frozen=True)
class Case:
    arch: str  # GGUF general.architecture
    layers: int
    tied: bool
    types: dict  # GGUF block tensor -> type
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32  # not hidden / heads: must come from attention.key_length
    ffn: int = 256  # ffn_down rows of 256: whole Q4_K blocks
    eps: float = 1e-6
    theta: float = 1e6
    window: int = 8  # gemma3: shorter than the prompt, so the window masks

    @property
    def shift(self):
        return 1.0 if self.arch.startswith("gemma") else 0.0


KQUANT_MIX = {"attn_q": Q.Q4_0, "attn_k": Q.Q8_0, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
              "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_K, "token_embd": Q.Q8_0}
# only types mx.load reads itself: the reader's other path (norm shift included)
MX_LOAD_MIX = {**KQUANT_MIX, "ffn_down": Q.Q4_1}

QWEN3 = Case("qwen3", layers=2, tied=False, types=KQUANT_MIX)
GEMMA3 = Case("gemma3", layers=6, tied=True, types=KQUANT_MIX)  # 5 sliding layers, 1 global
GEMMA3_MX_LOAD = replace(GEMMA3, types=MX_LOAD_MIX)
GEMMA = Case("gemma", layers=2, tied=True, types=KQUANT_MIX, kv_heads=4)

NORMS = {  # GGUF block norm -> mlx-lm module; an independent copy of the mapping
    "gemma": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "qwen3": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma3": {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def hf_tensors(case: Case, seed=0):
    """HF-convention float32 tensors: gguf name -> (w, GGUF type, mlx-lm name)."""
    rng = np.random.default_rng(seed)
    H, F, hd, V = case.hidden, case.ffn, case.head_dim, len(TOKENS)
    normal = lambda shape, std: rng.normal(0, std, shape).astype(np.float32)  # noqa: E731
    # Gemma's gain is 1 + w (w around 0, a few below -0.5); others' is w (around 1)
    low, high = (-0.7, 0.5) if case.shift else (0.6, 1.4)
    norm = lambda n: rng.uniform(low, high, n).astype(np.float32)  # noqa: E731
    shapes = {"attn_q": (case.heads * hd, H), "attn_k": (case.kv_heads * hd, H),
              "attn_v": (case.kv_heads * hd, H), "attn_output": (H, case.heads * hd),
              "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F)}
    out = {"token_embd.weight": (normal((V, H), 1.0), case.types["token_embd"], "model.embed_tokens.weight")}
    for i in range(case.layers):
        for key, module in NORMS[case.arch].items():
            n = hd if key in ("attn_q_norm", "attn_k_norm") else H
            out[f"blk.{i}.{key}.weight"] = (norm(n), Q.F32, f"model.layers.{i}.{module}.weight")
        for key, module in LINEARS.items():
            value = normal(shapes[key], 0.25)
            value[: len(value) // 4] += np.float32(0.1)  # row offsets: Q4_1 minima matter
            out[f"blk.{i}.{key}.weight"] = (value, case.types[key], f"model.layers.{i}.{module}.weight")
    out["output_norm.weight"] = (norm(H), Q.F32, "model.norm.weight")
    if not case.tied:
        out["output.weight"] = (normal((V, H), 0.5), Q.F16, "lm_head.weight")
    return out


def write_gguf(path, case: Case, seed=0, **extra):
    """Write ``case`` as llama.cpp's converter would; ``extra``: further metadata as
    ``{writer method without 'add_': value}``. Returns the reference weights (mlx-lm names,
    HF convention, float32: each the gguf dequantization of what was written, norms unshifted)."""
    rng = np.random.default_rng(seed + 1)
    meta = [("context_length", 256), ("embedding_length", case.hidden), ("block_count", case.layers),
            ("feed_forward_length", case.ffn), ("head_count", case.heads),
            ("head_count_kv", case.kv_heads), ("key_length", case.head_dim),
            ("value_length", case.head_dim), ("layer_norm_rms_eps", case.eps),
            ("rope_freq_base", case.theta), ("tokenizer_model", "gpt2"), ("tokenizer_pre", "qwen2"),
            ("token_list", TOKENS), ("token_types", TOKEN_TYPES), ("bos_token_id", BOS_ID),
            ("eos_token_id", EOS_ID), ("add_bos_token", False)]
    if case.arch == "gemma3":
        meta.append(("sliding_window", case.window))
    w = gguf_writer(path, case.arch, [*meta, *extra.items()])
    reference = {}
    for name, (value, qtype, mlx_name) in hf_tensors(case, seed).items():
        if qtype == Q.F32:  # norms: w + 1 for Gemma, in float32 as the converter adds it
            add_tensor(w, name, value + np.float32(case.shift), qtype)
            deq = value  # the reference keeps w
        else:
            data = None
            if qtype == Q.Q4_K:
                data = random_k_blocks(rng, qtype, value.size // 256, high=4e-4).reshape(len(value), -1)
            deq = add_tensor(w, name, value, qtype, data)
        reference[mlx_name] = deq.astype(np.float32)
    write_gguf_file(w)
    return reference


def reference_model(case: Case, weights: dict, **overrides):
    """mlx-lm's class for ``case``, float weights straight from ``weights``."""
    common = dict(hidden_size=case.hidden, num_hidden_layers=case.layers,
                  intermediate_size=case.ffn, num_attention_heads=case.heads,
                  num_key_value_heads=case.kv_heads, head_dim=case.head_dim,
                  rms_norm_eps=case.eps, vocab_size=len(TOKENS), rope_theta=case.theta,
                  max_position_embeddings=256)
    if case.arch == "qwen3":
        module, args = qwen3, dict(model_type="qwen3", tie_word_embeddings=case.tied)
    elif case.arch == "gemma":
        module, args = gemma, dict(model_type="gemma")
    else:
        module, args = gemma3_text, dict(model_type="gemma3_text", sliding_window=case.window,
                                          sliding_window_pattern=6, rope_local_base_freq=10000.0,
                                          query_pre_attn_scalar=case.head_dim)
    model = module.Model(module.ModelArgs.from_dict({**common, **args, **overrides}))
    weights = {k: mx.array(v) for k, v in weights.items()}
    if hasattr(model, "sanitize"):  # gemma3_text: drops its head when tied
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


PROMPT = mx.array([[BOS_ID, 40, 71, 120, 7, 200, 3, 258, 150, 33, 80, 99, 12, 64, 250, 31,
                    90, 17, 222, 5]])  # 20 tokens: past the window of 8


def logits_of(model):
    return np.array(model(PROMPT).astype(mx.float32), np.float64)[0]


@pytest.fixture(scope="module", params=[QWEN3, GEMMA3, GEMMA3_MX_LOAD, GEMMA],
                ids=["qwen3-untied", "gemma3-tied", "gemma3-mx-load-types", "gemma"])
def written(request, tmp_path_factory):
    case = request.param
    path = tmp_path_factory.mktemp("gguf_arch") / f"{case.arch}.gguf"
    reference = write_gguf(path, case)
    model, _, config = mlx_qspec.load(path, dtype=mx.float32, return_config=True)
    return case, path, reference, model, config


def test_forward_equals_mlx_lm_model_built_from_the_tensors(written):
    case, path, reference, model, config = written
    assert config["model_type"] == {"qwen3": "qwen3", "gemma": "gemma", "gemma3": "gemma3_text"}[case.arch]
    assert config["architectures"] == [{"qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
                                        "gemma3": "Gemma3ForCausalLM"}[case.arch]]
    ref = logits_of(reference_model(case, reference))
    gap = relative_gap(logits_of(model), ref)
    assert gap <= RTOL, f"relative logit gap {gap:.3g}"
    # The comparison has power: mapping mistakes give gaps orders of magnitude larger.
    wrong = []
    if case.shift:  # norms left as stored (w + 1)
        wrong.append({k: v + np.float32(1) if k.endswith("norm.weight") else v for k, v in reference.items()})
    if "attn_q_norm" in NORMS[case.arch]:  # q / k norms swapped (same size)
        swapped = dict(reference)
        for i in range(case.layers):
            q, k = (f"model.layers.{i}.self_attn.{n}_norm.weight" for n in "qk")
            swapped[q], swapped[k] = reference[k], reference[q]
        wrong.append(swapped)
    permuted = dict(reference)  # Q / K rows as llama.cpp permutes llama's (traditional RoPE)
    for i in range(case.layers):
        for proj, heads in (("q_proj", case.heads), ("k_proj", case.kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            permuted[key] = permute(reference[key], heads)
    wrong.append(permuted)
    for weights in wrong:
        assert relative_gap(logits_of(reference_model(case, weights)), ref) > 100 * RTOL
    if case.arch == "gemma3":  # no sliding window / the local base as the global one
        for overrides in ({"sliding_window_pattern": 1}, {"rope_local_base_freq": case.theta}):
            assert relative_gap(logits_of(reference_model(case, reference, **overrides)), ref) > 100 * RTOL


def test_converted_directory_equals_mlx_lm_model_built_from_the_tensors(written, tmp_path):
    """``mlx_qspec.convert`` -> stock mlx-lm loads the directory -> the reference's logits."""
    case, path, reference, _, _ = written
    model, _ = mlx_lm_load(str(convert(str(path), str(tmp_path / "mlx"), dtype="float32")))
    gap = relative_gap(logits_of(model), logits_of(reference_model(case, reference)))
    assert gap <= RTOL, f"relative logit gap {gap:.3g}"


def test_tensors_are_the_written_ones(written):
    """Every loaded tensor dequantizes to gguf's dequantization of the file (bit for bit), a
    Gemma norm w as the stored w + 1 gives back: 1 + w == stored wherever stored >= 0.5."""
    case, path, reference, model, _ = written
    params, modules = dict(tree_flatten(model.parameters())), dict(model.named_modules())
    assert "lm_head.weight" not in params if case.tied else "lm_head.weight" in params
    for gguf_name, _, stored in file_tensors(path):
        module = modules[our_gguf.ARCHITECTURES[case.arch].mlx_name(gguf_name)[: -len(".weight")]]
        if gguf_name.endswith("norm.weight") and case.shift:
            got = np.array(module.weight)
            assert got.dtype == np.float32
            back = np.float32(1) + got
            exact = stored >= 0.5
            assert exact.mean() > 0.5 and np.array_equal(back[exact], stored[exact]), gguf_name
            assert np.abs(back - stored).max() <= 2.0 ** -24, gguf_name
        else:
            assert np.array_equal(dequantized(module), stored), gguf_name


# ---------------------------------------------------------------- Gemma 3's configuration
def _config(tmp_path, case=replace(GEMMA3, layers=7), **extra):
    path = tmp_path / "g.gguf"
    write_gguf(path, case, **extra)
    return mlx_qspec.load(path, lazy=True, return_config=True)


def test_gemma3_sliding_window_survives(tmp_path):
    model, _, config = _config(tmp_path, rope_scaling_type=gguf.RopeScalingType.LINEAR,
                               rope_scaling_factor=8.0,  # a per-layer pattern (true: sliding)
                               sliding_window_pattern=[True] * 5 + [False, True])
    args = model.args
    assert (args.sliding_window, args.sliding_window_pattern) == (8, 6)
    assert (args.rope_theta, args.rope_local_base_freq) == (1e6, 10000.0)
    assert args.query_pre_attn_scalar == 32 and args.head_dim == 32
    assert config["rope_scaling"] == {"type": "linear", "factor": 8.0}
    # layers 0-4 and 6 slide (local base, unscaled), layer 5 is global (scaled by 1/8)
    ropes = [layer.self_attn.rope for layer in model.layers]
    assert [r.base for r in ropes] == [1e4] * 5 + [1e6] + [1e4]
    assert [r.scale for r in ropes] == [1.0] * 5 + [1 / 8] + [1.0]
    caches = model.make_cache()
    assert [type(c) for c in caches] == [RotatingKVCache] * 5 + [KVCache] + [RotatingKVCache]
    assert caches[0].max_size == 8


def test_gemma3_without_sliding_window_is_all_global(tmp_path):
    case = replace(GEMMA3, window=0)
    path = tmp_path / "g.gguf"
    w = write_gguf(path, case)
    model, _, config = mlx_qspec.load(path, dtype=mx.float32, return_config=True)
    assert config["sliding_window_pattern"] == 1
    assert all(type(c) is KVCache for c in model.make_cache())
    ref = reference_model(case, w, sliding_window_pattern=1)
    assert relative_gap(logits_of(model), logits_of(ref)) <= RTOL


@pytest.mark.parametrize("case,extra,words", [
    (GEMMA3, {"final_logit_softcapping": 30.0}, ["final logit softcapping"]),
    (GEMMA3, {"sliding_window_pattern": 4}, ["sliding-window pattern 4 "]),
    (GEMMA, {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 2.0},
     ["RoPE scaling", "gemma"]),
], ids=["gemma3-softcapping", "gemma3-pattern", "gemma-rope-scaling"])
def test_settings_mlx_lm_cannot_follow_are_refused(case, extra, words, tmp_path):
    message = model_error(_config, tmp_path, case, **extra)
    assert all(w in message for w in words), message


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf_file(gguf_writer(path, "made-up", [("token_list", TOKENS)]))
    message = model_error(mlx_qspec.load, path)
    assert "'made-up'" in message
    assert all(a in message for a in ("llama", "qwen2", "qwen3", "gemma3")), message
