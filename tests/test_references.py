"""Independent references for the draft path and the sampling distribution.

Every expected value here is computed from the formula, in numpy (float64 where it
matters), without calling the helper under test:
- activation quantization, per token and per group: symmetric codes in [-qmax, qmax],
  qmax = 2^(b-1) - 1, scale = absmax / qmax, round half to even (``np.round``), an
  all-zero group gets scale 0 and codes 0;
- W4A8 / W4A4 with real MLX affine 4-bit weights (non-trivial scales *and* biases, so the
  bias × code-sum term matters): y_n = Σ_blocks s_x · (s_gn · Σ a_k w_nk + b_gn · Σ a_k)
  from unpacked integer codes (SPEC.md §2), against the MLX reference path and, through
  the MSL emulator, against the Metal kernels;
- the target distribution of speculative sampling: softmax of mlx-lm's own filtered
  logits divided by the temperature, at temperatures other than 1 (a temperature applied
  upside down is invisible at 1), and the empirical histogram of mlx-lm's own sampler;
- the speculative-sampling chi-square test at temperature 0.7 with a top-k filter, its
  expected counts from that independent distribution.
"""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

from helpers import build_tiny_model
from helpers.sampling import assert_fits, joint, random_logprobs, sample_first_tokens
from mlx_qspec import kernels
from mlx_qspec.quant.activations import quantize_activations
from mlx_qspec.quant.linear import install
from mlx_qspec.sampling import make_sampler

# ``emulated`` (conftest): kernels built through the MSL emulator.


