"""``--draft auto`` as a measured controller: it times what runs and decides from that.

A model of a Mac (or of any machine) is only a guess at what a block costs; the product rule
is never to be slower than plain decoding, so ``auto`` decides from wall-clock measurements
of the blocks it runs. The decoder asks :meth:`Controller.next` what to run next — a draft
with γ, or plain decoding for n steps — and reports each block to :meth:`Controller.report`:
drafted, accepted, emitted, and the seconds it took, measured after the evaluation that ends
it (MLX is lazy: a block timed before its ``mx.eval`` would measure nothing).

The controller keeps, per arm, a cost model fitted to those seconds (least squares with a
prior and a forgetting factor, in :class:`_Fit`):

* a plain chunk of n steps costs ``chunk + n·step`` (``chunk``: the pipeline's fill);
* a block of draft d with k drafted tokens costs ``block + k·(row + draft[d])`` — ``block``
  a one-row verify and the block's own overhead, ``row`` each further verify row (shared by
  every draft: one draft's blocks teach the verify's growth to all), ``draft[d]`` one draft
  step (≈ 0 for the n-gram lookup);

and the measured rate of each arm (tokens ÷ seconds over its recent blocks). It runs the arm
with the best estimated rate — a draft's measured rate once it has one, adjusted by the model
only for a change of γ; the model's alone before — and switches only past a hysteresis
margin. It explores within a budget (≤ :data:`EXPLORE_SHARE` of the tokens): a few plain
steps now and then while a draft runs, so plain's rate stays current, and a block of a draft
that could be within reach of the current arm while plain runs. The first block of each arm
in a process is a warm-up (kernels build on first use) and is not measured.

The prior (:class:`Costs`) is the best one available: a measurement stored by an earlier run
on this machine (``measured``), the roofline on a Mac whose chip it knows (``modeled``), or
none: then plain decoding runs first and the drafts are timed by exploring them (``timed``).
What the run measured is stored (:class:`Store`) under the model, device, MLX version and
context bucket, so the next run starts from measurements. Pure logic: no MLX, no clock —
tests drive it with the seconds they choose.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cache_dir import cache_dir, read_json, write_json

GAMMAS = (1, 2, 3, 4, 6, 8)
NGRAM = "ngram"  # the n-gram lookup: a draft with no forward of its own
HYSTERESIS = 0.05  # switch only to an arm estimated this much faster than the current one
EXPLORE_SHARE = 0.05  # at most this share of the emitted tokens goes to exploration …
EXPLORE_ALLOWANCE = 8  # … plus this many tokens, so a run can explore before it has earned any
EXPLORE_SLACK = 0.1  # a draft estimated within this share of the current rate is timed
PLAIN_REFRESH = 128  # tokens between two timings of plain decoding while a draft runs
PLAIN_PROBE = 4  # plain steps in one such timing
STALE_AFTER = 64  # tokens after which a draft's timing is due again (doubled each time it loses,
BACKOFF_MAX = 2048  # up to this many)
MEMORY = 96  # tokens: the memory of the fits and rates (older blocks weigh e^(-age/MEMORY))
PLAIN_CHUNKS = (2, 8, 16, 32, 64)  # plain steps per decision, growing while plain runs
LEAVE_AFTER = 2  # measured blocks of a draft before it may be left for measuring slower
GAMMA_MARGIN = 0.02  # change γ only for a modeled gain past this
TOKEN_PRIOR = 64  # tokens of belief in the acceptance model before a draft's blocks correct it
FRESH = 32  # tokens since a draft's last block within which its timing counts as current
PROMPT_MEMORY = 256  # tokens over which a draft's acceptance and fill, unseen, fade to the prior
# Prior strengths, in blocks of evidence: a stored measurement, the roofline, a guess.
PRIOR_WEIGHT = {"measured": 4.0, "modeled": 1.0, "timed": 0.25}


def expected_tokens(alpha: float, k: float) -> float:
    """τ, tokens emitted per block when each of k drafts is accepted with probability α
    (i.i.d.): the accepted prefix and one token of the verify's own."""
    if alpha >= 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass(frozen=True)
class Action:
    """What the decoder runs next: ``draft`` with ``gamma`` tokens per block, or plain
    decoding (``draft`` None) for ``steps`` steps. ``explore``: run to measure, not because
    it is estimated best (it counts against the exploration budget)."""

    draft: str | None
    gamma: int = 0
    steps: int = 0
    explore: bool = False


