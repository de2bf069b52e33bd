"""QuaRot-style rotation of a llama-family model, so that its activations quantize to 4 bits.

Activation outliers make per-token A4 useless for drafting (per-token
A4 agreed on 9 % of next tokens on SmolLM2, docs/design.md). An orthogonal change
of basis spreads each outlier over many channels without changing the function the model
computes:

- RMSNorm gains are folded into the linears that read the norm (norm weights become 1), so
  the norm commutes with a rotation of the residual stream;
- the residual stream is rotated by one orthogonal ``Q``: the embedding and the linears that
  read it (q/k/v, gate/up, LM head) get ``W Q``, the linears that write it (o_proj, down_proj)
  get ``Qᵀ W``;
- online Hadamard transforms run on the inputs of ``o_proj`` (per head) and ``down_proj``
  (whole intermediate); their transposes are folded into those weights.

The rotated model is then re-quantized to 4-bit (round-to-nearest, or mlx-lm's GPTQ). It is
a different model from the original (the rounding differs); speculative decoding is lossless
with respect to it. Its forward runs the online Hadamards in verify and draft alike.
"""

import copy
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .loader import build_model as build_plain
from .quant.hadamard import (
    HADAMARD_BASES, apply_online_rotations, hadamard, hadamard_factors,
)

WEIGHT_BITS = 4
WEIGHT_GROUP = 32
EMBED_BITS = 8
EMBED_GROUP = 32
ONLINE = ("o_proj", "down_proj")
RESIDUAL_KINDS = ("hadamard", "random")
_LLAMA_FAMILY = ("llama",)


def check_rotatable(config: dict) -> None:
    """Raise ValueError naming the first size or feature the rotation cannot take.

    Cheap and compute-free, so the converter can call it before loading any weights.
    """
    mt = config.get("model_type")
    if mt not in _LLAMA_FAMILY:
        raise ValueError(f"--rotate supports model_type {_LLAMA_FAMILY}, not {mt!r}")
    if config.get("qspec", {}).get("rotation"):
        raise ValueError("--rotate: the model is already rotated (config.json has qspec.rotation)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"--rotate does not support linear biases ({key}=true)")
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    for name, n, where in (("intermediate_size", inter, "before down_proj"),
                           ("head_dim", head_dim, "per head before o_proj")):
        if hadamard_factors(n) is None:
            raise ValueError(
                f"--rotate: {name} {n} is not a Hadamard size mx.hadamard_transform can "
                f"apply (m*2^k, m in {HADAMARD_BASES}, or a product of two such); the "
                f"online Hadamard {where} needs it"
            )
    for name, n in (("hidden_size", hidden), ("intermediate_size", inter),
                    ("num_attention_heads*head_dim", heads * head_dim)):
        if n % WEIGHT_GROUP:
            raise ValueError(
                f"--rotate: {name} {n} is not a multiple of the quantization group "
                f"size {WEIGHT_GROUP}"
            )


def check_residual(config: dict, residual: str) -> None:
    """Raise ValueError if the residual rotation ``residual`` cannot be built for this model."""
    if residual not in RESIDUAL_KINDS:
        raise ValueError(f"residual rotation must be one of {RESIDUAL_KINDS}, not {residual!r}")
    d = config["hidden_size"]
    if residual == "hadamard" and hadamard_factors(d) is None:
        raise ValueError(f"--rotate: hidden_size {d} has no Hadamard MLX can build; "
                         f"use the 'random' residual rotation")


def float_weight(m: nn.Module) -> mx.array:
    """The module's weight as float32, dequantized if it is stored quantized (any module with
    ``scales``: mlx's quantized layers and ours)."""
    if "scales" in m:
        return mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits,
                             mode=getattr(m, "mode", "affine")).astype(mx.float32)
    return m["weight"].astype(mx.float32)


def _scale_dtype(model: nn.Module) -> mx.Dtype:
    """The source's storage dtype for scales, biases and norms."""
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.QuantizedLinear):
            return m.scales.dtype
    return mx.float32


