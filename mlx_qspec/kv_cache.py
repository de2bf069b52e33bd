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
    QuantizedKVCache,
    _BaseCache,
    create_attention_mask,
    make_prompt_cache,
)

from .errors import UserError

GROUP_SIZES = (32, 64, 128)
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


class NestedKVCache(_BaseCache):
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

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

    def is_trimmable(self):
        return True

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
    D = args and (getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads)
    fits = [g for g in GROUP_SIZES if g <= size and D and D % g == 0]
    return max(fits) if fits and D % size else size


def make_cache(model: nn.Module, kv_mode: str, block_size: int = 64, value_group_size: int = 64):
    """One cache per layer: ``fp`` mlx-lm's default, ``8bit`` mlx-lm's QuantizedKVCache (group
    64), ``nested`` :class:`NestedKVCache`. Groups along the head dim (8-bit, nested values)
    fall to the largest supported size that divides it (32 for a head dim of 32)."""
    if kv_mode not in KV_MODES:
        raise UserError(f"unknown kv mode {kv_mode!r}; choose one of {', '.join(KV_MODES)}")
    if kv_mode == "fp":
        return make_prompt_cache(model)
    n = len(model.layers)
    if kv_mode == "8bit":
        return [QuantizedKVCache(group_size=_group(model, 64), bits=8) for _ in range(n)]
    return [NestedKVCache(block_size, _group(model, value_group_size)) for _ in range(n)]
