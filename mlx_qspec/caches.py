"""What the decoder asks of a list of per-layer caches: where it stands, how to go back.

The rewind contract. The decoder rewinds every layer's cache through :func:`rewind` (back to
a position), built on each cache's ``trim(n)``, and after each block settles and after each
prefill chunk it calls :func:`commit`, which calls ``commit()`` on every per-layer cache that
has it. So a cache with recurrent or convolutional state only needs ``offset`` (positions
seen), ``trim(n)`` valid back to its last ``commit()``, ``commit()``, and
``is_trimmable() -> True``. Nobody reads ``cache[0].offset`` blindly: :func:`position` is the
offset of the first cache that has one (a skipped block's cache may stand behind).
"""

from .kv_cache import MAX_DRAFT_TOKENS, NestedKVCache, WINDOWS


def position(cache) -> int:
    """Positions the cache list holds: the offset of its first cache that has one."""
    return next(c.offset for c in cache if hasattr(c, "offset"))


def positions(cache) -> list[int]:
    """Positions per row: a ragged batch's lengths (``lengths``), else ``[position]``."""
    return list(cache[0].lengths) if hasattr(cache[0], "lengths") else [position(cache)]


def rewind(cache, to) -> None:
    """Every layer's cache back to ``to`` positions (those already at or below it stay);
    ``to`` is an int, or one per row (:func:`positions`)."""
    rows = [to] if isinstance(to, int) else list(to)
    for c in cache:
        if hasattr(c, "lengths"):  # a ragged batch rewinds each row by its own count
            c.trim([max(n - t, 0) for n, t in zip(c.lengths, rows)])
        elif c.offset > rows[0]:
            c.trim(c.offset - rows[0])


def commit(cache) -> None:
    """Tell each cache that keeps state it cannot rewind without a checkpoint that what it
    holds now is settled (it need not rewind past here)."""
    for c in cache:
        if hasattr(c, "commit"):
            c.commit()


def kv_mode(cache) -> str:
    """``nested``, ``8bit`` or ``fp``: how the cache stores K/V (what ``kv-upper`` needs) in
    its full-attention layers (sliding-window layers stay float windows in every mode)."""
    full = [c for c in cache if not isinstance(c, WINDOWS)]
    if full and all(isinstance(c, NestedKVCache) for c in full):
        return "nested"
    return "8bit" if full and all(hasattr(c, "bits") for c in full) else "fp"


def room(cache, kv_bits=None, quantized_kv_start: int = 0) -> int:
    """Drafts the next block may hold so that no verify block straddles a change in how the
    cache reads earlier positions (plain decoding would read them two ways): a nested
    cache's next flush, the position where ``kv_bits`` quantizes the cache."""
    k = min((c.room() for c in cache if hasattr(c, "room")), default=MAX_DRAFT_TOKENS)
    if kv_bits is not None and position(cache) < quantized_kv_start:
        k = min(k, quantized_kv_start - 1 - position(cache))
    return k