@dataclass
class Costs:
    """Seconds: the controller's prior, or what it measured (see the module docstring for
    what each one is). ``acceptance`` per drafted token; ``source`` measured, modeled(<chip>)
    or timed; ``weight`` the blocks of evidence it is worth as a prior."""

    step: float
    block: float
    row: float
    draft: dict[str, float]
    acceptance: dict[str, float] = field(default_factory=dict)
    chunk: float = 0.0
    source: str = "timed"
    weight: float = 1.0

    @classmethod
    def from_table(cls, verify: dict[int, float], draft: dict[str, float], source: str,
                   rows: int = max(GAMMAS) + 1) -> "Costs":
        """From seconds per forward — a verify of r rows, one draft step — as a roofline or a
        timing gives them: ``row`` the least-squares slope of the verify over 1…``rows``."""
        one = verify[1]
        xs = [r for r in sorted(verify) if 1 < r <= rows]
        row = (sum((r - 1) * (verify[r] - one) for r in xs) / sum((r - 1) ** 2 for r in xs)
               if xs else one)
        kind = source.split("(")[0]
        return cls(step=one, block=one, row=max(row, 0.0), draft=dict(draft), source=source,
                   weight=PRIOR_WEIGHT.get(kind, 1.0))

    @classmethod
    def guess(cls, step: float, drafts) -> "Costs":
        """No prior at all: a weak one around a measured plain step, loose enough that the
        first blocks of a draft decide (``timed``)."""
        draft = {d: 0.0 if d == NGRAM else step / 2 for d in drafts}
        return cls(step=step, block=step, row=step / 2, draft=draft, source="timed",
                   weight=PRIOR_WEIGHT["timed"])


class _Fit:
    """Least squares over named parameters with a fixed prior (ridge towards ``prior``'s
    values, each as strong as its weight in pseudo-observations of it alone) and data that fades by
    e^(-tokens/MEMORY) as newer observations of the same fit bring their tokens: what one
    draft taught about the verify is kept while plain decoding runs, not forgotten."""

    def __init__(self, prior: dict[str, tuple[float, float]], unit: float):
        self.names = list(prior)
        n = len(self.names)
        self.unit = unit  # seconds: fits in units of a step, so one weight suits all
        weights = np.array([prior[k][1] for k in self.names])
        self.p = np.diag(weights)
        self.p_mean = np.array([prior[k][0] / unit for k in self.names]) * weights
        self.a = np.zeros((n, n))
        self.b = np.zeros(n)
        self.evidence = 0.0

    def observe(self, x: dict[str, float], seconds: float, tokens: float):
        fade = math.exp(-tokens / MEMORY)
        v = np.array([x.get(k, 0.0) for k in self.names])
        self.a = self.a * fade + np.outer(v, v)
        self.b = self.b * fade + v * (seconds / self.unit)
        self.evidence = self.evidence * fade + 1

    def solve(self) -> dict[str, float]:
        theta = np.linalg.solve(self.p + self.a, self.p_mean + self.b)
        return {k: float(t) * self.unit for k, t in zip(self.names, theta)}


@dataclass
class _Arm:
    """One draft as it measured. Its block costs live in the shared fit; here its
    acceptance (per drafted token, smoothed over ~32 drafts), how full its blocks were, and
    the tokens it emitted against the tokens the i.i.d. model expected of those blocks (the
    model's error on real text, where acceptance comes in runs)."""

    acceptance: float
    prior: float = 0.0  # its prior acceptance
    fill: float = 1.0  # drafted ÷ γ asked (the lookup may find fewer)
    emitted: float = 0.0  # faded sums over its measured blocks
    expected: float = 0.0
    blocks: int = 0  # measured blocks since it was last switched to
    last: float = 0.0  # emitted count at its last block
    due: float = 0.0  # emitted count from which its timing is stale
    backoff: float = STALE_AFTER

    def measured(self) -> bool:
        return self.expected > 0

    def seen(self, now: float) -> tuple[float, float, float]:
        """(acceptance, fill, observed ÷ expected tokens) as believed ``now``: what it showed
        fades back to the prior over PROMPT_MEMORY tokens since it last ran (they depend on
        the text: the lookup that found nothing early may find much once the answer copies
        its prompt); the ratio with TOKEN_PRIOR tokens of belief in the model."""
        w = math.exp(-(now - self.last) / PROMPT_MEMORY)
        ratio = (w * self.emitted + TOKEN_PRIOR) / (w * self.expected + TOKEN_PRIOR)
        return self.prior + (self.acceptance - self.prior) * w, 1 + (self.fill - 1) * w, ratio


