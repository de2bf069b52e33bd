"""Matmuls and attention whose fast path is a custom kernel, each with its MLX-op reference.

Model code calls the dispatchers only — :func:`act_quant_matmul` (the W4A4 / W4A8 draft),
:func:`verify_matmul` (W4A16 for a verify block of M ≤ 16 rows) and :func:`nested_matmul`
(8-bit weights as two 4-bit planes: the verify reads both, a ``w-upper`` draft the upper
one; ``quant/linear.py`` runs every 8-bit layer through it). :func:`nested_attention`
(``attention.py``'s path over the nested KV cache) runs decode, draft and verify rows through
one kernel that reads the cache once per kv head for all of them. On a Mac with Metal the
kernels from ``metal/`` run (:func:`backend` says ``"metal"``); elsewhere, and for shapes a
kernel does not support, the MLX reference does. Both compute the same thing: integer parts
exactly, float parts to rounding. The ``metal_*`` functions always run the kernel and raise
``ValueError`` on shapes it does not support; the ``*_reference`` functions are the plain-MLX
definitions.

Each Metal source is one file in ``metal/``: a header comment (what a thread does, what it
reads per output, why the launch shape), then ``// --- body ---`` and the body that
``mx.fast.metal_kernel`` wraps; a file may build several kernels (``_VARIANTS``). Kernel
objects are built on first use, through whatever ``mx.fast.metal_kernel`` is at that moment,
so a test can substitute the MSL emulator.
"""

from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from .quant.activations import (
    ACT_BITS,
    ACT_GROUP_SIZES,
    dequantize_activations,
    fake_quantize_activations,
    quantize_activations,
)

_HERE = Path(__file__).resolve().parent
# A wheel carries the sources inside the package; a source checkout keeps them at the top.
METAL_DIR = _HERE / "metal" if (_HERE / "metal").is_dir() else _HERE.parent / "metal"
MAX_M = 16  # rows a small-M kernel takes: a draft step or a verify block of γ+1 ≤ 16
WEIGHT_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_BODY_MARK = "// --- body ---"
_NSG = 2  # SIMD groups per threadgroup in the matmuls
_LANE_ROWS = 2  # outputs per lane in the float-activation matmuls (4 lane groups per SIMD group)
# outputs per threadgroup of the float-activation matmuls (verify, nested): N is padded to it
FLOAT_MATMUL_TILE = 4 * _LANE_ROWS * _NSG


def _read_sources() -> dict[str, tuple[str, str]]:
    """name → (header, body) for every ``metal/*.metal`` (empty when not shipped)."""
    out = {}
    if METAL_DIR.is_dir():
        for path in sorted(METAL_DIR.glob("*.metal")):
            header, mark, body = path.read_text().partition(_BODY_MARK)
            if not mark:
                raise RuntimeError(f"{path} has no '{_BODY_MARK}' line")
            out[path.stem] = (header, body)
    return out


SOURCES = _read_sources()

_SIGNATURES = {
    "act_quant": (["x", "hscale"], ["codes", "scales", "sums"]),
    "w4a16_verify": (["x", "w", "scales", "biases"], ["y"]),
    "w4a_int_matmul": (["codes", "ascales", "sums", "w", "scales", "biases"], ["y"]),
    # the nested kernels' verify variants; their draft variants drop the lower planes
    "nested_matmul": (["x", "upper", "lower", "scales", "biases"], ["y"]),
    "nested_attention": (["q", "scale", "sizes", "k_upper", "k_lower", "k_scales", "k_mins",
                          "k_buf", "v_upper", "v_lower", "v_scales", "v_mins", "v_buf"],
                         ["o_part", "ml_part"]),
    "nested_attention_combine": (["o_part", "ml_part"], ["out"]),
}
# Kernels built from a file of another name, with the PLANES its header gets: 0 one plain 4-bit
# weight, 1 the upper planes only (the lower ones are not even inputs), 2 both planes.
_VARIANTS = {
    "w4a16_verify": ("nested_matmul", 0),
    "nested_matmul_draft": ("nested_matmul", 1), "nested_matmul_verify": ("nested_matmul", 2),
    "nested_attention_draft": ("nested_attention", 1),
    "nested_attention_verify": ("nested_attention", 2),
}


