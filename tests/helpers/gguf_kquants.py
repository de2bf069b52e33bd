"""GGUF files with k-quant tensors, through ``gguf.GGUFWriter``: Q4_K / Q5_K blocks of random
bytes (every 6-bit scale and min occurs, finite f16 super-scales), Q6_K blocks from a small
quantizer, and a tiny llama typed like a Q4_K_M file."""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from . import byte_symbols, gguf_writer, write_gguf_file

BLOCK_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210, Q.Q2_K: 84, Q.Q3_K: 110, Q.IQ4_XS: 136}


def random_k_blocks(rng, qtype, n_blocks, high=2e-2):
    """Random k-quant blocks; the f16 super-scale(s) (d, dmin at the start) kept finite."""
    blocks = rng.integers(0, 256, (n_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    blocks[:, 0:4] = rng.uniform(high / 200, high, (n_blocks, 2)).astype(np.float16).view(np.uint8)
    return blocks


def q6_k_blocks(x, equal_pairs=False):
    """Q6_K blocks of ``x`` (n, 256): d·sc per 16 values, sc int8, q 6-bit (value d·sc·(q−32)).
    The layout is the inverse of ``gguf.quants.Q6_K.dequantize_blocks``. ``equal_pairs``: both
    halves of each 32-value group share one scale (then 8-bit group 32 holds it exactly)."""
    n = len(x)
    sub = x.reshape(n, 16, 16)
    s = np.abs(sub).max(axis=2) / 31.5
    if equal_pairs:
        s = np.repeat(s.reshape(n, 8, 2).max(axis=2), 2, axis=1)
    d = (s.max(axis=1) / 127).astype(np.float16)
    sc = np.clip(np.rint(s / d.astype(np.float32)[:, None]), 1, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None, None] * sc[:, :, None]
    q = (np.clip(np.rint(sub / step), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(n, 128)  # values r and r + 64 per byte
    qh = sum(high[:, :, i] << (2 * i) for i in range(4)).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)


HIDDEN, FFN, HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 259
Q4_K_M = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q5_K, "attn_output": Q.Q5_0,
          "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K}


def tiny_llama(path, types, **extra):
    """A tiny llama GGUF with linear layers of ``types``; ``extra``: further metadata as
    ``{writer method without 'add_': value}``. Q6_K with paired sub-block scales (exact)."""
    rng = np.random.default_rng(2)
    w = gguf_writer(path, "llama", [
        ("context_length", 128), ("embedding_length", HIDDEN), ("block_count", LAYERS),
        ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", HEADS),
        ("layer_norm_rms_eps", 1e-5), ("tokenizer_model", "gpt2"),
        ("token_list", ["<s>", "</s>", "<pad>"] + byte_symbols()),
        ("token_types", [3, 3, 3] + [1] * 256), *extra.items()])

    def tensor(name, qtype, shape):
        x = rng.normal(0, 0.05, shape).astype(np.float32)
        if qtype == Q.F32:
            data = (1 + x).astype(np.float32)
        elif qtype == Q.Q6_K:
            data = q6_k_blocks(x.reshape(-1, 256), equal_pairs=True).reshape(shape[0], -1)
        elif qtype in (Q.Q4_K, Q.Q5_K):
            data = random_k_blocks(rng, qtype, x.size // 256, high=3e-4).reshape(shape[0], -1)
        else:
            data = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)

    shapes = {"ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    tensor("token_embd.weight", types["token_embd"], (VOCAB, HIDDEN))
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", Q.F32, (HIDDEN,))
        tensor(f"blk.{i}.ffn_norm.weight", Q.F32, (HIDDEN,))
        for key in ("attn_q", "attn_k", "attn_v", "attn_output", *shapes):
            tensor(f"blk.{i}.{key}.weight", types[key], shapes.get(key, (HIDDEN, HIDDEN)))
    tensor("output_norm.weight", Q.F32, (HIDDEN,))
    write_gguf_file(w)
    return path
