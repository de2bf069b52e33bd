"""When does a draft pay? A cost model for ``--draft auto``.

Speculation pays only where a verify of γ+1 rows costs about one decode step and a draft
step costs less than one: on a Mac at batch 1, where bytes read decide speed. Where a
forward over k rows costs ~k× one row (MLX on CPU), no draft can pay, and the rule is
never to be slower than plain decoding. So ``auto`` takes the costs on the loaded model and
its cache: stored timings (:func:`calibrate`, cached on disk by :func:`calibrate_cached`), else
on a Mac whose chip :mod:`roofline` knows the modeled ones (:func:`modeled`: no timing), else
it times them. It estimates acceptance (priors: agreement measured on real text, see
docs/design.md §8; then a running :class:`AcceptanceEstimate`) and lets :func:`choose` pick a
draft and γ, or plain decoding with the reason why.
"""

import bisect
import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache

from . import distributed, kernels, precision, reads, roofline, store
from .caches import position, rewind
from .drafts.grammar import parse_precision

GAMMAS = (1, 2, 3, 4, 6, 8)
STORE = "costs.json"  # the stored cost tables (mlx_qspec.store)
CALIBRATION_ROWS = (1, 5, 9)


def expected_tokens(alpha: float, gamma: int) -> float:
    """τ, tokens emitted per verify when each draft is accepted with probability α (i.i.d.)."""
    if alpha >= 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class CostTable:
    """Seconds per forward: the verify precision by number of rows, and each draft at one row;
    ``source`` says where they come from (``timed``, or ``modeled(<chip>)``)."""

    verify: dict[int, float]
    draft: dict[str, float]
    source: str = "timed"

    def verify_cost(self, rows: int) -> float:
        """Linear between measured row counts, linear past the ends; from one point, ∝ rows
        (the pessimistic guess: no draft pays)."""
        xs = sorted(self.verify)
        if len(xs) == 1:
            return self.verify[xs[0]] * rows / xs[0]
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        y0, y1 = self.verify[x0], self.verify[x1]
        return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)


@dataclass(frozen=True)
class Choice:
    """What to decode with: ``draft`` None (and ``gamma`` 0) means plain decoding."""

    draft: str | None
    gamma: int
    speedup: float  # modeled, over plain decoding (1.0 for plain)
    reason: str  # machine-friendly, no spaces


def speedup(table: CostTable, draft: str, alpha: float, gamma: int) -> float:
    """Plain seconds per token ÷ speculative seconds per token for one draft and γ."""
    block = gamma * table.draft[draft] + table.verify_cost(gamma + 1)
    return expected_tokens(alpha, gamma) * table.verify_cost(1) / block


def choose(
    table: CostTable, acceptance: dict[str, float], gammas=GAMMAS, margin: float = 0.05
) -> Choice:
    """The draft and γ with the best modeled speedup, or plain decoding if none beats
    1 + ``margin``; the reason names what stops speculation from paying."""
    names = [n for n in table.draft if n in acceptance]
    if not names:
        return Choice(None, 0, 1.0, "no_draft_candidates")
    best, name, gamma = max(
        ((speedup(table, n, acceptance[n], g), n, g) for n in names for g in gammas),
        key=lambda t: t[0],
    )
    if best > 1 + margin:
        return Choice(name, gamma, best, f"modeled_speedup_{best:.2f}")
    return Choice(None, 0, 1.0, _why_plain(table, names, acceptance, gammas, margin))


