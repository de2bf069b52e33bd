"""Read GGUF files (llama, qwen2, qwen3, gemma, gemma3 text) as MLX models without a
dequantize round trip.

Block-quantized tensors become MLX affine (weight, scales, biases) triples at group size 32,
value for value: Q4_0 / Q4_1 / Q4_K at 4 bits, Q5_0 / Q5_1 / Q5_K at 5, Q8_0 at 8. Q6_K's
16-value sub-blocks have no MLX form; it loads at 8 bits, exactly where a group allows and
otherwise within half an 8-bit step (see ``_q6_k``). F32 / F16 / BF16 load as floats; other
types are a one-line error. Also: a check of the header (a truncated or foreign file is a clear
error, not a crash), GGUF names and metadata (RoPE scaling included) mapped onto an mlx-lm
config, and the tokenizer rebuilt through transformers' GGUF converter.
"""

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ModelError

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, bytes per block, values per block)
GGML_TYPES = {
    0: ("F32", 4, 1), 1: ("F16", 2, 1), 2: ("Q4_0", 18, 32), 3: ("Q4_1", 20, 32),
    6: ("Q5_0", 22, 32), 7: ("Q5_1", 24, 32), 8: ("Q8_0", 34, 32), 9: ("Q8_1", 40, 32),
    10: ("Q2_K", 84, 256), 11: ("Q3_K", 110, 256), 12: ("Q4_K", 144, 256),
    13: ("Q5_K", 176, 256), 14: ("Q6_K", 210, 256), 15: ("Q8_K", 292, 256),
    16: ("IQ2_XXS", 66, 256), 17: ("IQ2_XS", 74, 256), 18: ("IQ3_XXS", 98, 256),
    19: ("IQ1_S", 50, 256), 20: ("IQ4_NL", 18, 32), 21: ("IQ3_S", 110, 256),
    22: ("IQ2_S", 82, 256), 23: ("IQ4_XS", 136, 256), 24: ("I8", 1, 1), 25: ("I16", 2, 1),
    26: ("I32", 4, 1), 27: ("I64", 8, 1), 28: ("F64", 8, 1), 29: ("IQ1_M", 56, 256),
    30: ("BF16", 2, 1), 34: ("TQ1_0", 54, 256), 35: ("TQ2_0", 66, 256), 39: ("MXFP4", 17, 32),
    40: ("NVFP4", 36, 64), 41: ("Q1_0", 18, 128),
}
# Block types -> bits of the MLX affine form (group 32) they load as. All exact, except
# Q6_K (see ``_q6_k``). Floats load as floats; every other type is refused.
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 8}
FLOAT_TYPES = {"F32", "F16", "BF16"}
SUPPORTED_TYPES = FLOAT_TYPES | set(QUANT_BITS)
GGUF_GROUP_SIZE = 32

# GGUF tensor name pieces -> mlx-lm module paths (llama family; an architecture adds or
# overrides block entries in its ``Architecture.block``)
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's MTP ("nextn") tensors of the last blocks (blk.N.nextn.*), DeepSeek-V3's names;
# the block's own tensors beside them are an ordinary decoder layer (see heads/mtp.py)
_NEXTN = {"eh_proj": "eh_proj", "enorm": "enorm", "hnorm": "hnorm", "embed_tokens": "embed_tokens",
          "shared_head_norm": "shared_head.norm", "shared_head_head": "shared_head.head"}
