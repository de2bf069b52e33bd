"""Draft names checked against a model and its KV mode, and listed for ``--help``.

A draft name is a :class:`~mlx_qspec.precision.Precision` (``a8``, ``a4-g32``, ``w-upper``,
``kv-upper``, ``a8+kv-upper``, …; ``precision.parse`` reads it). Whether a model can run it
depends on the model: activation terms need affine-quantized linears whose input sizes the
activation group divides, ``w-upper`` needs 8-bit weights (stored as two 4-bit planes),
``kv-upper`` needs the nested KV cache. ``none`` is plain decoding; ``auto`` lets the cost
model choose (``cost.py``), which may also mean plain decoding.
"""

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..errors import UserError
from ..kv_cache import KV_MODES
from ..precision import ACT_GROUP_SIZES, TERMS, UPPER, Precision, parse

NONE = "none"
AUTO = "auto"
NESTED_KV = "nested"


def _describe(term: str) -> str:
    if term == "w-upper":
        return "8-bit weights read as their upper 4-bit plane (half the weight bytes)"
    if term == "kv-upper":
        return "nested KV cache read as its upper 4-bit plane (needs --kv-mode nested)"
    p = parse(term)
    w = "W4A4" if p.act_bits == 4 else "W4A8"
    per = "token" if p.act_group_size is None else f"{p.act_group_size} input features"
    return f"{w}: {p.act_bits}-bit symmetric activations, one scale per {per}"


def draft_help() -> str:
    """One line per ``--draft`` term, for the CLI's help text."""
    lines = [
        f"{AUTO}: the cost model picks a draft and its length, or plain decoding where "
        "none can pay (it says why)",
        f"{NONE}: no speculation, plain decoding",
    ]
    lines += [f"{term}: {_describe(term)}" for term in TERMS]
    lines.append("combine terms with '+', one per axis: e.g. a8-g32+kv-upper, w-upper+kv-upper")
    return "\n".join(lines)


def _is_quantized(module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.mode == "affine"


def draftable_layers(model: nn.Module, exclude=("lm_head",)) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` for every linear (a mixture's experts included) whose activations a
    draft quantizes; the LM head and embeddings keep theirs (a draft reads them only
    through ``w-upper``)."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear)) and m.mode == "affine"
        and path.split(".")[-1] not in exclude
    ]


def eight_bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every 8-bit affine layer (linear, LM head, embedding): what ``w-upper`` reads in half."""
    return [(p, m) for p, m in model.named_modules() if _is_quantized(m) and m.bits == 8]


def _input_dims(layer: nn.Module) -> int:
    return layer.weight.shape[-1] * 32 // layer.bits if "weight" in layer else layer.upper.shape[-1] * 8


def check_draft(model: nn.Module, name, kv_mode: str = "fp") -> Precision | None:
    """Parse a draft name (``none``/None → None) and make sure ``model`` with a ``kv_mode``
    cache can run it: ValueError naming what to pass instead, before any compute.
    (``auto`` is not a precision: the caller resolves it with the cost model.)"""
    if name is None or str(name).strip().lower() == NONE:
        return None
    precision = name if isinstance(name, Precision) else parse(name)
    if precision.is_full:
        raise UserError(f"draft {name!r} reads nothing with fewer bits; use --draft none")
    if kv_mode not in KV_MODES:
        raise UserError(f"unknown KV mode {kv_mode!r}; valid: {', '.join(KV_MODES)}")
    if precision.kv == UPPER and kv_mode != NESTED_KV:
        raise UserError(
            f"draft {precision.name!r} reads the upper plane of a nested KV cache: "
            f"pass --kv-mode nested (got --kv-mode {kv_mode})"
        )
    if precision.weights == UPPER and not eight_bit_layers(model):
        raise UserError(
            f"draft {precision.name!r} reads 8-bit weights as their upper plane, and this model "
            "has no 8-bit layers; use an -8bit model, or a8-g32 / kv-upper"
        )
    if precision.act_bits is not None:
        layers = draftable_layers(model)
        if not layers:
            raise UserError(
                f"draft {precision.name!r} needs a model with affine-quantized linear layers; "
                "this model has none (quantize it to 4 bits first)"
            )
        g = precision.act_group_size
        for path, layer in layers if g else ():
            if _input_dims(layer) % g:
                raise UserError(
                    f"draft {precision.name!r}: activation group size {g} does not divide "
                    f"the input size {_input_dims(layer)} of {path}"
                )
    return precision


def _runs(model, name, kv_mode) -> bool:
    try:
        check_draft(model, name, kv_mode)
    except ValueError:
        return False
    return True


def activation_draft(model: nn.Module) -> str | None:
    """The activation draft that agrees best with the verify on this model, or None.

    A8 with one activation scale per weight group: on the test model it agrees with the
    verify on ~98 % of tokens (per-token A8: ~91 %, A4 g32: ~60 %). Falls back to the other
    A8 groupings, then per-token A8, which runs on every input size.
    """
    layers = draftable_layers(model)
    groups = sorted({m.group_size for _, m in layers})
    prefs = [f"a8-g{g}" for g in groups if g in ACT_GROUP_SIZES]
    prefs += [f"a8-g{g}" for g in ACT_GROUP_SIZES] + ["a8"]
    return next((p for p in prefs if _runs(model, p, "fp")), None)


def auto_candidates(model: nn.Module, kv_mode: str) -> list[str]:
    """The drafts ``auto`` weighs: those that read fewer bytes (the upper planes of 8-bit
    weights and of a nested cache, alone and together) and the best activation draft."""
    names = ["w-upper", "kv-upper", "w-upper+kv-upper", activation_draft(model)]
    return [n for n in names if n and _runs(model, n, kv_mode)]
