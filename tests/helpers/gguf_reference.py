"""A tiny llama GGUF written by llama.cpp's own Python package (``gguf.GGUFWriter``), its
tensors quantized by ``gguf.quants`` (Q4_0, Q4_1, Q8_0) after permuting the Q and K rows as
llama.cpp's converter does; a byte-level tokenizer with no merges, so any text is one token
per UTF-8 byte (plus one per special token) and token counts are arithmetic. And what the
GGUF tests compare with: mlx-lm's llama built from float tensors, gguf's own dequantization
of a file's tensors, a loaded module's values in float32."""

from dataclasses import dataclass

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from mlx_lm.models import llama

from . import add_tensor, byte_symbols, gguf_writer, write_gguf_file

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID, BOS_ID = 2, 1
# No default system prompt: the tokens a system prompt adds are exactly its own turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Tokens: the specials, then one token per byte. No merges, so any text is one token
# per UTF-8 byte (plus one per special token): token counts are known without a tokenizer.
TOKENS = SPECIALS + byte_symbols()
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * 256


@dataclass(frozen=True)
class Config:
    hidden: int = 64
    layers: int = 2
    ffn: int = 128
    heads: int = 4
    kv_heads: int = 4
    eps: float = 1e-5
    theta: float = 10000.0
    tied: bool = True

    @property
    def head_dim(self):
        return self.hidden // self.heads


MHA = Config()                                   # Q and K have the same shape
GQA = Config(kv_heads=2, tied=False, theta=100000.0)  # as SmolLM2: fewer KV heads, own head

# GGUF block tensor → (mlx-lm module, GGUF type); an independent copy of the mapping.
BLOCK = {
    "attn_norm": ("input_layernorm", Q.F32),
    "attn_q": ("self_attn.q_proj", Q.Q4_0),
    "attn_k": ("self_attn.k_proj", Q.Q4_1),
    "attn_v": ("self_attn.v_proj", Q.Q8_0),
    "attn_output": ("self_attn.o_proj", Q.Q4_0),
    "ffn_gate": ("mlp.gate_proj", Q.Q4_1),
    "ffn_up": ("mlp.up_proj", Q.Q4_0),
    "ffn_down": ("mlp.down_proj", Q.Q8_0),
    "ffn_norm": ("post_attention_layernorm", Q.F32),
}
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


def permute(w, n_head, n_head_kv=None):
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half row order → GGUF's interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """Inverse of :func:`permute` (with the head count it was permuted with)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(cfg: Config, seed=0, embed_std=1.0):
    """Original (HF-layout, un-permuted) float32 tensors: gguf name → (array, type, mlx name).
    ``embed_std`` sets the spread of the (tied) logits: small makes sampling far from greedy."""
    rng = np.random.default_rng(seed)
    H, F, hd = cfg.hidden, cfg.ffn, cfg.head_dim
    V = len(TOKENS)
    normal = lambda shape, std: (rng.normal(0, std, shape)).astype(np.float32)  # noqa: E731
    norm = lambda: rng.uniform(0.6, 1.4, (H,)).astype(np.float32)  # noqa: E731
    shapes = {
        "attn_q": (cfg.heads * hd, H, 0.3), "attn_k": (cfg.kv_heads * hd, H, 0.3),
        "attn_v": (cfg.kv_heads * hd, H, 0.2), "attn_output": (H, cfg.heads * hd, 0.2),
        "ffn_gate": (F, H, 0.2), "ffn_up": (F, H, 0.2), "ffn_down": (H, F, 0.15),
    }
    out = {"token_embd.weight": (normal((V, H), embed_std), Q.Q8_0, "model.embed_tokens.weight")}
    for i in range(cfg.layers):
        for key, (module, qtype) in BLOCK.items():
            if key.endswith("norm"):
                value = norm()
            else:
                rows, cols, std = shapes[key]
                value = normal((rows, cols), std)
                value[: rows // 4] += np.float32(0.1)  # a per-row offset: Q4_1 minima / Q4_0 asymmetry
            out[f"blk.{i}.{key}.weight"] = (value, qtype, f"model.layers.{i}.{module}.weight")
    out["output_norm.weight"] = (norm(), Q.F32, "model.norm.weight")
    if not cfg.tied:
        out["output.weight"] = (normal((V, H), 0.5), Q.F16, "lm_head.weight")
    return out


def write_gguf(path, cfg: Config, seed=0, embed_std=1.0):
    """Write the tiny llama with llama.cpp's writer and quantizers. Returns the reference
    weights (mlx-lm names, HF layout, float32 — each the gguf dequantization of what was
    written, un-permuted)."""
    w = gguf_writer(path, "llama", [
        ("name", "tiny-reference"), ("context_length", 256), ("embedding_length", cfg.hidden),
        ("block_count", cfg.layers), ("feed_forward_length", cfg.ffn), ("head_count", cfg.heads),
        ("head_count_kv", cfg.kv_heads), ("layer_norm_rms_eps", cfg.eps),
        ("rope_freq_base", cfg.theta), ("rope_dimension_count", cfg.head_dim),
        ("tokenizer_model", "gpt2"), ("tokenizer_pre", "default"), ("token_list", TOKENS),
        ("token_types", TOKEN_TYPES), ("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID),
        ("add_bos_token", False), ("chat_template", CHAT_TEMPLATE)])
    reference = {}
    for name, (value, qtype, mlx_name) in hf_tensors(cfg, seed, embed_std).items():
        heads = {"attn_q": cfg.heads, "attn_k": cfg.kv_heads}.get(name.split(".")[-2])  # Q, K: permuted
        deq = add_tensor(w, name, value if heads is None else permute(value, heads), qtype)
        reference[mlx_name] = (deq if heads is None else unpermute(deq, heads)).astype(np.float32)
    write_gguf_file(w)
    return reference


def reference_llama(cfg: Config, weights: dict, *, traditional=False):
    """mlx-lm's llama, float weights straight from ``weights`` (no quantized layers)."""
    args = llama.ModelArgs(
        model_type="llama", hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        intermediate_size=cfg.ffn, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.eps, vocab_size=len(TOKENS),
        rope_theta=cfg.theta, rope_traditional=traditional, tie_word_embeddings=cfg.tied,
    )
    model = llama.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


RTOL = 2e-5  # float32 rounding: quantized_matmul vs dense matmul of the same values


def relative_gap(a, b):
    """The largest difference of ``a`` from ``b``, relative to ``b``'s scale."""
    return np.abs(a - b).max() / np.abs(b).max()


def file_tensors(path):
    """Every tensor of the GGUF file at ``path``: (name, type, float32 values), as gguf's own
    reader and dequantizer give them (in MLX's shape order)."""
    for t in gguf.GGUFReader(str(path)).tensors:
        qtype = Q(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        yield t.name, qtype, gguf.quants.dequantize(t.data, qtype).reshape(shape).astype(np.float32)


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
