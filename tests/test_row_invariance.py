"""Row invariance of every matmul kernel, through the MSL emulator: row m of an M-row call
equals, bit for bit, the 1-row call on that row, for M ∈ {1, 2, 5, 8, 16}.

Exactness on a Mac rests on this: a plain decode step runs a kernel on one row, a verify
pass on γ+1 rows, and greedy speculative output equals plain output only if the verify's
row for a position is the very number the one-row step computes. Float sums are not
associative, so a kernel that split or ordered its reduction by M would break it while
staying within rounding of every reference (which is all the other kernel tests check).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qspec import kernels
from tools.msl_emulator import metal_kernel as emulated_metal_kernel

ROWS = (1, 2, 5, 8, 16)
K, N, GROUP = 256, 16, 64


@pytest.fixture(scope="module")
def emulated_module():
    """Kernels built through the MSL emulator instead of mx.fast.metal_kernel, for the whole
    module (conftest's ``emulated`` is per test; the kernels here are built once)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(mx.fast, "metal_kernel", emulated_metal_kernel)
    kernels.clear_kernel_cache()
    yield
    mp.undo()
    kernels.clear_kernel_cache()


def x_rows(dtype=mx.float32):
    """16 distinct rows (normal, with outlier channels, one row scaled way up) so a row
    whose result leaked into another would show."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(max(ROWS), K)) * np.where(np.arange(K) % 29 == 0, 10.0, 1.0)
    x[3] *= 50.0
    return mx.array(x.astype(np.float32)).astype(dtype)


def weight(bits, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, K)) + rng.normal(0, 0.3, (N, 1))
    return mx.quantize(mx.array(w.astype(np.float32)), group_size=GROUP, bits=bits)


def assert_rows_invariant(call, x):
    """call(x[:M]) row by row against call(x[i:i+1]), bit for bit (NaN-free, same dtype)."""
    single = [np.array(call(x[i : i + 1])) for i in range(max(ROWS))]
    for M in ROWS:
        y = np.array(call(x[:M]))
        assert y.shape[0] == M
        for i in range(M):
            assert y[i].dtype == single[i].dtype
            np.testing.assert_array_equal(
                y[i], single[i][0], err_msg=f"row {i} of an {M}-row call differs from the 1-row call")
    # the rows really differ (a kernel that wrote one row everywhere would not pass)
    assert len({single[i].tobytes() for i in range(max(ROWS))}) == max(ROWS)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_verify_matmul_rows_are_independent_of_m(emulated_module, dtype):
    w, s, b = weight(4, seed=1)
    s, b = s.astype(dtype), b.astype(dtype)
    assert_rows_invariant(
        lambda x: kernels.metal_verify_matmul(x, w, s, b, group_size=GROUP), x_rows(dtype))


@pytest.mark.parametrize("draft", [True, False], ids=["draft", "verify"])
def test_nested_matmul_rows_are_independent_of_m(emulated_module, draft):
    w8, s, b = weight(8, seed=2)
    upper, lower = kernels.split_planes(w8)
    assert_rows_invariant(
        lambda x: kernels.metal_nested_matmul(x, upper, None if draft else lower, s, b,
                                              group_size=GROUP, draft=draft),
        x_rows())


def test_act_quant_rows_are_independent_of_m(emulated_module):
    def call(x):
        codes, scales, sums = kernels.metal_act_quant(x, 4, 32, sum_size=32)
        return mx.concatenate([codes.astype(mx.float32), scales, sums.astype(mx.float32)], axis=-1)
    assert_rows_invariant(call, x_rows())


def test_int_matmul_rows_are_independent_of_m(emulated_module):
    """W4A4 with per-group activation scales (the bias × code-sum term included): the
    act_quant kernel then the integer matmul, both with M rows."""
    w, s, b = weight(4, seed=3)

    def call(x):
        codes, ascales, sums = kernels.metal_act_quant(x, 4, 32, sum_size=32)
        return kernels.metal_int_matmul(codes, ascales, sums, w, s, b, group_size=GROUP,
                                        act_group_size=32)
    assert_rows_invariant(call, x_rows())