# per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2 / 3 "sandwich" norms: ffn_norm is the norm before the MLP, and both sublayers'
# outputs have a norm of their own before the residual add.
_SANDWICH_NORM = {
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gemma3_config(meta, config, path):
    """Gemma 3's settings that GGUF leaves to llama.cpp's code (llama-model.cpp, LLM_ARCH_GEMMA3):
    with ``attention.sliding_window`` set, 5 of every 6 layers attend within the window and
    rotate with base 10000 unscaled (``rope.freq_base`` and any RoPE scaling are the global
    layers'); without it every layer is global. Queries scale by key_length^-1/2, except in the
    62-layer 27B: (hidden / heads)^-1/2 (its query_pre_attn_scalar 168)."""
    window = int(meta("attention.sliding_window", 0))
    layers = config["num_hidden_layers"]
    pattern = 6 if window > 0 else 1
    per_layer = [(i + 1) % pattern != 0 for i in range(layers)]  # true: sliding
    stored = meta("attention.sliding_window_pattern", pattern)  # llama.cpp ignores it
    if stored not in (pattern, per_layer):
        shown = stored if isinstance(stored, int) else "(per layer)"
        raise ModelError(f"{path}: sliding-window pattern {shown} is not supported "
                         f"(Gemma 3: every {pattern}th layer global)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta(key, 0.0):
            raise ModelError(f"{path}: {key.replace('_', ' ')} is not supported for gemma3")
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    return {
        "sliding_window": window or config["max_position_embeddings"],
        "sliding_window_pattern": pattern,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
    }


@dataclass(frozen=True)
class Architecture:
    model_type: str  # mlx-lm's
    class_name: str  # config.json "architectures"
    permuted: bool = False  # llama.cpp's converter permuted Q/K rows for the traditional RoPE
    block: dict = field(default_factory=dict)  # block tensor names beyond / instead of _BLOCK's
    # llama.cpp's converter stores every norm weight ('*norm.weight') as w + norm_shift where
    # the model computes x * (norm_shift + w): mlx-lm's Gemma RMSNorm takes w (_unshifted)
    norm_shift: float = 0.0
    rope_scaling: bool = True  # the mlx-lm class takes a rope_scaling config
    extra_config: object = None  # (meta, config, path) -> further config entries

    def mlx_name(self, gguf_name):
        """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None: unknown)."""
        parts = gguf_name.split(".")
        block = {**_BLOCK, **self.block}
        if parts[0] == "blk" and len(parts) >= 4 and parts[2] in block:
            return ".".join(["model.layers", parts[1], block[parts[2]], *parts[3:]])
        if parts[0] == "blk" and len(parts) >= 5 and parts[2] == "nextn" and parts[3] in _NEXTN:
            return ".".join(["model.layers", parts[1], _NEXTN[parts[3]], *parts[4:]])
        if parts[0] in _TOP_LEVEL:
            return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        return None


# GGUF general.architecture -> how it maps onto mlx-lm
ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", block=_QK_NORM),
    "gemma": Architecture("gemma", "GemmaForCausalLM", norm_shift=1.0, rope_scaling=False),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", norm_shift=1.0,
                           block={**_QK_NORM, **_SANDWICH_NORM}, extra_config=_gemma3_config),
}

# GGUF metadata value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple
    type_name: str
    offset: int
    nbytes: int
    mlx_name: str | None = None  # under the file's architecture; None: unknown there
    norm_shift: float = 0.0  # stored as w + norm_shift (see Architecture)


class _Reader:
    def __init__(self, fid, path, size):
        self.fid, self.path, self.size = fid, path, size

    def read(self, n):
        # a corrupt length past the end reads nothing (not gigabytes) and fails as short
        data = self.fid.read(n) if n <= self.size - self.fid.tell() else b""
        if len(data) != n:
            raise ModelError(f"{self.path}: truncated GGUF file (header ends early)")
        return data

    def scalar(self, fmt):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self):
        return self.read(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.read(n * size)))
            return [self.value(item_type) for _ in range(n)]
        raise ModelError(f"{self.path}: corrupt GGUF header (metadata value type {vtype})")


