"""A roofline of Apple GPUs, calibrated to public measurements: ``auto``'s prior on a Mac.

A launch takes max(bytes ÷ achieved bandwidth, lane-ops ÷ achieved lane-op rate), and a
forward adds a fixed cost of its own. Batch-1 decoding reads every weight once per forward,
so a verify of a few rows is bound by bytes and costs about one decode step; past the knee
each row adds its ALU work. Three constants per chip are not on Apple's spec sheets; they are
fitted to public numbers (docs/design.md §8 has the table, and SPEC.md §9 the sources):

* the achieved share of peak bandwidth and the fixed cost of a forward, from llama.cpp's
  Apple-silicon table (ggml-org/llama.cpp discussion #4167: LLaMA-2 7B, tg128, Q4_0 and
  Q8_0): on a chip with both, time per token = fixed + bytes ÷ (share × bandwidth) through
  the two points; a chip with Q4_0 only takes its generation's fixed cost;
* the achieved lane-op rate, from MLX's own ``quantized_matmul`` (its ``qmv_wide`` kernel)
  on an M4 Pro at 2–8 rows (ml-explore/mlx #3852): the share of the FP32 FMA rate at which
  :func:`mlx_qmm` — the kernel's op counts — gives its measured growth with rows.

This is a model, a prior only: ``--draft auto`` starts from it on a Mac and then decides from
what it measures there (:mod:`controller`). :func:`tokens_per_s` is the same model for a
one-row forward. The ALU work of our verify kernels is what the MSL emulator's counting build
measures (tests/test_alu_counts.py holds the constants below to it); a launch's bytes are its
weight codes, scales and biases once plus the activations in and out. Attention is taken to
read the KV cache once per forward, bytes-bound. scripts/bench_kernels.py charts it per kernel.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

from . import kernels
from .quant.linear import QSpecEmbedding, QSpecLinear, compute_dtype

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    """An Apple GPU as the roofline sees it, before calibration."""

    flops: float  # FP32 FLOPS
    bandwidth: float  # DRAM bytes per second
    gen: int  # GPU generation, as MLX's get_architecture_gen sees it

    @property
    def lane_ops(self) -> float:
        return self.flops / 2


# Bandwidths: Apple's product pages and press releases (M1 68.25 GB/s = LPDDR4X-4266 × 128 bit).
# FP32: Apple's press releases for M1 (2.6 TFLOPS, 8-core GPU), M1 Pro (5.2, 16-core), M1 Max
# (10.4, 32-core), M2 (3.6, 10-core), M2 Max (13.6, 38-core), M2 Ultra (27.2, 76-core); Apple
# published none for M3/M4, so cores × 128 × 2 × clock with the clocks of hmc-tech.com's GPU
# database: M3 10-core 1.398 GHz (3.58), M3 Max 40-core 1.398 GHz (14.3; other databases list
# 16.4 at 1.6 GHz), M4 10-core 1.47 GHz (3.76), M4 Max 40-core 1.678 GHz (17.2, the clock
# hmc-tech lists for the 32-core M4 Max). M2/M3/M4 Pro: the same generation's Max per core ×
# the Pro's largest GPU (19, 18, 20 cores).
CHIPS = {
    "M1": Chip(2.6e12, 68.25e9, 13),
    "M1 Pro": Chip(5.2e12, 200e9, 13),
    "M1 Max": Chip(10.4e12, 400e9, 13),
    "M2": Chip(3.6e12, 100e9, 14),
    "M2 Pro": Chip(6.8e12, 200e9, 14),
    "M2 Max": Chip(13.6e12, 400e9, 14),
    "M2 Ultra": Chip(27.2e12, 800e9, 14),
    "M3": Chip(3.58e12, 100e9, 15),
    "M3 Pro": Chip(6.44e12, 150e9, 15),
    "M3 Max": Chip(14.3e12, 400e9, 15),
    "M4": Chip(3.76e12, 120e9, 16),
    "M4 Pro": Chip(8.6e12, 273e9, 16),
    "M4 Max": Chip(17.2e12, 546e9, 16),
}

# ------------------------------------------------------------------ public measurements
# llama.cpp's Apple-silicon table (ggml-org/llama.cpp discussion #4167, read 2026-12): LLaMA-2
# 7B, tg128 tokens/s, the GPU configuration with the most cores of each chip listed. Bytes per
# token: the model files llama-bench lists, Q4_0 3.56 GiB, Q8_0 6.67 GiB.
LLAMA_7B_BYTES = {"Q4_0": 3.56 * GIB, "Q8_0": 6.67 * GIB}
LLAMA_7B_TOKENS_PER_S = {
    "M1": {"Q4_0": 14.2, "Q8_0": 7.9},
    "M1 Pro": {"Q4_0": 36.4},
    "M1 Max": {"Q4_0": 61.2, "Q8_0": 40.2},
    "M2": {"Q4_0": 21.9},
    "M2 Pro": {"Q4_0": 38.9},
    "M2 Max": {"Q4_0": 66.0, "Q8_0": 41.8},
    "M2 Ultra": {"Q4_0": 94.3},
    "M3": {"Q4_0": 21.3},
    "M3 Pro": {"Q4_0": 30.7},
    "M3 Max": {"Q4_0": 66.3, "Q8_0": 42.8},
    "M4": {"Q4_0": 24.1},
    "M4 Pro": {"Q4_0": 50.7},
    "M4 Max": {"Q4_0": 83.1, "Q8_0": 54.1},
}
# MLX quantized_matmul, 4-bit group 128, 5120 inputs → 17408 outputs, float16, on an M4 Pro
# (ml-explore/mlx #3852): time at M rows ÷ time at one row.
QMV_WIDE_M4_PRO = {"K": 5120, "N": 17408, "group": 128, "ratio": {2: 0.99, 3: 1.13, 4: 1.43, 5: 1.75, 8: 2.84}}


@dataclass(frozen=True)
class Calibration:
    """What a chip achieves, fitted: a forward's fixed seconds, the share of peak bandwidth,
    the share of the FP32 FMA lane-op rate."""

    fixed: float
    bandwidth_share: float
    alu_share: float


def _fit_decode() -> dict[str, tuple[float, float]]:
    """(fixed seconds, bandwidth share) per chip: through its Q4_0 and Q8_0 points, or, with
    Q4_0 only, the mean fixed cost of its generation's two-point chips."""
    two = {}
    for chip, tps in LLAMA_7B_TOKENS_PER_S.items():
        if len(tps) == 2:
            (b4, t4), (b8, t8) = ((LLAMA_7B_BYTES[q], 1 / tps[q]) for q in ("Q4_0", "Q8_0"))
            per_byte = (t8 - t4) / (b8 - b4)
            two[chip] = (t4 - b4 * per_byte, 1 / (per_byte * CHIPS[chip].bandwidth))
    fits = {}
    for chip, tps in LLAMA_7B_TOKENS_PER_S.items():
        if chip in two:
            fits[chip] = two[chip]
            continue
        same = [f for c, (f, _) in two.items() if CHIPS[c].gen == CHIPS[chip].gen]
        fixed = sum(same) / len(same)
        fits[chip] = (fixed, LLAMA_7B_BYTES["Q4_0"] / ((1 / tps["Q4_0"] - fixed) * CHIPS[chip].bandwidth))
    return fits


