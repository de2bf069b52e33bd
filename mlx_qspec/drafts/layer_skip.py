"""Layer-skip drafts: the same model with some transformer blocks passed over.

A forward whose precision names ``skip`` blocks runs every other block and adds nothing to
the skipped blocks' caches (their weights and KV are not read): the blocks pass their input
through when the current precision skips them (:func:`mlx_qspec.hooks.install`). The
verify runs all blocks over the drafted positions and so writes every block's KV for them,
as it already rewrites the draft's positions; the decoder rewinds each block's cache back
to where it stood, whatever each one appended (:func:`mlx_qspec.caches.rewind`).

Which blocks to skip for a share ``skip-<f>`` is calibrated (Draft & Verify / SWIFT-style,
no training): teacher-forced on real text (the start of Python stdlib files, present on
every machine with Python), a greedy search adds one block at a time, the one whose skipping
keeps the most top-1 agreement with the full model; the result is cached per model.
"""

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from .. import hooks, precision, store
from ..cache_dir import read_json, write_json
from ..calibration_text import calibration_tokens
from ..errors import UserError
from ..precision import Precision

CALIBRATION_SAMPLES, CALIBRATION_LENGTH = 1, 128  # forwards of 128 tokens (slow on MLX-CPU)
STORE = "skip.json"  # beside the measured costs (measured.json)
SHORTLIST = 6  # blocks tried at each greedy step: the best by their agreement when skipped alone


def check(model: nn.Module, p: Precision) -> None:
    """UserError unless ``p``'s skipped blocks exist in ``model`` and leave some to run."""
    n = len(model.layers)
    if p.skip_fraction is not None:
        raise UserError(
            f"draft {p.name!r} names a share of blocks, which is calibrated with the "
            "tokenizer: pass it through mlx_qspec.generate / stream_generate, or resolve it "
            "with mlx_qspec.drafts.layer_skip.resolve(model, tokenizer, draft)"
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
    by teacher-forced top-1 agreement with the full model on ``tokens`` (samples, length).
    ``progress(done, total)`` after each forward (minutes on a CPU: ~40 forwards of 128
    tokens for a 30-block model)."""
    n = len(model.layers)
    if n < 3:  # block 0 always runs and a draft must run one more: nothing left to choose
        raise UserError(f"draft skip-{fraction:g}: this model has {n} blocks; a skip draft "
                        "needs at least 3")
    hooks.install_skippable_blocks(model)
    count = max(1, min(round(fraction * n), n - 2))
    total = n + sum(min(SHORTLIST, n - 1 - k) for k in range(count))
    done = 0
    if progress:
        progress(done, total)

    def measured(value):  # counted once its forward has run (.item() evaluates it)
        nonlocal done
        done += 1
        if progress:
            progress(done, total)
        return value

    reference = mx.argmax(model(tokens)[:, :-1], axis=-1)
    mx.eval(reference)
    measured(reference)
    single = {i: measured(_agreement(model, tokens, reference, {i})) for i in range(1, n)}
    chosen, agreement = set(), 1.0
    while len(chosen) < count:
        shortlist = sorted((i for i in single if i not in chosen), key=single.get, reverse=True)
        scores = {i: measured(_agreement(model, tokens, reference, chosen | {i}))
                  for i in shortlist[:SHORTLIST]}
        best = max(scores, key=scores.get)
        chosen.add(best)
        agreement = scores[best]
    return Calibration(fraction, tuple(sorted(chosen)), agreement, single)


def calibrate_cached(model, tokenizer, fraction: float, progress=None) -> Calibration:
    """:func:`calibrate` on stdlib text, or its stored result for the same model (beside
    the cost tables); a corrupt entry is recomputed."""
    key = f"{store.fingerprint(model)}|{fraction:g}"
    stored = read_json(STORE)
    if (found := _entry(fraction, stored.get(key))) is not None:
        return found
    tokens = calibration_tokens(tokenizer, CALIBRATION_SAMPLES, CALIBRATION_LENGTH)
    result = calibrate(model, tokens, fraction, progress)
    stored[key] = dict(skip=list(result.skip), agreement=result.agreement, single=result.single)
    write_json(STORE, stored)
    return result


def cached_calibrations(model: nn.Module) -> list[Calibration]:
    """Every calibration stored for ``model`` (what ``auto`` may weigh without calibrating)."""
    prefix = store.fingerprint(model) + "|"
    found = [_entry(key[len(prefix):], entry) for key, entry in read_json(STORE).items()
             if key.startswith(prefix)]
    return [c for c in found if c is not None]


def _entry(fraction, entry) -> Calibration | None:
    """A stored calibration (``fraction``: a number or its text); None if missing or corrupt."""
    try:
        return Calibration(float(fraction), tuple(int(i) for i in entry["skip"]),
                           float(entry["agreement"]),
                           {int(k): float(v) for k, v in entry["single"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def resolve(model: nn.Module, tokenizer, p: Precision, progress=None) -> Precision:
    """``p`` with a calibrated skip set in place of its share of blocks (unchanged if none)."""
    if p.skip_fraction is None:
        return p
    found = calibrate_cached(model, tokenizer, p.skip_fraction, progress)
    return replace(p, skip=found.skip, skip_fraction=None)
