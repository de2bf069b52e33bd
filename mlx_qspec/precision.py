"""Precision: how one forward reads the model — one value, set per forward, context-local.

A draft is not a second model but a way of reading the same memory with fewer bits:
how 8-bit weights are read (both 4-bit planes, or only the upper one), how activations
enter the quantized linears (compute dtype, or 8/4-bit codes per token or per group), and
how a nested KV cache is read (both planes, or only the upper one), and which transformer
blocks the forward skips (a layer-skip draft reads only the others). The speculative loop
sets a :class:`Precision` for each forward with :func:`reading`; layers and caches read it
with :func:`current`. It lives in a :class:`contextvars.ContextVar`, so it never leaks out
of the ``with`` block, and two threads (two requests of a server) never see each other's.

A precision's name joins its terms with ``+`` (``a8-g32+kv-upper``, ``skip-3,14``); the full
precision (what plain decoding and every verify read) is named ``verify``. How names are
read, and what else a draft may be, is :mod:`mlx_qspec.drafts.grammar`'s.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import UserError

ACT_BITS = (4, 8)
ACT_GROUP_SIZES = (16, 32, 64, 128)
FULL, UPPER = "full", "upper"
VERIFY_NAME = "verify"


@dataclass(frozen=True)
class Precision:
    """One way of reading the model. The default reads everything at full precision."""

    weights: str = FULL  # 8-bit weights: both planes (full) or the upper plane only
    act_bits: int | None = None  # None: activations in the compute dtype
    act_group_size: int | None = None  # None: one activation scale per token
    kv: str = FULL  # nested KV cache: both planes (full) or the upper plane only
    skip: tuple[int, ...] = ()  # transformer blocks the forward passes over
    skip_fraction: float | None = None  # a share of the blocks, not yet calibrated to a set

    def __post_init__(self):
        for axis in ("weights", "kv"):
            if getattr(self, axis) not in (FULL, UPPER):
                raise UserError(f"{axis} precision must be {FULL!r} or {UPPER!r}, got {getattr(self, axis)!r}")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise UserError(f"draft activation bits must be one of {ACT_BITS}, got {self.act_bits}")
        if self.act_group_size is not None:
            if self.act_bits is None:
                raise UserError("an activation group size needs activation bits")
            if self.act_group_size not in ACT_GROUP_SIZES:
                raise UserError(
                    f"draft activation group size must be one of {ACT_GROUP_SIZES}, "
                    f"got {self.act_group_size}"
                )
        if self.skip_fraction is not None and (self.skip or not 0 < self.skip_fraction < 1):
            raise UserError(f"a skip fraction must be in (0, 1) and alone, got {self.skip_fraction}")
        if self.skip != tuple(sorted(set(self.skip))) or any(i < 1 for i in self.skip):
            raise UserError(
                f"skipped blocks must be distinct indices from 1 up (block 0 builds the "
                f"attention mask), got {self.skip}"
            )

    @property
    def is_full(self) -> bool:
        return self == FULL_PRECISION

    @property
    def terms(self) -> list[str]:
        """The name's ``+``-separated parts, in canonical order (activations, weights, KV)."""
        out = []
        if self.skip_fraction is not None:
            out.append(f"skip-{self.skip_fraction:g}")
        elif self.skip:
            out.append("skip-" + ",".join(map(str, self.skip)))
        if self.act_bits is not None:
            g = "" if self.act_group_size is None else f"-g{self.act_group_size}"
            out.append(f"a{self.act_bits}{g}")
        if self.weights == UPPER:
            out.append("w-upper")
        if self.kv == UPPER:
            out.append("kv-upper")
        return out

    @property
    def name(self) -> str:
        return "+".join(self.terms) or VERIFY_NAME

    def __str__(self):
        return self.name


FULL_PRECISION = Precision()

_current: ContextVar[Precision] = ContextVar("mlx_qspec_precision", default=FULL_PRECISION)


def current() -> Precision:
    """The precision the forward being built reads at (full outside any :func:`reading`)."""
    return _current.get()


@contextmanager
def reading(precision: Precision):
    """Build the forwards inside the block at ``precision``; the previous one comes back after."""
    token = _current.set(precision)
    try:
        yield precision
    finally:
        _current.reset(token)

