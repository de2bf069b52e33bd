"""QuantSpec's hierarchical KV cache: one 8-bit cache that also holds the draft's 4-bit view.

A quantized position is stored as two 4-bit planes in MLX's 4-bit packing: the upper plane
U = round((x − min)/s), s = (max − min)/15, a plain 4-bit RTN code (the draft reads
min + s·U), and the lower plane, the signed residual L = round((x − min − s·U)/(s/16)) ∈ −8..7
stored as L + 8 (the verify reads min + s·U + (s/16)·L, ~8 bits). So the draft's view costs no
memory beyond the 8-bit cache, and both views are ``quantized_matmul`` calls. Keys are grouped
per channel over blocks of ``block_size`` tokens (their outliers are per channel), values per
token over ``value_group_size`` channels. The newest tokens (between one and two blocks once
there are more than one) stay in float until their block is complete.

The cache is oblivious of precision: it returns both planes, attention (``attention.py``)
decides which to read.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    _BaseCache,
    create_attention_mask,
    make_prompt_cache,
)

from . import recurrent
from .errors import SettingError, UserError

GROUP_SIZES = (32, 64, 128)
MAX_DRAFT_TOKENS = 32  # the longest draft block the speculative loop writes and rewinds
REWIND_SLOTS = MAX_DRAFT_TOKENS + 1  # positions a rotating cache can always rewind
KV_MODES = ("fp", "8bit", "nested")

_NIBBLES = mx.array([4 * i for i in range(8)], mx.uint32)


def _pack(codes: mx.array) -> mx.array:
    """Codes 0..15 (..., N) → MLX 4-bit packing (..., N/8) uint32, element i at bits 4i."""
    codes = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, 8) << _NIBBLES
    return codes.sum(-1).astype(mx.uint32)  # disjoint bits: the sum is the OR


def nest(x: mx.array, group: int):
    """Quantize ``x`` (..., N) in groups of ``group`` along the last axis into
    ``(upper, lower, scales, mins)``: planes (..., N/8), scales/mins (..., N/group) in x's dtype.
    Codes are computed against the stored (rounded) scale and min, so both views reconstruct
    from what is stored."""
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    mins = lo.astype(x.dtype)
    scales = ((hi - lo) / 15).astype(x.dtype)
    m, s = mins.astype(mx.float32), scales.astype(mx.float32)
    safe = mx.where(s > 0, s, 1)  # max == min: s = 0, every code 0 / residual 0, no NaN
    u = mx.clip(mx.round((g - m) / safe), 0, 15)
    low = mx.clip(mx.round((g - m - s * u) / (safe / 16)), -8, 7) + 8
    return (_pack(u.reshape(x.shape)), _pack(low.reshape(x.shape)),
            scales.squeeze(-1), mins.squeeze(-1))


def _zeros(planes: tuple, groups: tuple, dtype) -> list:
    """Empty ``[upper, lower, scales, mins]`` storage."""
    return [mx.zeros(planes, mx.uint32), mx.zeros(planes, mx.uint32),
            mx.zeros(groups, dtype), mx.zeros(groups, dtype)]


class _RewindableCache(_BaseCache):
    """What our caches share: always trimmable (within their rewind slots), and rebuilt from
    ``state`` plus ``meta_state`` (mlx-lm's ``from_state`` takes no meta state)."""

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

    def is_trimmable(self):
        return True


class NestedKVCache(_RewindableCache):
    """Keys/values as upper+lower 4-bit planes, the newest tokens in a float buffer.

    ``update_and_fetch`` returns ``(keys, values)``, each ``(upper, lower, scales, mins,
    buffer)`` as ``kernels.nested_attention_reference`` takes them (planes None while nothing
    is quantized). The number of quantized blocks is a function of the offset only —
    ``nq = max(nq, offset // block_size − 1)`` after each append — so a speculative block that
    stays within :meth:`room` sees the split plain decoding would.
    """

    step = 256

    def __init__(self, block_size: int = 64, value_group_size: int = 64):
        for name, v in (("block_size", block_size), ("value_group_size", value_group_size)):
            if v not in GROUP_SIZES:
                raise UserError(f"nested KV {name} must be one of {GROUP_SIZES}, got {v}")
        self.block_size = block_size
        self.value_group_size = value_group_size
        self.keys = self.values = None  # (upper, lower, scales, mins) storage, step-allocated
        self.kbuf = self.vbuf = None  # (B, Hkv, 2·block, D) float
        self.offset = 0
        self.nq = 0  # quantized blocks; never recomputed downward

    @property
    def quantized(self) -> int:
        """Tokens held in the planes."""
        return self.nq * self.block_size

    def _init(self, keys, values):
        D = values.shape[-1]
        g = self.value_group_size
        if D % g:
            ok = [s for s in GROUP_SIZES if D % s == 0]
            fix = f"pass value_group_size={max(ok)}" if ok else "nested KV needs a multiple of 32"
            raise UserError(f"value head dim {D} is not a multiple of value_group_size={g}; {fix}")
        B, H, _, Dk = keys.shape
        self.kbuf = mx.zeros((B, H, 2 * self.block_size, Dk), keys.dtype)
        self.vbuf = mx.zeros((B, H, 2 * self.block_size, D), values.dtype)

    def _grow(self, tokens: int):
        """Make the planes hold ``tokens`` tokens, extending by whole steps."""
        have = 0 if self.keys is None else self.keys[0].shape[-1] * 8
        if tokens <= have:
            return
        n = (tokens - have + self.step - 1) // self.step * self.step
        B, H, _, Dk = self.kbuf.shape
        D = self.vbuf.shape[-1]
        kz = _zeros((B, H, Dk, n // 8), (B, H, Dk, n // self.block_size), self.kbuf.dtype)
        vz = _zeros((B, H, n, D // 8), (B, H, n, D // self.value_group_size), self.kbuf.dtype)
        if self.keys is None:
            self.keys, self.values = kz, vz
        else:
            self.keys = [mx.concatenate([a, b], axis=-1) for a, b in zip(self.keys, kz)]
            self.values = [mx.concatenate([a, b], axis=-2) for a, b in zip(self.values, vz)]

    def _flush(self, k: mx.array, v: mx.array):
        """Quantize the oldest whole blocks ``k``/``v`` (B, H, f, D) after the current planes."""
        a, b = self.quantized, self.quantized + k.shape[2]
        self._grow(b)
        bs = self.block_size
        ku, kl, ks, km = nest(k.swapaxes(-1, -2), bs)  # per channel over the block's tokens
        self.keys[0][..., a // 8 : b // 8] = ku
        self.keys[1][..., a // 8 : b // 8] = kl
        self.keys[2][..., a // bs : b // bs] = ks
        self.keys[3][..., a // bs : b // bs] = km
        for store, part in zip(self.values, nest(v, self.value_group_size)):
            store[..., a:b, :] = part

    def update_and_fetch(self, keys, values):
        if self.kbuf is None:
            self._init(keys, values)
        n, L = self.offset - self.quantized, keys.shape[2]
        self.offset += L
        nq = max(self.nq, self.offset // self.block_size - 1)
        f = (nq - self.nq) * self.block_size
        if f == 0:
            self.kbuf[..., n : n + L, :] = keys
            self.vbuf[..., n : n + L, :] = values
        else:
            k = mx.concatenate([self.kbuf[..., :n, :], keys], axis=2)
            v = mx.concatenate([self.vbuf[..., :n, :], values], axis=2)
            self._flush(k[..., :f, :], v[..., :f, :])
            self.nq = nq
            self.kbuf[..., : n + L - f, :] = k[..., f:, :]
            self.vbuf[..., : n + L - f, :] = v[..., f:, :]
        return self.keys_and_values()

    def keys_and_values(self):
        t, bs, nb = self.quantized, self.block_size, self.offset - self.quantized
        if t == 0:
            kq = vq = (None,) * 4
        else:
            ku, kl, ks, km = self.keys
            kq = (ku[..., : t // 8], kl[..., : t // 8], ks[..., : t // bs], km[..., : t // bs])
            vq = tuple(a[..., :t, :] for a in self.values)
        return (*kq, self.kbuf[..., :nb, :]), (*vq, self.vbuf[..., :nb, :])

    def room(self) -> int:
        """How many positions after the next one can join it in one forward and still see
        the quantized/float split one-token decoding would give each of them.

        Plain decoding's query at position p sees the blocks flushed when the offset became
        p + 1. A block appended at once sees the split of its last offset, so its positions
        must not straddle an offset o with o % block == 0 and o ≥ 2·block (where a flush
        happens). The speculative loop caps a draft/verify block of k + 1 tokens at
        k ≤ min(room()) over the caches, which keeps greedy speculation token-for-token
        equal to plain decoding and means a rewind never reaches into the planes.
        """
        t, bs = self.offset, self.block_size
        o = max((t + 1) // bs + 1, 2) * bs
        return o - t - 2

    def size(self):
        return self.offset

    @property
    def state(self):
        """The used portions: key (upper, lower, scales, mins, buffer), then the values'."""
        if self.kbuf is None:
            return []
        k, v = self.keys_and_values()
        return (*k, *v)

    @state.setter
    def state(self, v):
        self.keys = self.values = self.kbuf = self.vbuf = None
        self.offset = self.nq = 0
        if not v:
            return
        kb, vb = v[4], v[9]
        if v[0] is not None:
            self.keys, self.values = list(v[:4]), list(v[5:9])
            self.nq = v[2].shape[-1]
        self.offset = self.quantized + kb.shape[2]
        pad = [(0, 0), (0, 0), (0, 2 * self.block_size - kb.shape[2]), (0, 0)]
        self.kbuf, self.vbuf = mx.pad(kb, pad), mx.pad(vb, pad)

    @property
    def meta_state(self):
        return tuple(map(str, (self.block_size, self.value_group_size)))

    @meta_state.setter
    def meta_state(self, v):
        self.block_size, self.value_group_size = map(int, v)

    def trim(self, n):
        n = min(self.offset, n)
        if n > self.offset - self.quantized:
            raise ValueError(
                f"cannot trim {n} positions: only the newest {self.offset - self.quantized} "
                "are unquantized (cap speculative blocks with room())"
            )
        self.offset -= n
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return create_attention_mask(N, self.offset, return_array, window_size)

    def empty(self):
        return self.kbuf is None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state if a is not None)


def _group(model, size: int) -> int:
    """The largest supported group ≤ ``size`` that divides the model's head dim (``size``
    itself when it divides, or when none does: the cache then names the problem)."""
    args = getattr(model, "args", None)
    args = getattr(args, "text_config", None) or vars(args or {})  # multimodal: the text model's
    D = args.get("head_dim") or args.get("hidden_size", 0) // args.get("num_attention_heads", 1)
    fits = [g for g in GROUP_SIZES if g <= size and D and D % g == 0]
    return max(fits) if fits and D % size else size


def make_cache(model: nn.Module, kv_mode: str, block_size: int = 64, value_group_size: int = 64):
    """The model's caches, its full-attention ones as ``kv_mode`` says: ``fp`` mlx-lm's,
    ``8bit`` mlx-lm's QuantizedKVCache (group 64), ``nested`` :class:`NestedKVCache`. Groups
    along the head dim (8-bit, nested values) fall to the largest supported size that divides
    it (32 for a head dim of 32). A model's sliding-window layers stay float windows (their
    memory is bounded already); ``nested`` refuses them: ``kv-upper`` reads every attention
    layer's upper plane, and a window has none. Recurrent layers (a hybrid's) keep their state
    in a :class:`~mlx_qspec.recurrent.RecurrentCache` (it counts its positions)."""
    if kv_mode not in KV_MODES:
        raise SettingError(f"unknown {{kv_mode}} {kv_mode!r}; choose one of {', '.join(KV_MODES)}")
    caches = recurrent.make_rewindable(make_prompt_cache(model), model)
    if kv_mode == "fp":
        return caches
    windows = sorted({type(c).__name__ for c in caches if isinstance(c, WINDOWS)})
    if kv_mode == "nested" and windows:
        raise SettingError(f"{{kv_mode}} nested needs full attention in every layer (recurrent "
                           f"ones aside), and this model has {', '.join(windows)} layers; use "
                           "{kv_mode} 8bit or fp")
    if kv_mode == "8bit":
        full = lambda: QuantizedKVCache(group_size=_group(model, 64), bits=8)  # noqa: E731
    else:
        full = lambda: NestedKVCache(block_size, _group(model, value_group_size))  # noqa: E731
    return [full() if type(c) is KVCache else c for c in caches]


class SpeculativeRotatingKVCache(_RewindableCache):
    """mlx-lm's ``RotatingKVCache(max_size, keep)`` attention window, rewindable by up to
    :data:`REWIND_SLOTS` positions at any time (mlx-lm's is trimmable only before it wraps).

    What each query sees is mlx-lm's, by position: a one-token step at position p sees the
    ``keep`` first positions and the newest ``max_size − keep`` up to p (the in-place
    rotating buffer); a prefill chunk sees what mlx-lm's concatenating path gives it (a
    causal window of ``max_size`` over its kept positions). A block of several tokens after
    decoding has started — a speculative verify of k + 1 ≤ ``REWIND_SLOTS`` rows — gives
    each row exactly what a one-token step at its position would see, so greedy
    speculation equals plain decoding with mlx-lm's rotating cache token for token.
    ``decoding`` says which: a one-token step sets it; whoever feeds a prompt (a chat's
    next turn included) clears it for the chunks and sets it after (``speculative.prefill``).

    Storage is in temporal order: the ``keep`` first positions, then every position from
    ``start`` to the offset, written in place into ``step`` entries of slack; when the slack
    is used up one copy drops what no query can see any more, keeping ``keep + max_size − 1
    + REWIND_SLOTS`` positions. So ``trim(n)`` for n ≤ REWIND_SLOTS always works and
    trim-then-re-append equals never having appended. Masks are built from the positions
    (an array wherever a stored position is hidden from some row; the dropped positions
    are exactly those hidden from every later query).
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 0):
        if max_size <= keep:
            raise SettingError(f"{{max_kv_size}} must exceed the {keep} first positions a "
                               f"window always keeps, got {max_size}")
        self.max_size, self.keep = max_size, keep
        self.keys = self.values = None
        self.offset = 0
        self.start = 0  # first stored position after the kept head; 0: all stored from 0
        self.decoding = False  # past the prompt: later small blocks are verifies

    @property
    def _head(self) -> int:
        return self.keep if self.start else 0

    @property
    def _len(self) -> int:
        return self._head + self.offset - self.start

    def _positions(self, end: int) -> mx.array:
        """Positions of the stored entries, then of new ones up to ``end``."""
        tail = mx.arange(self.start, end)
        return mx.concatenate([mx.arange(self._head), tail]) if self._head else tail

    def _store(self, keys: mx.array, values: mx.array):
        """Store ``keys``/``values`` (every stored entry, then the new ones) without the
        positions no later query can see — after a rewind of up to REWIND_SLOTS, a query
        reads back at most ``max_size − 1`` positions — with ``step`` entries of slack."""
        need = self.offset - self.max_size + 1 - REWIND_SLOTS
        if need > max(self.start, self.keep):
            cut = self._head + need - self.start
            keys = mx.concatenate([keys[..., : self.keep, :], keys[..., cut:, :]], axis=2)
            values = mx.concatenate([values[..., : self.keep, :], values[..., cut:, :]], axis=2)
            self.start = need
        pad = lambda x: mx.pad(x, [(0, 0), (0, 0), (0, self.step), (0, 0)])  # noqa: E731
        self.keys, self.values = pad(keys), pad(values)

    def update_and_fetch(self, keys, values):
        N, n = keys.shape[2], self._len
        self.decoding = self.decoding or N == 1
        if self.keys is not None and n + N <= self.keys.shape[2]:
            self.keys[..., n : n + N, :] = keys
            self.values[..., n : n + N, :] = values
            self.offset += N
            return self.keys[..., : n + N, :], self.values[..., : n + N, :]
        # Full: return what the mask (built before this update) indexes, store it compacted.
        if self.keys is not None:
            keys = mx.concatenate([self.keys[..., :n, :], keys], axis=2)
            values = mx.concatenate([self.values[..., :n, :], values], axis=2)
        self.offset += N
        self._store(keys, values)
        return keys, values

    def _prefill_block(self, N: int) -> bool:
        """Whether an N-token block gets mlx-lm's concatenating-path window (a prompt chunk)
        rather than each row a one-token step's (a verify block)."""
        return N > 1 and (not self.decoding or N > REWIND_SLOTS)

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        o, W, keep = self.offset, self.max_size, self.keep
        w = window_size or W  # a model's window_size narrows or widens mlx-lm's as it does there
        last = o + N - 1
        prefill = self._prefill_block(N)
        if prefill:  # every stored position inside every row's window
            plain = self.start == 0 and last < min(W, w)
        else:  # a one-token step ignores a window_size of max_size or more (mlx-lm's rule)
            plain = w >= W and ((self.start == 0 and last < W) or 0 < self.start > last - W + keep)
        if plain and not return_array:
            return None if N == 1 else "causal"
        q = self._positions(o + N)[None]
        p = mx.arange(o, o + N)[:, None]
        mask = q <= p
        if prefill:
            if o <= W - 1:  # mlx-lm holds every position: a causal window of w
                return mask & (q > p - w)
            # mlx-lm holds keep + the newest W − 1 − keep, its window w counted over those
            # entries: row i sees its entries i + W − w … W − 1 + i
            i = p - o + W - w
            newest = (q >= keep) & (q >= o - (W - 1) + mx.maximum(i, keep))
            return mask & (((q < keep) & (q >= i)) | newest)
        mask = mask & ((q < keep) | (q > p - W + keep))
        return mask & (q > p - w) if w < W else mask

    def size(self):
        return min(self.offset, self.max_size)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self._len, :], self.values[..., : self._len, :]

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = None
            return
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.max_size, self.keep, self.offset, self.start,
                               int(self.decoding))))

    @meta_state.setter
    def meta_state(self, v):
        self.max_size, self.keep, self.offset, self.start, decoding = map(int, v)
        self.decoding = bool(decoding)

    def trim(self, n):
        """Rewind ``n`` positions, as far as the next query still finds every position it
        sees stored (it reads back ``max_size − 1 − keep`` past the kept head): always
        ``REWIND_SLOTS + keep``, more until positions were dropped."""
        n = min(self.offset, n)
        deepest = self.offset - self.start - (self.max_size - 1 - self.keep) if self.start else self.offset
        if n > deepest:
            raise ValueError(
                f"cannot trim {n} positions: a query after it would read positions this "
                f"window no longer stores (it rewinds up to {max(deepest, 0)} now)"
            )
        self.offset -= n
        return n

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state)


WINDOWS = (RotatingKVCache, SpeculativeRotatingKVCache)


def make_rewindable(cache: list, model: nn.Module) -> list:
    """``cache`` (changed in place, as the caller's list is the generation's) with each
    mlx-lm ``RotatingKVCache`` — a model's sliding-window layers, a ``max_kv_size`` window —
    made a :class:`SpeculativeRotatingKVCache` of the same window: mlx-lm's can be trimmed
    only until it wraps. A filled one converts exactly: it holds at least the newest
    ``max_size − 1 − keep`` positions, all any later query sees, and speculation never
    rewinds past what it appended after the conversion. Recurrent layers' ``ArraysCache``
    become :class:`~mlx_qspec.recurrent.RecurrentCache` (rewound by replay) where ``model``'s
    mixers are ones :mod:`~mlx_qspec.recurrent` rewinds."""
    recurrent.make_rewindable(cache, model)
    for i, c in enumerate(cache):
        if type(c) is not RotatingKVCache:
            continue
        cache[i] = new = SpeculativeRotatingKVCache(c.max_size, c.keep)
        if c.keys is not None:
            n = min(c.offset, c.keys.shape[2])  # stored: the kept head, then the newest
            new.keys, new.values = (c._temporal_order(x)[..., :n, :] for x in (c.keys, c.values))
            new.offset = c.offset
            new.start = 0 if n == c.offset else c.offset - n + c.keep
    return cache


def make_rotating_cache(model: nn.Module, max_size: int | None = None, keep: int = 4,
                        rewindable: bool = True):
    """The model's caches (its sliding-window layers keep their own windows), each plain
    ``KVCache`` a window of ``max_size`` when given (``keep=4`` as mlx-lm's
    ``make_prompt_cache``, which ignores ``max_kv_size`` for models that build their caches,
    llama among them). ``rewindable``: every window a :class:`SpeculativeRotatingKVCache`
    (for a draft), else mlx-lm's ``RotatingKVCache`` (plain decoding, same windows).
    Recurrent layers are :class:`~mlx_qspec.recurrent.RecurrentCache` either way (the same
    arithmetic as mlx-lm's; it counts its positions, and a chat can take a turn back)."""
    caches = make_prompt_cache(model)
    if max_size is not None:
        if max_size <= keep:
            raise SettingError(f"{{max_kv_size}} must exceed the {keep} first positions a "
                               f"window always keeps, got {max_size}")
        caches = [RotatingKVCache(max_size, keep) if type(c) is KVCache else c for c in caches]
    return make_rewindable(caches, model) if rewindable else recurrent.make_rewindable(caches, model)


def make_generation_cache(model: nn.Module, kv_mode: str = "fp", max_kv_size=None,
                          plain: bool = False):
    """The cache a generation makes when given none (a chat keeps one across turns): the
    model's, its full-attention layers ours for ``kv_mode`` 8bit / nested or a window of
    ``max_kv_size``; the same windows for plain decoding and a draft (whose are rewindable
    unless ``plain``)."""
    if kv_mode == "fp":
        return make_rotating_cache(model, max_kv_size, rewindable=not plain)
    caches = make_cache(model, kv_mode)
    return caches if plain else make_rewindable(caches, model)


def check_kv_bits(cache, kv_bits) -> None:
    """mlx-lm's ``kv_bits`` quantizes every layer's cache once it is long enough, and a
    window cannot be (NotImplementedError mid-generation): refuse it up front."""
    if kv_bits is not None and any(isinstance(c, WINDOWS) for c in cache):
        raise SettingError("{kv_bits} cannot quantize a sliding-window cache (this model's "
                           "sliding layers, or {max_kv_size}); leave it unset")