def backend() -> str:
    """Which path the dispatchers take here: ``"metal"`` or ``"mlx-reference"``."""
    return "metal" if mx.metal.is_available() and SOURCES else "mlx-reference"


@lru_cache(maxsize=None)
def _kernel(name: str):
    """Build the kernel object on first use (creating it needs no GPU; running it does).
    The attention kernel reads its inputs in place through their strides (no copy of the
    cache's slices)."""
    file, planes = _VARIANTS.get(name, (name, None))
    if file not in SOURCES:
        raise RuntimeError(f"Metal source {file}.metal not found in {METAL_DIR}")
    header, body = SOURCES[file]
    inputs, outputs = _SIGNATURES.get(name) or _SIGNATURES[file]
    if planes is not None:
        header += f"\n#define PLANES {planes}\n"
    if planes == 1:
        inputs = [n for n in inputs if "lower" not in n]
    return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=outputs, source=body,
                                header=header, ensure_row_contiguous=file != "nested_attention")


def clear_kernel_cache():
    """Forget built kernel objects, so the next call builds them through the current
    ``mx.fast.metal_kernel`` (a test swapping in the emulator calls this)."""
    _kernel.cache_clear()


# ---------------------------------------------------------------- shape checks
def _check_float(name: str, a: mx.array):
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")


