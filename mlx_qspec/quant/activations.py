"""Symmetric activation quantization for the draft (W4A4 / W4A8).

The draft quantizes the input of every quantized linear to ``bits``-bit signed
codes with one scale per token (``group_size=None``) or per ``group_size``
consecutive input features. Codes lie in ``[-qmax, qmax]`` with
``qmax = 2**(bits-1) - 1`` (symmetric: no zero point, so the integer dot
product needs no correction term of its own).
"""

import mlx.core as mx

ACT_BITS = (4, 8)
ACT_GROUP_SIZES = (16, 32, 64, 128)


def quantize_activations(x: mx.array, bits: int, group_size: int | None = None):
    """Return ``(codes, scales)`` with ``x ≈ codes * scales`` (broadcast per group).

    ``codes`` is int8 with the shape of ``x``; ``scales`` has shape
    ``x.shape[:-1] + (K // group_size,)`` (or ``(1,)`` per token) in x's dtype.
    A group that is all zero gets scale 0 and codes 0.
    """
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits}")
    K = x.shape[-1]
    g = K if group_size is None else group_size
    if K % g:
        raise ValueError(f"activation group size {g} does not divide input size {K}")
    qmax = 2 ** (bits - 1) - 1
    xg = x.reshape(*x.shape[:-1], K // g, g)
    scales = mx.max(mx.abs(xg), axis=-1, keepdims=True) / qmax
    safe = mx.where(scales == 0, mx.array(1, scales.dtype), scales)
    codes = mx.clip(mx.round(xg / safe), -qmax, qmax).astype(mx.int8)
    return codes.reshape(x.shape), scales.squeeze(-1)


def dequantize_activations(codes: mx.array, scales: mx.array) -> mx.array:
    """Inverse of :func:`quantize_activations` (``codes * scale`` per group)."""
    K = codes.shape[-1]
    n = scales.shape[-1]
    cg = codes.reshape(*codes.shape[:-1], n, K // n).astype(scales.dtype)
    return (cg * scales[..., None]).reshape(codes.shape)


def fake_quantize_activations(x: mx.array, bits: int, group_size: int | None = None):
    """Quantize then dequantize: what the draft's matmul sees, in plain MLX ops."""
    return dequantize_activations(*quantize_activations(x, bits, group_size))
