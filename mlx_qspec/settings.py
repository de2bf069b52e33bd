"""Every decoding setting in one value, each checked by one function.

:class:`Settings` holds what a generation decodes with: the draft (parsed once), γ, the
draft's p-min, the KV cache (mode, bits, group, start, window), the n-gram lookup, the
prefill chunk and the sampling values. :func:`check` is the one check of each value; the
command lines' argparse types (:mod:`mlx_qspec.cli`), the API (:func:`resolve`), the
server's flags and its request checks all call it. The checks that join values (a KV mode
and its bits, a draft and its cache) run when a Settings is made.

Messages name settings as the API does (``num_draft_tokens``); :class:`SettingError` can
also name them as the command line does (``--num-draft-tokens``).
"""

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, DEFAULT_QUANTIZED_KV_START

from .drafts import grammar
from .drafts.ngram import Ngram
from .errors import SettingError, UserError
from .kv_cache import GROUP_SIZES, KV_MODES, MAX_DRAFT_TOKENS

DEFAULT_DRAFT_TOKENS = 4  # γ of an explicit draft when none is given
KV_BITS = (4, 8)
SEED_MAX = 2**64 - 1


def _integer(value, low: int, high: Optional[int] = None) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (
            high is None or value <= high):
        return None
    span = f">= {low}" if high is None else f"from {low} to {high}"
    return f"must be an integer {span}, got {value!r}"


def _number(value, low: float, high: float = math.inf) -> Optional[str]:
    """NaN and infinities are refused: they sample garbage without an error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low <= value <= high:
        return None
    bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
    return f"must be a finite number {bounds}, got {value!r}"


def _probability_below_1(value) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return None  # (NaN fails the comparison)
    return f"must be a number in [0, 1), got {value!r}"


def _choice(value, choices) -> Optional[str]:
    if value in choices and not isinstance(value, bool):
        return None
    return f"must be one of {', '.join(map(str, choices))}, got {value!r}"


def _literal(x) -> str:
    """``x`` as text inside a message template (its braces are not setting names)."""
    return str(x).replace("{", "{{").replace("}", "}}")


def _optional(check):
    return lambda v: None if v is None else check(v)


# One check per setting: the problem with a value ("must be …, got …"), or None.
CHECKS = {
    "num_draft_tokens": _optional(lambda v: _integer(v, 1, MAX_DRAFT_TOKENS)),
    "draft_p_min": _probability_below_1,
    "kv_mode": lambda v: _choice(v, KV_MODES),
    "kv_bits": _optional(lambda v: _choice(v, KV_BITS)),
    "kv_group_size": lambda v: _choice(v, GROUP_SIZES),
    "quantized_kv_start": lambda v: _integer(v, 0),
    "max_kv_size": _optional(lambda v: _integer(v, 1)),
    "prefill_step_size": lambda v: _integer(v, 1),
    "temp": lambda v: _number(v, 0),
    "top_p": lambda v: _number(v, 0, 1),
    "min_p": lambda v: _number(v, 0, 1),
    "top_k": lambda v: _integer(v, 0),
    "min_tokens_to_keep": lambda v: _integer(v, 1),
    "xtc_probability": lambda v: _number(v, 0, 1),
    "xtc_threshold": lambda v: _number(v, 0, 0.5),
    "seed": _optional(lambda v: _integer(v, 0, SEED_MAX)),
}


def check(name: str, value):
    """``value`` if it is a valid ``name``, else SettingError naming both."""
    if problem := CHECKS[name](value):
        raise SettingError(f"{{{name}}} {_literal(problem)}", problem)
    return value


@dataclass(frozen=True)
class Settings:
    """How a generation decodes (see the module docstring). ``draft`` may be given as a name
    and is kept parsed (:class:`~mlx_qspec.drafts.grammar.DraftName`); a draft model
    proposes below its levels (``none``: alone)."""

    draft: Any = grammar.NONE
    num_draft_tokens: Optional[int] = None
    draft_p_min: float = 0.0
    kv_mode: str = "fp"
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    max_kv_size: Optional[int] = None
    ngram: Ngram = field(default_factory=Ngram)
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    min_tokens_to_keep: int = 1
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    seed: Optional[int] = None

    def __post_init__(self):
        for name in CHECKS:
            check(name, getattr(self, name))
        if not isinstance(self.ngram, Ngram):
            raise SettingError(f"{{ngram}} must be an Ngram, got {_literal(repr(self.ngram))}")
        for name in ("kv_bits", "max_kv_size"):
            if self.kv_mode != "fp" and getattr(self, name) is not None:
                raise SettingError(f"{{{name}}} applies to {{kv_mode}} fp only, got {{kv_mode}} "
                                   f"{self.kv_mode}")
        try:
            draft = grammar.check(self.draft, self.kv_mode)
        except UserError as e:
            raise SettingError(f"{{draft}} {_literal(self.draft)}: {_literal(e)}") from None
        object.__setattr__(self, "draft", draft)

    @property
    def gamma(self) -> int:
        """Drafts per block of an explicit draft."""
        return self.num_draft_tokens or DEFAULT_DRAFT_TOKENS

    @property
    def plain(self) -> bool:
        return self.draft.none

    def sampling(self) -> dict:
        """The sampling values, as :func:`mlx_qspec.sampling.make_sampler` takes them."""
        return {k: getattr(self, k) for k in ("temp", "top_p", "min_p", "min_tokens_to_keep",
                                               "top_k", "xtc_probability", "xtc_threshold")}

    def but(self, **changes) -> "Settings":
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)


NAMES = tuple(f.name for f in fields(Settings))


def resolve(kwargs: dict, **given) -> Settings:
    """The settings of an API call: its ``settings=`` value (removed from ``kwargs``; the
    defaults without one) changed by the setting names beside it and ``given``. Either way
    the setting names leave ``kwargs``; None for one means not given."""
    settings = kwargs.pop("settings", None) or Settings()
    changes = {k: kwargs.pop(k) for k in NAMES if k in kwargs} | given
    return settings.but(**{k: v for k, v in changes.items() if v is not None})
