"""Every Metal kernel in metal/, run through the MSL emulator, against its MLX reference:
integer parts bit-exact, float parts to rounding; byte counts from the emulator; the
dispatchers' choice of path; bad shapes."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qspec import kernels
from helpers import close, quantized_weight as weight
from tools.msl_emulator import recording


def acts(M, K, seed, dtype=mx.float32):
    x = mx.random.normal((M, K), key=mx.random.key(seed))
    # a few outlier channels, as real activations have
    return (x * mx.where(mx.arange(K) % 37 == 0, 8.0, 1.0)).astype(dtype)


def test_every_metal_file_is_documented_and_has_a_kernel():
    """Every file builds a kernel (one or several), each file with a header comment saying what
    it reads and its launch."""
    files = sorted(kernels.METAL_DIR.glob("*.metal"))
    assert {f.stem for f in files} == set(kernels.SOURCES)
    built = {kernels._VARIANTS.get(n, (n,))[0] for n in (*kernels._SIGNATURES, *kernels._VARIANTS)}
    assert built == set(kernels.SOURCES)
    for name, (header, body) in kernels.SOURCES.items():
        assert header.startswith(f"// {name} —"), name
        assert "Launch" in header and ("Per output" in header or "Reads per" in header), name
        assert body.strip(), name


# ------------------------------------------------------------------ act_quant
@pytest.mark.parametrize("M,K,bits,group,sum_size,hadamard,dtype", [
    (1, 576, 4, None, 64, 0, mx.float32),      # per token; K = 4.5 chunks of 128
    (5, 576, 8, None, 32, 0, mx.float32),
    (3, 320, 4, 16, 16, 0, mx.float32),        # per group, groups smaller than the weight group
    (16, 256, 8, 128, 32, 0, mx.float32),      # per group, larger than the weight group
    (2, 576, 4, 32, 32, 64, mx.float32),       # block Hadamard 64 (SmolLM2's 576 = 9·64)
    (7, 384, 8, None, 128, 128, mx.float32),
    (4, 256, 8, 32, 32, 0, mx.float16),
])
def test_act_quant_bit_exact(emulated, M, K, bits, group, sum_size, hadamard, dtype):
    x = acts(M, K, seed=M + K, dtype=dtype)
    got = kernels.metal_act_quant(x, bits, group, sum_size=sum_size, hadamard=hadamard)
    ref = kernels.act_quant_reference(x, bits, group, sum_size=sum_size, hadamard=hadamard)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert mx.array_equal(g, r).item()
    qmax = 2 ** (bits - 1) - 1
    assert mx.abs(got[0]).max().item() == qmax  # every scale is attained by some code


def test_act_quant_rounds_half_to_even(emulated):
    """Exact ties (scale 1): rint, as mx.round — round() would give 1, 2, 3, 4, -1, -3."""
    ties = [7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -2.5]
    x = mx.array([ties + [0.0] * (128 - len(ties))])
    codes, _, _ = kernels.metal_act_quant(x, 4, None, sum_size=32)
    assert np.array(codes)[0, :7].tolist() == [7, 0, 2, 2, 4, 0, -2]
    assert mx.array_equal(codes, kernels.act_quant_reference(x, 4, None, sum_size=32)[0]).item()


def test_act_quant_zero_rows(emulated):
    x = mx.zeros((2, 128))
    codes, scales, sums = kernels.metal_act_quant(x, 4, None, sum_size=32)
    assert not mx.any(codes).item() and not mx.any(scales).item() and not mx.any(sums).item()


# ------------------------------------------------------------------ W4A4 / W4A8
@pytest.mark.parametrize("M,K,N,group,act_bits,act_group", [
    (1, 576, 72, 64, 8, None),     # K is not a multiple of the 32-group-per-SIMD-group tile
    (3, 320, 40, 32, 4, 16),       # odd M; act groups inside weight groups
    (16, 256, 36, 128, 8, 32),     # M = 16; N not a multiple of the rows per threadgroup
    (7, 512, 64, 32, 4, 128),      # act groups spanning weight groups
    (2, 2112, 12, 32, 8, None),    # 66 groups per row: lanes loop 3 times, the last partly
])
def test_int_matmul_matches_reference(emulated, M, K, N, group, act_bits, act_group):
    x = acts(M, K, seed=K + N)
    w, s, b = weight(N, K, group, seed=N)
    sub = min(act_group or K, group)
    codes, ascales, sums = kernels.metal_act_quant(x, act_bits, act_group, sum_size=sub)
    y = kernels.metal_int_matmul(codes, ascales, sums, w, s, b, group_size=group,
                                 act_group_size=act_group)
    close(y, kernels.int_matmul_reference(codes, ascales, w, s, b, group_size=group,
                                          out_dtype=mx.float32))


def test_int_matmul_integer_part_is_exact(emulated):
    """With unit scales, zero biases and unit activation scales the output is the integer
    dot product itself: it must equal numpy's int64 matmul exactly."""
    M, K, N, G = 5, 384, 24, 64
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, (N, K)).astype(np.uint32)
    w = mx.array((q.reshape(N, K // 8, 8) << (4 * np.arange(8, dtype=np.uint32))).sum(-1).astype(np.uint32))
    a = rng.integers(-127, 128, (M, K)).astype(np.int8)
    ones, zeros = mx.ones((N, K // G)), mx.zeros((N, K // G))
    sums = mx.array(a.astype(np.int32).reshape(M, K // G, G).sum(-1).astype(np.int32))
    y = kernels.metal_int_matmul(mx.array(a), mx.ones((M, 1)), sums, w, ones, zeros, group_size=G)
    np.testing.assert_array_equal(np.array(y), (a.astype(np.int64) @ q.astype(np.int64).T).astype(np.float32))


def test_act_quant_matmul_dispatch(emulated, monkeypatch):
    x = acts(3, 256, seed=1)
    w, s, b = weight(48, 256, 64, seed=2)
    args = dict(group_size=64, bits=4, act_bits=4, act_group_size=32)
    assert kernels.backend() == ("metal" if mx.metal.is_available() else "mlx-reference")
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    ref = kernels.act_quant_matmul(x, w, s, b, **args)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert kernels.backend() == "metal"
    with recording() as runs:
        y = kernels.act_quant_matmul(x, w, s, b, **args)
    assert [r[0] for r in runs] == ["act_quant", "w4a_int_matmul"]
    close(y, ref)
    # shapes the kernels do not take fall back to the reference, never wrong numbers
    x20 = acts(20, 256, seed=4)
    with recording() as runs:
        y20 = kernels.act_quant_matmul(x20, w, s, b, **args)
    assert runs == []
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert mx.array_equal(y20, kernels.act_quant_matmul(x20, w, s, b, **args)).item()


# ------------------------------------------------------------------ W4A16 verify
@pytest.mark.parametrize("M,K,N,group", [
    (1, 576, 40, 64), (5, 320, 36, 32), (8, 512, 64, 128), (16, 256, 24, 32), (3, 96, 8, 32),
    (2, 2112, 12, 32),  # 66 groups per row: lanes loop 3 times, the last partly
])
def test_verify_matmul_matches_quantized_matmul(emulated, M, K, N, group):
    x = acts(M, K, seed=M * K)
    w, s, b = weight(N, K, group, seed=K)
    y = kernels.metal_verify_matmul(x, w, s, b, group_size=group)
    close(y, mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=4))


@pytest.mark.parametrize("dtype, M, K, N, group, rtol", [
    (mx.float16, 4, 256, 32, 64, 2.0**-10),
    (mx.bfloat16, 3, 128, 16, 32, 2.0**-7),
])
def test_verify_matmul_half_precision(emulated, dtype, M, K, N, group, rtol):
    """float16 / bfloat16 in and out (as on a Mac): within their rounding of the float32 result."""
    x, (w, s, b) = acts(M, K, seed=5, dtype=dtype), weight(N, K, group, seed=6, dtype=dtype)
    y = kernels.metal_verify_matmul(x, w, s, b, group_size=group)
    assert y.dtype == dtype
    ref = mx.quantized_matmul(x.astype(mx.float32), w, s.astype(mx.float32), b.astype(mx.float32),
                              transpose=True, group_size=group, bits=4)
    close(y, ref, rtol=rtol)


def test_verify_reads_weights_once_for_all_rows(emulated):
    K, N, G = 512, 64, 64
    w, s, b = weight(N, K, G, seed=7)
    loads = {}
    for M in (1, 8):
        with recording() as runs:
            kernels.metal_verify_matmul(acts(M, K, seed=M), w, s, b, group_size=G)
        loads[M] = runs[0][1]
    wb = {M: sum(loads[M][n] for n in ("w", "scales", "biases")) for M in loads}
    assert wb[1] == w.nbytes + s.nbytes + b.nbytes  # every weight byte exactly once
    assert wb[8] <= 1.1 * wb[1]
    # activations: each threadgroup reads the M·K values once, for its 4·_LANE_ROWS·_NSG outputs
    groups = -(-N // (4 * kernels._LANE_ROWS * kernels._NSG))
    assert loads[8]["x"] == 8 * K * 4 * groups


# ------------------------------------------------------------------ nested planes
def test_split_planes_recombine_to_8bit():
    w, _, _ = weight(16, 128, 64, seed=8, bits=8)
    up, lo = kernels.split_planes(w)
    c = np.array(w)[..., None] >> np.array([0, 8, 16, 24], np.uint32) & 0xFF
    u = np.array(up)[..., None] >> (4 * np.arange(8, dtype=np.uint32)) & 0xF
    l_ = np.array(lo)[..., None] >> (4 * np.arange(8, dtype=np.uint32)) & 0xF
    np.testing.assert_array_equal(c.reshape(16, -1), 16 * u.reshape(16, -1) + l_.reshape(16, -1))


@pytest.mark.parametrize("M,K,N,group", [(1, 576, 40, 64), (8, 256, 36, 32), (16, 384, 16, 128), (3, 128, 8, 64), (2, 2112, 12, 32)])
def test_nested_matmul(emulated, M, K, N, group):
    x = acts(M, K, seed=N + M)
    w8, s, b = weight(N, K, group, seed=M, bits=8)
    up, lo = kernels.split_planes(w8)
    yv = kernels.metal_nested_matmul(x, up, lo, s, b, group_size=group, draft=False)
    close(yv, mx.quantized_matmul(x, w8, s, b, transpose=True, group_size=group, bits=8))
    yd = kernels.metal_nested_matmul(x, up, None, s, b, group_size=group, draft=True)
    close(yd, kernels.nested_matmul_reference(x, up, lo, s, b, group_size=group, draft=True))


def test_nested_draft_reads_half_the_weight_bytes(emulated):
    K, N, G = 512, 32, 64
    w8, s, b = weight(N, K, G, seed=11, bits=8, dtype=mx.float16)  # scales as models store them
    up, lo = kernels.split_planes(w8)
    x = acts(4, K, seed=12)
    with recording() as runs:
        kernels.metal_nested_matmul(x, up, lo, s, b, group_size=G, draft=False)
        kernels.metal_nested_matmul(x, up, None, s, b, group_size=G, draft=True)
    verify = sum(runs[0][1][n] for n in ("upper", "lower", "scales", "biases"))
    draft = sum(runs[1][1][n] for n in ("upper", "scales", "biases"))
    assert verify == up.nbytes + lo.nbytes + s.nbytes + b.nbytes
    assert "lower" not in runs[1][1]
    assert draft <= 0.55 * verify


def test_nested_dispatch_falls_back_on_cpu(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    x = acts(2, 128, seed=13)
    w8, s, b = weight(8, 128, 64, seed=14, bits=8)
    up, lo = kernels.split_planes(w8)
    y = kernels.nested_matmul(x, up, lo, s, b, group_size=64, draft=False)
    close(y, mx.quantized_matmul(x, w8, s, b, transpose=True, group_size=64, bits=8))


# ------------------------------------------------------------------ bad input
def test_unsupported_shapes_raise_clear_errors(emulated):
    x = acts(2, 256, seed=15)
    w, s, b = weight(16, 256, 64, seed=16)
    verify, act_quant = kernels.metal_verify_matmul, kernels.metal_act_quant
    for match, call in [
        ("1..16 rows", lambda: verify(acts(17, 256, seed=1), w, s, b, group_size=64)),
        ("group size", lambda: verify(x, w, s, b, group_size=16)),
        ("does not match", lambda: verify(acts(2, 128, seed=1), w, s, b, group_size=64)),
        ("float32, float16 or bfloat16", lambda: verify(x.astype(mx.int32), w, s, b, group_size=64)),
        ("too small", lambda: verify(acts(1, 32, seed=1), *weight(1, 32, 32, seed=1), group_size=32)),
        ("does not divide", lambda: act_quant(acts(1, 96, seed=1), 4, 64, sum_size=32)),
        ("bits", lambda: act_quant(x, 3, None, sum_size=32)),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_verify_dispatch_falls_back_for_prefill_and_8bit(mac):
    x = acts(24, 256, seed=17)
    w, s, b = weight(16, 256, 64, seed=18)
    with recording() as runs:
        y = kernels.verify_matmul(x, w, s, b, group_size=64)
    assert runs == []
    assert mx.array_equal(y, mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)).item()
    with recording() as runs:
        y = kernels.verify_matmul(x[:4], w, s, b, group_size=64)
    assert [r[0] for r in runs] == ["w4a16_verify"]
    close(y, mx.quantized_matmul(x[:4], w, s, b, transpose=True, group_size=64, bits=4))
    w8, s8, b8 = weight(16, 256, 64, seed=19, bits=8)
    with recording() as runs:
        y = kernels.verify_matmul(x[:4], w8, s8, b8, group_size=64, bits=8)
    assert runs == []
    assert mx.array_equal(y, mx.quantized_matmul(x[:4], w8, s8, b8, transpose=True, group_size=64, bits=8)).item()
