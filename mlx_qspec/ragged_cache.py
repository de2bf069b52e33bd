"""One layer's K/V for a batch of sequences of different lengths: the server's batched rows.

mlx-lm's ``BatchKVCache`` rewinds every row alike; a speculative batch accepts a different
count per row. Here rows are left-aligned, so a ragged rewind is a per-row length
(:func:`mlx_qspec.caches.rewind` with one position per row), and a per-row mask hides what
lies past a row's length.
"""

import mlx.core as mx


class RaggedKVCache:
    """One layer's K/V for a batch of sequences of different lengths, for mlx-lm's attention.

    Row b holds its positions at ``0 .. lengths[b]`` (left-aligned): a forward of N tokens
    writes each row's at its own length, RoPE reads each row's own ``offset``, and the mask
    lets query j of row b see positions ≤ lengths[b] + j only — whatever lies past a row's
    length (rejected drafts, or nothing) is never read. So rewinding a row by its own count
    is ``lengths[b] -= n``: mlx-lm's ``BatchKVCache`` rewinds every row alike."""

    step = 256

    def __init__(self, rows: list):
        """``rows``: one ``(keys, values)`` pair per sequence, each ``(1, heads, L, dim)``, or
        ``(None, None)`` for a sequence with no positions yet."""
        self.lengths = [0 if k is None else k.shape[2] for k, _ in rows]
        self.keys = self.values = None
        some = next(((k, v) for k, v in rows if k is not None), None)
        if some is not None:
            cap = self._capacity(max(self.lengths))
            self.keys = mx.concatenate([self._pad(k, cap, some[0]) for k, _ in rows])
            self.values = mx.concatenate([self._pad(v, cap, some[1]) for _, v in rows])

    @classmethod
    def _capacity(cls, n):
        return (n // cls.step + 1) * cls.step

    @staticmethod
    def _pad(x, cap, like=None):
        """``x`` padded to ``cap`` positions; None: zeros shaped as ``like``."""
        if x is None:
            return mx.zeros((1, like.shape[1], cap, like.shape[3]), like.dtype)
        return mx.pad(x, [(0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)])

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths)

    def row(self, b: int, n: int):
        """Row b's first ``n`` positions as ``(keys, values)``."""
        return self.keys[b:b + 1, :, :n], self.values[b:b + 1, :, :n]

    def trim(self, counts):
        """Rewind row b by ``counts[b]`` positions."""
        self.lengths = [n - c for n, c in zip(self.lengths, counts)]

    def update_and_fetch(self, keys, values):
        B, N = keys.shape[0], keys.shape[2]
        end = max(self.lengths) + N
        if self.keys is None:
            cap = self._capacity(end)
            self.keys = mx.concatenate([self._pad(None, cap, keys)] * B)
            self.values = mx.concatenate([self._pad(None, cap, values)] * B)
        elif end > self.keys.shape[2]:
            cap = self._capacity(end)
            self.keys, self.values = self._pad(self.keys, cap), self._pad(self.values, cap)
        for b, n in enumerate(self.lengths):
            self.keys[b:b + 1, :, n:n + N] = keys[b:b + 1]
            self.values[b:b + 1, :, n:n + N] = values[b:b + 1]
        self.lengths = [n + N for n in self.lengths]
        return self.keys[:, :, :end], self.values[:, :, :end]

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """``(B, 1, N, max length + N)``: query j of row b sees positions ≤ lengths[b] + j."""
        end = max(self.lengths) + N
        query = mx.array(self.lengths)[:, None, None, None] + mx.arange(N)[None, None, :, None]
        return mx.arange(end)[None, None, None, :] <= query
