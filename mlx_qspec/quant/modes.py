"""Which layers a draft reads differently: the affine-quantized linears whose activations an
activation draft quantizes, and the 8-bit layers ``w-upper`` reads as their upper plane.
(What a draft is called and whether a model can run it: :mod:`mlx_qspec.drafts`.)"""

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear


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


def input_dims(layer: nn.Module) -> int:
    """A quantized linear's input size (from its packed weight, or its upper plane)."""
    return layer.weight.shape[-1] * 32 // layer.bits if "weight" in layer else layer.upper.shape[-1] * 8
