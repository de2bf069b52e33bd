"""How drafts are named: the terms, the levels, ``auto`` / ``none``, the help text, one parse.

A draft is a cascade of levels joined by ``>``, cheapest first, the verify (full precision,
``verify``) implied last: ``ngram>skip-0.4+kv-upper>verify``. A level is ``ngram`` (the
lookup, :mod:`.ngram`) or a way of reading the model — a
:class:`~mlx_qspec.precision.Precision` named by terms joined by ``+``, one per axis:
activations (``a8``, ``a4-g32``, …), weights (``w-upper``), the nested KV cache
(``kv-upper``), skipped blocks (``skip-3,14``, or a share ``skip-0.4`` calibrated per model).
A separate draft model (mlx-lm's ``--draft-model``) proposes below the named levels; its
level is called ``draft-model``. ``mtp`` (the checkpoint's own MTP layers) and ``head`` (a
head trained for the model, ``--draft-head DIR``) draft from the model's hidden state
(:mod:`mlx_qspec.heads`). ``none`` is plain decoding; ``auto`` lets the cost model
choose (:mod:`.auto`), which may also mean plain decoding.

:func:`parse` reads a name once into a :class:`DraftName`; :func:`check` adds what needs no
model (a ``kv-upper`` level needs a nested cache). What needs the model is checked when the
cascade is built (:func:`mlx_qspec.drafts.cascade.build`).
"""

import textwrap
from dataclasses import dataclass

from ..errors import UserError
from ..precision import ACT_BITS, ACT_GROUP_SIZES, UPPER, VERIFY_NAME, Precision

NONE = "none"
AUTO = "auto"
NGRAM = "ngram"
MTP, HEAD = "mtp", "head"  # trained self-drafts (mlx_qspec.heads): a checkpoint's MTP layers, --draft-head
NAMED_LEVELS = (NGRAM, MTP, HEAD)  # levels that are not a way of reading the model
DRAFT_MODEL = "draft-model"
SEPARATOR = ">"
NESTED_KV = "nested"

# Every single term a precision name may contain, and what it sets.
TERMS: dict[str, dict] = {
    **{
        f"a{bits}{'' if g is None else f'-g{g}'}": dict(act_bits=bits, act_group_size=g)
        for bits in sorted(ACT_BITS, reverse=True)
        for g in (None, *ACT_GROUP_SIZES)
    },
    "w-upper": dict(weights=UPPER),
    "kv-upper": dict(kv=UPPER),
}
SKIP = "skip-"  # a term's prefix: skip-<fraction> or skip-<i>,<j>,…


def _skip_fields(term: str) -> dict:
    """``skip-0.4`` → a fraction to calibrate; ``skip-3,14`` → those blocks."""
    spec = term[len(SKIP):]
    try:
        if "." in spec:
            return dict(skip_fraction=float(spec))
        return dict(skip=tuple(sorted(int(i) for i in spec.split(","))))
    except ValueError:
        raise UserError(
            f"bad layer-skip term {term!r}: use skip-<fraction> (e.g. skip-0.4) or "
            "skip-<block>,<block>,… (e.g. skip-3,14)"
        ) from None


def parse_precision(name: str) -> Precision:
    """``'a8+kv-upper'`` → ``Precision(act_bits=8, kv='upper')``; UserError naming the bad
    part for an unknown term or two terms on one axis (``a8+a4``)."""
    terms = [t.strip() for t in str(name).strip().lower().split("+")]
    fields, axes = {}, {}
    for term in terms:
        if not term.startswith(SKIP) and term not in TERMS:
            raise UserError(
                f"unknown draft term {term!r} in {name!r}; terms: {', '.join(TERMS)} "
                "(combine with '+', e.g. a8+kv-upper)"
            )
        axis = "activations" if term.startswith("a") else term.split("-")[0]
        if axis in axes:
            raise UserError(f"draft {name!r} reads {axis} two ways ({axes[axis]} and {term})")
        axes[axis] = term
        fields.update(_skip_fields(term) if term.startswith(SKIP) else TERMS[term])
    return Precision(**fields)


@dataclass(frozen=True)
class DraftName:
    """A draft name read once: ``auto``, or its levels cheapest first (a name of
    :data:`NAMED_LEVELS` or a :class:`Precision`); no levels is ``none`` (plain decoding, or
    a draft model alone)."""

    levels: tuple = ()
    auto: bool = False

    @property
    def none(self) -> bool:
        return not self.auto and not self.levels

    @property
    def name(self) -> str:
        if self.auto:
            return AUTO
        return SEPARATOR.join(x if isinstance(x, str) else x.name for x in self.levels) or NONE

    @property
    def reads_kv_upper(self) -> bool:
        return any(isinstance(x, Precision) and x.kv == UPPER for x in self.levels)

    def __str__(self):
        return self.name