def _fit_alu(decode: dict) -> float:
    """The share of the FP32 lane-op rate at which MLX's qmv_wide, as :func:`mlx_qmm` counts
    it, grows with rows as measured on the M4 Pro (least squares on the log ratios, by
    golden-section search: one parameter)."""
    q = QMV_WIDE_M4_PRO
    chip, (_, share) = "M4 Pro", decode["M4 Pro"]
    bw, lane = share * CHIPS[chip].bandwidth, CHIPS[chip].lane_ops

    def loss(alu_share):
        def t(m):
            _, nbytes, alu = mlx_qmm(q["K"], q["N"], m, q["group"], 2, CHIPS[chip].gen)
            return max(nbytes / bw, alu / (alu_share * lane))
        return sum(math.log(t(m) / t(1) / r) ** 2 for m, r in q["ratio"].items())

    lo, hi = 0.05, 1.0
    for _ in range(60):
        a, b = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    return (lo + hi) / 2


# ------------------------------------------------------------------ MLX's own kernels
def qmv_batch_limit(gen: int, K: int, N: int) -> int:
    """mlx/backend/metal/quantized.cpp get_qmv_batch_limit for a base or Max chip (a Pro
    taken as the Max): from this many rows MLX leaves the matrix-vector kernels."""
    small, mid = K <= 2048 and N <= 2048, K <= 4096 and N <= 4096
    if gen >= 15:
        return 13 if small else 15 if mid else 13
    return 14 if small else 10 if mid else 6


