"""Matmuls whose fast path is a custom kernel, each with its MLX-op reference.

Model code calls these functions only; on a Mac with Metal the kernels from
``metal/`` run, elsewhere the MLX reference does. Both compute the same thing.
"""

import mlx.core as mx

from .quant.activations import fake_quantize_activations


def act_quant_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
    act_bits: int,
    act_group_size: int | None = None,
) -> mx.array:
    """``x @ W^T`` with x quantized to ``act_bits`` symmetric codes (per token, or per
    ``act_group_size`` features) and W an MLX affine-quantized weight (W4A4 / W4A8).

    Reference: quantize → dequantize x, then MLX's ``quantized_matmul``. The
    result equals ``dequant(a) @ dequant(W)^T``.
    """
    xq = fake_quantize_activations(x, act_bits, act_group_size)
    return mx.quantized_matmul(
        xq, w, scales, biases, transpose=True, group_size=group_size, bits=bits
    )
