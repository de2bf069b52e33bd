"""Hadamard transforms MLX can apply, and the online ones a rotated model runs.

A model rotated by ``mlx_qspec.rotate`` computes the original function only with a Hadamard
before ``o_proj`` (per head) and ``down_proj``; the loader re-applies them from config.json.
Kept below the loader, apart from the rotation itself (which builds models through it).
"""

import math

import mlx.core as mx
import mlx.nn as nn

HADAMARD_BASES = (1, 12, 20, 28)


def hadamard_size_ok(n: int) -> bool:
    """Whether ``mx.hadamard_transform`` takes size ``n`` (m·2^k, m ∈ {1, 12, 20, 28}).

    Decided arithmetically: MLX 0.32 can crash (double free) instead of raising on some
    unsupported sizes, 576 among them, so never probe it with a call.
    """
    for m in HADAMARD_BASES:
        if n >= m and n % m == 0 and (n // m) & (n // m - 1) == 0:
            return True
    return False


def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Sizes whose Kronecker product is a Hadamard of order ``n`` that MLX can apply.

    ``(n,)`` when MLX takes n, else a pair (576 → 12 × 48: a Hadamard of order 576 as two
    small transforms), else None.
    """
    if hadamard_size_ok(n):
        return (n,)
    for a in range(2, n):
        if n % a == 0 and hadamard_size_ok(a) and hadamard_size_ok(n // a):
            return (a, n // a)
    return None


def hadamard(x: mx.array, factors) -> mx.array:
    """Orthonormal Kronecker-Hadamard on each consecutive prod(factors) block of the last axis."""
    shape, k = x.shape, len(factors)
    n = math.prod(factors)
    y = x.reshape(*shape[:-1], shape[-1] // n, *factors)
    for i, f in enumerate(factors):
        ax = y.ndim - k + i
        y = mx.moveaxis(mx.hadamard_transform(mx.moveaxis(y, ax, -1), scale=f**-0.5), -1, ax)
    return y.reshape(shape)


class OnlineHadamard(nn.Module):
    """Applies a (block-wise, Kronecker) Hadamard to the input, then the wrapped linear.

    The linear stays reachable as ``self.linear`` so tree-walking layer replacement (the
    draft/verify linear) still finds and swaps it; the transform then runs in every mode.
    """

    def __init__(self, linear: nn.Module, factors):
        super().__init__()
        self.linear = linear
        self.factors = tuple(factors)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(hadamard(x, self.factors))


def apply_online_rotations(model: nn.Module, config: dict) -> nn.Module:
    """Wrap ``o_proj`` and ``down_proj`` of a freshly loaded rotated model in their Hadamards.

    Does nothing when config.json carries no rotation; wrapping twice is a no-op.
    """
    rot = config.get("qspec", {}).get("rotation")
    if rot is None:
        return model
    factors = rot["online_factors"]
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            mod = getattr(parent, name)
            if not isinstance(mod, OnlineHadamard):
                setattr(parent, name, OnlineHadamard(mod, factors[name]))
    return model
