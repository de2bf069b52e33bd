"""The speculative step, written once: :class:`Decoder`, over one row or many.

A block (:meth:`Decoder.step`): the policy plans a draft and γ (:mod:`mlx_qspec.policy`);
:meth:`~Decoder.propose` asks the draft's levels, cheapest first, for up to γ tokens per row
(each level above the cheapest checks what the ones below offered); :meth:`~Decoder.verify`
scores ``[last token, d1..dγ]`` at full precision in forwards of at most ``kernels.MAX_M``
rows (the row counts one kernel path serves, so a verify row is computed as a one-token step
is); :meth:`~Decoder.settle` applies the rejection rule per row (greedy: accept while the
argmax agrees; sampling: keep d with probability min(1, p/q), else draw from the residual),
rewinds each row to what it accepted (the step then commits the caches: a middle level's
check settles too, and the block may still be taken back); :meth:`~Decoder.emit` hands
each row its accepted drafts and one token of the verify's. Greedy output equals plain
decoding token for token; at temperature > 0 the rule keeps the verify's distribution.

Rows. The CLI, API and chat decode one row on the model's own caches — mlx-lm's cache and
attention path, on which exactness on Metal depends (:meth:`Decoder.generate`; plain stretches
run through mlx-lm's pipelined ``generate_step``). The server decodes its batched rows on a
ragged cache with the same decoder (one precision level or none, shared by the rows), and
each request that cannot share a batched forward as a decoder of its own at batch 1.
Each row draws from its own key (:meth:`Row.new`: a request's seed, or one drawn from MLX's
generator), never by reseeding the global generator.

The contracts other parts build on: caches rewind and commit through
:mod:`mlx_qspec.caches`; levels propose as :mod:`mlx_qspec.drafts.cascade` describes (a level
that ``reads_hidden`` gets ``Row.kept_hidden()``; every forward goes through :func:`forward`,
the one place where that state would be taken); the policy is asked before and told after every
block, with its wall-clock seconds measured after the ``mx.eval`` that ends it.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, List, Optional

import mlx.core as mx
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache

from . import kernels, precision, reads
from .caches import commit, position, positions, rewind, room
from .drafts.cascade import Context
from .drafts.grammar import NONE
from .heads import capture
from .kv_cache import SpeculativeRotatingKVCache
from .policy import BlockResult, FixedGamma
from .precision import FULL_PRECISION, Precision
from .sampling import accept, resolve_sampler

VERIFY_ROWS = kernels.MAX_M  # verify rows per forward: one kernel path (γ ≥ 16: two forwards)
DRAFT, VERIFY = "draft", "verify"


@dataclass
class SpecStats:
    """Counts, times and bytes read of one generation, filled in as it goes.

    ``acceptance`` α = accepted ÷ drafted; ``tokens_per_verify`` τ = emitted ÷ verify
    passes (1 … γ+1). Times are host wall-clock seconds per phase (drafting waits for its
    tokens, so the split is real). ``draft_reads`` / ``verify_reads`` count the bytes the
    draft and verify forwards read (:mod:`mlx_qspec.reads`); a plain step reads what one
    verify forward reads at the same context. ``auto_reason`` says what ``auto`` chose and
    why, ``measured_speedup`` its measured tokens/s ÷ plain decoding's (None but for
    ``auto``). Runs that share one object add up.
    """

    draft: str = ""
    num_draft_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    emitted: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    auto_reason: str = ""
    measured_speedup: Optional[float] = None
    # Cascades: per checking level, [proposals from the levels below, proposals it kept].
    level_counts: dict = field(default_factory=dict)
    draft_reads: reads.ReadCounter = field(default_factory=reads.ReadCounter)
    verify_reads: reads.ReadCounter = field(default_factory=reads.ReadCounter)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.verify_passes if self.verify_passes else 0.0

    @property
    def forwards(self) -> int:
        return self.draft_reads.forwards + self.verify_reads.forwards

    def reads(self, kind: str) -> reads.ReadCounter:
        return self.draft_reads if kind == DRAFT else self.verify_reads

    def bytes_per_token(self, half: bool = False) -> dict:
        """Bytes read per emitted token: by the drafts, the verifies, both, and by plain
        decoding at the same context — a verify forward's reads less what only a forward of
        several rows reads (a mixture's experts beyond a row's own, a recurrent replay):
        ``reads.ReadCounter.step_bytes`` (``half``: float arrays counted as a Mac's float16)."""
        n = lambda c: c.bytes_f16() if half else c.bytes()  # noqa: E731
        per = lambda b: b / self.emitted if self.emitted else 0.0  # noqa: E731
        v = self.verify_reads
        return {
            "draft": per(n(self.draft_reads)),
            "verify": per(n(v)),
            "total": per(n(self.draft_reads) + n(v)),
            "plain": v.step_bytes(half) / v.forwards if v.forwards else 0.0,
        }

    def __str__(self):
        b = self.bytes_per_token()
        return (f"SpecStats(draft={self.draft}, acceptance={self.acceptance:.3f}, "
                f"tokens_per_verify={self.tokens_per_verify:.3f}, drafted={self.drafted}, "
                f"accepted={self.accepted}, verify_passes={self.verify_passes}, "
                f"bytes_per_token={b['total']:.0f}, plain_bytes_per_token={b['plain']:.0f})")


@dataclass
class Row:
    """One sequence being decoded: the token its next block starts from (not yet in the
    cache), how it samples (``sampler`` None: greedy) and from which ``key``, how many
    tokens it may still emit, its counts, and what levels and logits processors read."""

    y: int
    sampler: Any = None
    key: Optional[mx.array] = None
    budget: float = math.inf
    stats: SpecStats = field(default_factory=SpecStats)
    context: Optional[List[int]] = None  # token ids so far (levels that read them)
    history: Optional[mx.array] = None  # the same as an array (logits processors)
    processors: list = field(default_factory=list)
    # final hidden states of the last cached positions not yet handed to a level, in pieces
    hidden: List[mx.array] = field(default_factory=list)

    @classmethod
    def new(cls, y: int, sampler, seed: Optional[int], budget: int, stats=None, processors=None):
        """A row starting from ``y`` (``sampler``: :func:`~mlx_qspec.sampling.resolve_sampler`'s,
        None when greedy; ``budget`` < 0 never ends). A sampling row's key is ``seed``'s, else
        random bits drawn from MLX's global generator (so a process seeded with
        ``mx.random.seed`` still repeats itself; lazily, no sync)."""
        sampler, key = resolve_sampler(sampler), None
        if sampler is not None:
            key = (mx.random.key(seed) if seed is not None
                   else mx.random.randint(0, 2**31 - 1, shape=(2,)).astype(mx.uint32))
        return cls(y, sampler, key, math.inf if budget < 0 else budget, stats or SpecStats(),
                   processors=list(processors or []))

    def split_key(self) -> Optional[mx.array]:
        """A fresh key for one draw (None for a greedy row: it draws nothing)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def distribution(self, lp: mx.array) -> mx.array:
        """What this row draws from, given log-probs ``lp``: ``lp`` itself when greedy (its
        argmax), else its sampler's distribution."""
        return lp if self.sampler is None else self.sampler.distribution(lp)

    def draw(self, q: mx.array) -> mx.array:
        """A token from each row of the distribution ``q``: its argmax when greedy, else a
        draw with a fresh key."""
        return (mx.argmax(q, axis=-1) if self.sampler is None
                else mx.random.categorical(q, key=self.split_key()))

    def keep_hidden(self, rows: mx.array) -> None:
        """The final hidden states (N, D) of the next N cached positions, after those kept
        and not yet handed to a level: a piece, joined only when a level reads them (one
        concatenation per stretch, not a copy of all kept so far per block)."""
        self.hidden.append(rows)

    def kept_hidden(self) -> Optional[mx.array]:
        """The hidden states kept since a level last took them, (N, D), or None."""
        if len(self.hidden) > 1:
            self.hidden = [mx.concatenate(self.hidden)]
        return self.hidden[0] if self.hidden else None

    def add(self, tokens: list) -> None:
        """Tokens emitted: the contexts grow by them."""
        if self.context is not None:
            self.context += tokens
        if self.history is not None:
            self.history = mx.concatenate([self.history, mx.array(tokens, mx.uint32)])


def forward(model, tokens: mx.array, cache, at: Precision = FULL_PRECISION, counter=None,
            hidden: Optional[list] = None):
    """The model's logits for ``tokens`` (B, N) on ``cache`` at precision ``at``, reads
    counted in ``counter``: the one place the decoder, its prefill and plain decoding run
    the model. ``hidden``: a list that gets the forward's final hidden states (B, N, D),
    the LM head's input, captured as it runs (:mod:`mlx_qspec.heads.capture`)."""
    keep = nullcontext([]) if hidden is None else capture.capturing()
    with precision.reading(at), reads.counting(counter) if counter else nullcontext(), keep as rows:
        logits = model(tokens, cache=cache)
    if hidden is not None:
        hidden.extend(rows)
    return logits


def quantize_kv(cache, s) -> None:
    """mlx-lm's KV quantization as the settings ``s`` ask, after a prefill chunk or a block
    (plain decoding quantizes after each step)."""
    maybe_quantize_kv_cache(cache, s.quantized_kv_start, s.kv_group_size, s.kv_bits)


def prefill(model, tokens: mx.array, cache, step: int, after=None, hidden: Optional[list] = None,
            progress=None):
    """Feed ``tokens`` into ``cache`` at full precision in chunks of ``step``, as mlx-lm's
    ``generate_step`` does with a prompt's first n − 1 tokens (same chunks, same cache),
    committing after each. Rewindable windows see the chunks as prompt chunks, the blocks
    after them as verifies. ``hidden``: a list that gets each chunk's final hidden states.
    ``after()``: after each chunk's forward, before its evaluation (mlx-lm's KV
    quantization); ``progress(done, total)``: once the chunk is evaluated (MLX is lazy: the
    work is done only then)."""
    windows = [c for c in cache if isinstance(c, SpeculativeRotatingKVCache)]
    for c in windows:
        c.decoding = False
    total, done = tokens.size, 0
    while tokens.size:
        n = min(step, tokens.size)
        forward(model, tokens[:n][None], cache, hidden=hidden)
        if after is not None:
            after()
        mx.eval([c.state for c in cache], hidden or [])
        commit(cache)
        tokens, done = tokens[n:], done + n
        if progress is not None:
            progress(done, total)
        mx.clear_cache()
    for c in windows:
        c.decoding = True


class Decoder:
    """Speculative decoding of ``rows`` on ``cache`` (one list of per-layer caches: the
    model's own at batch 1, a ragged one for a batch), block by block as ``policy`` plans
    (None: plain decoding only). ``settings``: ``draft_p_min``, and mlx-lm's KV quantization
    (:func:`quantize_kv`), applied after each block as plain decoding applies it after each
    step."""

    def __init__(self, model, cache, rows: List[Row], policy, settings, *,
                 keep_hidden: bool = False):
        self.model, self.cache, self.rows, self.policy = model, cache, rows, policy
        self.settings = settings
        # Levels that read the hidden state (heads.level) get the verify's rows of each
        # block's accepted positions, and a plain stretch's (DEVELOPERS.md, "The decoder's
        # contracts").
        self.keep_hidden = keep_hidden
        self._hidden: list = []  # the LM head inputs of this block's verify forwards
        self.forwards = {DRAFT: 0, VERIFY: 0}  # model forwards made, by kind
        if policy is not None:
            self.describe()

    def describe(self) -> None:
        """Each row's stats say what the policy runs (``none``: plain decoding), why, and the
        γ asked for: a fixed draft's, else ``auto``'s cap (``num_draft_tokens``) if given."""
        p = self.policy
        for r in self.rows:
            r.stats.draft, r.stats.auto_reason = p.name or NONE, p.reason
            r.stats.num_draft_tokens = (p.gamma if isinstance(p, FixedGamma)
                                        else self.settings.num_draft_tokens or 0)

    def close(self) -> None:
        """The generation ended: the policy stores what it measured, and the stats say what
        it ran last, why, and its measured speed-up."""
        self.policy.close()
        self.describe()
        for r in self.rows:
            r.stats.measured_speedup = self.policy.measured_speedup

    # ------------------------------------------------------------ the step
    def step(self, plan=None) -> list:
        """One block for every row (``plan``: the policy's, asked here when not given):
        what each row emits, a list of ``(token, logprobs, from_draft)``."""
        plan = plan or self.policy.plan()
        start = time.perf_counter()
        k = self.block_size(plan.gamma if plan.draft is not None else 0)
        drafts, q = self.propose(plan.draft.levels, k) if k else self._nothing()
        drafted = time.perf_counter()
        lp = self.verify(drafts, FULL_PRECISION, VERIFY)
        counts, out = self.settle(lp, drafts, q)
        commit(self.cache)  # the block is settled: no rewind goes back past it
        self._keep_hidden(counts)
        quantize_kv(self.cache, self.settings)
        end = time.perf_counter()
        for r, d, n in zip(self.rows, drafts, counts):
            r.stats.drafted += len(d)
            r.stats.accepted += n
            r.stats.verify_passes += 1
            r.stats.draft_time += drafted - start
            r.stats.verify_time += end - drafted
        self.policy.report(BlockResult(sum(map(len, drafts)), sum(counts),
                                       sum(map(len, out)), end - start))
        return self.emit(out, lp, counts)

    def _keep_hidden(self, counts: list) -> None:
        """Each row keeps the verify's hidden states of the positions it accepted (its
        pending token's and the accepted drafts'), after those not yet handed to a level."""
        if self._hidden:
            h = mx.concatenate(self._hidden, axis=1)
            for b, (r, n) in enumerate(zip(self.rows, counts)):
                r.keep_hidden(h[b, : n + 1])
        self._hidden = []

    def block_size(self, gamma: int) -> int:
        """Drafts the next block may hold: γ, cut to what the rows may still emit and to
        the cache's room (no block straddles a change of how it stores earlier positions)."""
        budget, s = max(r.budget for r in self.rows), self.settings
        return int(max(0, min(gamma, budget - 1, room(self.cache, s.kv_bits, s.quantized_kv_start))))

    def _nothing(self):
        return [[] for _ in self.rows], [[] for _ in self.rows]

    # ------------------------------------------------------------ propose
    def propose(self, levels, k: int, before: Optional[list] = None):
        """Up to ``k`` drafts per row from the cascade ``levels`` (cheapest first) after
        ``before`` (per row: this block's tokens so far), and the distribution each was drawn
        from (None: a point mass); the cache ends where it began."""
        base = positions(self.cache)
        out = self._propose(levels, k, before or [[] for _ in self.rows])
        self._rewind(base, DRAFT)
        return out

    def _propose(self, levels, k: int, before: list):
        """:meth:`propose`, the cache left as the forwards leave it. A precision level drafts
        a token per forward, or, above lower levels, checks their offers with one forward and
        extends what it keeps."""
        *lower, top = levels
        if not isinstance(top, Precision):  # a level that proposes by itself (batch 1)
            return self._propose_alone(lower, top, k, before)
        if len(self.rows) > 1:  # a batch shares one precision level: k drafts for every row
            return self._draft_batch(top, k)
        tokens, q = self._nothing()
        while len(tokens[0]) < k:
            so_far = [b + t for b, t in zip(before, tokens)]
            offered = self.propose(lower, k - len(tokens[0]), so_far) if lower else None
            if offered and offered[0][0]:
                out, qs = self._check_level(top, offered, so_far)
            else:
                out, qs = self._draft_one(top, so_far)
                if out is None:  # --draft-p-min: the draft is unsure, the block ends
                    break
            for t, qi, o, oq in zip(tokens, q, out, qs):
                t += o
                qi += oq
        return [t[:k] for t in tokens], [qi[:k] for qi in q]

    def _propose_alone(self, lower, top, k: int, before: list):
        """A level that proposes by itself (batch 1): above lower levels (``ngram>head``) it
        takes their proposals as given and extends them, so what the verify sees was drawn
        from each level's distribution. A level that reads the hidden state gets the rows the
        decoder kept since it last ran (then let go)."""
        (row,) = self.rows
        offered, offered_q = [[]], [[]]
        if lower:
            offered, offered_q = self.propose(lower, k, before)
        reads_hidden = getattr(top, "reads_hidden", False)
        context = Context(row.context + before[0] + offered[0],
                          row.kept_hidden() if reads_hidden else None,
                          row.stats.draft_reads, len(row.context) - 1)
        tokens, q = top.proposals(context, k - len(offered[0]), lambda lp: self._draw(row, lp))
        if reads_hidden and k > len(offered[0]):  # the level took them
            row.hidden = []
        return [offered[0] + tokens], [offered_q[0] + q]

    def _last(self, so_far) -> mx.array:
        return mx.array([[s[-1] if s else r.y] for r, s in zip(self.rows, so_far)], mx.uint32)

    def _draft_one(self, at: Precision, so_far):
        """One token per row drawn from the model read at ``at``."""
        logits = self.forward(self._last(so_far), at, DRAFT)[:, -1:]
        drawn = [self._draw(r, lp) for r, lp in
                 zip(self.rows, self._logprobs(logits, so_far))]
        if any(d is None for d in drawn):
            return None, None
        return [[t] for t, _ in drawn], [[qi] for _, qi in drawn]

    def _draft_batch(self, at: Precision, k: int):
        """``k`` tokens per row, one forward over the batch each, drawn without waiting for
        them (evaluated once, after the k forwards)."""
        x, tokens, q = self._last([[] for _ in self.rows]), [], [[] for _ in self.rows]
        greedy = all(r.sampler is None for r in self.rows)
        for _ in range(k):
            lp = self._logprobs(self.forward(x, at, DRAFT)[:, -1:], None)[:, 0]
            if greedy:  # one argmax over (B, V); accept reads no q for a greedy row
                drawn, qs = mx.argmax(lp, axis=-1), [None] * len(self.rows)
            else:
                qs = [r.distribution(lp[b : b + 1]) for b, r in enumerate(self.rows)]
                drawn = mx.concatenate([r.draw(qb) for r, qb in zip(self.rows, qs)])
            for qi, qb in zip(q, qs):
                qi.append(qb)
            tokens.append(drawn.astype(mx.uint32))
            x = tokens[-1][:, None]
        return (mx.stack(tokens, axis=1).tolist() if k else [[] for _ in self.rows]), q

    def _check_level(self, at: Precision, offered, so_far):
        """A middle level: its forward over what the levels below offered keeps what it
        agrees with, plus one token of its own (batch 1)."""
        counted = self.rows[0].stats.level_counts.setdefault(at.name, [0, 0])
        base = positions(self.cache)
        tokens, q = offered
        lp = self.verify(tokens, at, DRAFT, so_far)
        counts, out = self.settle(lp, tokens, q, base, DRAFT)
        counted[0] += len(tokens[0])
        counted[1] += counts[0]
        qs = []
        for r, row_lp, n in zip(self.rows, lp, counts):
            dist = r.distribution(row_lp[: n + 1])
            qs.append([dist[i : i + 1] for i in range(n + 1)])
        return out, qs

    def _draw(self, row: Row, lp: mx.array):
        """One draft token from a level's log-probs ``lp`` (1, V) and the distribution it
        was drawn from, or None where its top probability is below ``draft_p_min``
        (llama.cpp's --draft-p-min: an unsure draft ends the block)."""
        q = row.distribution(lp)
        p_min = self.settings.draft_p_min
        if p_min and math.exp(q.max().item()) < p_min:
            return None
        return row.draw(q).item(), q

    # ------------------------------------------------------------ verify, settle, emit
    def forward(self, tokens: mx.array, at: Precision, kind: str) -> mx.array:
        """One forward over every row, its reads counted in the rows' ``kind`` counters (a
        batch's bytes are not split: each row counts the forward)."""
        self.forwards[kind] += 1
        hidden = self._hidden if self.keep_hidden and kind == VERIFY else None
        if len(self.rows) == 1:
            return forward(self.model, tokens, self.cache, at, self.rows[0].stats.reads(kind),
                           hidden=hidden)
        logits = forward(self.model, tokens, self.cache, at, hidden=hidden)
        for r in self.rows:
            r.stats.reads(kind).forwards += 1
        return logits

    def verify(self, drafts: list, at: Precision, kind: str, before=None) -> mx.array:
        """Log-probs (B, k+1, V) of ``[y, *drafts]`` per row read at ``at``, in forwards of
        at most :data:`VERIFY_ROWS` rows; row i scored after ``before`` and drafts[:i]."""
        before = before or [[] for _ in self.rows]
        k = len(drafts[0])  # (a batch drafts alike)
        inputs = self._last(before)
        if k:
            inputs = mx.concatenate([inputs, mx.array(drafts, mx.uint32)], axis=1)
        logits = mx.concatenate([
            self.forward(inputs[:, i : i + VERIFY_ROWS], at, kind)
            for i in range(0, inputs.shape[1], VERIFY_ROWS)
        ], axis=1)
        return self._logprobs(logits, [b + d for b, d in zip(before, drafts)])

    def _logprobs(self, logits: mx.array, contexts) -> mx.array:
        """Log-softmax of ``logits`` (B, N, V); a row with logits processors has its i-th
        position scored in its history extended by ``contexts[b][: len - N + 1 + i]``."""
        if not any(r.processors for r in self.rows):
            return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out = []
        for r, row, ctx in zip(self.rows, logits, contexts):
            n = row.shape[0]
            full = mx.concatenate([r.history, mx.array(ctx, mx.uint32)])
            scored = []
            for i in range(n):
                x = row[i : i + 1]
                for proc in r.processors:
                    x = proc(full[: full.size - n + 1 + i], x)
                scored.append(x)
            row = mx.concatenate(scored)
            out.append(row - mx.logsumexp(row, axis=-1, keepdims=True))
        return mx.stack(out)

    def settle(self, lp: mx.array, drafts: list, q: list, base=None, kind: str = VERIFY):
        """The rejection rule per row: ``(accepted counts, tokens to emit)``, each row's
        accepted drafts and the verify's token after them; every row's cache rewound to its
        ``base`` (default: where it stood before the verify) + accepted + 1, what the rewind
        reads counted as the ``kind`` forward's (a recurrent state's replay)."""
        k = [len(d) for d in drafts]
        base = base or [p - n - 1 for p, n in zip(positions(self.cache), k)]
        results = [accept(lp[b, : k[b] + 1], mx.array(d, mx.uint32), qi, r.sampler, r.split_key)
                   for b, (r, d, qi) in enumerate(zip(self.rows, drafts, q))]
        mx.eval(lp, results)
        counts, out = [], []
        for d, (ok, targets) in zip(drafts, results):
            flags = ok.tolist()
            n = flags.index(False) if False in flags else len(d)
            counts.append(n)
            out.append(list(d[:n]) + [targets.tolist()[n]])
        self._rewind([b + n + 1 for b, n in zip(base, counts)], kind)
        return counts, out

    def _rewind(self, to, kind: str) -> None:
        """:func:`caches.rewind`, what it reads (a recurrent state's replay of the positions
        kept) counted with the ``kind`` forwards' reads, as no forward of its own (batch 1: a
        batch's rows hold no recurrent state)."""
        counter = self.rows[0].stats.reads(kind) if len(self.rows) == 1 else None
        with reads.counting(counter, forward=False) if counter else nullcontext():
            rewind(self.cache, to)

    def emit(self, out: list, lp: mx.array, counts: list) -> list:
        """Each row's ``(token, logprobs, from_draft)``, cut to what it may still emit; the
        row's next block starts from its last token."""
        emitted = []
        for r, tokens, row_lp, n in zip(self.rows, out, lp, counts):
            tokens = tokens[: int(min(len(tokens), r.budget))]
            r.budget -= len(tokens)
            r.y = tokens[-1] if tokens else r.y
            r.add(tokens)
            emitted.append([(t, row_lp[i], i < n) for i, t in enumerate(tokens)])
        return emitted

    # ------------------------------------------------------------ batch 1
    def generate(self):
        """Batch 1: yield ``(token, logprobs, from_draft)`` block after block, plain stretches
        through mlx-lm's pipelined ``generate_step``, until the row's budget is spent."""
        (row,) = self.rows
        while row.budget > 0:
            plan = self.policy.plan()
            if plan.draft is None:
                yield from self.decode_plainly(plan.steps)
                continue
            for token in self.step(plan)[0]:
                row.stats.emitted += 1
                yield token

    def decode_plainly(self, steps: Optional[int] = None, settle: bool = True):
        """Plain decoding of ``steps`` tokens (None: the row's budget) through mlx-lm's own
        ``generate_step``, pipelined as mlx-lm pipelines it; every forward a one-token step
        counted in the verify reads, logits processors seeing the row's history; the policy
        (if any) told the tokens and the seconds spent waiting for them. ``settle``: the cache
        then holds the row as a block would leave it (the token it goes on from not in it);
        else as ``generate_step`` leaves it."""
        (row,) = self.rows
        n = row.budget if steps is None else min(steps, row.budget)
        start = position(self.cache) if settle else None
        history = None if row.history is None else row.history[:-1]
        processors = [
            (lambda toks, logits, proc=proc: proc(mx.concatenate([history, toks]), logits))
            for proc in row.processors
        ] if history is not None and history.size else row.processors
        sampler = None if row.sampler is None else (lambda lp: row.sampler(lp, row.split_key()))
        hidden = [] if self.keep_hidden else None  # one row per step, in order
        model = lambda x, cache: forward(self.model, x, cache, FULL_PRECISION,  # noqa: E731
                                         row.stats.verify_reads, hidden=hidden)
        emitted, seconds, s = 0, 0.0, self.settings  # seconds waiting for tokens, not the consumer's
        steps = generate_step(mx.array([row.y], mx.uint32), model,
                              max_tokens=-1 if math.isinf(n) else int(n), sampler=sampler,
                              logits_processors=processors, prompt_cache=self.cache,
                              kv_bits=s.kv_bits, kv_group_size=s.kv_group_size,
                              quantized_kv_start=s.quantized_kv_start)
        try:
            asked = time.perf_counter()
            for tok, lp in steps:  # each token an int: evaluated
                seconds += time.perf_counter() - asked
                emitted += 1
                row.budget -= 1
                row.stats.emitted += 1
                row.stats.verify_passes += 1
                row.y = tok
                row.add([tok])
                yield tok, lp, False
                asked = time.perf_counter()
        finally:
            steps.close()
            if settle:
                self._rewind([start + emitted], VERIFY)
                commit(self.cache)
                if hidden and emitted:
                    row.keep_hidden(mx.concatenate(hidden, axis=1)[0, :emitted])
            if self.policy is not None and emitted:
                self.policy.report(BlockResult(0, 0, emitted, seconds))
