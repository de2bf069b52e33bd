"""``--draft auto``: the drafts a model can weigh, their prior acceptance, and the block
policy that decides between them and plain decoding from what it measures.

The candidates: the n-gram lookup (free), the precision drafts that read fewer bytes (the
upper planes of 8-bit weights and of a nested cache, alone and together) and the best
activation draft, and the layer-skip sets calibrated for this model before. After the
prefill, :class:`AutoPolicy` hands them to the measured controller
(:class:`~mlx_qspec.controller.Controller`) with a prior (:func:`mlx_qspec.cost.prior`), and
serves its decisions to the decoder as plans on built drafts.
"""

import mlx.core as mx
import mlx.nn as nn

from .. import controller, cost, distributed, recurrent, store
from ..caches import kv_mode, position
from ..heads import mtp
from ..heads.level import HeadDraft, head_level, mtp_level
from ..policy import BlockResult, Plan
from ..precision import ACT_GROUP_SIZES, Precision
from ..quant.modes import draftable_layers
from . import layer_skip
from .cascade import build, runs
from .grammar import HEAD, MTP, NGRAM, parse_precision
from .ngram import Ngram

# A checkpoint's MTP layers, before any is measured here: DeepSeek-V3's report puts the
# acceptance of its MTP module's token at 85-90 %; what the controller sees takes over.
MTP_PRIOR = 0.85
HEAD_PRIOR = 0.3  # a trained head whose agreement was not measured (trained on the user's text)
# Why auto decodes plainly a model whose recurrent state mlx_qspec cannot rewind.
NOT_REWINDABLE = "recurrent_state_not_rewindable"


def activation_draft(model: nn.Module) -> str | None:
    """The activation draft that agrees best with the verify on this model, or None.

    A8 with one activation scale per weight group: on the test model it agrees with the
    verify on ~98 % of tokens (per-token A8: ~91 %, A4 g32: ~60 %). Falls back to the other
    A8 groupings, then per-token A8, which runs on every input size.
    """
    groups = sorted({m.group_size for _, m in draftable_layers(model)})
    prefs = [f"a8-g{g}" for g in groups if g in ACT_GROUP_SIZES]
    prefs += [f"a8-g{g}" for g in ACT_GROUP_SIZES] + ["a8"]
    return next((p for p in prefs if runs(model, p, "fp")), None)


def auto_candidates(model: nn.Module, kv: str) -> list[str]:
    """The precision drafts ``auto`` weighs: those that read fewer bytes (the upper planes
    of 8-bit weights and of a nested cache, alone and together) and the best activation
    draft."""
    def candidates():
        names = ["w-upper", "kv-upper", "w-upper+kv-upper", activation_draft(model)]
        return [n for n in names if n and runs(model, n, kv)]
    return store.per_model(model, f"auto_candidates {kv}", candidates)


def auto_priors(model, kv: str) -> dict[str, float]:
    """The drafts ``auto`` weighs, with their prior acceptance: the n-gram lookup, the
    precision drafts whose terms were measured, and the layer-skip sets calibrated for this
    model before (``--draft skip-<share>`` calibrates one), alone and with ``kv-upper``."""
    priors = {NGRAM: cost.PRIOR_ACCEPTANCE[NGRAM]}
    for name in auto_candidates(model, kv):
        if all(t in cost.PRIOR_ACCEPTANCE for t in parse_precision(name).terms):
            priors[name] = cost.prior_acceptance(name)
    for found in layer_skip.cached_calibrations(model):
        name = Precision(skip=found.skip).name
        priors[name] = found.agreement
        if kv == "nested":
            priors[name + "+kv-upper"] = found.agreement * cost.PRIOR_ACCEPTANCE["kv-upper"]
    return priors


