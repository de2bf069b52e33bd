"""``--draft auto``: the drafts a model can weigh, their prior acceptance, and the block
policy that picks one and its γ from the cost model (:mod:`mlx_qspec.cost`), or plain
decoding where none pays (saying why).

The candidates: the n-gram lookup (free), the precision drafts that read fewer bytes (the
upper planes of 8-bit weights and of a nested cache, alone and together) and the best
activation draft, and the layer-skip sets calibrated for this model before. After the
prefill, :class:`AutoPolicy` takes the forward costs at this context (stored, modeled on a
Mac, else timed), picks, and then adapts γ to the acceptance it sees, going plain once
drafting no longer pays.
"""

import mlx.nn as nn

from .. import cost, reads
from ..heads import mtp
from ..heads.level import HeadDraft, head_level, mtp_level
from ..caches import kv_mode
from ..policy import BlockResult, Plan
from ..precision import ACT_GROUP_SIZES, Precision
from ..quant.modes import draftable_layers
from . import layer_skip
from .cascade import build, runs
from .grammar import HEAD, MTP, NGRAM, parse_precision

# A checkpoint's MTP layers, before any is measured here: DeepSeek-V3's report puts the
# acceptance of its MTP module's token at 85-90 %; the running estimate takes over.
MTP_PRIOR = 0.85
HEAD_PRIOR = 0.3  # a trained head whose agreement was not measured (trained on the user's text)
from .ngram import Ngram


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
    names = ["w-upper", "kv-upper", "w-upper+kv-upper", activation_draft(model)]
    return [n for n in names if n and runs(model, n, kv)]


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


def weigh_heads(model, cache, table, priors: dict, draft_head) -> None:
    """Add the head levels the model can run to what ``auto`` weighs: the checkpoint's MTP
    layers (``mtp``) and a ``--draft-head`` (``head``), each at its acceptance — a trained
    head's agreement measured on held-back text, else :data:`MTP_PRIOR` / :data:`HEAD_PRIOR` —
    and at a plain step's
    cost × the bytes one of its steps reads ÷ a plain step's (bound by bytes, as the modeled
    drafts are)."""
    levels = {}
    if isinstance(mtp.attached(model), tuple):
        levels[MTP] = mtp_level(model)
    if draft_head is not None:
        levels[HEAD] = draft_head if isinstance(draft_head, HeadDraft) else head_level(model, draft_head)
    if not levels:
        return
    plain = reads.ReadCounter()
    cost.count_forward(model, cache, plain)
    for name, level in levels.items():
        table.draft[name] = table.verify_cost(1) * level.step_reads().bytes() / plain.bytes()
        default = MTP_PRIOR if name == MTP else HEAD_PRIOR
        priors[name] = level.agreement if level.agreement is not None else default


class AutoPolicy:
    """``auto`` as a block policy, made on a prefilled cache: forward costs at this context
    (cached per model, device and context; the lookup costs no forward), then the draft
    and γ the cost model favours (γ ≤ ``max_gamma``), or plain decoding. ``draft`` (a
    cascade, or None) and ``reason`` say what it chose and why."""

    def __init__(self, model, cache, ngram: Ngram = Ngram(), max_gamma: int | None = None,
                 draft_head=None):
        kv = kv_mode(cache)
        priors = auto_priors(model, kv)
        gamma_max = max_gamma or max(cost.GAMMAS)
        self.gammas = tuple(g for g in cost.GAMMAS if g <= gamma_max)
        self.table = cost.calibrate_cached(model, cache, [n for n in priors if n != NGRAM])
        self.table.draft[NGRAM] = 0.0
        weigh_heads(model, cache, self.table, priors, draft_head)
        choice = cost.choose(self.table, priors, gammas=self.gammas)
        self.name = choice.draft
        self.reason = f"{choice.reason};costs={self.table.source}"
        self.draft = None if choice.draft is None else build(model, choice.draft, kv, ngram,
                                                              draft_head=draft_head)
        self.estimate = None if choice.draft is None else cost.AcceptanceEstimate(
            priors[choice.draft])

    def plan(self) -> Plan:
        if self.draft is None:
            return Plan(None)
        choice = cost.choose(self.table, {self.name: self.estimate.value}, gammas=self.gammas)
        if choice.draft is None:  # drafting no longer pays: plain decoding from here on
            self.draft = None
            return Plan(None)
        return Plan(self.draft, choice.gamma)

    def report(self, result: BlockResult) -> None:
        """A block is ``accepted`` agreements and, if it was cut, one disagreement: drafts
        after the first rejection were never compared (counting them would make the
        per-token agreement the cost model expects look lower than it is)."""
        if result.drafted and self.estimate is not None:
            accepted = result.accepted
            self.estimate.update(accepted + (accepted < result.drafted), accepted)
