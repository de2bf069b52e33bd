"""A draft is a cascade of levels, cheapest first: ``ngram>skip-0.4+kv-upper>verify``.

Each level is the n-gram lookup (:class:`~.ngram.Ngram`: no forward at all), a separate
smaller model (:class:`DraftModel`, mlx-lm's ``--draft-model``, with its own KV cache), or a
way of reading the model (a :class:`~mlx_qspec.precision.Precision`). The cheapest level
proposes; each level above checks the proposals with one forward over them, keeps what it
agrees with (speculative sampling's rule, so its output is distributed as its own reading of
the model) and extends them; only its survivors reach the next level, and the verify (full
precision) is always last. A single name (``a8``, ``ngram``) is a cascade of one level.

The level contract. A precision level is run by the decoder (its forwards are the model's,
on the shared cache). Any other level proposes by itself:
``level.proposals(context, k, draw) -> (tokens, distributions)`` — up to ``k`` token ids
and, for each, the log-distribution it was drawn from (None: a point mass on it).
``context`` (:class:`Context`) holds the row's token ids so far (prompt, output and this
block's drafts) and, for a level that declares ``reads_hidden = True``, the final hidden
states (the LM head's input) of every position cached since it last ran;
``draw(logprobs)`` draws one token with the row's sampler and key (None where
``--draft-p-min`` ends the block).
``reads_context`` says the level needs the token ids (the decoder then keeps them).
"""

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .. import precision, reads, recurrent
from ..errors import UserError
from ..heads.level import HeadDraft, head_level, mtp_level
from ..kv_cache import make_rotating_cache
from ..precision import FULL_PRECISION, UPPER, Precision
from ..quant.modes import draftable_layers, eight_bit_layers, input_dims
from ..caches import commit, rewind
from ..vocabulary import vocabulary_size
from . import grammar, layer_skip
from .grammar import DRAFT_MODEL, NGRAM, SEPARATOR
from .ngram import Ngram


@dataclass
class Context:
    """What a level proposes from: the row's token ids so far (its pending token, then the
    block's proposals so far), the model's final hidden states of the positions cached since
    the level last ran (levels that read them), where its reads are counted, and how many
    of the tokens are in the model's cache."""

    tokens: list
    hidden: Any = None
    reads: Any = None
    cached: Any = None  # how many of ``tokens`` the model's cache holds (the row's, not the block's)