def qmm_bytes(K: int, N: int, M: int, group: int, itemsize: int) -> int:
    """Bytes a cache-perfect GPU fetches for a 4-bit matmul: weights, scales, biases, x, y."""
    return N * K // 2 + 2 * N * (K // group) * itemsize + (M * K + M * N) * itemsize


def mlx_qmm(K: int, N: int, M: int, group: int, itemsize: int, gen: int) -> tuple[str, int, float]:
    """MLX's quantized_matmul (4-bit, transposed weights) at M rows: (path, bytes, lane-ops),
    from the structure of mlx/backend/metal/quantized.cpp and kernels/quantized.h
    (ml-explore/mlx 846d176): below :func:`qmv_batch_limit` rows ``qmv`` — one pass over the
    weights per row — on M1/M2 (GPU generation 13/14) and for one row on M3+, ``qmv_wide`` on
    M3/M4 for 2+ rows (weights dequantized once per tile of ≤ 5 rows); from the limit on,
    ``qmm``/``qmm_splitk`` (rows padded to 32). Ops per weight, counted by hand: qmv 3.875 per
    row + a 320-op simd_sum per output and row; qmv_wide 3 per tile + 1.125 per row + 48 per
    output and row; qmm 3 + 32 per 32-row tile. Re-read weights and split-K partial sums are
    taken to be served by cache."""
    nk = N * K
    nbytes = qmm_bytes(K, N, M, group, itemsize)
    if M >= qmv_batch_limit(gen, K, N):
        mt = -(-M // 32)
        split = min(max(1, 512 // (-(-N // 32) * mt)), K // max(group, 32))
        while split > 1 and K % (split * max(group, 32)):
            split -= 1
        alu = mt * 3 * nk + 32 * mt * nk + (split - 1) * M * N  # dequantize, MMA, add partials
        return ("qmm_splitk" if split > 1 else "qmm"), nbytes, alu
    if gen >= 15 and M >= 2:
        tiles = -(-M // 5)
        vecs = tiles * -(-M // tiles)
        return "qmv_wide", nbytes, tiles * (3 * nk + nk // group) + vecs * (1.125 * nk + 48 * N)
    return "qmv", nbytes, M * (3.875 * nk + 320 * N)


_DECODE = _fit_decode()
ALU_SHARE = _fit_alu(_DECODE)  # one share for every chip: only the M4 Pro was measured
CALIBRATION = {chip: Calibration(fixed, share, ALU_SHARE) for chip, (fixed, share) in _DECODE.items()}


def this_chip() -> str | None:
    """The chip in :data:`CHIPS` that runs our Metal kernels here (device "Apple M2 Max" →
    ``"M2 Max"``); None without them (the CPU backend: compute-bound, not this roofline) or
    for a chip not listed."""
    if kernels.backend() != "metal":
        return None
    name = mx.device_info().get("device_name", "").removeprefix("Apple ").strip()
    return name if name in CHIPS else None


def seconds(nbytes: float, alu: float, chip: str) -> float:
    """One launch: bound by its bytes or by its ALU work, whichever takes longer, at the
    bandwidth and lane-op rate the chip achieves."""
    c, cal = CHIPS[chip], CALIBRATION[chip]
    return max(nbytes / (cal.bandwidth_share * c.bandwidth), alu / (cal.alu_share * c.lane_ops))


def tokens_per_s(bytes_per_token: float, chip: str) -> float:
    """Batch-1 decode speed of a forward that reads ``bytes_per_token`` and is bound by them:
    the fixed cost of a forward, then the bytes at the achieved bandwidth. The same model as
    :func:`forward_seconds` at one row."""
    return 1 / (CALIBRATION[chip].fixed + seconds(bytes_per_token, 0, chip))


# ------------------------------------------------------------------ our verify kernels
# Lane-ops of one launch over N outputs (padded to whole threadgroups) and K inputs at M rows,
# as the emulator counts them: A + B·M with A = a dequantize of every weight (bitfield
# extract, convert, fma: 3 ops; 5 for an 8-bit weight's two planes) + 4 index ops in each of
# the 4 lanes per output, and B = one fma per weight + the 8-lane shuffle ladder per output
# (3 shuffles, 3 adds, in each of 8 lanes).
DEQUANTIZE_OPS = {4: 3, 8: 5}  # per weight: w4a16_verify, nested_matmul (both planes)
INDEX_OPS = 16  # per output
FMA_OPS = 1  # per weight and row
REDUCE_OPS = 48  # per output and row


def verify_alu(K: int, N: int, M: int, bits: int) -> int:
    """Lane-ops of one verify-kernel launch (``bits`` 8: the two-plane nested kernel)."""
    n = -(-N // kernels.FLOAT_MATMUL_TILE) * kernels.FLOAT_MATMUL_TILE
    return n * (DEQUANTIZE_OPS[bits] * K + INDEX_OPS) + M * n * (FMA_OPS * K + REDUCE_OPS)


class Linear(NamedTuple):
    """One matmul of a verify forward, as the roofline sees it."""

    K: int
    N: int
    bits: int  # 4, or 8 (two 4-bit planes)
    nbytes: int  # weight codes, scales and biases: what ``reads`` counts for it
    itemsize: int  # of the activations: the model's compute dtype


def linears(model) -> list[Linear] | None:
    """The matmuls of one forward of an installed model: every QSpec linear, and the
    embedding where it is also the LM head (tied: the model has no ``lm_head``). None where
    one would not run on our verify kernels (other bit widths or group sizes): the roofline
    does not describe it."""
    modules = [(p, m) for p, m in model.named_modules() if isinstance(m, (QSpecLinear, QSpecEmbedding))]
    tied = not any(p.split(".")[-1] == "lm_head" for p, _ in modules)
    itemsize = compute_dtype(model).size
    out = []
    for _, m in modules:
        if isinstance(m, QSpecEmbedding) and not tied:
            continue
        bits = 8 if "upper" in m else m.bits
        if bits not in DEQUANTIZE_OPS or m.group_size not in kernels.WEIGHT_GROUP_SIZES:
            return None
        s = m["scales"]
        arrays = [m[k] for k in ("weight", "upper", "lower", "scales", "biases") if k in m]
        out.append(Linear(s.shape[-1] * m.group_size, s.shape[0], bits, sum(a.nbytes for a in arrays), itemsize))
    return out


def experts_seconds(nbytes: float, row_weights: float, rows: int, chip: str) -> float:
    """A forward's expert layers (MLX's ``gather_qmm``, not our kernels): bound by the bytes
    of the distinct experts its rows read, or by each row dequantizing and multiplying the
    ``row_weights`` of its own experts (4-bit), whichever takes longer."""
    return seconds(nbytes, rows * row_weights * (DEQUANTIZE_OPS[4] + FMA_OPS), chip)


def forward_seconds(model_linears: list[Linear], kv_bytes: float, rows: int, chip: str) -> float:
    """One forward of ``rows`` rows (≤ kernels.MAX_M): the fixed cost of a forward, its
    linears one launch after another, and attention reading ``kv_bytes`` of cache."""
    return CALIBRATION[chip].fixed + sum(
        seconds(m.nbytes + rows * (m.K + m.N) * m.itemsize, verify_alu(m.K, m.N, rows, m.bits), chip)
        for m in model_linears
    ) + seconds(kv_bytes, 0, chip)