@dataclass
class _Estimate:
    """An arm's estimated tokens/s at its best γ, and the modeled rate at each γ."""

    rate: float
    gamma: int = 0
    modeled: dict = field(default_factory=dict)


class Controller:
    """The block policy of ``--draft auto``: :meth:`next` says what to run, :meth:`report`
    is told what happened, :meth:`close` stores what was measured. ``drafts`` maps each
    candidate draft to its prior acceptance; ``gammas`` are the γ it may ask for; ``prior``
    a :class:`Costs` or None (see the module docstring). With a ``store`` and ``key`` it saves
    what it measured under the context bucket of ``start`` (the context position at the
    first block) plus the tokens emitted. ``warm`` is the set of arms already run once in
    this process (share one set between runs: only a process's first block of an arm
    builds kernels)."""

    def __init__(self, drafts: dict[str, float], gammas=GAMMAS, prior: Costs | None = None,
                 store: "Store | None" = None, key: str | None = None, start: int = 0,
                 warm: set | None = None):
        self.gammas = tuple(sorted(gammas))
        self.arms = {d: _Arm(acceptance=a, prior=a) for d, a in drafts.items()}
        self.store, self.key, self.position = store, key, start
        self.warm = set() if warm is None else warm
        self.emitted = self.explored = 0.0
        # What ran after its warm-up: plain chunks, tokens and seconds; draft tokens and seconds
        self.ran = dict(chunks=0, plain=0.0, plain_s=0.0, drafts=0.0, drafts_s=0.0)
        self.plain_seen = -math.inf  # emitted count at plain decoding's last timing
        self.confirm = False  # plain decoding is to be timed again under the current draft
        self.chunk_index = 0
        self.current: str | None = None
        self.gamma = 0
        self.prior = prior
        self.plain = self.blocks = None
        self._estimates_now = None
        if prior is not None:
            self._start_fits(prior)
            for d, arm in self.arms.items():
                arm.acceptance = arm.prior = prior.acceptance.get(d, arm.acceptance)
            best = max(self._estimates().items(), key=lambda kv: kv[1].rate)[0]
            self._switch(best)

    # ------------------------------------------------------------------ the contract
    def next(self) -> Action:
        """The next block: explore if due and affordable, else the best arm (hysteresis)."""
        if self.prior is None:  # nothing known: plain decoding first, and time it
            return self._plain_action()
        est = self._estimates()
        # Switch only to an arm timed just now: one known from its prior or long ago gets a
        # timing first (exploration, within its budget).
        fresh = [a for a in est if a is None or a == self.current or (
            self.arms[a].measured() and self.emitted - self.arms[a].last <= FRESH)]
        best = max(fresh, key=lambda arm: est[arm].rate)
        if best != self.current and est[best].rate > est[self.current].rate * (1 + HYSTERESIS):
            if self.current is None or self.arms[self.current].blocks >= LEAVE_AFTER:
                self._switch(best)
        explore = self._exploration(est)
        if explore is not None:
            return explore
        if self.current is None:
            return self._plain_action()
        self.gamma = self._gamma_for(self.current, self.gamma)
        return Action(self.current, self._warm_gamma(self.current, self.gamma))

    def report(self, action: Action, drafted: int, accepted: int, emitted: int, seconds: float):
        """What ``action`` did: tokens drafted, accepted and emitted, and its wall-clock
        seconds (after the evaluation that ended it)."""
        self.emitted += emitted
        if action.explore:
            self.explored += emitted
        arm = action.draft or "plain"
        warm_up = arm not in self.warm
        self.warm.add(arm)
        if not warm_up:
            ran = "plain" if action.draft is None else "drafts"
            self.ran[ran] += emitted
            self.ran[ran + "_s"] += seconds
            self.ran["chunks"] += action.draft is None
        self._estimates_now = None
        if action.draft is None:
            self._report_plain(emitted, seconds, warm_up)
        else:
            self._report_block(action, drafted, accepted, emitted, seconds, warm_up)
        self._save_on_new_bucket(emitted)

    def close(self):
        """Store what was measured (the decoder calls it when the generation ends)."""
        self._save(self.position)

    def _save(self, position: int):
        if self.store is not None and self.key and self.plain is not None:
            self.store.save(self.key, position, self.measured_costs())

    # ------------------------------------------------------------------ estimates
    def _start_fits(self, prior: Costs):
        w, unit = prior.weight, prior.step
        self.plain = _Fit({"chunk": (prior.chunk, w), "step": (prior.step, w)}, unit)
        block_prior = {"block": (prior.block, w), "row": (prior.row, w)}
        for d in self.arms:  # a draft the prior does not know: as costly as a step, loosely
            known = d in prior.draft
            guess = 0.0 if d == NGRAM else prior.step
            block_prior[d] = ((prior.draft[d], w) if known else (guess, PRIOR_WEIGHT["timed"]))
        self.blocks = _Fit(block_prior, unit)

    def _modeled(self, d: str, gamma: float, block: dict) -> float:
        """Tokens per second of draft d at γ by the fitted block costs and what it shows of
        acceptance, fill and the model's error (:meth:`_Arm.seen`)."""
        acceptance, fill, ratio = self.arms[d].seen(self.emitted)
        k = fill * gamma
        seconds = (max(block["block"], 1e-9)
                   + k * (max(block["row"], 0.0) + max(block[d], 0.0)))
        return expected_tokens(acceptance, k) * ratio / seconds

    def _estimates(self) -> dict:
        """Estimated tokens/s of plain decoding (key None) and of each draft at its best γ:
        the fitted (measured) costs, the acceptance seen, and the draft's observed ÷
        expected tokens. Cached until the next report."""
        if self._estimates_now is None:
            plain, block = self.plain.solve(), self.blocks.solve()
            est = {None: _Estimate(1 / max(plain["step"], 1e-9))}
            for d in self.arms:
                modeled = {g: self._modeled(d, g, block) for g in self.gammas}
                g = max(modeled, key=modeled.get)
                est[d] = _Estimate(modeled[g], g, modeled)
            self._estimates_now = est
        return self._estimates_now

    def _gamma_for(self, d: str, current: int) -> int:
        """The best modeled γ for d, keeping ``current`` unless the gain is past a margin."""
        e = self._estimates()[d]
        if current in e.modeled and e.modeled[e.gamma] <= e.modeled[current] * (1 + GAMMA_MARGIN):
            return current
        return e.gamma

    # ------------------------------------------------------------------ decisions
    def _switch(self, arm: str | None):
        left = self.current
        if left is not None and left != arm:  # time it again later, and later each time
            a = self.arms[left]
            a.due = self.emitted + a.backoff
            a.backoff = min(a.backoff * 2, BACKOFF_MAX)
        self.current = arm
        self.chunk_index = 0
        if arm is not None:
            self.arms[arm].blocks = 0
            self.gamma = self._gamma_for(arm, 0)
            self.confirm = True  # plain decoding timed again once the draft has been

    def _credit(self) -> float:
        return EXPLORE_ALLOWANCE + EXPLORE_SHARE * self.emitted - self.explored

    def _exploration(self, est: dict) -> Action | None:
        """Plain steps while a draft runs and plain's timing is stale; else a block of
        another draft whose timing is stale and whose estimate is within reach of the
        current arm's. None if neither is due or the budget cannot pay for it."""
        if self.current is not None and self._plain_stale() and self._credit() >= PLAIN_PROBE:
            return Action(None, steps=PLAIN_PROBE, explore=True)
        floor = est[self.current].rate / (1 + EXPLORE_SLACK)
        due = [d for d, a in self.arms.items()
               if d != self.current and self.emitted >= a.due and est[d].rate >= floor]
        if not due:
            return None
        d = max(due, key=lambda n: est[n].rate)
        gamma = self._warm_gamma(d, est[d].gamma)
        if self._credit() < gamma + 1:
            return None
        return Action(d, gamma, explore=True)

    def _warm_gamma(self, d: str, gamma: int) -> int:
        """γ for a draft's block: 1 for its warm-up (its time is not counted, so spend little)."""
        return gamma if d in self.warm else min(self.gammas)

    def _plain_stale(self) -> bool:
        """Plain decoding is due for a timing: once a draft switched to has been timed (the
        two compared under the same conditions: a machine's load comes and goes), and then
        every PLAIN_REFRESH tokens."""
        if self.confirm:
            return self.arms[self.current].blocks >= LEAVE_AFTER
        return self.emitted - self.plain_seen >= PLAIN_REFRESH

    def _plain_action(self) -> Action:
        steps = PLAIN_CHUNKS[min(self.chunk_index, len(PLAIN_CHUNKS) - 1)]
        self.chunk_index += 1
        return Action(None, steps=steps)

    # ------------------------------------------------------------------ reports
    def _report_plain(self, emitted: int, seconds: float, warm_up: bool):
        if warm_up or emitted == 0:
            return
        if self.prior is None:  # the first timing: a weak prior around it
            self.prior = Costs.guess(seconds / emitted, self.arms)
            self._start_fits(self.prior)
        self.plain.observe({"chunk": 1.0, "step": float(emitted)}, seconds, emitted)
        self.plain_seen, self.confirm = self.emitted, False

    def _report_block(self, action, drafted, accepted, emitted, seconds, warm_up):
        arm = self.arms[action.draft]
        before = self.emitted - emitted
        acceptance, arm.fill, _ = arm.seen(before)  # as believed before this block
        unseen = math.exp(-(before - arm.last) / PROMPT_MEMORY)
        arm.emitted, arm.expected = arm.emitted * unseen, arm.expected * unseen
        expected = expected_tokens(acceptance, drafted)
        arm.acceptance, arm.last = acceptance, self.emitted
        if drafted:  # accepted agreements and, if the block was cut, one disagreement
            compared = accepted + (accepted < drafted)
            rate = accepted / compared
            arm.acceptance = rate + (arm.acceptance - rate) * (1 - 1 / 32) ** compared
        if action.gamma:
            arm.fill += (min(drafted / action.gamma, 1.0) - arm.fill) / 4
        if warm_up or self.blocks is None:
            return
        fade = math.exp(-emitted / MEMORY)
        arm.emitted = arm.emitted * fade + emitted
        arm.expected = arm.expected * fade + expected
        arm.blocks += 1
        self.blocks.observe({"block": 1.0, "row": float(drafted), action.draft: float(drafted)},
                            seconds, emitted)
        if action.explore:  # stale again later; later each time it loses
            arm.due = self.emitted + arm.backoff
            est = self._estimates()
            if est[action.draft].rate < est[self.current].rate:
                arm.backoff = min(arm.backoff * 2, BACKOFF_MAX)

    def _save_on_new_bucket(self, emitted: int):
        """Costs grow with the context: leaving a context bucket, store what was measured
        in it."""
        before = context_bucket(self.position)
        self.position += emitted
        if context_bucket(self.position) != before:
            self._save(self.position - emitted)

    # ------------------------------------------------------------------ what it says
    @property
    def measured_speedup(self) -> float:
        """This run's measured tokens/s ÷ plain decoding's: the seconds plain decoding takes
        for the same tokens by its fit (its chunks as they ran, the drafts' tokens at its
        step) ÷ the seconds they took. Warm-up blocks are left out (plain pays them too)."""
        r = self.ran
        if self.plain is None or r["plain_s"] + r["drafts_s"] <= 0:
            return 1.0
        fit = self.plain.solve()
        plain = r["chunks"] * fit["chunk"] + (r["plain"] + r["drafts"]) * fit["step"]
        return plain / (r["plain_s"] + r["drafts_s"])

    @property
    def source(self) -> str:
        """``measured`` once the decision rests on timings (this run's or stored), else
        the prior's source (``modeled(<chip>)``, or ``timed`` for none)."""
        if self.prior is None:
            return "timed"
        mine = self.plain.evidence > 0 and any(a.measured() for a in self.arms.values())
        return "measured" if mine or self.prior.source == "measured" else self.prior.source

    @property
    def reason(self) -> str:
        """Why it decodes as it does now, machine-friendly: ``measured_speedup_1.12`` (or
        ``modeled_…``) for a draft, else the first bound that stops every draft; then
        ``;costs=<source>``."""
        if self.prior is None:
            return "timing_plain_decoding;costs=timed"
        est = self._estimates()
        plain = est[None].rate
        if self.current is not None:
            kind = "measured" if self.arms[self.current].measured() else "modeled"
            why = f"{kind}_speedup_{est[self.current].rate / plain:.2f}"
        else:
            why = self._why_plain(est)
        return f"{why};costs={self.source}"

    def _why_plain(self, est: dict) -> str:
        """The first bound that fails: free drafts accepted always (the verify's rows cost
        too much), a draft that measured slower (in this run or a stored one); no draft
        timed yet where the costs are guessed (no roofline, nothing stored: a short run on a
        CPU); the cheapest draft accepted always; else acceptance is too low."""
        if not self.arms:
            return "no_draft_candidates"
        block = self.blocks.solve()
        step, plain = 1 / est[None].rate, est[None].rate
        g = max(self.gammas)
        verify = block["block"] + g * max(block["row"], 0.0)
        if (g + 1) / verify <= plain * (1 + HYSTERESIS):
            return f"verify_cost_grows_with_rows(x{verify / step:.1f}_at_{g + 1}_rows)"
        measured = self._timed()
        if measured:
            d = max(measured, key=lambda n: est[n].rate)
            return f"measured_not_faster({d}_x{est[d].rate / plain:.2f})"
        top = max(self.arms, key=lambda d: est[d].rate)
        if self.prior.source == "timed":  # the drafts' costs are guesses until one is timed
            return f"not_timed_yet({top})"
        cheapest = min(self.arms, key=lambda d: block[d])
        perfect = max((n + 1) / (block["block"] + n * (max(block["row"], 0.0) + block[cheapest]))
                      for n in self.gammas)
        if perfect <= plain * (1 + HYSTERESIS):
            return f"draft_too_costly({cheapest}_x{block[cheapest] / step:.2f})"
        return f"acceptance_too_low({top}_{self.arms[top].acceptance:.2f})"

    def _timed(self) -> list:
        """The drafts timed in this run or in the stored measurement it started from."""
        stored = self.prior.draft if self.prior.source == "measured" else {}
        return [d for d, a in self.arms.items() if a.measured() or d in stored]

    def measured_costs(self) -> Costs:
        """The fitted costs and acceptances, as the next run's prior (``measured``): the
        drafts timed in this run or in the stored measurement it started from."""
        plain = {k: max(v, 0.0) for k, v in self.plain.solve().items()}
        block = {k: max(v, 0.0) for k, v in self.blocks.solve().items()}
        timed = self._timed()
        return Costs(step=plain["step"], chunk=plain["chunk"], block=block["block"],
                     row=block["row"], draft={d: block[d] for d in timed},
                     acceptance={d: self.arms[d].acceptance for d in timed},
                     source="measured", weight=PRIOR_WEIGHT["measured"])