def read_header(path):
    """Parse a GGUF header: ``(metadata, tensors)``. Validates magic, tensor types
    and that every tensor's data lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fid:
        r = _Reader(fid, path, size)
        if fid.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (bad magic bytes)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelError(f"{path}: corrupt GGUF header (counts out of range)")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise ModelError(f"{path}: corrupt GGUF header (tensor '{name}' has {n_dims} dims)")
            dims = tuple(r.scalar("<Q") for _ in range(n_dims))
            type_id, offset = r.scalar("<I"), r.scalar("<Q")
            if type_id not in GGML_TYPES:
                raise ModelError(f"{path}: tensor '{name}' has unknown GGML type id {type_id}")
            type_name, block_bytes, block_values = GGML_TYPES[type_id]
            count = math.prod(dims)
            if count % block_values:
                raise ModelError(
                    f"{path}: tensor '{name}' has {count} values, not a whole number of "
                    f"{type_name} blocks of {block_values}"
                )
            if block_values > 1 and (not dims or dims[0] % block_values):
                raise ModelError(f"{path}: tensor '{name}' rows are not whole {type_name} blocks")
            nbytes = count // block_values * block_bytes
            # GGUF lists dims fastest-first; MLX shapes are slowest-first.
            tensors.append(TensorInfo(name, dims[::-1], type_name, offset, nbytes))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ModelError(f"{path}: corrupt GGUF header (general.alignment {alignment!r})")
        data_start = -(-fid.tell() // alignment) * alignment
    unsupported = [t for t in tensors if t.type_name not in SUPPORTED_TYPES]
    if unsupported:
        t = unsupported[0]
        raise ModelError(
            f"{path}: tensor '{t.name}' has GGML type {t.type_name}; supported types are "
            f"{', '.join(sorted(SUPPORTED_TYPES))} (re-quantize the model, e.g. to Q4_K_M)"
        )
    spec = ARCHITECTURES.get(metadata.get("general.architecture"))
    for t in tensors:
        t.offset += data_start  # from here on: where the data lies in the file
        if spec is not None:
            t.mlx_name = spec.mlx_name(t.name)
            t.norm_shift = spec.norm_shift if t.name.endswith("norm.weight") else 0.0
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file ({size} bytes, tensor data needs {end})")
    return metadata, tensors


def model_config(metadata, tensors, path):
    """An mlx-lm config.json dict from GGUF metadata and tensor types."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture '{arch}' is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if any(t.name == "rope_freqs.weight" for t in tensors):
        raise ModelError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")
    spec = ARCHITECTURES[arch]

    def meta(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    n_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    nextn = int(meta("nextn_predict_layers", 0))  # MTP blocks, counted in block_count
    config = {
        "model_type": spec.model_type,
        "architectures": [spec.class_name],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")) - nextn,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_heads)),
        "head_dim": int(meta("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_traditional": spec.permuted,
        "max_position_embeddings": int(meta("context_length", 4096)),
        "vocab_size": len(metadata.get("tokenizer.ggml.tokens", ())) or int(meta("vocab_size")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in tensors),
    }
    rotary = metadata.get(f"{arch}.rope.dimension_count", config["head_dim"])
    if rotary != config["head_dim"]:
        raise ModelError(f"{path}: partial RoPE ({rotary} of {config['head_dim']} dims) is not supported")
    value_dim = metadata.get(f"{arch}.attention.value_length", config["head_dim"])
    if value_dim != config["head_dim"]:
        raise ModelError(f"{path}: value heads of {value_dim} dims (keys: {config['head_dim']}) "
                         "are not supported")
    if scaling := rope_scaling(metadata, arch, path):
        if not spec.rope_scaling:
            raise ModelError(f"{path}: RoPE scaling is not supported for {arch}")
        config["rope_scaling"] = scaling
    if spec.extra_config:
        config.update(spec.extra_config(meta, config, path))
    if nextn:
        config["gguf_nextn_layers"] = nextn  # heads/mtp.py reads them as DeepSeek's MTP layout
    if spec.model_type == "llama":
        config["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in tensors)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)

    # Quantization: the most common linear type sets the default, others override.
    weight_types = {
        t.mlx_name[: -len(".weight")]: t.type_name
        for t in tensors
        if t.name.endswith(".weight") and len(t.shape) == 2 and t.mlx_name
    }
    quant_types = [ty for ty in weight_types.values() if ty in QUANT_BITS]
    if quant_types:
        default = max(set(quant_types), key=quant_types.count)
        quantization = {"group_size": GGUF_GROUP_SIZE, "bits": QUANT_BITS[default]}
        for module, ty in sorted(weight_types.items()):
            if ty not in QUANT_BITS:
                quantization[module] = False
            elif ty != default:
                quantization[module] = {"group_size": GGUF_GROUP_SIZE, "bits": QUANT_BITS[ty]}
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


# ---------------------------------------------------------------- block formats -> MLX affine
# Each decoder takes blocks (n, bytes per block) of uint8 and returns the integer codes
# (n, values per block) and the float scale and bias of each 32-value group (n, groups),
# with value = scale * code + bias: MLX's affine form at group size 32. The layouts are
# ggml's (ggml-quants.c; gguf-py's ``quants.py`` dequantizes the same bytes).


def _f16(blocks, start):
    return blocks[:, start:start + 2].copy().view(np.float16)


def _nibbles(qs, width):
    """(n, bytes) -> (n, 2 * bytes) codes: per ``width`` bytes, the low nibbles, then the high
    ones (width 16 in the 32-value formats, 32 in the k-quants)."""
    qs = qs.reshape(len(qs), -1, 1, width)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(len(qs), -1)


def _high_bits(qh):
    """(n, 4) bytes, a little-endian uint32 (Q5_0 / Q5_1) -> (n, 32) fifth bits."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, d * np.float16(-8)


def _q4_1(b):
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6]) << 4), d, d * np.float16(-16)


def _q5_1(b):
    return _nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    d = _f16(b, 0)
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, d * np.float16(-128)


def _k_scales(b):
    """Q4_K / Q5_K: float32 scale d*sc and bias -dmin*m of the eight sub-blocks (6-bit sc, m).
    Both products are exact in float32 (11-bit mantissa times a 6-bit integer)."""
    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    lo, hi, mix = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=1)
    return d * sc, -(dmin * m)


def _q4_k(b):
    return _nibbles(b[:, 16:], 32), *_k_scales(b)


def _q5_k(b):
    # bit i of qh byte j is the fifth bit of value 32*i + j
    high = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little").transpose(0, 2, 1)
    return _nibbles(b[:, 48:], 32) | (high.reshape(len(b), 256) << 4), *_k_scales(b)


def _q6_k(b):
    """Q6_K: value = d * sc * (q - 32), sc an int8 per 16 values. MLX has no group 16, so each
    32-value group becomes 8-bit affine over the integers n = sc*(q-32) of its two halves:
    step gcd(sc1, sc2) where their span fits 256 levels (then exact), else span/255
    (error at most half that step; measured on Gaussian weights: an RMS error 0.21 of Q6_K's
    own, so 2 % more error in all)."""
    n_blocks = len(b)
    ql, qh = b[:, :128].reshape(n_blocks, 2, 1, 64), b[:, 128:192].reshape(n_blocks, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n_blocks, 2, 4, 32)
    high = np.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=2)
    q = (low | (high << 4)).reshape(n_blocks, 16, 16).astype(np.int32) - 32
    sc = b[:, 192:208].view(np.int8).astype(np.int32)
    n = (q * sc[:, :, None]).reshape(n_blocks, 8, 32)
    lo, hi = n.min(axis=2), n.max(axis=2)
    g = np.gcd(sc[:, 0::2], sc[:, 1::2])
    step = np.where(hi - lo <= 255 * g, np.maximum(g, 1), (hi - lo) / 255).astype(np.float32)
    codes = np.rint((n - lo[:, :, None]).astype(np.float32) / step[:, :, None]).clip(0, 255).astype(np.uint8)
    d = _f16(b, 208).astype(np.float32)
    return codes.reshape(n_blocks, 256), d * step, d * lo.astype(np.float32)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_CHUNK_VALUES = 1 << 24  # bounds the numpy temporaries of one tensor's decoding


def _pack(codes, bits):
    """(rows, cols) codes -> MLX's packing: a little-endian bit stream in uint32 words."""
    if bits == 8:
        return codes.view(np.uint32)
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
    stream = np.unpackbits(codes[:, :, None], axis=2, count=bits, bitorder="little")
    return np.packbits(stream.reshape(len(codes), -1), axis=1, bitorder="little").view(np.uint32)


def _quantized(data, info):
    """(weight, scales, biases) for a block-quantized tensor; decoded by row chunks."""
    _, block_bytes, block_values = next(v for v in GGML_TYPES.values() if v[0] == info.type_name)
    bits = QUANT_BITS[info.type_name]
    cols = info.shape[-1]
    rows = info.nbytes // block_bytes * block_values // cols
    blocks = data.reshape(rows, cols // block_values, block_bytes)
    weight = np.empty((rows, cols * bits // 32), np.uint32)
    scales = biases = None
    step = max(1, _CHUNK_VALUES // cols)
    for r in range(0, rows, step):
        chunk = blocks[r:r + step].reshape(-1, block_bytes)
        codes, s, z = _DECODERS[info.type_name](chunk)
        if scales is None:
            scales = np.empty((rows, cols // GGUF_GROUP_SIZE), s.dtype)
            biases = np.empty_like(scales)
        n = len(blocks[r:r + step])
        weight[r:r + n] = _pack(codes.reshape(n, cols), bits)
        scales[r:r + n] = s.reshape(n, -1)
        biases[r:r + n] = z.reshape(n, -1)
    shape = (*info.shape[:-1], -1)
    return [mx.array(a.reshape(shape)) for a in (weight, scales, biases)]


def _float(data, info):
    if info.type_name == "BF16":
        return mx.array(data.view(np.uint16).reshape(info.shape)).view(mx.bfloat16)
    return mx.array(data.view({"F32": np.float32, "F16": np.float16}[info.type_name]).reshape(info.shape))


def rope_scaling(metadata, arch, path):
    """mlx-lm's ``rope_scaling`` for the GGUF's RoPE scaling metadata (None where there is
    none); what mlx-lm cannot reproduce exactly is refused, never dropped."""
    prefix = f"{arch}.rope.scaling."
    keys = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    kind, factor = keys.pop("type", None), keys.pop("factor", None)
    keys.pop("finetuned", None)  # informational
    if kind is None and f"{arch}.rope.scale_linear" in metadata:  # the older spelling
        kind, factor = "linear", metadata[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") and factor in (None, 1.0):
        scaling = None
    elif kind == "linear" and factor is not None:
        scaling = {"type": "linear", "factor": float(factor)}
    elif kind == "yarn" and factor is not None and "original_context_length" in keys:
        # llama.cpp's YaRN with attn_factor 1 is mlx-lm's YarnRoPE (mscale 0.1 ln(factor) + 1)
        if keys.get("attn_factor", 1.0) == 1.0:
            keys.pop("attn_factor", None)
        scaling = {"type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": int(keys.pop("original_context_length"))}
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if theirs in keys:
                scaling[ours] = float(keys.pop(theirs))
    else:
        raise ModelError(f"{path}: RoPE scaling '{kind}' (factor {factor}) is not supported")
    keys.pop("original_context_length", None)  # linear: informational
    if keys:
        raise ModelError(f"{path}: RoPE scaling setting '{prefix}{sorted(keys)[0]}' is not supported")
    return scaling


_MX_LOAD_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}


def _unshifted(value, shift):
    """w of a norm weight stored as v = w + shift (Gemma: 1), subtracted in float32. With
    shift 1 it is exact wherever v >= 0.5 (Sterbenz's lemma below 2; above, 1 is a multiple of
    v's last place), so mlx-lm's Gemma norm computing in float32 gets 1 + (v - 1) = v, the
    stored gain, bit for bit (in half precision, as on Metal, within its rounding). Below 0.5
    (w < -0.5) v - 1 rounds, by at most 2^-25 absolute (tested)."""
    return value.astype(mx.float32) - mx.array(shift, mx.float32)


def load_weights(path, tensors=None):
    """The GGUF tensors (``read_header``'s list, read again if not given) under mlx-lm's
    names, block-quantized ones as MLX affine (weight, scales, biases) triples at group size
    32; scales and biases in float16 for the 32-value formats (as ``mx.load`` gives Q4_0 /
    Q4_1 / Q8_0), float32 for the k-quants (d*sc needs 17 bits of mantissa). Norm weights
    stored shifted (Gemma's w + 1) come back as w, in float32."""
    tensors = read_header(path)[1] if tensors is None else tensors
    for t in tensors:
        if t.mlx_name is None:
            raise ModelError(f"{path}: unexpected tensor '{t.name}' for this architecture")
        if t.norm_shift and t.type_name not in FLOAT_TYPES:
            raise ModelError(f"{path}: norm tensor '{t.name}' is {t.type_name}, not a float type")
    if all(t.type_name in _MX_LOAD_TYPES for t in tensors):
        # MLX reads these itself, ~4x faster, into the same triples (checked on SmolLM2).
        # Its names keep GGUF's ('blk.0.attn_q.weight' / '.scales' / '.biases').
        bases = {t.name.rsplit(".", 1)[0]: t.mlx_name.rsplit(".", 1)[0] for t in tensors}
        weights = {}
        for name, value in mx.load(str(path), format="gguf").items():
            base, suffix = name.rsplit(".", 1)
            weights[f"{bases[base]}.{suffix}"] = value
    else:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        weights = {}
        for info in tensors:
            data = raw[info.offset:info.offset + info.nbytes]
            if info.type_name in FLOAT_TYPES:
                weights[info.mlx_name] = _float(data, info)
            else:
                base = info.mlx_name.rsplit(".", 1)[0]
                weights[info.mlx_name], weights[f"{base}.scales"], weights[f"{base}.biases"] = (
                    _quantized(data, info))
    for t in tensors:
        if t.norm_shift:
            weights[t.mlx_name] = _unshifted(weights[t.mlx_name], t.norm_shift)
    return weights


# llama.cpp pre-tokenizers (``tokenizer.ggml.pre``) of byte-level BPE vocabularies that split
# text with GPT-2's regex, or with it after cutting out every digit. transformers' converter
# knows the others it can build (llama-bpe, qwen2, ...); any other name is refused, since a
# wrong split gives other token ids without a visible error.
_GPT2_SPLIT = {None, "default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def _converted_tokenizer(metadata, path):
    """The Hugging Face ``tokenizers.Tokenizer`` transformers' GGUF converter builds from this
    metadata (SentencePiece 'llama' and its gemma / phi3 variants, byte-level 'gpt2' with the
    llama-3 / qwen2 / ... splits, unigram 't5'). Wrapped here because the module is
    semi-private; it imports without torch."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS, GGUF_SENTENCEPIECE_BUILDERS, GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        import transformers

        raise ModelError(
            f"{path}: rebuilding a GGUF tokenizer needs transformers' GGUF converter "
            f"(transformers.integrations.gguf), absent from transformers {transformers.__version__}"
        ) from None

    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if kind == "gpt2" and pre not in _GPT2_SPLIT | _DIGITS_THEN_GPT2_SPLIT | set(GGUF_PRE_TOKENIZER_SPLITS):
        raise ModelError(f"{path}: GGUF pre-tokenizer '{pre}' is not supported")
    if not metadata.get("tokenizer.ggml.tokens"):
        raise ModelError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens")
    tokenizer_dict = {
        name: metadata[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in metadata
    }
    if kind == "gpt2":
        tokenizer_dict.setdefault("merges", [])  # a byte-level vocabulary may have none
    arch = metadata.get("general.architecture")
    if kind == "llama" and arch not in GGUF_SENTENCEPIECE_BUILDERS:
        # Its phi3 builder prepends '▁' to every text piece, as sentencepiece, llama.cpp and
        # Llama / Mistral's own tokenizer.json do; the generic one (Metaspace, prepend 'first')
        # drops that '▁' before text that starts with a space or a special token.
        arch = "phi3"
    try:
        tok, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: cannot build the GGUF tokenizer ('{kind}'): {e}") from None
    if kind == "llama" and arch == "phi3" and metadata.get("tokenizer.ggml.add_space_prefix") is False:
        from tokenizers import decoders, normalizers

        # no '▁' prepended, so none stripped when decoding
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    if pre in _DIGITS_THEN_GPT2_SPLIT:
        from tokenizers import pre_tokenizers

        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer]
        )
    return tok


def tokenizer_files(metadata, path):
    """``{filename: json-able dict}`` for a Hugging Face fast tokenizer directory, rebuilt
    from GGUF metadata; BOS / EOS added as llama.cpp adds them."""
    from tokenizers import processors

    tok = _converted_tokenizer(metadata, path)
    tokens = metadata["tokenizer.ggml.tokens"]
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    sentencepiece = metadata.get("tokenizer.ggml.model") == "llama"
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", sentencepiece))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos and token("bos") is not None,
        "add_eos_token": add_eos and token("eos") is not None,
    }
    for key in ("bos", "eos", "unknown", "padding"):
        if token(key) is not None:
            name = {"unknown": "unk", "padding": "pad"}.get(key, key)
            tokenizer_config[f"{name}_token"] = token(key)
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    added = {key: (token(key), metadata[f"tokenizer.ggml.{key}_token_id"])
             for key in ("bos", "eos") if tokenizer_config[f"add_{key}_token"]}
    bos = [added["bos"][0]] if "bos" in added else []
    eos = [added["eos"][0]] if "eos" in added else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos), pair=" ".join(bos + ["$A"] + eos + bos + ["$B"] + eos),
        special_tokens=list(dict(added.values()).items()),
    )
    data = json.loads(tok.to_str())
    # A class's default specials the vocabulary lacks (GemmaTokenizer's <mask>, ...) would get
    # ids past the model's embedding: leave them out.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < len(tokens)]
    return {"tokenizer.json": data, "tokenizer_config.json": tokenizer_config}


def write_tokenizer(metadata, path, out_dir):
    """Write the rebuilt tokenizer files into ``out_dir`` (compact: an indented dump runs
    json's Python encoder, a second per load on the test model's 49k-token vocabulary)."""
    for name, content in tokenizer_files(metadata, path).items():
        (Path(out_dir) / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
