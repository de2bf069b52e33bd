"""Draft modes: how the draft reads activations, named so the name says the config.

``a8`` quantizes the input of every quantized linear to 8-bit symmetric codes with
one scale per token; ``a4-g32`` to 4-bit codes with one scale per 32 input
features. ``none`` means no speculation (plain decoding).
"""

from dataclasses import dataclass

import mlx.nn as nn

from .activations import ACT_BITS, ACT_GROUP_SIZES

NONE = "none"
AUTO = "auto"


@dataclass(frozen=True)
class DraftMode:
    """Activation bits and granularity of the draft (``act_group_size=None``: per token)."""

    act_bits: int
    act_group_size: int | None = None

    def __post_init__(self):
        if self.act_bits not in ACT_BITS:
            raise ValueError(
                f"draft activation bits must be one of {ACT_BITS}, got {self.act_bits}"
            )
        if self.act_group_size is not None and self.act_group_size not in ACT_GROUP_SIZES:
            raise ValueError(
                f"draft activation group size must be one of {ACT_GROUP_SIZES}, "
                f"got {self.act_group_size}"
            )

    @property
    def name(self) -> str:
        g = "" if self.act_group_size is None else f"-g{self.act_group_size}"
        return f"a{self.act_bits}{g}"

    def __str__(self):
        return self.name


def _describe(mode: DraftMode) -> str:
    w = "W4A4" if mode.act_bits == 4 else "W4A8"
    if mode.act_group_size is None:
        return f"{w} draft: {mode.act_bits}-bit symmetric activations, one scale per token"
    return (
        f"{w} draft: {mode.act_bits}-bit symmetric activations, "
        f"one scale per {mode.act_group_size} input features"
    )


DRAFT_MODES: dict[str, DraftMode] = {
    m.name: m
    for bits in sorted(ACT_BITS, reverse=True)
    for m in [DraftMode(bits)] + [DraftMode(bits, g) for g in ACT_GROUP_SIZES]
}


def draft_help() -> str:
    """One line per valid ``--draft`` name, for the CLI's help text."""
    lines = [
        f"{AUTO}: the best draft mode the model supports",
        f"{NONE}: no speculation, plain decoding",
    ]
    lines += [f"{name}: {_describe(m)}" for name, m in DRAFT_MODES.items()]
    return "\n".join(lines)


def parse_draft(name: "str | DraftMode | None") -> DraftMode | None:
    """``'a8-g32'`` → ``DraftMode(8, 32)``; ``'none'``/None → None; anything else: ValueError."""
    if name is None or isinstance(name, DraftMode):
        return name
    key = str(name).strip().lower()
    if key == NONE:
        return None
    if key not in DRAFT_MODES:
        raise ValueError(
            f"unknown draft mode {name!r}; valid: {', '.join([NONE, *DRAFT_MODES])}"
        )
    return DRAFT_MODES[key]


def _is_draftable(module) -> bool:
    """Affine-quantized linears are the layers a draft mode reads differently."""
    return isinstance(module, nn.QuantizedLinear) and module.mode == "affine"


def draftable_layers(model: nn.Module, exclude=("lm_head",)) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` for every linear the draft reads differently; the LM head stays."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if _is_draftable(m) and path.split(".")[-1] not in exclude
    ]


def _input_dims(layer: nn.Module) -> int:
    return layer.weight.shape[-1] * 32 // layer.bits


def check_draft(model: nn.Module, mode: "str | DraftMode | None") -> DraftMode | None:
    """Parse ``mode`` (``'auto'``: :func:`default_draft`) and make sure ``model`` can run it;
    ValueError before any compute."""
    if isinstance(mode, str) and mode.strip().lower() == AUTO:
        return default_draft(model)
    mode = parse_draft(mode)
    if mode is None:
        return None
    layers = draftable_layers(model)
    if not layers:
        raise ValueError(
            f"draft mode {mode.name!r} needs a model with affine-quantized linear layers; "
            "this model has none (quantize it to 4 bits first)"
        )
    if mode.act_group_size is not None:
        for path, layer in layers:
            k = _input_dims(layer)
            if k % mode.act_group_size:
                raise ValueError(
                    f"draft mode {mode.name!r}: activation group size "
                    f"{mode.act_group_size} does not divide the input size {k} of {path}"
                )
    return mode


def _runs(model: nn.Module, mode: DraftMode) -> bool:
    try:
        check_draft(model, mode)
    except ValueError:
        return False
    return True


def supported_draft_modes(model: nn.Module) -> list[DraftMode]:
    """Every draft mode ``model`` can run, in the order of :data:`DRAFT_MODES`."""
    return [mode for mode in DRAFT_MODES.values() if _runs(model, mode)]


def default_draft(model: nn.Module) -> DraftMode | None:
    """The best draft the model supports, or None when it has no quantized linears.

    A8 with one activation scale per weight group: on the test model it agrees
    with the verify on ~98 % of tokens (per-token A8: ~91 %, A4 g32: ~60 %), and
    an activation group equal to the weight group keeps the integer kernel's
    scale bookkeeping to one multiply per group. Falls back to the other A8
    groupings, then per-token A8, which runs on every input size.
    """
    layers = draftable_layers(model)
    if not layers:
        return None
    weight_groups = sorted({layer.group_size for _, layer in layers})
    prefs = [DraftMode(8, g) for g in weight_groups if g in ACT_GROUP_SIZES]
    prefs += [DraftMode(8, g) for g in ACT_GROUP_SIZES] + [DraftMode(8)]
    return next(mode for mode in prefs if _runs(model, mode))
