"""What ``--draft auto`` starts from, before it has measured anything here.

``auto`` decides from the wall-clock seconds of the blocks it runs (:mod:`controller`); this
module gives it a prior (:func:`prior`), in this order: the costs measured on this machine
before — by an earlier run or ``python -m mlx_qspec.bench`` — for this model, device, MLX
version, KV mode and the nearest context bucket (drafts it never timed taken from the
roofline, scaled to the measured step); on a Mac whose chip :mod:`roofline` knows, the
roofline's costs (:func:`modeled`: counted bytes, no timing); else none — plain decoding runs
first and the drafts are timed by exploring them. Acceptance priors: agreement measured on
real text (docs/design.md §8).
"""

import math
import time
from dataclasses import dataclass

import mlx.core as mx

from . import controller, distributed, kernels, moe, precision, reads, roofline, store
from .recurrent import ShiftedConv1d
from .caches import kv_mode, position, rewind
from .drafts.grammar import NGRAM, parse_precision

# Per-token top-1 agreement of each single draft term with the verify (docs/design.md §8)
# (SmolLM2-135M Q4_1, teacher-forced on real text).
PRIOR_ACCEPTANCE = {
    "a8": 0.91,  # A8 per-token: 0.905 (first probe), 0.910 (second probe)
    "a8-g32": 0.975,  # A8 group-32: 0.975 (first probe), 0.979 (second probe)
    "a4": 0.09,  # A4 per-token: 0.09 (first probe)
    "a4-g32": 0.6,  # A4 group-32: 0.58 (first probe), 0.607 (second probe)
    "a4-g16": 0.66,  # A4 group-16: 0.66 (first probe)
    "kv-upper": 0.94,  # upper nibble of 8-bit KV, keys per channel over 64-token blocks: 0.942
    "w-upper": 0.83,  # Q8_0 LM head read as its upper nibble: 0.833 (only the head was measured)
    # n-gram lookup proposals accepted, per proposed token, on the test model's rewrites of
    # given functions at γ = 4 (scripts/bench_acceptance.py --workload grounded): 0.44
    "ngram": 0.44,
}


def prior_acceptance(name: str) -> float:
    """A draft's prior acceptance: the product of its terms' priors (``a8+kv-upper`` →
    0.91 · 0.94). ValueError for a term never measured."""
    alpha = 1.0
    for term in parse_precision(name).terms:
        if term not in PRIOR_ACCEPTANCE:
            known = ", ".join(PRIOR_ACCEPTANCE)
            raise ValueError(f"no measured acceptance for draft term {term!r} (measured: {known})")
        alpha *= PRIOR_ACCEPTANCE[term]
    return alpha


def forward(model, cache, rows: int = 1, read: precision.Precision = precision.FULL_PRECISION) -> float:
    """Seconds of one evaluated forward of ``rows`` rows at ``read`` (of zeros: what it reads
    and how long it takes do not depend on the tokens); the cache rewound after, also when
    the forward raises (a failed forward may have appended to some layers only)."""
    at, inputs = position(cache), mx.zeros((1, rows), mx.uint32)
    try:
        with precision.reading(read):
            start = time.perf_counter()
            mx.eval(model(inputs, cache=cache))
            return time.perf_counter() - start
    finally:
        rewind(cache, at)


def counted(model, cache, read: precision.Precision = precision.FULL_PRECISION) -> reads.ReadCounter:
    """The bytes one untimed one-row forward at ``read`` reads."""
    counter = reads.ReadCounter()
    with reads.counting(counter):
        forward(model, cache, 1, read)
    return counter


# Every verify ``auto`` can ask for (γ ≤ max(GAMMAS)), up to one past a kernel launch's rows.
MODELED_ROWS = range(1, kernels.MAX_M + 2)


@dataclass(frozen=True)
class ForwardShape:
    """What a full-precision forward reads at a context, in the roofline's terms, from one
    counted one-row forward: the matmuls our kernels run, the expert layers (a row reads its
    router's top-k; r rows the expected distinct experts of their union, :mod:`moe`), the KV
    cache (growing with the rows), and what is read once per forward outside the matmuls (a
    recurrent layer's state, read and written, and its convolutions' weights)."""

    linears: list
    experts: list
    kv: float  # KV bytes of the one-row forward
    once: float  # bytes read once per forward beside the matmuls and the KV
    state: float  # of which recurrent state
    offset: int  # positions in the cache before the forward

    def _beside(self, rows: int) -> float:
        """Bytes beside the matmuls: the KV cache, growing with the rows, and what is read once;
        a verify (rows > 1) that rejects replays the recurrent state from the block's start:
        read and written again (charged to every verify, an upper bound)."""
        kv = self.kv * (self.offset + rows) / (self.offset + 1)
        return kv + self.once + (self.state if rows > 1 else 0.0)

    def bytes(self, rows: int) -> float:
        """Bytes a forward of ``rows`` rows reads."""
        experts = moe.forward_expert_bytes(self.experts, rows)
        return sum(m.nbytes for m in self.linears) + experts + self._beside(rows)

    def seconds(self, rows: int, chip: str) -> float:
        """A forward of ``rows`` ≤ kernels.MAX_M rows on ``chip``, by the roofline."""
        experts = moe.forward_expert_bytes(self.experts, rows)
        row_weights = sum(x.top_k * x.expert_weights for x in self.experts)
        return (roofline.forward_seconds(self.linears, self._beside(rows), rows, chip)
                + (roofline.experts_seconds(experts, row_weights, rows, chip) if self.experts else 0.0))