# ====================================================================== numpy references
def np_act_quant(x: np.ndarray, bits: int, group: int | None):
    """Symmetric activation quantization from the formula, in x's precision (float32).

    Returns (codes int8 (M, K), scales float32 (M, K // group)). Division and max are
    IEEE-exact operations, so float32 numpy is the bit-exact definition here."""
    x = np.asarray(x, np.float32)
    M, K = x.shape
    g = K if group is None else group
    qmax = np.float32(2 ** (bits - 1) - 1)
    xg = x.reshape(M, K // g, g)
    scales = (np.abs(xg).max(axis=-1) / qmax).astype(np.float32)
    nonzero = scales > 0
    safe = np.where(nonzero, scales, np.float32(1))[..., None]
    codes = np.where(nonzero[..., None], np.round(xg / safe), 0)  # np.round: half to even
    assert np.abs(codes).max() <= qmax
    return codes.astype(np.int8).reshape(M, K), scales


def np_unpack4(wq: mx.array) -> np.ndarray:
    """MLX 4-bit packing (N, K/8) uint32, low nibble first → codes (N, K) int64."""
    w = np.array(wq).astype(np.uint64)
    shifts = (4 * np.arange(8)).astype(np.uint64)
    return ((w[..., None] >> shifts) & np.uint64(0xF)).reshape(w.shape[0], -1).astype(np.int64)


def np_w4a(codes, ascales, act_group, wcodes, wscales, wbiases, group, bias_term=True):
    """y (M, N) float64 = Σ_blocks s_x · (s_gn · Σ_k a_k w_nk + b_gn · Σ_k a_k).

    Blocks are the intersections of activation groups and weight groups (both divide K,
    both powers of two, so a block is min(act group, weight group) long): inside one,
    the activation scale and the weight's scale and bias are constant. The inner sums are
    int64 dot products, exact."""
    M, K = codes.shape
    N = wcodes.shape[0]
    ag = K if act_group is None else act_group
    B = min(ag, group)
    nb = K // B
    a = codes.astype(np.int64).reshape(M, nb, B)
    w = wcodes.astype(np.int64).reshape(N, nb, B)
    dots = np.einsum("mbk,nbk->mnb", a, w)          # integer, exact
    asum = a.sum(-1)                                 # (M, nb) integer code sums
    start = np.arange(nb) * B
    sx = np.asarray(ascales, np.float64).reshape(M, -1)[:, start // ag]   # (M, nb)
    sw = np.asarray(wscales, np.float64)[:, start // group]               # (N, nb)
    bw = np.asarray(wbiases, np.float64)[:, start // group]
    inner = sw[None] * dots
    if bias_term:
        inner = inner + bw[None] * asum[:, None, :]
    return (sx[:, None, :] * inner).sum(-1)


def activations(M, K, seed):
    """Normal activations with outlier channels, an all-zero row (when M > 2) and an
    all-zero 16-feature span in row 0 (a zero group for group sizes ≤ 16)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)).astype(np.float32)
    x *= np.where(np.arange(K) % 37 == 0, 8.0, 1.0).astype(np.float32)
    x[0, 16:32] = 0.0
    if M > 2:
        x[2] = 0.0
    return x


def tie_rows(bits, K, scale=0.25):
    """Rows whose scale is a power of two (absmax = qmax · scale), so x / scale is exact and
    the .5 ties are real ties: round half to even decides them."""
    qmax = 2 ** (bits - 1) - 1
    ties = [qmax, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 4.5 if qmax > 4 else 0.0]
    row = np.zeros(K, np.float32)
    row[: len(ties)] = ties
    return (np.stack([row, -row]) * np.float32(scale)).astype(np.float32)


def real_weight(N, K, group, seed):
    """An MLX affine 4-bit weight from a real-looking float matrix: per-row spread and an
    offset, so scales vary and biases are far from zero (and of both signs)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, K)) * rng.uniform(0.5, 2.0, (N, 1)) + rng.normal(0, 0.5, (N, 1))
    wq, s, b = mx.quantize(mx.array(w.astype(np.float32)), group_size=group, bits=4)
    assert float(mx.abs(b).max()) > 1.0 and float(mx.min(b)) < 0  # the bias term matters
    return wq, s, b


# ====================================================================== activation quantization
ACT_CASES = [  # (M, K, bits, group)
    (5, 256, 8, None),
    (5, 256, 4, None),
    (4, 256, 8, 16),
    (4, 256, 4, 16),
    (3, 384, 4, 32),
    (3, 384, 8, 64),
    (6, 512, 4, 128),
]


@pytest.mark.parametrize("M,K,bits,group", ACT_CASES)
def test_quantize_activations_matches_formula(M, K, bits, group):
    x = np.concatenate([activations(M, K, seed=K + M + bits), tie_rows(bits, K)])
    codes, scales = np_act_quant(x, bits, group)
    got_codes, got_scales = quantize_activations(mx.array(x), bits, group)
    assert got_codes.dtype == mx.int8
    np.testing.assert_array_equal(np.array(got_codes), codes)
    np.testing.assert_array_equal(np.array(got_scales).reshape(scales.shape), scales)
    # the test data hits every rule: zero groups, exact ties, the clip value
    assert (scales == 0).any() and np.abs(codes).max() == 2 ** (bits - 1) - 1
    if group is None:
        assert list(codes[-2, :9]) == [2 ** (bits - 1) - 1, 0, 2, 2, 4, 0, -2, -2, -4]


@pytest.mark.parametrize("impl,M,K,bits,group", [("reference", *c) for c in ACT_CASES] + [
    ("metal", 5, 256, 8, None), ("metal", 4, 256, 4, 16), ("metal", 3, 384, 4, 32)])
def test_act_quant_reference_and_kernel_match_formula(request, impl, M, K, bits, group):
    if impl == "metal":
        request.getfixturevalue("emulated")
    quantize = kernels.act_quant_reference if impl == "reference" else kernels.metal_act_quant
    x = np.concatenate([activations(M, K, seed=K * bits + M), tie_rows(bits, K)])
    sum_size = min(group or K, 32)
    codes, scales = np_act_quant(x, bits, group)
    sums = codes.astype(np.int64).reshape(x.shape[0], K // sum_size, sum_size).sum(-1)
    got = quantize(mx.array(x), bits, group, sum_size=sum_size)
    np.testing.assert_array_equal(np.array(got[0]), codes)
    np.testing.assert_array_equal(np.array(got[1]).reshape(scales.shape), scales)
    np.testing.assert_array_equal(np.array(got[2]), sums)


# ====================================================================== W4A8 / W4A4
INT_CASES = [  # (M, K, N, weight group, act bits, act group)
    (3, 256, 24, 32, 8, None),   # W4A8 per token
    (4, 256, 16, 64, 4, 32),     # W4A4, activation groups inside weight groups
    (2, 512, 12, 32, 4, 128),    # W4A4, activation groups spanning weight groups
    (5, 384, 20, 128, 8, 64),
]


def _int_case(M, K, N, group, act_bits, act_group):
    x = activations(M, K, seed=M * N + K)
    wq, s, b = real_weight(N, K, group, seed=K + N)
    codes, ascales = np_act_quant(x, act_bits, act_group)
    args = (codes, ascales, act_group, np_unpack4(wq), np.array(s), np.array(b), group)
    return x, (wq, s, b), np_w4a(*args), np_w4a(*args, bias_term=False)


def _assert_close(y, ref, no_bias, rtol=5e-6):
    """Within float32 rounding of the float64 value (relative to the output's scale;
    measured ≤ 5.2e-7 for the MLX path, ≤ 1.4e-7 for the kernel), and the bias term is many
    tolerances large (dropping it moves the output by ~2× its scale: it cannot pass)."""
    y = np.array(y.astype(mx.float32), np.float64)
    scale = np.abs(ref).max()
    err = np.abs(y - ref).max()
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"
    assert np.abs(no_bias - ref).max() > 10000 * rtol * scale


@pytest.mark.parametrize("backend,M,K,N,group,act_bits,act_group",
                         [("mlx-reference", *c) for c in INT_CASES] + [("metal", *INT_CASES[1])])
def test_act_quant_matmul_matches_formula(request, monkeypatch, backend, M, K, N, group, act_bits,
                                          act_group):
    """The dispatcher as the CPU runs it (MLX), and as a Mac does (backend "metal": act_quant
    then the int matmul, through the emulator)."""
    if backend == "metal":
        request.getfixturevalue("emulated")
    monkeypatch.setattr(mx.metal, "is_available", lambda: backend == "metal")
    assert kernels.backend() == backend
    x, (wq, s, b), ref, no_bias = _int_case(M, K, N, group, act_bits, act_group)
    y = kernels.act_quant_matmul(mx.array(x), wq, s, b, group_size=group, bits=4,
                                 act_bits=act_bits, act_group_size=act_group)
    _assert_close(y, ref, no_bias)


@pytest.mark.parametrize("M,K,N,group,act_bits,act_group", INT_CASES[:3])
def test_metal_int_matmul_matches_formula(emulated, M, K, N, group, act_bits, act_group):
    x, (wq, s, b), ref, no_bias = _int_case(M, K, N, group, act_bits, act_group)
    sub = min(act_group or K, group)
    codes, ascales, sums = kernels.metal_act_quant(mx.array(x), act_bits, act_group, sum_size=sub)
    y = kernels.metal_int_matmul(codes, ascales, sums, wq, s, b, group_size=group,
                                 act_group_size=act_group)
    _assert_close(y, ref, no_bias)


# ====================================================================== target distribution
def independent_distribution(logprobs: mx.array, temp, top_p=0.0, min_p=0.0, top_k=0):
    """softmax(filtered / T) in float64, the filters being mlx-lm's own functions applied in
    mlx-lm's order (top-p, min-p, top-k: ``mlx_lm.sample_utils.make_sampler``)."""
    lp = logprobs
    if 0 < top_p < 1.0:
        lp = apply_top_p(lp, top_p)
    if min_p != 0.0:
        lp = apply_min_p(lp, min_p, 1)
    if top_k > 0:
        lp = apply_top_k(lp, top_k)
    z = np.array(lp.astype(mx.float32), np.float64) / temp
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


FILTERS = [dict(), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=5),
           dict(top_p=0.95, min_p=0.02, top_k=12)]


@pytest.mark.parametrize("temp", [0.5, 0.7, 1.5])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "-".join(f) or "nofilter")
def test_sampler_distribution_equals_softmax_of_filtered_logits(temp, filters):
    lp = random_logprobs(64, rows=3, seed=11, scale=2.5)
    ours = np.exp(np.array(make_sampler(temp=temp, **filters).distribution(lp), np.float64))
    ref = independent_distribution(lp, temp, **filters)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
    # the filters and the temperature really act on this data
    assert ((ref == 0) == (ours == 0)).all()
    if filters:
        assert (ref == 0).any()
    assert np.abs(ref - independent_distribution(lp, 1 / temp, **filters)).max() > 1e-2


@pytest.mark.parametrize("temp, filters", [
    (0.5, dict(top_p=0.9)), (0.7, dict(top_k=8)), (1.5, dict(min_p=0.05)), (0.7, dict()),
])
def test_mlx_lm_sampler_histogram_matches_our_distribution(temp, filters):
    """20 000 draws of mlx-lm's own sampler against Sampler.distribution; the same draws are
    far from the distribution with the temperature upside down (the test has power)."""
    n, V = 20000, 24
    lp = random_logprobs(V, seed=5, scale=2.5)
    mx.random.seed(99)
    draws = mlx_lm_make_sampler(temp=temp, **filters)(mx.broadcast_to(lp, (n, V)))
    counts = Counter(np.array(draws).tolist())
    ours = np.exp(np.array(make_sampler(temp=temp, **filters).distribution(lp), np.float64))[0]
    upside_down = independent_distribution(lp, 1 / temp, **filters)[0]
    assert_fits(counts, n, dict(enumerate(ours)), dict(enumerate(upside_down)), power=1e-9)


# ====================================================================== speculative sampling at T = 0.7
PROMPT = [200, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_speculative_sampling_at_temperature_0_7_keeps_the_target_distribution():
    """Chi-square of the first three tokens of speculative sampling (draft a4, γ = 2,
    T = 0.7, top-k 4) against the joint distribution computed independently of
    ``Sampler.distribution``; the same samples must be far from the joint at the
    temperature applied upside down (1/0.7), so the test can tell."""
    model = build_tiny_model()
    # Sharper logits (final norm × 2): the T = 0.7 and T = 1/0.7 joints then differ enough
    # for 400 samples to tell them apart (at gain 1 it would take ~1000).
    model.model.norm.weight = model.model.norm.weight * 2.0
    install(model)
    temp, filters, steps, n = 0.7, dict(top_k=4), 3, 400

    def independent(t):  # the exact joint's distribution, not Sampler.distribution
        return lambda lp: independent_distribution(lp, t, **filters)[0]

    p_joint = joint(model, PROMPT, independent(temp), steps)
    bad_joint = joint(model, PROMPT, independent(1 / temp), steps)
    counts, stats = sample_first_tokens(model, PROMPT, make_sampler(temp=temp, **filters), steps, n,
                                        seed=4321)
    assert_fits(counts, n, p_joint, bad_joint, stats)
