"""A roofline of Apple GPUs: what a forward of the loaded model costs on a Mac, untimed.

A kernel launch takes max(bytes ÷ bandwidth, lane-ops ÷ lane-op rate). Batch-1 decoding
reads every weight once per forward, so a verify of a few rows is bound by bytes and costs
about one decode step; past the knee each row adds its ALU work. The lane-op rate is the FP32
FMA rate (GPU cores × 128 lanes × clock = FP32 FLOPS ÷ 2): every counted operation is taken to
issue at it. The ALU work of our verify kernels is what the MSL emulator's counting build
measures (tests/test_alu_counts.py holds the constants below to it); a launch's bytes are its
weight codes, scales and biases once plus the activations in and out. Attention is taken to
read the KV cache once per forward, bytes-bound. ``cost.py`` builds ``auto``'s cost table
from this where no device timing exists; scripts/bench_kernels.py charts it per kernel.
"""

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

from . import kernels
from .quant.linear import QSpecEmbedding, QSpecLinear, compute_dtype


@dataclass(frozen=True)
class Chip:
    """An Apple GPU as the roofline sees it."""

    flops: float  # FP32 FLOPS
    bandwidth: float  # DRAM bytes per second
    gen: int  # GPU generation, as MLX's get_architecture_gen sees it

    @property
    def lane_ops(self) -> float:
        return self.flops / 2


# Bandwidths: Apple's product pages and press releases (M1 68.25 GB/s = LPDDR4X-4266 × 128 bit).
# FP32: Apple's press releases for M1 (2.6 TFLOPS, 8-core GPU), M1 Pro (5.2, 16-core), M1 Max
# (10.4, 32-core), M2 (3.6, 10-core), M2 Max (13.6, 38-core); Apple published none for M3/M4, so
# cores × 128 × 2 × clock with the clocks of hmc-tech.com's GPU database: M3 10-core 1.398 GHz
# (3.58), M3 Max 40-core 1.398 GHz (14.3; other databases list 16.4 at 1.6 GHz), M4 10-core
# 1.47 GHz (3.76), M4 Max 40-core 1.678 GHz (17.2, the clock hmc-tech lists for the 32-core M4
# Max). M2/M3/M4 Pro: the same generation's Max per core × the Pro's largest GPU (19, 18, 20 cores).
CHIPS = {
    "M1": Chip(2.6e12, 68.25e9, 13),
    "M1 Pro": Chip(5.2e12, 200e9, 13),
    "M1 Max": Chip(10.4e12, 400e9, 13),
    "M2": Chip(3.6e12, 100e9, 14),
    "M2 Pro": Chip(6.8e12, 200e9, 14),
    "M2 Max": Chip(13.6e12, 400e9, 14),
    "M3": Chip(3.58e12, 100e9, 15),
    "M3 Pro": Chip(6.44e12, 150e9, 15),
    "M3 Max": Chip(14.3e12, 400e9, 15),
    "M4": Chip(3.76e12, 120e9, 16),
    "M4 Pro": Chip(8.6e12, 273e9, 16),
    "M4 Max": Chip(17.2e12, 546e9, 16),
}


def this_chip() -> str | None:
    """The chip in :data:`CHIPS` that runs our Metal kernels here (device "Apple M2 Max" →
    ``"M2 Max"``); None without them (the CPU backend: compute-bound, not this roofline) or
    for a chip not listed."""
    if kernels.backend() != "metal":
        return None
    name = mx.device_info().get("device_name", "").removeprefix("Apple ").strip()
    return name if name in CHIPS else None


def seconds(nbytes: float, alu: float, chip: str) -> float:
    """One launch: bound by its bytes or by its ALU work, whichever takes longer."""
    c = CHIPS[chip]
    return max(nbytes / c.bandwidth, alu / c.lane_ops)


def tokens_per_s(bytes_per_token: float, chip: str, efficiency: float = 0.75) -> float:
    """Batch-1 decode speed when bytes read decide it: ``efficiency`` of peak bandwidth."""
    return efficiency * CHIPS[chip].bandwidth / bytes_per_token


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


def forward_seconds(model_linears: list[Linear], kv_bytes: float, rows: int, chip: str) -> float:
    """One forward of ``rows`` rows (≤ kernels.MAX_M): its linears one launch after another,
    and attention reading ``kv_bytes`` of cache."""
    return sum(
        seconds(m.nbytes + rows * (m.K + m.N) * m.itemsize, verify_alu(m.K, m.N, rows, m.bits), chip)
        for m in model_linears
    ) + kv_bytes / CHIPS[chip].bandwidth