def head_levels(model, draft_head) -> dict:
    """The levels that propose by reading the model's hidden state that ``auto`` can weigh:
    the checkpoint's MTP layers (``mtp``) and a ``--draft-head`` (``head``: a
    :class:`HeadDraft` used as given, or its directory)."""
    levels = {}
    if isinstance(mtp.attached(model), tuple):  # built once per model, a cache per request
        levels[MTP] = store.per_model(model, "mtp level", lambda: mtp_level(model)).fresh()
    if draft_head is not None:
        levels[HEAD] = draft_head if isinstance(draft_head, HeadDraft) else head_level(model, draft_head)
    return levels


WARM: set = set()  # arms run once in this process: only their first block builds kernels


class AutoPolicy:
    """``auto`` as a block policy on a prefilled cache: the measured controller's decisions
    (a draft and γ ≤ ``max_gamma``, or plain decoding for some steps) as plans on built
    drafts; each block's seconds reported back to it (rank 0's clock across several ranks,
    so that every rank decides alike). A plain run that reaches the controller as several
    one-step blocks (the server's loop) is reported to it whole. ``name`` (the draft it runs
    now, or None), ``reason``, ``measured_speedup``; :meth:`close` stores what it measured.
    A model whose recurrent state cannot be rewound has no draft to weigh: plain decoding."""

    def __init__(self, model, cache, ngram: Ngram = Ngram(), max_gamma: int | None = None,
                 draft_head=None):
        self.model, self.kv, self.ngram = model, kv_mode(cache), ngram
        self.unrewindable = recurrent.unsupported(model) is not None
        priors = {} if self.unrewindable else auto_priors(model, self.kv)
        heads = {} if self.unrewindable else head_levels(model, draft_head)
        for name, level in heads.items():
            default = MTP_PRIOR if name == MTP else HEAD_PRIOR
            priors[name] = level.agreement if level.agreement is not None else default
        self.draft_head = heads.get(HEAD)
        # a head step's bytes, counted only where a roofline prices them (a Mac)
        step_bytes = {name: lambda level=level: level.step_reads().bytes()
                      for name, level in heads.items()}
        gammas = tuple(g for g in controller.GAMMAS if g <= (max_gamma or max(controller.GAMMAS)))
        self.ranks = distributed.group().size()
        key = None if self.ranks > 1 else cost.store_key(model, self.kv)
        self.controller = controller.Controller(
            priors, gammas, cost.prior(model, cache, priors, step_bytes=step_bytes),
            start=position(cache), warm=WARM,
            store=None if key is None else controller.default_store(), key=key)
        self.reads_context = NGRAM in priors  # the lookup may run any time: keep the context
        self.drafts: dict = {}
        self.action = self.plain = None  # the controller's action; a plain run's [emitted, seconds]

    @property
    def name(self) -> str | None:
        return self.controller.current

    @property
    def reason(self) -> str:
        return NOT_REWINDABLE if self.unrewindable else self.controller.reason

    @property
    def measured_speedup(self) -> float:
        return self.controller.measured_speedup

    def plan(self) -> Plan:
        if self.plain is None:
            self.action = self.controller.next()
            if self.action.draft is None:
                self.plain = [0, 0.0]
        if self.action.draft is None:
            return Plan(None, steps=self.action.steps - self.plain[0])
        if self.action.draft not in self.drafts:
            self.drafts[self.action.draft] = build(self.model, self.action.draft, self.kv,
                                                   self.ngram, draft_head=self.draft_head)
        return Plan(self.drafts[self.action.draft], self.action.gamma)

    def report(self, result: BlockResult) -> None:
        seconds = result.seconds
        if self.ranks > 1:
            seconds = distributed.from_rank0(mx.array(seconds, mx.float32)).item()
        if self.action.draft is not None:
            self.controller.report(self.action, result.drafted, result.accepted, result.emitted,
                                   seconds)
            return
        self.plain[0] += result.emitted
        self.plain[1] += seconds
        if self.plain[0] >= self.action.steps:
            self._report_plain()

    def _report_plain(self):
        if self.plain and self.plain[0]:
            self.controller.report(self.action, 0, 0, self.plain[0], self.plain[1])
        self.plain = None

    def close(self) -> None:
        """The generation ended: report a plain run cut short, store what was measured."""
        self._report_plain()
        self.controller.close()