def residual_rotation(d: int, kind: str = "hadamard", seed: int = 0) -> mx.array:
    """A d×d orthogonal matrix for the residual stream.

    ``hadamard``: seeded random signs, then a Hadamard of order d (Kronecker of two sizes
    MLX takes when d itself is not one); it spreads outliers over all d channels and
    measured better for A4 drafts than ``random`` (Haar-random, QR of a seeded Gaussian).
    """
    key = mx.random.key(seed)
    if kind == "random":
        a = mx.random.normal((d, d), key=key, dtype=mx.float32)
        q, r = mx.linalg.qr(a, stream=mx.cpu)
        return q * mx.sign(mx.diag(r))[None, :]
    if kind == "hadamard":
        signs = mx.where(mx.random.bernoulli(key=key, shape=(d,)), 1.0, -1.0)
        return hadamard(mx.diag(signs.astype(mx.float32)), hadamard_factors(d))
    raise ValueError(f"residual rotation must be one of {RESIDUAL_KINDS}, not {kind!r}")


def _online_factors(config: dict) -> dict:
    """Per-head Hadamard before o_proj, whole-width Hadamard before down_proj.

    A whole-width Hadamard before o_proj too (576 = 12 × 48) made its input Gaussian
    (kurtosis 5.8 → 3) but measured the same A4 agreement on SmolLM2, so per head it stays.
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {"o_proj": list(hadamard_factors(head_dim)),
            "down_proj": list(hadamard_factors(config["intermediate_size"]))}


def rotate_weights(model: nn.Module, config: dict, *, residual: str = "hadamard",
                   seed: int = 0, progress: bool = True) -> dict:
    """Float32 weights of the rotated model (norms fused, Q applied, Hadamards folded).

    Keys are mlx-lm's (``lm_head.weight`` always present: fusing the final norm gain unties
    the head from the embedding). Computing with these weights plus
    :func:`apply_online_rotations` gives the original model's logits up to float rounding.
    """
    check_rotatable(config)
    check_residual(config, residual)
    hidden = config["hidden_size"]
    factors = _online_factors(config)
    Q = residual_rotation(hidden, residual, seed)
    inner = model.model
    embed = float_weight(inner.embed_tokens)
    head = embed if getattr(model, "lm_head", None) is None else float_weight(model.lm_head)
    out = {
        "model.embed_tokens.weight": embed @ Q,
        "lm_head.weight": (head * inner.norm.weight.astype(mx.float32)) @ Q,
        "model.norm.weight": mx.ones((hidden,), mx.float32),
    }
    mx.eval(out)
    n = len(inner.layers)
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        g_attn = layer.input_layernorm.weight.astype(mx.float32)
        g_mlp = layer.post_attention_layernorm.weight.astype(mx.float32)
        for name in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{name}.weight"] = (float_weight(getattr(attn, name)) * g_attn) @ Q
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = (float_weight(getattr(mlp, name)) * g_mlp) @ Q
        # o = h Wᵀ; online h ↦ h H, so the stored weight is (Qᵀ W) H, row by row.
        out[p + "self_attn.o_proj.weight"] = hadamard(Q.T @ float_weight(attn.o_proj),
                                                       factors["o_proj"])
        out[p + "mlp.down_proj.weight"] = hadamard(Q.T @ float_weight(mlp.down_proj),
                                                    factors["down_proj"])
        out[p + "input_layernorm.weight"] = mx.ones((hidden,), mx.float32)
        out[p + "post_attention_layernorm.weight"] = mx.ones((hidden,), mx.float32)
        mx.eval(out)
        if progress:
            print(f"\rrotate: layer {i + 1}/{n}", end="" if i + 1 < n else "\n",
                  file=sys.stderr, flush=True)
    return out


def rotated_config(config: dict, *, residual: str, seed: int, method: str) -> dict:
    """config.json of the rotated 4-bit model: untied head, 8-bit embedding/head, rotation."""
    cfg = copy.deepcopy(config)
    cfg.pop("quantization_config", None)
    cfg["tie_word_embeddings"] = False
    cfg["quantization"] = {
        "group_size": WEIGHT_GROUP, "bits": WEIGHT_BITS, "mode": "affine",
        "model.embed_tokens": {"group_size": EMBED_GROUP, "bits": EMBED_BITS},
        "lm_head": {"group_size": EMBED_GROUP, "bits": EMBED_BITS},
    }
    cfg.setdefault("qspec", {})["rotation"] = {
        "online_hadamard": list(ONLINE),
        "online_factors": _online_factors(config),
        "residual": residual,
        "seed": seed,
        "method": method,
    }
    return cfg


def build_model(weights: dict, config: dict) -> nn.Module:
    """An mlx-lm model from (weights, config) in saved layout, online Hadamards applied:
    the loaded rotated directory, without the disk round-trip."""
    model = apply_online_rotations(build_plain(weights, config), config)
    mx.eval(model.parameters())
    return model


def _gptq(fw: dict, config: dict, calibration: mx.array) -> dict:
    """Re-quantize the linears with mlx-lm's GPTQ on the float rotated model.

    Embedding and head are RTN 8-bit beforehand, so GPTQ (which takes every ``nn.Linear``)
    sees exactly the 4-bit linears, with the Hessians of their post-Hadamard inputs.
    """
    from mlx_lm.quant.gptq import gptq_quantize

    float_cfg = {k: v for k, v in config.items() if k != "quantization"}
    model = build_model(fw, float_cfg)
    model.model.embed_tokens = model.model.embed_tokens.to_quantized(group_size=EMBED_GROUP,
                                                                     bits=EMBED_BITS)
    model.lm_head = model.lm_head.to_quantized(group_size=EMBED_GROUP, bits=EMBED_BITS)
    gptq_quantize(model, calibration, WEIGHT_BITS, WEIGHT_GROUP, EMBED_BITS, EMBED_GROUP,
                  batch_size=1)
    return {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters())}


def save_rotated(path, weights: dict, config: dict) -> None:
    """Write ``(weights, config)`` with mlx-lm's own ``save_model``/``save_config``.

    The model is staged without its Hadamard wrappers so the tensor names are mlx-lm's
    (``o_proj.weight``, not ``o_proj.linear.weight``); loading re-applies the wrappers.
    """
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    staged = build_model(weights, {k: v for k, v in config.items() if k != "qspec"})
    save_model(path, staged, donate_model=True)
    save_config(copy.deepcopy(config), path / "config.json")


def _rtn(fw: dict) -> dict:
    """Round-to-nearest: linears 4-bit, embedding and head 8-bit, norms as they are."""
    weights = {}
    for k, w in fw.items():
        if not k.endswith("proj.weight") and k not in ("model.embed_tokens.weight",
                                                        "lm_head.weight"):
            weights[k] = w
            continue
        prefix = k[: -len("weight")]
        big = k in ("model.embed_tokens.weight", "lm_head.weight")
        q, scales, biases = mx.quantize(w, group_size=EMBED_GROUP if big else WEIGHT_GROUP,
                                        bits=EMBED_BITS if big else WEIGHT_BITS)
        weights.update({prefix + "weight": q, prefix + "scales": scales,
                        prefix + "biases": biases})
        mx.eval(weights)
    return weights


def rotate_model(model: nn.Module, config: dict, *, method: str = "gptq",
                 calibration: mx.array | None = None, residual: str = "hadamard",
                 seed: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """Rotate and re-quantize: ``(weights, config)`` as mlx-lm's save would write them.

    ``method``: ``"gptq"`` (mlx-lm's GPTQ; needs ``calibration``, int token ids of shape
    (samples, length), e.g. :func:`mlx_qspec.calibration_text.calibration_tokens`) or ``"rtn"`` (round-to-nearest).
    GPTQ measured far closer to the original on SmolLM2 (perplexity 13.8 vs 19.8, original
    12.6). Linears 4-bit group 32, embedding and the now-untied LM head 8-bit group 32;
    floating parameters keep the source's dtype (float16 scales cost 1 bit/weight less).
    """
    check_rotatable(config)
    check_residual(config, residual)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', not {method!r}")
    if method == "gptq" and (calibration is None or calibration.ndim != 2
                             or not mx.issubdtype(calibration.dtype, mx.integer)):
        raise ValueError("method='gptq' needs calibration token ids of shape (samples, length)")
    dtype = _scale_dtype(model)
    cfg = rotated_config(config, residual=residual, seed=seed, method=method)
    fw = rotate_weights(model, config, residual=residual, seed=seed, progress=progress)
    if method == "gptq":
        weights = _gptq(fw, cfg, calibration)
    else:
        weights = _rtn(fw)
    return {k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in weights.items()}, cfg
