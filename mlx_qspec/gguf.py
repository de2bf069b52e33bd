"""Read llama-family GGUF files as MLX models without a dequantize round trip.

``mx.load`` already turns Q4_0 / Q4_1 / Q8_0 tensors into MLX affine
(weight, scales, biases) triples with group size 32. This module adds what it
does not: a check of the header (so a truncated file, a foreign file or an
unsupported tensor type is a clear error, not a crash deep inside MLX), the
mapping of GGUF names and metadata onto an mlx-lm config, and the tokenizer,
rebuilt from metadata as a Hugging Face fast tokenizer.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import ModelError

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, bytes per block, values per block)
GGML_TYPES = {
    0: ("F32", 4, 1), 1: ("F16", 2, 1), 2: ("Q4_0", 18, 32), 3: ("Q4_1", 20, 32),
    6: ("Q5_0", 22, 32), 7: ("Q5_1", 24, 32), 8: ("Q8_0", 34, 32), 9: ("Q8_1", 36, 32),
    10: ("Q2_K", 84, 256), 11: ("Q3_K", 110, 256), 12: ("Q4_K", 144, 256),
    13: ("Q5_K", 176, 256), 14: ("Q6_K", 210, 256), 15: ("Q8_K", 292, 256),
    24: ("I8", 1, 1), 25: ("I16", 2, 1), 26: ("I32", 4, 1), 27: ("I64", 8, 1),
    28: ("F64", 8, 1), 30: ("BF16", 2, 1),
}
# Types kept as they are: floats, and the block formats MLX reads as affine triples.
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
SUPPORTED_TYPES = {"F32", "F16", *QUANT_BITS}
GGUF_GROUP_SIZE = 32

# GGUF architecture -> (mlx-lm model_type, Q/K rows permuted for the traditional RoPE)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# GGUF tensor name pieces -> mlx-lm module paths (llama family)
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
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


class _Reader:
    def __init__(self, fid, path, size):
        self.fid, self.path, self.size = fid, path, size

    def read(self, n):
        if n > self.size - self.fid.tell():
            raise ModelError(f"{self.path}: truncated GGUF file (header ends early)")
        data = self.fid.read(n)
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
            count = 1
            for d in dims:
                count *= d
            if count % block_values:
                raise ModelError(
                    f"{path}: tensor '{name}' has {count} values, not a whole number of "
                    f"{type_name} blocks of {block_values}"
                )
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
            f"{', '.join(sorted(SUPPORTED_TYPES))} (re-quantize the model to Q4_0, Q4_1 or Q8_0)"
        )
    end = max((data_start + t.offset + t.nbytes for t in tensors), default=data_start)
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file ({size} bytes, tensor data needs {end})")
    return metadata, tensors


def _mlx_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _BLOCK:
        return ".".join(["model.layers", parts[1], _BLOCK[parts[2]], *parts[3:]])
    if parts[0] in _TOP_LEVEL:
        return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
    return None


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
    model_type, permuted = ARCHITECTURES[arch]

    def meta(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    n_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    config = {
        "model_type": model_type,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_heads)),
        "head_dim": int(meta("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_traditional": permuted,
        "max_position_embeddings": int(meta("context_length", 4096)),
        "vocab_size": len(metadata.get("tokenizer.ggml.tokens", ())) or int(meta("vocab_size")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in tensors),
    }
    if model_type == "llama":
        config["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in tensors)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)

    # Quantization: the most common linear type sets the default, others override.
    weight_types = {
        _mlx_name(t.name)[: -len(".weight")]: t.type_name
        for t in tensors
        if t.name.endswith(".weight") and len(t.shape) == 2 and _mlx_name(t.name)
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


def load_weights(path):
    """The GGUF tensors under mlx-lm's names, quantized ones as (weight, scales, biases)."""
    raw = mx.load(str(path))
    weights = {}
    for name, value in raw.items():
        mlx_name = _mlx_name(name)
        if mlx_name is None:
            raise ModelError(f"{path}: unexpected tensor '{name}' for this architecture")
        weights[mlx_name] = value
    return weights


def _pre_tokenizer(kind, path):
    """The pre-tokenizer llama.cpp names with ``tokenizer.ggml.pre``."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if kind == "smollm":
        # SmolLM splits every digit on its own before the GPT-2 regex.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    raise ModelError(f"{path}: GGUF pre-tokenizer '{kind}' is not supported")


def tokenizer_files(metadata, path):
    """``{filename: json-able dict}`` for a Hugging Face fast tokenizer directory,
    rebuilt from GGUF metadata (byte-level BPE, as llama.cpp's 'gpt2' model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(
            f"{path}: GGUF tokenizer model '{kind}' is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    # GGUF token types: 3 = control (special), 4 = user-defined.
    tok.add_tokens(
        [AddedToken(t, special=ty == 3, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    )

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }
    for key in ("bos", "eos", "unknown", "padding"):
        if token(key) is not None:
            name = {"unknown": "unk", "padding": "pad"}.get(key, key)
            tokenizer_config[f"{name}_token"] = token(key)
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    if tokenizer_config["add_bos_token"] and token("bos") is not None:
        from tokenizers import processors

        bos = token("bos")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))],
        )
    return {"tokenizer.json": json.loads(tok.to_str()), "tokenizer_config.json": tokenizer_config}


def write_tokenizer(metadata, path, out_dir):
    """Write the rebuilt tokenizer files into ``out_dir``."""
    for name, content in tokenizer_files(metadata, path).items():
        with open(Path(out_dir) / name, "w", encoding="utf-8") as fid:
            json.dump(content, fid, ensure_ascii=False, indent=1)
