"""What the decoder asks of a list of per-layer caches: where it stands, how to go back.

The rewind contract. The decoder rewinds every layer's cache through :func:`rewind` (back to
a position), built on each cache's ``trim(n)``, and after each block settles and after each
prefill chunk it calls :func:`commit`, which calls ``commit()`` on every per-layer cache that
has it. So a cache with recurrent or convolutional state only needs ``offset`` (positions
seen), ``trim(n)`` valid back to its last ``commit()``, ``commit()``, and
``is_trimmable() -> True``. Nobody reads ``cache[0].offset`` blindly: :func:`position` is the
offset of the first cache that has one (a skipped block's cache may stand behind).
Recurrent layers (:mod:`mlx_qspec.recurrent`) count their positions as attention's do; where
mlx-lm's ``ArraysCache`` stays (a model whose state cannot be rewound) it counts none, stands
where the list's other layers stand, and cannot go back.
"""

from mlx_lm.models.cache import ArraysCache, CacheList

from .kv_cache import MAX_DRAFT_TOKENS, NestedKVCache, WINDOWS


def position(cache) -> int:
    """Positions the cache list holds: the offset of its first cache that has one."""
    found = next((c.offset for c in cache if hasattr(c, "offset")), None)
    if found is None:
        raise ValueError("this cache list counts no positions (mlx-lm's recurrent state only)")
    return found


def _ragged(c) -> bool:
    return getattr(c, "lengths", None) is not None and not isinstance(c, ArraysCache)


def positions(cache) -> list[int]:
    """Positions per row: a ragged batch's lengths (``lengths``), else ``[position]``."""
    return list(cache[0].lengths) if _ragged(cache[0]) else [position(cache)]


def rewind(cache, to) -> None:
    """Every layer's cache back to ``to`` positions (those already at or below it stay);
    ``to`` is an int, or one per row (:func:`positions`). ValueError where a layer cannot go
    back that far."""
    rows = [to] if isinstance(to, int) else list(to)
    stuck = [c for c in cache if not hasattr(c, "offset") and not _ragged(c)]
    if stuck and position(cache) > rows[0]:  # it stands where the list stands
        raise ValueError(f"cannot rewind a {type(stuck[0]).__name__}: mlx-lm's recurrent "
                         "state keeps no way back")
    for c in cache:
        if _ragged(c):  # a ragged batch rewinds each row by its own count
            c.trim([max(n - t, 0) for n, t in zip(c.lengths, rows)])
        elif c in stuck:
            continue
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
    its full-attention layers (sliding-window layers stay float windows in every mode, and
    recurrent layers keep their state)."""
    full = [c for c in cache if not isinstance(c, (*WINDOWS, ArraysCache, CacheList))]
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