def _why_plain(table, names, acceptance, gammas, margin) -> str:
    """The first bound that already fails: free drafts accepted always (the verify's rows
    cost too much), then the cheapest draft accepted always (drafts plus verify cost more
    than the tokens they give), else acceptance is too low — named for the draft that came
    closest to paying."""
    v1 = table.verify_cost(1)
    if max((g + 1) * v1 / table.verify_cost(g + 1) for g in gammas) <= 1 + margin:
        g = max(gammas)
        return f"verify_cost_grows_with_rows(x{table.verify_cost(g + 1) / v1:.1f}_at_{g + 1}_rows)"
    cheapest = min(names, key=table.draft.get)
    perfect, g = max((speedup(table, cheapest, 1.0, g), g) for g in gammas)
    if perfect <= 1 + margin:
        return (
            f"draft_too_costly({cheapest}_x{table.draft[cheapest] / v1:.2f},"
            f"verify_x{table.verify_cost(g + 1) / v1:.1f}_at_{g + 1}_rows)"
        )
    # The draft closest to paying: its acceptance is what falls short.
    top = max(names, key=lambda n: max(speedup(table, n, acceptance[n], g) for g in gammas))
    return f"acceptance_too_low({top}_{acceptance[top]:.2f})"


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


class AcceptanceEstimate:
    """Acceptance as it runs: an exponential moving average over drafted tokens that starts
    at the prior; a block of k drafts weighs as k observations (``window`` ≈ memory in drafts)."""

    def __init__(self, prior: float, window: int = 32):
        self.value = prior
        self.decay = 1 - 1 / window

    def update(self, drafted: int, accepted: int):
        if drafted > 0:
            rate = accepted / drafted
            self.value = rate + (self.value - rate) * self.decay**drafted


# ---------------------------------------------------------------- calibration
def _forward(model, cache, rows: int, read: precision.Precision,
             counter: reads.ReadCounter | None = None) -> float:
    """Seconds for one evaluated forward of ``rows`` tokens at ``read``, its reads counted in
    ``counter`` if one is given; the cache is trimmed back after, also when the forward raises."""
    at = position(cache)
    inputs = mx.zeros((1, rows), dtype=mx.uint32)
    try:
        counting = contextlib.nullcontext() if counter is None else reads.counting(counter)
        with precision.reading(read), counting:
            start = time.perf_counter()
            mx.eval(model(inputs, cache=cache))
            return time.perf_counter() - start
    finally:
        rewind(cache, at)  # (a failed forward may have appended to some layers only)


def count_forward(model, cache, counter: reads.ReadCounter) -> None:
    """Count what one full-precision one-row forward reads at this context (cache unmoved)."""
    _forward(model, cache, 1, precision.FULL_PRECISION, counter)


def calibrate(model, cache, candidates, rows=CALIBRATION_ROWS, repeats: int = 3) -> CostTable:
    """Measure, on ``model`` with its prefilled ``cache`` as it stands (cost depends on
    context), the median seconds of a verify forward at each row count and of a one-row
    forward for each draft candidate. A candidate that cannot run here (ValueError) is left
    out. The cache ends exactly as it started: row counts are capped at a cache's
    ``room() + 1`` (past it, the nested KV cache quantizes positions a rewind cannot reach)."""
    if not can_trim_prompt_cache(cache):
        raise ValueError("calibration needs a trimmable cache")
    start = position(cache)
    limit = min((c.room() + 1 for c in cache if hasattr(c, "room")), default=math.inf)

    def median(n, read):
        return statistics.median(_forward(model, cache, n, read) for _ in range(repeats))

    _forward(model, cache, 1, precision.FULL_PRECISION)  # warm-up
    verify = {n: median(n, precision.FULL_PRECISION) for n in sorted({min(n, limit) for n in rows})}
    draft = {}
    for name in candidates:
        try:
            draft[name] = median(1, parse_precision(name))
        except ValueError:
            continue
    assert position(cache) == start, "calibration left the cache moved"
    return CostTable(verify, draft)


# Every verify ``auto`` can ask for (γ ≤ max(GAMMAS)), up to one past a kernel launch's rows.
MODELED_ROWS = range(1, kernels.MAX_M + 2)