class DraftModel:
    """A second, smaller model with the same vocabulary as a proposing level. Its cache
    mirrors ``tokens``; each block it is rewound to what it shares with the context and
    fed the rest (the tokens the verify emitted since). Its sliding windows are rewindable
    ones; where a block rewinds one further than it can go, the cache starts over. One
    per request: the cache is the request's."""

    name = DRAFT_MODEL
    reads_context = True
    reads_hidden = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = make_rotating_cache(model)
        self.tokens: list[int] = []

    def catch_up(self, context: list[int]) -> list[int]:
        """Rewind the cache to its common prefix with ``context``; the tokens left to feed."""
        common = 0
        for a, b in zip(self.tokens, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # the last token is always fed: its logits
        try:
            rewind(self.cache, common)
        except ValueError:  # a window holds too little to go back that far
            self.cache, common = make_rotating_cache(self.model), 0
        commit(self.cache)  # what it shares with the context is settled: never rewound
        self.tokens = context[:common]
        return context[common:]

    def proposals(self, context: Context, k: int, draw: Callable):
        """Up to ``k`` tokens drawn autoregressively from the draft model on its own cache."""
        pending = self.catch_up(context.tokens)
        tokens, q = [], []
        for _ in range(k):
            with precision.reading(FULL_PRECISION), reads.counting(context.reads):
                logits = self.model(mx.array(pending, mx.uint32)[None], cache=self.cache)[0, -1:]
            self.tokens += pending
            drawn = draw(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            if drawn is None:
                break
            t, qi = drawn
            tokens.append(t)
            q.append(qi)
            pending = [t]
        return tokens, q

    def fresh(self) -> "DraftModel":
        """The same draft model with a cache of its own (for another request)."""
        return DraftModel(self.model)


@dataclass(frozen=True)
class Cascade:
    """The levels below the verify, cheapest first: ``Ngram`` settings, a ``DraftModel``,
    a ``Precision``, or a head (:class:`~mlx_qspec.heads.level.HeadDraft`: an MTP layer or
    a trained head, reading the hidden states)."""

    levels: tuple

    @property
    def name(self) -> str:
        return SEPARATOR.join(NGRAM if isinstance(x, Ngram) else x.name for x in self.levels)

    @property
    def reads_context(self) -> bool:
        """Whether a level needs the token ids of the context (the lookup, a draft model)."""
        return any(getattr(x, "reads_context", False) for x in self.levels)

    @property
    def reads_hidden(self) -> bool:
        """Whether a level needs the final hidden states of the positions cached since it
        last ran."""
        return any(getattr(x, "reads_hidden", False) for x in self.levels)

    @property
    def precision(self) -> Precision | None:
        """The one precision of a single-precision cascade (what a batch can share), else None."""
        (level,) = self.levels if len(self.levels) == 1 else (None,)
        return level if isinstance(level, Precision) else None

    def fresh(self) -> "Cascade":
        """The same cascade with fresh per-request state (a draft model's own cache)."""
        return Cascade(tuple(x.fresh() if isinstance(x, (DraftModel, HeadDraft)) else x
                             for x in self.levels))

    def __str__(self):
        return self.name


def check_draft(model: nn.Module, name, kv_mode: str = "fp") -> Precision | None:
    """Parse a precision name (``none``/None → None) and make sure ``model`` with a
    ``kv_mode`` cache can run it: UserError naming what to pass instead, before any compute."""
    if name is None or str(name).strip().lower() == grammar.NONE:
        return None
    p = name if isinstance(name, Precision) else grammar.parse_precision(name)
    if p.is_full:
        raise UserError(f"draft {name!r} reads nothing with fewer bits; use --draft none")
    grammar.check(p, kv_mode)  # (kv-upper needs the nested cache)
    _check_upper_weights(model, p, p.name, "; use an -8bit model, or a8-g32 / kv-upper")
    if p.act_bits is not None:
        layers = draftable_layers(model)
        if not layers:
            raise UserError(f"draft {p.name!r} needs a model with affine-quantized linear "
                            "layers; this model has none (quantize it to 4 bits first)")
        g = p.act_group_size
        for path, layer in layers if g else ():
            if input_dims(layer) % g:
                raise UserError(f"draft {p.name!r}: activation group size {g} does not divide "
                                f"the input size {input_dims(layer)} of {path}")
    return p


def _check_upper_weights(model: nn.Module, p: Precision, name: str, hint: str = "") -> None:
    """``w-upper`` reads 8-bit layers as their upper plane: UserError where there are none."""
    if p.weights == UPPER and not eight_bit_layers(model):
        raise UserError(f"draft {name!r} reads 8-bit weights as their upper plane, and this "
                        f"model has no 8-bit layers{hint}")


def runs(model: nn.Module, name, kv_mode: str) -> bool:
    """Whether ``model`` with a ``kv_mode`` cache can run the precision ``name``."""
    try:
        check_draft(model, name, kv_mode)
    except ValueError:
        return False
    return True


def build(model: nn.Module, name, kv_mode: str = "fp", ngram: Ngram = Ngram(),
          draft_model: DraftModel | None = None, draft_head=None) -> Cascade:
    """The cascade ``name`` denotes (a name, :class:`~.grammar.DraftName`,
    :class:`Precision` or :class:`Cascade`), ``draft_model`` (if given) below its levels
    (``none`` then leaves the draft model alone), each level checked against ``model`` and
    its cache: UserError naming what to pass instead, before any compute. ``draft_head``: the
    ``head`` level's head (a :class:`HeadDraft`, used as given: one per conversation; or its
    directory)."""
    if why := recurrent.unsupported(model):
        raise UserError(f"cannot speculate: {why}")
    if isinstance(name, Cascade):
        levels = list(name.levels)
    else:
        levels = [_named_level(model, x, ngram, draft_head) if isinstance(x, str) else x
                  for x in grammar.parse(name).levels]
    if draft_model is not None:
        if vocabulary_size(model) != (vocab := vocabulary_size(draft_model.model)):
            raise UserError(f"the draft model's vocabulary ({vocab} tokens) is not the model's "
                            f"({vocabulary_size(model)}): a draft model must share the tokenizer")
        if why := recurrent.unsupported(draft_model.model):
            raise UserError(f"cannot draft with the draft model: {why}")
        if levels and isinstance(levels[0], Ngram):
            raise UserError("a draft model and ngram are both first levels: pick one")
        levels.insert(0, draft_model)
    for i, level in enumerate(levels):
        if isinstance(level, Ngram) and i:
            raise UserError(f"draft {name!r}: ngram proposes without reading the model, so it "
                            "can only be the first level")
        if isinstance(level, Precision):
            check_draft(model, level, kv_mode)
            layer_skip.check(model, level)
    for below, above in zip(levels, levels[1:]):
        if (isinstance(below, Precision) and isinstance(above, Precision)
                and not set(above.skip) <= set(below.skip)):
            raise UserError(f"draft {name!r}: {above.name} skips blocks that {below.name} below "
                            "it runs (a level checks with at least the blocks of the levels below)")
    cascade = Cascade(tuple(levels))
    if len(set(cascade.name.split(SEPARATOR))) < len(levels):
        raise UserError(f"draft {name!r} repeats a level")
    return cascade


def _named_level(model, name: str, ngram: Ngram, draft_head):
    """The level a name stands for: the lookup, the checkpoint's MTP layers, or the head."""
    if name == NGRAM:
        return ngram
    at = grammar.head_precision(name)
    _check_upper_weights(model, at, name)
    if name.startswith(grammar.MTP):
        return mtp_level(model, at)
    if isinstance(draft_head, HeadDraft):  # its cache goes on with the conversation it drafts for
        return draft_head if draft_head.precision == at else draft_head.reading(at)
    return head_level(model, draft_head, at)


def resolve(model: nn.Module, tokenizer, name, progress=None):
    """The draft ``name`` (parsed) with every ``skip-<share>`` level calibrated to a block
    set for ``model`` (its calibration text needs the tokenizer); objects pass unchanged."""
    if not isinstance(name, (str, grammar.DraftName)):
        return name
    draft = grammar.parse(name)
    levels = tuple(x if isinstance(x, str) else layer_skip.resolve(model, tokenizer, x, progress)
                   for x in draft.levels)
    return grammar.DraftName(levels, draft.auto)