def forward_shape(model, cache, plain: reads.ReadCounter | None = None) -> ForwardShape | None:
    """The :class:`ForwardShape` of ``model`` at ``cache``'s context (``plain``: the reads of
    a one-row full-precision forward there, counted if not given). None where the forward
    reads weights through matmuls the roofline does not know (float or non-affine linears,
    other bit widths or groups)."""
    linears, experts, convs = store.per_model(model, "forward weights", lambda: (
        roofline.linears(model), moe.expert_layers(model, half=False),  # experts as counted here
        sum(p.nbytes for _, m in model.named_modules() if isinstance(m, ShiftedConv1d)
            for p in (m.weight, m.get("bias")) if p is not None)))
    if linears is None:
        return None
    plain = plain or counted(model, cache)
    known = sum(m.nbytes for m in linears) + moe.forward_expert_bytes(experts, 1) + convs
    if not math.isclose(plain.bytes(reads.WEIGHTS), known, rel_tol=1e-6, abs_tol=0.5):
        return None
    state = plain.bytes(reads.STATE)
    return ForwardShape(linears, experts, plain.bytes(reads.KV), convs + state, state,
                        position(cache))


def modeled(model, cache, candidates, chip: str, step_bytes=None) -> controller.Costs | None:
    """The costs on ``chip`` by :mod:`roofline`, with no timing: a verify of r rows as its
    modeled forwards (:class:`ForwardShape`, at most kernels.MAX_M rows each, as the decoder
    verifies), a draft step as a forward's fixed cost plus a plain step's byte time × the
    bytes its one-row forward reads ÷ a plain step's (one row is bound by bytes), the n-gram
    lookup free. Bytes are counted (:mod:`reads`) on one untimed one-row forward per
    precision, at this context, or by ``step_bytes[name]()`` (a head level's step); a candidate
    that cannot run here is left out. None where the roofline does not describe the model's
    matmuls."""
    step_bytes = step_bytes or {}
    plain = counted(model, cache)
    shape = forward_shape(model, cache, plain)
    if shape is None:
        return None
    step = kernels.MAX_M
    verify = {r: sum(shape.seconds(min(step, r - i), chip) for i in range(0, r, step))
              for r in MODELED_ROWS}
    fixed = roofline.CALIBRATION[chip].fixed  # a forward's own cost: not per byte
    draft = {NGRAM: 0.0} if NGRAM in candidates else {}
    for name in candidates:
        if name == NGRAM:
            continue
        try:
            read = (step_bytes[name]() if name in step_bytes
                    else counted(model, cache, parse_precision(name)).bytes())
        except ValueError:
            continue
        draft[name] = fixed + (verify[1] - fixed) * read / plain.bytes()
    return controller.Costs.from_table(verify, draft, f"modeled({chip.replace(' ', '_')})")


def device_name() -> str:
    """The default device and its chip, e.g. ``Device(gpu, 0):Apple M3 Max``."""
    return f"{mx.default_device()}:{mx.device_info().get('device_name', 'unknown')}"


def store_key(model, kv: str) -> str:
    """What this model's measured costs are kept under on this machine with KV mode ``kv``."""
    fingerprint = store.per_model(model, "fingerprint", lambda: store.fingerprint(model))
    return controller.store_key(fingerprint, device_name(), mx.__version__, kv)


def prior(model, cache, candidates, step_bytes=None) -> controller.Costs | None:
    """``auto``'s prior on this model and prefilled cache (see the module docstring). None
    across several ranks: each would hold other measurements and might model another chip,
    and all must decide alike (they then time from rank 0's clock)."""
    if distributed.group().size() > 1:
        return None
    stored = controller.default_store().load(store_key(model, kv_mode(cache)), position(cache))
    chip = roofline.this_chip()
    if stored is None:
        return modeled(model, cache, list(candidates), chip, step_bytes) if chip else None
    stored.acceptance = {}  # the last prompt's acceptance says little of this one's
    never_timed = [d for d in candidates if d not in stored.draft]
    costs = modeled(model, cache, never_timed, chip, step_bytes) if chip and never_timed else None
    if costs is not None:  # drafts never timed here: the roofline's, in this machine's scale
        scale = stored.step / costs.step
        stored.draft = {**{d: t * scale for d, t in costs.draft.items()}, **stored.draft}
    return stored
