"""A tiny GGUF v3 file written byte by byte (no library writes it): a tiny llama (or qwen2)
with Q4_0, Q4_1 and Q8_0 linears, a byte-level BPE tokenizer with a few merges. Its block
tensors, their types and the tokenizer's specials are ``gguf_reference``'s."""

import struct
from pathlib import Path

import numpy as np

from . import byte_symbols
# BLOCK: both Q4 flavours and Q8_0 in every block, so the per-module quantization overrides
# are exercised too.
from .gguf_reference import BLOCK, BOS_ID, CHAT_TEMPLATE, EOS_ID, SPECIALS

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 64, 2, 128, 4, 2
EPS, THETA, CONTEXT = 1e-5, 10000.0, 512
MERGES = ["t h", "th e", "Ġ the", "h e", "l l", "he ll", "hell o", "1 2"]
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q2_K": 10}


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
        "attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (ffn, HIDDEN), "ffn_up": (ffn, HIDDEN), "ffn_down": (HIDDEN, ffn), "ffn_norm": (HIDDEN,),
    }
    specs = [("token_embd.weight", "model.embed_tokens", (len(tokens), HIDDEN), "Q8_0")]
    for i in range(LAYERS):
        for k, (module, qtype) in BLOCK.items():
            specs.append((f"blk.{i}.{k}.weight", f"model.layers.{i}.{module}", shapes[k], qtype.name))
            if arch == "qwen2" and k in ("attn_q", "attn_k", "attn_v"):  # qwen2: q/k/v biases
                specs.append((f"blk.{i}.{k}.bias", f"model.layers.{i}.{module}.bias", shapes[k][:1], "F32"))
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
