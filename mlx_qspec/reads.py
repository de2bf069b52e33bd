"""Bytes read per forward, counted from the arrays the forward actually touches.

On a Mac, batch-1 decoding is bound by bytes read, so this is the number that decides
whether a draft pays. Layers and attention call :func:`count` with the arrays they hand to
a matmul (packed codes, scales, biases, KV planes and buffers) while the graph is built;
the count goes to the :class:`ReadCounter` that the caller opened with :func:`counting`
(none open: nothing is counted, nothing is slower). Counters live in a ContextVar, so
concurrent generations count apart.

Integer arrays (packed codes) are counted as they are stored; float arrays both in their
dtype here (``nbytes``) and as half precision (``nbytes_f16``: what a Mac running the
model in float16/bfloat16 reads), because on the CPU backend we compute in float32.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import mlx.core as mx

WEIGHTS, KV = "weights", "kv"


@dataclass
class ReadCounter:
    """Bytes read by the forwards built while it was open, split into weights and KV."""

    forwards: int = 0
    ints: dict = field(default_factory=lambda: {WEIGHTS: 0, KV: 0})
    floats: dict = field(default_factory=lambda: {WEIGHTS: 0, KV: 0})  # bytes in their dtype
    float_elems: dict = field(default_factory=lambda: {WEIGHTS: 0, KV: 0})

    def add(self, kind: str, arrays):
        for a in arrays:
            if a is None:
                continue
            if mx.issubdtype(a.dtype, mx.floating):
                self.floats[kind] += a.nbytes
                self.float_elems[kind] += a.size
            else:
                self.ints[kind] += a.nbytes

    def bytes(self, kind: str | None = None) -> int:
        """Bytes read here (in this machine's dtypes), of one kind or both."""
        kinds = (WEIGHTS, KV) if kind is None else (kind,)
        return sum(self.ints[k] + self.floats[k] for k in kinds)

    def bytes_f16(self, kind: str | None = None) -> int:
        """The same reads with every float array in half precision (a Mac's model dtype)."""
        kinds = (WEIGHTS, KV) if kind is None else (kind,)
        return sum(self.ints[k] + 2 * self.float_elems[k] for k in kinds)


_active: ContextVar[ReadCounter | None] = ContextVar("mlx_qspec_reads", default=None)


def count(kind: str, *arrays):
    """Add the arrays a matmul or attention reads to the open counter, if any."""
    counter = _active.get()
    if counter is not None:
        counter.add(kind, arrays)


@contextmanager
def counting(counter: ReadCounter):
    """Count the reads of one forward built inside the block."""
    token = _active.set(counter)
    try:
        yield counter
    finally:
        _active.reset(token)
        counter.forwards += 1

