"""Layer-skip drafts: the same model with some transformer blocks passed over.

A forward whose precision names ``skip`` blocks runs every other block and adds nothing to
the skipped blocks' caches (their weights and KV are not read). The verify runs all blocks
over the drafted positions and so writes every block's KV for them, as it already rewrites
the draft's positions; the loop trims each block's cache back to where it stood, whatever
each one appended.

Which blocks to skip for a share ``skip-<f>`` is calibrated (Draft & Verify / SWIFT-style,
no training): teacher-forced on real text (the start of Python stdlib files, present on
every machine with Python), a greedy search adds one block at a time, the one whose skipping
keeps the most top-1 agreement with the full model; the result is cached per model.
"""

import json
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from . import precision
from .cost import cache_path, fingerprint, read_store
from .errors import UserError
from .precision import Precision
from .rotate import calibration_tokens

CALIBRATION_SAMPLES, CALIBRATION_LENGTH = 1, 128  # ~40 forwards of 128 tokens (slow on MLX-CPU only)
STORE = "skip.json"  # beside the cost tables
SHORTLIST = 6  # blocks tried at each greedy step: the best by their agreement when skipped alone

_skippable_classes: dict[type, type] = {}


def _skippable(cls: type) -> type:
    """A subclass of a transformer block class that returns its input when the current
    precision skips it (its ``skip_index``)."""
    if cls not in _skippable_classes:
        def __call__(self, x, *args, **kwargs):
            if self.skip_index in precision.current().skip:
                return x
            return cls.__call__(self, x, *args, **kwargs)

        _skippable_classes[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _skippable_classes[cls]


def install(model: nn.Module) -> nn.Module:
    """Make every transformer block skippable, in place (no weight moves; idempotent)."""
    for i, block in enumerate(model.layers):
        if type(block) not in _skippable_classes.values():
            block.__class__ = _skippable(type(block))
        block.skip_index = i
    return model


def check(model: nn.Module, p: Precision) -> None:
    """UserError unless ``p``'s skipped blocks exist in ``model`` and leave some to run."""
    n = len(model.layers)
    if p.skip_fraction is not None:
        raise UserError(
            f"draft {p.name!r} names a share of blocks, which is calibrated with the "
            "tokenizer: pass it through mlx_qspec.generate / stream_generate, or resolve it "
            "with mlx_qspec.layer_skip.resolve(model, tokenizer, draft)"
        )
    if p.skip and (p.skip[-1] >= n or len(p.skip) >= n - 1):
        raise UserError(f"draft {p.name!r}: this model has blocks 0..{n - 1} and block 0 always runs")


@dataclass(frozen=True)
class Calibration:
    """The blocks a share ``fraction`` skips, and their measured top-1 agreement."""

    fraction: float
    skip: tuple[int, ...]
    agreement: float
    single: dict  # block → agreement when it alone is skipped


def _agreement(model, tokens, reference, skip) -> float:
    with precision.reading(Precision(skip=tuple(sorted(skip)))):
        top = mx.argmax(model(tokens)[:, :-1], axis=-1)
    return (top == reference).astype(mx.float32).mean().item()


def calibrate(model: nn.Module, tokens: mx.array, fraction: float, progress=None) -> Calibration:
    """Greedy search for ``round(fraction · blocks)`` blocks to skip (block 0 never), scored
    by teacher-forced top-1 agreement with the full model on ``tokens`` (samples, length)."""
    install(model)
    n = len(model.layers)
    count = max(1, min(round(fraction * n), n - 2))
    reference = mx.argmax(model(tokens)[:, :-1], axis=-1)
    single = {}
    for i in range(1, n):
        single[i] = _agreement(model, tokens, reference, {i})
        if progress:
            progress(f"skip calibration: block {i} alone keeps {single[i]:.3f}")
    chosen, agreement = set(), 1.0
    while len(chosen) < count:
        shortlist = sorted((i for i in single if i not in chosen), key=single.get, reverse=True)
        scores = {i: _agreement(model, tokens, reference, chosen | {i}) for i in shortlist[:SHORTLIST]}
        best = max(scores, key=scores.get)
        chosen.add(best)
        agreement = scores[best]
        if progress:
            progress(f"skip calibration: {len(chosen)}/{count} blocks, agreement {agreement:.3f}")
    return Calibration(fraction, tuple(sorted(chosen)), agreement, single)


def calibrate_cached(model, tokenizer, fraction: float, progress=None) -> Calibration:
    """:func:`calibrate` on stdlib text, or its stored result for the same model (beside
    the cost tables); a corrupt entry is recomputed."""
    key = f"{fingerprint(model)}|{fraction:g}"
    path = cache_path().with_name(STORE)
    store = read_store(path)
    try:
        return _entry(fraction, store[key])
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    tokens = calibration_tokens(tokenizer, CALIBRATION_SAMPLES, CALIBRATION_LENGTH)
    result = calibrate(model, tokens, fraction, progress)
    store[key] = dict(skip=list(result.skip), agreement=result.agreement, single=result.single)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1, sort_keys=True))
    return result


def cached_calibrations(model: nn.Module) -> list[Calibration]:
    """Every calibration stored for ``model`` (what ``auto`` may weigh without calibrating)."""
    prefix = fingerprint(model) + "|"
    out = []
    for key, entry in read_store(cache_path().with_name(STORE)).items():
        if key.startswith(prefix):
            try:
                out.append(_entry(float(key[len(prefix):]), entry))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
    return out


def _entry(fraction: float, entry) -> Calibration:
    return Calibration(fraction, tuple(int(i) for i in entry["skip"]), float(entry["agreement"]),
                       {int(k): float(v) for k, v in entry["single"].items()})


def resolve(model: nn.Module, tokenizer, p: Precision, progress=None) -> Precision:
    """``p`` with a calibrated skip set in place of its share of blocks (unchanged if none)."""
    if p.skip_fraction is None:
        return p
    found = calibrate_cached(model, tokenizer, p.skip_fraction, progress)
    return replace(p, skip=found.skip, skip_fraction=None)
