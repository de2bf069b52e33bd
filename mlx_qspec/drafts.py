"""A draft is a cascade of levels, cheapest first: ``ngram>skip-0.4+kv-upper>verify``.

Each level is the n-gram lookup (``ngram``: no forward at all), a separate smaller model
(:class:`DraftModel`, mlx-lm's ``--draft-model``, with its own KV cache), or a way of
reading the model (a :class:`~mlx_qspec.precision.Precision` name). The cheapest level proposes; each
level above checks the proposals with one forward over them, keeps what it agrees with
(speculative sampling's rule, so its output is distributed as its own reading of the model)
and extends them; only its survivors reach the next level, and the verify (full precision)
is always last. A single name (``a8``, ``ngram``) is a cascade of one level.
"""

from dataclasses import dataclass

import mlx.nn as nn

from . import layer_skip
from .errors import UserError
from .kv_cache import make_rotating_cache
from .ngram import Ngram
from .precision import VERIFY_NAME, Precision, parse
from .quant.modes import AUTO, NONE, check_draft
from .vocabulary import vocabulary_size

NGRAM = "ngram"
DRAFT_MODEL = "draft-model"
SEPARATOR = ">"


class DraftModel:
    """A second, smaller model with the same vocabulary as a proposing level. Its cache
    mirrors ``tokens``; each block it is trimmed to what it shares with the context and
    fed the rest (the tokens the verify emitted since). Its sliding windows are rewindable
    ones; where a block rewinds one further than it can go, the cache starts over."""

    name = DRAFT_MODEL

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = make_rotating_cache(model)
        self.tokens: list[int] = []

    def catch_up(self, context: list[int]) -> list[int]:
        """Trim the cache to its common prefix with ``context``; the tokens left to feed."""
        common = 0
        for a, b in zip(self.tokens, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # the last token is always fed: its logits
        try:
            for c in self.cache:
                c.trim(c.offset - common)
        except ValueError:  # a window holds too little to go back that far
            self.cache, common = make_rotating_cache(self.model), 0
        for c in self.cache:  # what it shares with the context is settled
            if hasattr(c, "commit"):
                c.commit()
        self.tokens = context[:common]
        return context[common:]


@dataclass(frozen=True)
class Cascade:
    """The levels below the verify, cheapest first: ``Ngram`` settings or a ``Precision``."""

    levels: tuple

    @property
    def name(self) -> str:
        return SEPARATOR.join(NGRAM if isinstance(x, Ngram) else x.name for x in self.levels)

    @property
    def reads_context(self) -> bool:
        """Whether a level needs the token ids of the context (the lookup, a draft model)."""
        return isinstance(self.levels[0], (Ngram, DraftModel))

    def __str__(self):
        return self.name


def parse_levels(name: str) -> list[str]:
    """``'ngram > a8+kv-upper > verify'`` → ``['ngram', 'a8+kv-upper']`` (the trailing
    ``verify`` is implied); UserError for an empty level."""
    parts = [p.strip().lower() for p in str(name).split(SEPARATOR)]
    if len(parts) > 1 and parts[-1] == VERIFY_NAME:
        parts.pop()
    if not all(parts):
        raise UserError(f"draft {name!r} has an empty level; write levels as ngram>a8-g32>verify")
    return parts


def check(model: nn.Module, name, kv_mode: str = "fp", ngram: Ngram = Ngram(),
          draft_model: DraftModel | None = None) -> Cascade:
    """The cascade ``name`` denotes (below it ``draft_model``, if given; ``none`` then
    leaves the draft model alone), each level checked against ``model`` and its cache
    (UserError naming what to pass instead, before any compute)."""
    if isinstance(name, Cascade):
        levels = list(name.levels)
    elif isinstance(name, Precision):
        levels = [name]
    elif draft_model is not None and (name is None or str(name).strip().lower() == NONE):
        levels = []
    else:
        levels = [ngram if part == NGRAM else parse(part) for part in parse_levels(name)]
    if draft_model is not None:
        _check_vocabulary(model, draft_model.model)
        if levels and isinstance(levels[0], Ngram):
            raise UserError("a draft model and ngram are both first levels: pick one")
        levels.insert(0, draft_model)
    for i, level in enumerate(levels):
        if isinstance(level, DraftModel):
            continue
        if isinstance(level, Ngram):
            if i:
                raise UserError(
                    f"draft {name!r}: ngram proposes without reading the model, so it can only "
                    "be the first level"
                )
            continue
        check_draft(model, level, kv_mode)
        layer_skip.check(model, level)
    for below, above in zip(levels, levels[1:]):
        if isinstance(below, Precision) and isinstance(above, Precision) and not set(above.skip) <= set(below.skip):
            raise UserError(
                f"draft {name!r}: {above.name} skips blocks that {below.name} below it runs "
                "(a level checks with at least the blocks of the levels below)"
            )
    cascade = Cascade(tuple(levels))
    if len(set(cascade.name.split(SEPARATOR))) < len(levels):
        raise UserError(f"draft {name!r} repeats a level")
    return cascade


def _check_vocabulary(model: nn.Module, draft: nn.Module):
    if vocabulary_size(model) != vocabulary_size(draft):
        raise UserError(
            f"the draft model's vocabulary ({vocabulary_size(draft)} tokens) is not the model's "
            f"({vocabulary_size(model)}): a draft model must share the tokenizer"
        )


def resolve(model: nn.Module, tokenizer, name, progress=None):
    """``name`` with every ``skip-<share>`` level calibrated to a block set for ``model``
    (its calibration text needs the tokenizer); ``auto``, ``none`` and objects unchanged."""
    if not isinstance(name, str) or name.strip().lower() in (AUTO, NONE):
        return name
    return SEPARATOR.join(
        part if part == NGRAM else layer_skip.resolve(model, tokenizer, parse(part), progress).name
        for part in parse_levels(name)
    )