# ---------------------------------------------------------------------- the store
def store_key(model: str, device: str, mlx_version: str, kv_mode: str) -> str:
    """What a model's measured costs are kept under (the store adds the context bucket): the
    model (cost.fingerprint), the device and chip, the MLX version, the KV cache's mode."""
    return "|".join((model, device, f"mlx={mlx_version}", f"kv={kv_mode}"))


def default_store() -> "Store":
    """The store ``auto`` reads and ``python -m mlx_qspec.bench`` writes."""
    return Store(cache_dir() / "measured.json")


def context_bucket(position: int) -> int:
    """The context length rounded up to a power of two, at least 256: costs grow with the
    context a forward reads, so they are kept per bucket."""
    return max(256, 1 << math.ceil(math.log2(max(position, 1))))


class Store:
    """Measured costs kept between runs, a JSON file of ``key|ctx=<bucket>`` → costs
    (:func:`~mlx_qspec.cache_dir.read_json`): where it cannot be written (a read-only home, a
    sandbox, a full disk) they are kept in memory for this process, with one warning —
    measuring must never stop decoding; a corrupt or unreadable file reads as empty."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self, key: str, position: int) -> Costs | None:
        """The costs stored for ``key`` at the context bucket of ``position``, else at the
        nearest bucket stored for it; None if none (or malformed)."""
        entries = read_json(self.path)
        want = context_bucket(position)
        found = []
        for name, entry in entries.items():
            base, _, bucket = name.rpartition("|ctx=")
            if base == key and bucket.isdigit():
                found.append((abs(math.log2(int(bucket) / want)), name))
        for _, name in sorted(found):
            costs = _costs_from(entries[name])
            if costs is not None:
                return costs
        return None

    def save(self, key: str, position: int, costs: Costs) -> bool:
        """False where the file could not be written (the costs kept in memory)."""
        entries = read_json(self.path)
        entries[f"{key}|ctx={context_bucket(position)}"] = asdict(costs)
        return write_json(self.path, entries)


def _costs_from(entry) -> Costs | None:
    """A stored entry as :class:`Costs`; None where it is not one (hand-edited, older)."""
    try:
        costs = Costs(**entry)
        numbers = [costs.step, costs.block, costs.row, costs.chunk, costs.weight,
                   *costs.draft.values(), *costs.acceptance.values()]
    except (TypeError, AttributeError):
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
        return None
    return costs if costs.step > 0 else None
