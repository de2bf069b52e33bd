"""The n-gram (prompt-lookup) draft: proposals copied from the context, zero bytes read.

Where output repeats its input (code edits, summaries, retrieval, JSON), the continuation
of the latest earlier occurrence of the context's last few tokens is often what the model
writes next. llama.cpp's ``--spec-type ngram-*`` and prompt-lookup decoding propose it.
Here the longest suffix (``max_n`` down to ``min_n`` tokens) with an earlier occurrence in
the last ``window`` tokens wins; among its occurrences, the next token that follows most of
them (ties: the one that followed first — in a rewrite, the source in the prompt), from
its latest occurrence on. A continuation that runs into the
end of the context is extended by looking up again from its own end (periodic text keeps
proposing). On the test model's own rewrites of given functions, voting raised τ at γ = 4
from 2.16 (latest match only, suffixes of 3 → 1 tokens) to 2.26.
As a distribution for speculative sampling a proposal is a point mass (q = 1 on it).
"""

from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Ngram:
    """Lookup settings: suffix lengths ``min_n``..``max_n`` and the ``window`` searched."""

    min_n: int = 1
    max_n: int = 4
    window: int = 4096

    reads_context = True  # a level of a cascade (drafts.cascade): it reads the token ids
    reads_hidden = False

    def __post_init__(self):
        for name in ("min_n", "max_n", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"ngram {name.replace('_n', '')} must be a positive integer, got {v!r}")
        if self.min_n > self.max_n:
            raise UserError(f"ngram min ({self.min_n}) is larger than ngram max ({self.max_n})")

    def _continuation(self, ids: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` tokens after an earlier occurrence of the longest suffix: the latest
        of those followed by the most frequent next token."""
        ids = ids[-self.window:]
        for n in range(min(self.max_n, ids.size - 1), self.min_n - 1, -1):
            suffix = ids[-n:]
            # Starts j < len − n where ids[j : j + n] == suffix.
            starts = [j for j in np.flatnonzero(ids[: ids.size - n] == suffix[0])
                      if np.array_equal(ids[j : j + n], suffix)]
            if starts:
                nexts = ids[np.array(starts) + n].tolist()
                best = max(nexts, key=lambda t: (nexts.count(t), -nexts.index(t)))
                j = max(j for j, t in zip(starts, nexts) if t == best)
                return ids[j + n : j + n + k]
        return ids[:0]

    def propose(self, context, k: int) -> list[int]:
        """At most ``k`` tokens predicted to follow ``context`` (a list of token ids)."""
        ids = np.asarray(context, dtype=np.int64)
        out: list[int] = []
        while len(out) < k:
            more = self._continuation(ids, k - len(out))
            if more.size == 0:
                break
            out += more.tolist()
            ids = np.concatenate([ids, more])
        return out

    def proposals(self, context, k: int, draw=None):
        """As a cascade's first level: the lookup's tokens, each a point mass (None)."""
        tokens = self.propose(context.tokens, k)
        return tokens, [None] * len(tokens)
