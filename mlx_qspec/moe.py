"""What a mixture-of-experts forward reads: the union of the experts its rows route to.

A decode step reads top-k experts per expert layer; a verify of k rows reads the union of its
rows' choices, up to k× that. So on a MoE model the verify is far from flat, and a cost model
that takes a verify's bytes as a step's would speculate where it cannot pay. This module says
how many distinct experts a forward of r rows is expected to read from the router's top-k
(rows routing independently and uniformly: consecutive tokens often share experts, so it is an
upper bound) — and so how many expert bytes, for the cost model (``cost.py``) and the roofline (``roofline.py``).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .quant.linear import QSpecSwitchLinear

# Keys of a model's arguments that hold its router's top-k, as mlx-lm's models name it.
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k")


def expected_distinct(experts: int, top_k: int, rows: int) -> float:
    """Expected number of distinct experts among ``rows`` rows' choices of ``top_k`` of
    ``experts``, rows choosing independently and uniformly: n·(1 − (1 − k/n)^rows)."""
    if rows <= 0:
        return 0.0
    return experts * (1 - (1 - top_k / experts) ** rows)


@dataclass(frozen=True)
class ExpertLayer:
    """One expert layer (a SwitchGLU or SwitchMLP): its route key, its experts, the router's
    top-k, the bytes one of its experts holds (codes as stored, floats as ``half``), and its
    weights (every projection's inputs × outputs: what a row multiplies)."""

    key: str
    experts: int
    top_k: int
    expert_bytes: float
    expert_weights: int = 0


def top_k(model: nn.Module) -> int | None:
    """The router's top-k from the model's arguments (a multimodal model's text config too)."""
    args = getattr(model, "args", None)
    for cfg in (vars(args) if args is not None else {}, getattr(args, "text_config", None) or {}):
        for key in TOP_K_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def expert_layers(model: nn.Module, half: bool = True) -> list[ExpertLayer]:
    """Every expert layer of a model prepared by ``quant.linear.install``, its experts'
    bytes summed over its projections (``half``: float arrays as a Mac's float16)."""
    k = top_k(model)
    sizes: dict[str, list] = {}
    for _, m in model.named_modules():
        if not isinstance(m, QSpecSwitchLinear):
            continue
        entry = sizes.setdefault(m.route_key, [m.num_experts, 0.0, 0])
        for _, a in tree_flatten(m.parameters()):
            floats = mx.issubdtype(a.dtype, mx.floating)
            entry[1] += (2 * a.size if half and floats else a.nbytes) / m.num_experts
        _, outputs, packed = m["weight"].shape
        entry[2] += outputs * packed * 32 // m.bits
    if sizes and k is None:
        raise ValueError("this mixture-of-experts model does not say its router's top-k")
    return [ExpertLayer(key, n, k, b, w) for key, (n, b, w) in sizes.items()]


def forward_expert_bytes(layers: list[ExpertLayer], rows: int) -> float:
    """Expected expert bytes a forward of ``rows`` rows reads: per layer, its expected
    distinct experts times an expert's bytes."""
    return sum(expected_distinct(x.experts, x.top_k, rows) * x.expert_bytes for x in layers)