def _check_w4(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int):
    """Validate a 4-bit MLX weight against x; return (M, K, N)."""
    if group_size not in WEIGHT_GROUP_SIZES:
        raise ValueError(f"weight group size must be one of {WEIGHT_GROUP_SIZES}, got {group_size}")
    if w.dtype != mx.uint32 or w.ndim != 2:
        raise ValueError(f"4-bit weight must be a 2-D uint32 array, got {w.dtype} {w.shape}")
    K = x.shape[-1]
    N = w.shape[0]
    if w.size < 8:  # MLX binds arrays under 8 elements as `constant`, not `device`, memory
        raise ValueError(f"weight {w.shape} is too small for the Metal kernels (fewer than 64 values)")
    if K % group_size or w.shape[1] * 8 != K:
        raise ValueError(f"input size {K} does not match a 4-bit weight {w.shape} with group size {group_size}")
    for nm, a in (("scales", scales), ("biases", biases)):
        _check_float(nm, a)
        if a.shape != (N, K // group_size):
            raise ValueError(f"{nm} shape {a.shape} != {(N, K // group_size)}")
    M = x.size // K if K else 0
    if not 1 <= M <= MAX_M:
        raise ValueError(f"small-M kernel takes 1..{MAX_M} rows, got {M}")
    return M, K, N


def _metal_takes(check, *args) -> bool:
    """Whether a dispatcher runs the kernel: on Metal, for a call that ``check`` (raising
    ValueError on what the kernel does not take) lets through."""
    if backend() != "metal":
        return False
    try:
        check(*args)
    except ValueError:
        return False
    return True


def _rows_per_simdgroup(group_size: int) -> int:
    """Output features per SIMD group of the integer matmul: 4, or 2 where a group's words
    would crowd registers."""
    return 4 if group_size // 8 <= 8 else 2


def _matmul_launch(N: int, rn: int):
    per_tg = rn * _NSG
    return dict(grid=((N + per_tg - 1) // per_tg * _NSG * 32, 1, 1), threadgroup=(_NSG * 32, 1, 1))


# ---------------------------------------------------------------- activation quantization
def act_quant_reference(x, bits, group_size=None, *, sum_size, hadamard=0):
    """MLX-op definition of :func:`metal_act_quant`: (codes, scales, code sums per sum_size)."""
    if hadamard:
        K = x.shape[-1]
        xb = x.reshape(*x.shape[:-1], K // hadamard, hadamard)
        x = mx.hadamard_transform(xb, scale=hadamard**-0.5).reshape(x.shape)
    codes, scales = quantize_activations(x, bits, group_size)
    K = x.shape[-1]
    cs = codes.astype(mx.int32).reshape(*x.shape[:-1], K // sum_size, sum_size).sum(-1)
    return codes, scales, cs


def metal_act_quant(x, bits, group_size=None, *, sum_size, hadamard=0):
    """The fused kernel ``act_quant.metal``: per-token (or per-group) absmax → int codes
    (int8, shape of x), scales (x's dtype, ``(..., K // group)``), and int32 code sums per
    ``sum_size`` values — what the W4A4 formula's bias term needs. ``hadamard`` > 0 first
    applies a block Hadamard of that size (as ``mx.hadamard_transform`` per block)."""
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits}")
    _check_float("x", x)
    K = x.shape[-1]
    age = K if group_size is None else group_size
    if group_size is not None and group_size not in ACT_GROUP_SIZES:
        raise ValueError(f"activation group size must be one of {ACT_GROUP_SIZES}, got {group_size}")
    if K == 0 or K % age:
        raise ValueError(f"activation group size {age} does not divide input size {K}")
    if sum_size not in (4, 8, 16, 32, 64, 128) or age % sum_size or K % sum_size:
        raise ValueError(f"code-sum block {sum_size} must be a power of two in 4..128 dividing {age}")
    if hadamard and (hadamard not in (2, 4, 8, 16, 32, 64, 128) or K % hadamard):
        raise ValueError(f"Hadamard block {hadamard} must be a power of two in 2..128 dividing {K}")
    lead = x.shape[:-1]
    M = x.size // K
    nsg = max(1, min(8, (K + 127) // 128))
    codes, scales, sums = _kernel("act_quant")(
        inputs=[x.reshape(M, K), mx.array(hadamard**-0.5 if hadamard else 1.0, mx.float32)],
        template=[("T", x.dtype), ("K", K), ("AG", group_size or 0), ("SG", sum_size),
                  ("QMAX", 2 ** (bits - 1) - 1), ("HB", hadamard), ("NSG", nsg)],
        grid=(nsg * 32, M, 1),
        threadgroup=(nsg * 32, 1, 1),
        output_shapes=[(M, K), (M, K // age), (M, K // sum_size)],
        output_dtypes=[mx.int8, x.dtype, mx.int32],
    )
    return (codes.reshape(x.shape), scales.reshape(*lead, K // age),
            sums.reshape(*lead, K // sum_size))


# ---------------------------------------------------------------- W4A4 / W4A8
def int_matmul_reference(codes, ascales, w, scales, biases, *, group_size, out_dtype):
    """``dequant(a) @ dequant(W)^T`` from activation codes and their scales."""
    xq = dequantize_activations(codes, ascales.astype(out_dtype))
    return mx.quantized_matmul(xq, w, scales, biases, transpose=True, group_size=group_size, bits=4)


def metal_int_matmul(codes, ascales, sums, w, scales, biases, *, group_size, act_group_size=None,
                     out_dtype=mx.float32):
    """The kernel ``w4a_int_matmul.metal``: int8 activation codes (from :func:`metal_act_quant`
    with ``sum_size = min(act group, group_size)``) × MLX 4-bit weights, integer inner sums,
    one float epilogue per block. Returns ``(..., N)`` in ``out_dtype``."""
    if codes.dtype != mx.int8 or sums.dtype != mx.int32:
        raise ValueError("codes must be int8 and sums int32 (from metal_act_quant)")
    _check_float("activation scales", ascales)
    M, K, N = _check_w4(codes, w, scales, biases, group_size)
    age = K if act_group_size is None else act_group_size
    if K % age:
        raise ValueError(f"activation group size {age} does not divide input size {K}")
    sub = min(age, group_size)
    if ascales.size != M * (K // age) or sums.size != M * (K // sub):
        raise ValueError("activation scales / sums do not match codes and group sizes")
    rn = _rows_per_simdgroup(group_size)
    y = _kernel("w4a_int_matmul")(
        inputs=[codes.reshape(M, K), ascales.reshape(M, K // age), sums.reshape(M, K // sub),
                w, scales, biases],
        template=[("T", out_dtype), ("K", K), ("N", N), ("M", M), ("WG", group_size),
                  ("AG", act_group_size or 0), ("RN", rn), ("NSG", _NSG)],
        output_shapes=[(M, N)],
        output_dtypes=[out_dtype],
        **_matmul_launch(N, rn),
    )[0]
    return y.reshape(*codes.shape[:-1], N)


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

    Metal: ``act_quant`` then ``w4a_int_matmul`` (4-bit weights, ≤ 16 rows). Otherwise the
    reference: quantize → dequantize x, then MLX's ``quantized_matmul``. Both equal
    ``dequant(a) @ dequant(W)^T``.
    """
    groups_ok = act_group_size is None or (act_group_size in ACT_GROUP_SIZES
                                           and not x.shape[-1] % act_group_size)
    if (bits == 4 and act_bits in ACT_BITS and groups_ok and x.dtype in FLOAT_DTYPES
            and _metal_takes(_check_w4, x, w, scales, biases, group_size)):
        K = x.shape[-1]
        sub = min(act_group_size or K, group_size)
        codes, ascales, sums = metal_act_quant(x, act_bits, act_group_size, sum_size=sub)
        return metal_int_matmul(codes, ascales, sums, w, scales, biases, group_size=group_size,
                                act_group_size=act_group_size, out_dtype=x.dtype)
    xq = fake_quantize_activations(x, act_bits, act_group_size)
    return mx.quantized_matmul(
        xq, w, scales, biases, transpose=True, group_size=group_size, bits=bits
    )


# ---------------------------------------------------------------- W4A16 verify
def metal_verify_matmul(x, w, scales, biases, *, group_size):
    """The kernel ``w4a16_verify`` (``nested_matmul.metal`` on one plain 4-bit weight):
    ``x @ W^T`` for ≤ 16 rows, each weight byte read once for all rows. Returns ``(..., N)``
    in x's dtype."""
    _check_float("x", x)
    M, K, N = _check_w4(x, w, scales, biases, group_size)
    return _float_matmul("w4a16_verify", x, [w], scales, biases, M, K, N, group_size=group_size)


def _float_matmul(name, x, planes, scales, biases, M, K, N, *, group_size):
    """Launch a float-activation small-M matmul kernel; ``(..., N)`` in x's dtype. The launch
    shape does not depend on M, nor does any row's arithmetic."""
    y = _kernel(name)(
        inputs=[x.reshape(M, K), *planes, scales, biases],
        template=[("T", x.dtype), ("K", K), ("N", N), ("M", M), ("WG", group_size),
                  ("RN", _LANE_ROWS), ("NSG", _NSG)],
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
        **_matmul_launch(N, 4 * _LANE_ROWS),
    )[0]
    return y.reshape(*x.shape[:-1], N)


def verify_matmul(x, w, scales, biases, *, group_size, bits=4):
    """The verify pass's ``x @ W^T`` (activations in compute dtype). Metal kernel for 4-bit
    weights and ≤ 16 rows; MLX's ``quantized_matmul`` otherwise (prefill, other bit widths)."""
    if bits == 4 and x.dtype in FLOAT_DTYPES and _metal_takes(_check_w4, x, w, scales, biases, group_size):
        return metal_verify_matmul(x, w, scales, biases, group_size=group_size)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


# ---------------------------------------------------------------- nested planes
def split_planes(w8: mx.array) -> tuple[mx.array, mx.array]:
    """MLX 8-bit packed codes (N, K/4) uint32 → (upper, lower) 4-bit planes, each in MLX's
    4-bit packing (N, K/8): code c = 16·upper + lower. Scales and biases stay the 8-bit ones.
    Works on bytes (a uint8 view): byte j of the 8-bit array is code j, byte j of a 4-bit
    plane holds codes 2j (low nibble) and 2j+1 (high nibble)."""
    if w8.dtype != mx.uint32 or w8.ndim != 2:
        raise ValueError(f"8-bit weight must be a 2-D uint32 array, got {w8.dtype} {w8.shape}")
    c = w8.view(mx.uint8).reshape(w8.shape[0], -1, 2)  # (N, K/2, 2): codes 2j, 2j+1
    even, odd = c[..., 0], c[..., 1]
    upper = (even >> 4) | (odd & 0xF0)
    lower = (even & 0xF) | ((odd & 0xF) << 4)
    return upper.view(mx.uint32), lower.view(mx.uint32)


def merge_planes(upper: mx.array, lower: mx.array) -> mx.array:
    """Inverse of :func:`split_planes`: the MLX 8-bit packed codes, bit for bit."""
    u, lo = upper.view(mx.uint8), lower.view(mx.uint8)
    even = ((u & 0xF) << 4) | (lo & 0xF)
    odd = (u & 0xF0) | (lo >> 4)
    return mx.stack([even, odd], axis=-1).reshape(upper.shape[0], -1).view(mx.uint32)


def nested_matmul_reference(x, upper, lower, scales, biases, *, group_size, draft):
    """Plain MLX: verify = MLX's 8-bit ``quantized_matmul`` on the merged codes (bit for bit
    the 8-bit layer); draft = qmm(x, U, 16s, b + 7.5s), the lower plane replaced by its
    mid-point, reading half the bytes."""
    if draft:
        return mx.quantized_matmul(x, upper, 16 * scales, biases + 7.5 * scales, transpose=True,
                                   group_size=group_size, bits=4)
    return mx.quantized_matmul(x, merge_planes(upper, lower), scales, biases, transpose=True,
                               group_size=group_size, bits=8)


def metal_nested_matmul(x, upper, lower, scales, biases, *, group_size, draft):
    """The kernel ``nested_matmul.metal``: draft reads the upper plane only (half the weight
    bytes), verify reads both planes in one pass. ``lower`` is unused (may be None) for the
    draft. ≤ 16 rows; returns ``(..., N)`` in x's dtype."""
    _check_float("x", x)
    M, K, N = _check_w4(x, upper, scales, biases, group_size)
    if not draft and (lower is None or lower.shape != upper.shape or lower.dtype != mx.uint32):
        raise ValueError("the verify variant needs a lower plane shaped like the upper plane")
    planes = [upper] if draft else [upper, lower]
    return _float_matmul("nested_matmul_draft" if draft else "nested_matmul_verify", x, planes,
                         scales, biases, M, K, N, group_size=group_size)


def nested_matmul(x, upper, lower, scales, biases, *, group_size, draft):
    """``x @ W^T`` for an 8-bit weight kept as two 4-bit planes: ``draft=True`` reads the
    upper plane only. Metal kernel for ≤ 16 rows, the MLX reference otherwise."""
    if x.dtype in FLOAT_DTYPES and _metal_takes(_check_w4, x, upper, scales, biases, group_size):
        return metal_nested_matmul(x, upper, lower, scales, biases, group_size=group_size, draft=draft)
    return nested_matmul_reference(x, upper, lower, scales, biases, group_size=group_size, draft=draft)


# ---------------------------------------------------------------- attention over a nested KV cache
def nested_attention_reference(q, keys, values, *, scale, mask, upper, key_block, value_group):
    """Plain MLX attention over a QuantSpec-style hierarchical KV cache (``kv_cache.py``).

    ``keys`` = ``(upper, lower, scales, mins, buffer)``: ``upper``/``lower`` (B, Hkv, D, Tq/8)
    uint32 4-bit planes grouped per channel over ``key_block`` tokens, ``scales``/``mins``
    (B, Hkv, D, Tq/key_block), ``buffer`` (B, Hkv, Tb, D) the recent tokens in float.
    ``values`` the same with planes (B, Hkv, Tq, D/8) grouped per token over ``value_group``
    channels, ``scales``/``mins`` (B, Hkv, Tq, D/value_group). A quantized value is
    ``min + s·U`` (``upper=True``: the draft's 4-bit view) or ``min + s·U + (s/16)·(L − 8)``
    (the verify's view, ~8 bits: the lower plane stores the signed residual + 8). Tq may be
    0 (planes None). ``q`` (B, Hq, L, D), Hq a multiple of Hkv; ``mask`` None, ``"causal"``
    (the L queries are the last L of the Tq + Tb positions) or an array broadcastable to
    (B, Hq, L, Tq + Tb) (bool: True attends; float: added). Returns (B, Hq, L, D) in q's dtype.
    """
    ku, kl, ks, kb, kbuf = keys
    vu, vl, vs, vb, vbuf = values
    B, Hq, L, D = q.shape
    Hkv = kbuf.shape[1]
    R = Hq // Hkv
    Tq = 0 if ku is None else ku.shape[-1] * 8
    T = Tq + kbuf.shape[2]
    qg = (q * scale).reshape(B, Hkv, R, L, D)

    def planes(x, u, lo, s, m, group, transpose):
        """``x @ dequant(planes)`` for the chosen view (two 4-bit reads for the verify)."""
        ex = lambda a: mx.expand_dims(a, 2)  # noqa: E731  broadcast over the R query heads
        qmm = lambda w_, s_, b_: mx.quantized_matmul(  # noqa: E731
            x, ex(w_), ex(s_), ex(b_), transpose=transpose, group_size=group, bits=4)
        out = qmm(u, s, m)
        if not upper:
            out = out + qmm(lo, s * (1 / 16), s * -0.5)
        return out

    scores = qg @ mx.expand_dims(kbuf, 2).swapaxes(-1, -2)
    if Tq:
        scores = mx.concatenate(
            [planes(qg, ku, kl, ks, kb, key_block, False), scores], axis=-1)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = mx.arange(T)[None] <= (mx.arange(L) + T - L)[:, None]
    if mask is not None:
        if mask.ndim == 4:  # (B, Hq or 1, L, T) → (B, Hkv or 1, R or 1, L, T)
            mask = (mask.reshape(mask.shape[0], Hkv, R, L, T) if mask.shape[1] == Hq
                    else mx.expand_dims(mask, 2))
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    p = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
    out = p[..., Tq:] @ mx.expand_dims(vbuf, 2)
    if Tq:
        out = out + planes(p[..., :Tq], vu, vl, vs, vb, value_group, False)
    return out.reshape(B, Hq, L, D)


ATTN_HEAD_DIMS = (32, 64, 128)
ATTN_MAX_ROWS = 128  # R·L query rows of one kv head: 32 SIMD groups × _ATTN_SLOTS
_ATTN_SLOTS = 4  # query rows per SIMD group, fixed: decode and verify run one compiled kernel
_ATTN_CHUNK = 512  # positions per threadgroup, fixed: a row's arithmetic depends on T only


def _check_attention(q, keys, values, mask, upper, key_block, value_group):
    """Validate a call for the attention kernel; return (Tq, Tb, causal)."""
    _check_float("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must be (B, Hq, L, D), got {q.shape}")
    B, Hq, L, D = q.shape
    if D not in ATTN_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {ATTN_HEAD_DIMS}, got {D}")
    if not 1 <= L <= MAX_M:
        raise ValueError(f"the attention kernel takes 1..{MAX_M} query rows, got {L}")
    causal = isinstance(mask, str) and mask == "causal"
    if mask is not None and not causal:
        raise ValueError("the attention kernel takes mask None or 'causal', not an array mask")
    if {key_block, value_group} - set(WEIGHT_GROUP_SIZES) or D % value_group:
        raise ValueError(f"key block {key_block} / value group {value_group} must be one of "
                         f"{WEIGHT_GROUP_SIZES}, the value group dividing head dim {D}")
    ku, kl, ks, km, kbuf = keys
    vu, vl, vs, vm, vbuf = values
    for nm, a in (("key buffer", kbuf), ("value buffer", vbuf)):
        _check_float(nm, a)
        if a.ndim != 4 or a.shape[0] != B or a.shape[3] != D or a.shape != kbuf.shape:
            raise ValueError(f"{nm} {a.shape} is not (B, Hkv, Tb, {D}) like the key buffer")
    Hkv, Tb = kbuf.shape[1], kbuf.shape[2]
    if Hq % Hkv or Hq // Hkv * L > ATTN_MAX_ROWS:
        raise ValueError(f"{Hq} query heads over {Hkv} kv heads at {L} rows: need a multiple "
                         f"and at most {ATTN_MAX_ROWS} rows per kv head")
    Tq = 0 if ku is None else ku.shape[-1] * 8
    if Tq:
        if Tq % key_block:
            raise ValueError(f"{Tq} quantized positions are not whole key blocks of {key_block}")
        want = [(ku, (B, Hkv, D, Tq // 8), "key planes"),
                (vu, (B, Hkv, Tq, D // 8), "value planes")]
        if not upper:
            want += [(kl, (B, Hkv, D, Tq // 8), "key planes"),
                     (vl, (B, Hkv, Tq, D // 8), "value planes")]
        for a, shape, nm in want:
            if a is None or a.dtype != mx.uint32 or a.shape != shape:
                raise ValueError(f"{nm} must be uint32 {shape}")
        kg, vg = (B, Hkv, D, Tq // key_block), (B, Hkv, Tq, D // value_group)
        for a, shape in ((ks, kg), (km, kg), (vs, vg), (vm, vg)):
            _check_float("scales / mins", a)
            if a.shape != shape:
                raise ValueError(f"scales / mins {a.shape} != {shape}")
    if Tq + Tb == 0 or (causal and Tq + Tb < L):
        raise ValueError(f"{Tq + Tb} cached positions for {L} causal query rows")
    return Tq, Tb, causal


def metal_nested_attention(q, keys, values, *, scale, mask, upper, key_block, value_group):
    """The kernels ``nested_attention.metal`` then ``nested_attention_combine.metal``: what
    :func:`nested_attention_reference` computes, reading each KV byte once per kv head for
    all R·L query rows (a verify block costs about a decode step's bytes); the draft variant
    (``upper=True``) reads no lower plane. Head dim 32/64/128, 1..16 rows, mask None or
    ``"causal"``; raises ValueError otherwise. Returns (B, Hq, L, D) in q's dtype."""
    Tq, Tb, causal = _check_attention(q, keys, values, mask, upper, key_block, value_group)
    B, Hq, L, D = q.shape
    ku, kl, ks, km, kbuf = keys
    vu, vl, vs, vm, vbuf = values
    Hkv = kbuf.shape[1]
    rows = Hq // Hkv * L
    nsg = max(8, -(-rows // _ATTN_SLOTS))
    chunks = -(-(Tq + Tb) // _ATTN_CHUNK)

    def given(a, planes=False):  # an absent part (Tq or Tb = 0): a placeholder, never read
        if a is not None and a.size:
            return a
        return mx.zeros((1, 1, 1, 8), mx.uint32 if planes else kbuf.dtype)

    kq = [given(ku, True), *([] if upper else [given(kl, True)]), given(ks), given(km)]
    vq = [given(vu, True), *([] if upper else [given(vl, True)]), given(vs), given(vm)]
    sizes = mx.array([Tq, Tb, Hq // Hkv, L, Hkv, key_block, value_group, int(causal)], mx.int32)
    variant = "nested_attention_draft" if upper else "nested_attention_verify"
    o_part, ml_part = _kernel(variant)(
        inputs=[q, mx.array(scale, mx.float32), sizes, *kq, given(kbuf), *vq, given(vbuf)],
        template=[("D", D), ("MAXR", _ATTN_SLOTS), ("TC", _ATTN_CHUNK)],
        grid=(chunks * nsg * 32, B * Hkv, 1),
        threadgroup=(nsg * 32, 1, 1),
        output_shapes=[(B * Hkv, chunks, rows, D), (B * Hkv, chunks, rows, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return _kernel("nested_attention_combine")(
        inputs=[o_part, ml_part],
        template=[("T", q.dtype), ("D", D)],
        grid=(D, B * Hq * L, 1),
        threadgroup=(D, 256 // D, 1),
        output_shapes=[(B, Hq, L, D)],
        output_dtypes=[q.dtype],
    )[0]


def nested_attention(q, keys, values, *, scale, mask, upper, key_block, value_group):
    """Attention over a nested KV cache (``attention.py`` calls this). On Metal the kernel, so
    a verify block reads the cache about once and every row runs the decode step's arithmetic;
    otherwise, and for what the kernel does not take (L > 16, array masks, other head dims),
    :func:`nested_attention_reference`."""
    if _metal_takes(_check_attention, q, keys, values, mask, upper, key_block, value_group):
        return metal_nested_attention(q, keys, values, scale=scale, mask=mask, upper=upper,
                                      key_block=key_block, value_group=value_group)
    return nested_attention_reference(q, keys, values, scale=scale, mask=mask, upper=upper,
                                      key_block=key_block, value_group=value_group)
