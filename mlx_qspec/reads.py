"""Bytes read per forward, counted from the arrays the forward actually touches.

On a Mac, batch-1 decoding is bound by bytes read, so this is the number that decides
whether a draft pays. Layers and attention call :func:`count` with the arrays they hand to
a matmul (packed codes, scales, biases, KV planes and buffers) while the graph is built;
the count goes to the :class:`ReadCounter` that the caller opened with :func:`counting`
(none open: nothing is counted, nothing is slower). Counters live in a ContextVar, so
concurrent generations count apart.

Integer arrays (packed codes, fp8 scales) are counted as they are stored; float arrays both
in their dtype here (``nbytes``) and as half precision (``nbytes_f16``: what a Mac running
the model in float16/bfloat16 reads), because on the CPU backend we compute in float32 —
except a recurrent layer's state (``STATE``), which mlx-lm keeps in float32 on a Mac too
(``as_stored``). A state counts where it is read and where it is written, and again where a
rewind replays it.

Mixture-of-experts layers read only the experts their rows route to: :func:`count_routed`
takes the routing indices (still lazy while the graph is built) and the per-expert arrays;
the counter resolves them when asked for bytes — the union of the experts over the forward's
rows, so a verify of k rows reads up to k× a step's expert bytes.

What plain decoding would have read in the same forwards (:meth:`ReadCounter.step_bytes`):
the count less what only a forward of several rows reads — the experts beyond each row's own
(a row reads its top-k; the union of k rows reads more) — and less the reads counted outside a
forward (``counting(…, forward=False)``: a recurrent state's replay after a rejection).
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

WEIGHTS, KV, STATE = "weights", "kv", "state"
KINDS = (WEIGHTS, KV, STATE)
_RESOLVE_AT = 4096  # routed reads held lazily before they are resolved


def _per_kind():
    return {k: 0 for k in KINDS}


@dataclass
class ReadCounter:
    """Bytes read by the forwards built while it was open, by kind (weights, KV, recurrent
    state)."""

    forwards: int = 0
    ints: dict = field(default_factory=_per_kind)  # bytes of arrays counted as stored
    floats: dict = field(default_factory=_per_kind)  # bytes in their dtype
    float_elems: dict = field(default_factory=_per_kind)
    # What no plain step reads (see the module docstring): bytes as stored, float bytes, float elements
    beyond_step: list = field(default_factory=lambda: [0, 0, 0])
    _routed: list = field(default_factory=list, repr=False)  # (kind, indices, per expert)

    def add(self, kind: str, arrays, as_stored: bool = False, beyond_step: bool = False):
        for a in arrays:
            if a is None:
                continue
            if mx.issubdtype(a.dtype, mx.floating) and not as_stored:
                self._tally(kind, 0, a.nbytes, a.size, beyond_step)
            else:
                self._tally(kind, a.nbytes, 0, 0, beyond_step)

    def _tally(self, kind: str, ints, floats, elems, beyond_step: bool):
        self.ints[kind] += ints
        self.floats[kind] += floats
        self.float_elems[kind] += elems
        if beyond_step:
            for i, n in enumerate((ints, floats, elems)):
                self.beyond_step[i] += n

    def add_routed(self, kind: str, indices: mx.array, arrays):
        """Expert arrays (leading axis: experts) of which a forward reads the rows
        ``indices`` (…, top-k) select; resolved into bytes on the next :meth:`bytes`."""
        arrays = [a for a in arrays if a is not None]
        experts = arrays[0].shape[0]
        per = (sum(a.nbytes for a in arrays if not mx.issubdtype(a.dtype, mx.floating)) / experts,
               sum(a.nbytes for a in arrays if mx.issubdtype(a.dtype, mx.floating)) / experts,
               sum(a.size for a in arrays if mx.issubdtype(a.dtype, mx.floating)) / experts)
        self._routed.append((kind, indices, per))
        if len(self._routed) > _RESOLVE_AT:
            self._resolve()

    def _resolve(self):
        pending, self._routed = self._routed, []
        seen = {}  # id(indices) → (distinct, own): a layer's projections share one array
        for kind, indices, (ints, floats, elems) in pending:
            if id(indices) not in seen:
                routed = np.array(indices)
                distinct = np.unique(routed).size
                own = distinct  # the distinct experts of one row, on average (sorted rows: unknown)
                if routed.ndim >= 2 and routed.size:
                    rows = np.sort(routed.reshape(-1, routed.shape[-1]), axis=1)
                    own = 1 + np.count_nonzero(np.diff(rows, axis=1), axis=1).mean()
                seen[id(indices)] = distinct, own
            distinct, own = seen[id(indices)]
            total = [round(distinct * n) for n in (ints, floats, elems)]
            step = [round(own * n) for n in (ints, floats, elems)]
            self._tally(kind, *step, False)
            self._tally(kind, *(t - s for t, s in zip(total, step)), True)

    def bytes(self, kind: str | None = None) -> int:
        """Bytes read here (in this machine's dtypes), of one kind or all."""
        self._resolve()
        kinds = KINDS if kind is None else (kind,)
        return sum(self.ints[k] + self.floats[k] for k in kinds)

    def bytes_f16(self, kind: str | None = None) -> int:
        """The same reads with every float array in half precision (a Mac's model dtype)."""
        self._resolve()
        kinds = KINDS if kind is None else (kind,)
        return sum(self.ints[k] + 2 * self.float_elems[k] for k in kinds)

    def step_bytes(self, half: bool = False) -> int:
        """What plain decoding's one-row steps would have read in these forwards (see the
        module docstring); ``half``: float arrays as a Mac's float16."""
        ints, floats, elems = self.beyond_step
        return (self.bytes_f16() - ints - 2 * elems) if half else (self.bytes() - ints - floats)


_active: ContextVar[ReadCounter | None] = ContextVar("mlx_qspec_reads", default=None)
_outside_forward: ContextVar[bool] = ContextVar("mlx_qspec_reads_outside", default=False)


def count(kind: str, *arrays, as_stored: bool = False):
    """Add the arrays a matmul or attention reads to the open counter, if any
    (``as_stored``: floats counted in their dtype on a Mac too)."""
    counter = _active.get()
    if counter is not None:
        counter.add(kind, arrays, as_stored, beyond_step=_outside_forward.get())


def count_routed(indices: mx.array, *arrays):
    """Add the rows of expert ``arrays`` a forward reads — those ``indices`` route to — to
    the open counter, if any."""
    counter = _active.get()
    if counter is not None:
        counter.add_routed(WEIGHTS, indices, arrays)


@contextmanager
def counting(counter: ReadCounter, forward: bool = True):
    """Count the reads of one forward built inside the block (``forward=False``: reads that
    are not a forward of their own, such as a rewind's replay)."""
    token, outside = _active.set(counter), _outside_forward.set(not forward)
    try:
        yield counter
    finally:
        _active.reset(token)
        _outside_forward.reset(outside)
        counter.forwards += forward