def modeled(model, cache, candidates, chip: str) -> CostTable | None:
    """The costs on ``chip`` by :mod:`roofline`, with no timing: a verify of r rows as its
    modeled forwards (at most kernels.MAX_M rows each, as the loop verifies), a draft as a
    plain step × the bytes its one-row forward reads ÷ a plain step's (one row is bound by
    bytes). Bytes are counted (:mod:`reads`) on one untimed one-row forward per precision,
    at this context; a candidate that cannot run here is left out. None where the roofline
    does not describe the model's matmuls: they are timed instead."""
    linears = roofline.linears(model)
    if linears is None:
        return None
    plain = reads.ReadCounter()
    _forward(model, cache, 1, precision.FULL_PRECISION, plain)
    if sum(m.nbytes for m in linears) != plain.bytes(reads.WEIGHTS):
        return None  # the forward reads weights through matmuls the roofline does not know
    offset = position(cache)

    def forward(rows):  # the one-row forward's KV bytes, and each further row's
        kv = plain.bytes(reads.KV) * (offset + rows) / (offset + 1)
        return roofline.forward_seconds(linears, kv, rows, chip)

    step = kernels.MAX_M
    verify = {r: sum(forward(min(step, r - i)) for i in range(0, r, step)) for r in MODELED_ROWS}
    draft = {}
    for name in candidates:
        counter = reads.ReadCounter()
        try:
            _forward(model, cache, 1, parse_precision(name), counter)
        except ValueError:
            continue
        draft[name] = verify[1] * counter.bytes() / plain.bytes()
    return CostTable(verify, draft, f"modeled({chip.replace(' ', '_')})")


def device_name() -> str:
    """The default device and its chip, e.g. ``Device(gpu, 0):Apple M3 Max``."""
    return f"{mx.default_device()}:{mx.device_info().get('device_name', 'unknown')}"


def context_bucket(offset: int) -> int:
    """The context length rounded up to a power of two, at least 256."""
    return max(256, 1 << math.ceil(math.log2(max(offset, 1))))


def _stored(entry, rows, candidates) -> CostTable | None:
    """The stored table if it covers ``rows`` and ``candidates``; None if not or malformed."""
    try:
        verify = {int(n): float(t) for n, t in entry["verify"].items()}
        draft = {n: float(t) for n, t in entry["draft"].items()}
        covered = set(rows) <= set(verify) and set(candidates) <= set(entry["tried"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return CostTable(verify, draft) if covered else None


def calibrate_cached(model, cache, candidates, rows=CALIBRATION_ROWS, repeats: int = 3) -> CostTable:
    """The stored result of :func:`calibrate` for the same model, device, MLX version and
    context bucket if that covered these rows and candidates; else, on a Mac whose chip the
    roofline knows, the :func:`modeled` costs (not stored: they cost no timing); else
    :func:`calibrate`, stored. A corrupt store is rewritten."""
    if distributed.group().size() > 1:
        # Each rank times the same forwards (they make collectives, so all must run them)
        # and all decide from rank 0's times: one choice of draft and γ everywhere. No
        # store: the ranks' stores would differ, and a rank that skipped the timing would
        # leave the others waiting.
        table = calibrate(model, cache, candidates, rows, repeats)
        times = distributed.from_rank0(mx.array([*table.verify.values(), *table.draft.values()]))
        times, n = times.tolist(), len(table.verify)
        return CostTable(dict(zip(table.verify, times[:n])), dict(zip(table.draft, times[n:])))
    key = "|".join(
        (store.fingerprint(model), device_name(), f"mlx={mx.__version__}",
         f"ctx={context_bucket(position(cache))}")
    )
    stored = store.read(STORE)
    table = _stored(stored.get(key), rows, candidates)
    if table is not None:
        return table
    chip = roofline.this_chip()
    table = modeled(model, cache, candidates, chip) if chip else None
    if table is not None:
        return table
    table = calibrate(model, cache, candidates, rows, repeats)
    stored[key] = dict(verify=table.verify, draft=table.draft, tried=sorted(candidates))
    store.write(STORE, stored)
    return table
