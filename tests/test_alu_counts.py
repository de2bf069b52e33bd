"""The MSL emulator's counting build: ALU work and unique bytes per launch, exact on a
hand-written kernel; and what it shows of the verify kernels — one dequantize per weight and
one fma per weight and row, whatever M, each weight byte fetched once, the activations read
once per threadgroup."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import quantized_weight as weight
from mlx_qspec import kernels, roofline
from tools.msl_emulator import counting_alu, metal_kernel

# What a lane issues, by msl.h's rules ("ALU counting"): the comments count each line.
COUNTED = """
    uint i = thread_position_in_grid.x;
    float a = in0[i];
    float b = a * 2.0f + 1.0f;                      // 2
    b = fma(a, b, 3.0f);                            // 1
    uint w = as_type<uint>(b);                      // 0: a reinterpretation
    uint q = (w >> 3) & 0xfu;                       // 2
    float acc = 0.0f;
    for (int k = 0; k < 10; k++) {                  // 0: int loop control
        acc += a;                                   // 10
    }
    float4 v = float4(a) * float4(1.0f, 2.0f, 3.0f, 4.0f);   // 4
    half h = half(a) * half(2.0f);                  // 0: half arithmetic, width conversions
    float s = simd_sum(acc) + simd_shuffle_xor(a, 1u);       // 10 + 1 + 1
    out0[i] = b + float(q) + s + v.w + float(h) + float(extract_bits(w, 4, 4));  // 5 adds, 2 cvt, 1
    const int j = int(i) / 2;                       // 0: int
    out1[i] = in1[j] + in1[j];                      // 1; in1 read twice per pair of threads
"""
PER_THREAD = 2 + 1 + 2 + 10 + 4 + 12 + 8 + 1


def test_alu_count_of_a_hand_written_kernel_is_exact():
    k = metal_kernel(name="alu", input_names=["in0", "in1"], output_names=["out0", "out1"], source=COUNTED)
    x, x2 = mx.arange(64, dtype=mx.float32) / 7, mx.arange(48, dtype=mx.float32)
    args = dict(inputs=[x, x2], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,), (64,)],
                output_dtypes=[mx.float32, mx.float32])
    plain = k(**args)
    assert k.last_alu is None and k.last_unique is None  # the plain build counts bytes only
    with counting_alu():
        counted = k(**args)
    assert k.last_alu == 64 * PER_THREAD
    # the counted types compute the same bits
    for p, c in zip(plain, counted):
        assert np.array_equal(np.array(p), np.array(c))
    # requests count re-reads; unique bytes count each byte once, and not the unread ones
    assert k.last_loads["in1"] == 64 * 2 * 4
    assert k.last_unique == {"in0": 64 * 4, "in1": 32 * 4}


def counted_call(kind, M, K, N, group):
    """(alu, unique bytes, requested bytes, weight arrays) of one counted launch."""
    x = mx.random.normal((M, K), key=mx.random.key(M))
    with counting_alu():
        if kind == "verify":
            w, s, b = weight(N, K, group)
            arrays = dict(w=w, scales=s, biases=b)
            kernels.metal_verify_matmul(x, w, s, b, group_size=group)
            k = kernels._kernel("w4a16_verify")
        else:
            w8, s, b = weight(N, K, group, bits=8)
            up, lo = kernels.split_planes(w8)
            draft = kind == "draft"
            arrays = dict(upper=up, scales=s, biases=b, **({} if draft else {"lower": lo}))
            kernels.metal_nested_matmul(x, up, None if draft else lo, s, b, group_size=group, draft=draft)
            k = kernels._kernel("nested_matmul_draft" if draft else "nested_matmul_verify")
    return k.last_alu, k.last_unique, k.last_loads, arrays


K, N, GROUP = 320, 40, 64  # N: two full threadgroups of 16 outputs and a partial one
PER_TG = 4 * kernels._LANE_ROWS * kernels._NSG
N_PAD = -(-N // PER_TG) * PER_TG


@pytest.mark.parametrize("kind, dequant, bits", [("verify", 3, 4), ("nested-verify", 5, 8),
                                                 ("draft", 3, None)])
def test_alu_per_weight_is_one_dequantize_plus_one_fma_per_row(emulated, kind, dequant, bits):
    """alu(M) = A + B·M exactly, B = one fma per (padded) weight and row + the 8-lane shuffle
    ladder (3 shuffles, 3 adds) per output and row; A = the dequantize ops of every weight once
    (plus, for the draft, its 16s and b + 7.5s per staged scale) and a few index ops per thread.
    The lane-ops ``auto``'s modeled costs take for a verify launch (``bits``) are the kernel's."""
    alu = {M: counted_call(kind, M, K, N, GROUP)[0] for M in (1, 2, 16)}
    if bits is not None:
        assert [roofline.verify_alu(K, N, M, bits) for M in (1, 16)] == [alu[1], alu[16]]
    B = alu[2] - alu[1]
    assert B == N_PAD * K + 6 * 8 * N_PAD
    assert alu[16] == alu[1] + 15 * B
    A = alu[1] - B
    threads = N_PAD // PER_TG * kernels._NSG * 32
    staged = 2 * N_PAD * (K // GROUP) if kind == "draft" else 0
    assert dequant * N_PAD * K + staged <= A <= dequant * N_PAD * K + staged + 4 * threads


@pytest.mark.parametrize("kind", ["verify", "nested-verify"])
def test_weight_bytes_once_activations_once_per_threadgroup(emulated, kind):
    M = 5
    _, unique, loads, arrays = counted_call(kind, M, K, N, GROUP)
    for name, a in arrays.items():
        assert unique[name] == a.nbytes and loads[name] == a.nbytes  # each byte once, no re-read
    assert unique["x"] == M * K * 4
    assert loads["x"] == M * K * 4 * -(-N // PER_TG)


def test_counts_scale_exactly_with_whole_threadgroups(emulated):
    """What scripts/bench_kernels.py relies on to emulate a slice of a large layer's rows."""
    a1, u1, l1, _ = counted_call("verify", 4, 256, 32, 32)
    a2, u2, l2, _ = counted_call("verify", 4, 256, 64, 32)
    assert a2 == 2 * a1
    assert {n: 2 * v for n, v in l1.items() if n != "y"} == {n: v for n, v in l2.items() if n != "y"}
    assert u2["x"] == u1["x"] and u2["w"] == 2 * u1["w"]