def _head_level(part: str) -> str:
    """``head+w-upper`` / ``mtp+w-upper``: a head level reading 8-bit layers (its own, the
    model's LM head) as their upper plane; the one precision a head level takes."""
    base, rest = part.split("+", 1)
    if parse_precision(rest).terms != ["w-upper"]:
        raise UserError(f"draft level {part!r}: a {base} level reads weights at full precision "
                        f"or as {base}+w-upper")
    return part


def head_precision(part: str) -> Precision:
    """How a head level (``head``, ``head+w-upper``, ``mtp`` …) reads weights."""
    _, _, rest = part.partition("+")
    return parse_precision(rest) if rest else Precision()


def parse(name) -> DraftName:
    """A draft name (``none``, ``auto``, ``ngram>a8-g32``, a :class:`Precision`, or an
    already parsed :class:`DraftName`) as a :class:`DraftName`; UserError naming the bad
    part."""
    if isinstance(name, DraftName):
        return name
    if isinstance(name, Precision):
        return DraftName((name,))
    if name is None or str(name).strip().lower() == NONE:
        return DraftName()
    if str(name).strip().lower() == AUTO:
        return DraftName(auto=True)
    parts = [p.strip().lower() for p in str(name).split(SEPARATOR)]
    if len(parts) > 1 and parts[-1] == VERIFY_NAME:  # the verify is implied last
        parts.pop()
    if not all(parts):
        raise UserError(f"draft {name!r} has an empty level; write levels as ngram>a8-g32>verify")
    levels = []
    for part in parts:
        try:
            levels.append(part if part in NAMED_LEVELS else
                          _head_level(part) if part.split("+")[0] in (MTP, HEAD) else
                          parse_precision(part))
        except UserError as e:
            raise UserError(f"{e}; or {NONE} / {AUTO} / {' / '.join(NAMED_LEVELS)}") from None
    return DraftName(tuple(levels))


def check(name, kv_mode: str) -> DraftName:
    """:func:`parse`, and what needs no model: a ``kv-upper`` level needs ``kv_mode``
    nested (the CLI, chat and server check this before the model loads)."""
    draft = parse(name)
    if draft.reads_kv_upper and kv_mode != NESTED_KV:
        raise UserError(f"draft {draft.name!r} reads the upper plane of a nested KV cache: "
                        f"pass --kv-mode nested (got --kv-mode {kv_mode})")
    return draft


def _describe(term: str) -> str:
    if term == "w-upper":
        return "8-bit weights read as their upper 4-bit plane (half the weight bytes)"
    if term == "kv-upper":
        return "nested KV cache read as its upper 4-bit plane (needs --kv-mode nested)"
    p = parse_precision(term)
    w = "W4A4" if p.act_bits == 4 else "W4A8"
    per = "token" if p.act_group_size is None else f"{p.act_group_size} input features"
    return f"{w}: {p.act_bits}-bit symmetric activations, one scale per {per}"


def draft_help() -> str:
    """One line per ``--draft`` term, for the CLI's help text."""
    lines = [
        f"{AUTO}: the cost model picks a draft and its length, or plain decoding where "
        "none can pay (it says why)",
        f"{NONE}: no speculation, plain decoding",
    ]
    lines += [f"{term}: {_describe(term)}" for term in TERMS]
    lines.append("combine terms with '+', one per axis: e.g. a8-g32+kv-upper, w-upper+kv-upper")
    return "\n".join(lines)


def drafts_epilog() -> str:
    """The ``draft modes`` section closing the CLIs' ``--help``."""
    return textwrap.fill(
        "draft modes (--draft). Which of them a model can run depends on the model: w-upper "
        "needs 8-bit weights, activation drafts need affine-quantized linears whose input "
        "sizes the group divides, kv-upper needs --kv-mode nested. A draft the model cannot "
        "run is refused with the reason; auto weighs only those it can run.", 88
    ) + "\n  " + draft_help().replace("\n", "\n  ") + """
  ngram: no forward: the continuation of the context's last --ngram-min..--ngram-max
    tokens where they occurred before (pays where output copies input)
  skip-3,14 / skip-0.3: the model without those blocks (a share: calibrated, cached)
  mtp: the checkpoint's own MTP layers (one block over the model's hidden state)
  head: a head trained for the model (python -m mlx_qspec.train_head), with --draft-head DIR
  cascades, cheapest first: ngram>skip-0.3>verify (each level checks the one below)
  --draft-model M: a smaller model with the same tokenizer drafts first"""
