"""The model's vocabulary: how many token ids it has rows for, and the check every token-id
input passes (an id outside ``[0, vocab)`` indexes the embedding out of bounds: MLX reads
whatever memory lies there, or crashes the process on a negative id)."""

import mlx.nn as nn

from .errors import UserError


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's token embedding, as its config gives them (None: it does not say)."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return size if size is not None else (getattr(args, "text_config", None) or {}).get("vocab_size")


def check_token_ids(ids, vocab_size: int | None, what: str) -> list[int]:
    """``ids`` as a list of ints, each in ``[0, vocab_size)``; else a UserError naming
    ``what`` (the field or argument) and the first bad value."""
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise UserError(f"{what}[{i}] must be an integer token id, got {t!r}")
        if t < 0 or vocab_size is not None and t >= vocab_size:
            top = "" if vocab_size is None else f" below {vocab_size} (the vocabulary size)"
            raise UserError(f"{what}[{i}] must be a token id from 0{top}, got {t}")
        out.append(t)
    return out
