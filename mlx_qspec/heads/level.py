"""A draft level that proposes from a next-token head reading the model's hidden state: the
checkpoint's MTP layers (``mtp``) or a trained head (``head``).

The head keeps a KV cache of its own, one entry per token of the context: entry j is the
row (x_j, h_{j-1}) — a token with the model's final hidden state at the position before it
(zero before the first). Each block the level is handed the model's hidden states of the positions
cached since it last ran (the verify's accepted rows, the prefill's rows; at least the last
one), rebuilds the entries of those positions from them in one forward whose last row (the
pending token with the last hidden state) gives the first draft, then chains: each further
draft feeds the block's own output back as the hidden state, as MTP serving engines do. What
a block rejected is trimmed at the next call by comparing tokens, so the head's cache always
matches the context it is given; entries built from the head's own output (chained drafts
that were accepted) are rebuilt from the model's hidden states wherever those are given.
Where a position's hidden state was never given (only the last row was handed over) its
entry keeps the chained state, or, with none, a zero hidden state (the token alone).
"""

import copy
from contextlib import nullcontext

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .. import hooks, precision, reads
from ..quant.linear import compute_dtype
from ..quant.linear import install as install_qspec
from ..errors import UserError
from ..precision import FULL_PRECISION, Precision
from .block import NextTokenHead
from .capture import ModelEnds, rows_of
from .mtp import attached
from .store import load

CATCH_UP_ROWS = 512  # rows per forward when the head catches up on a long prompt


def greedy_draw(logits: mx.array, context: list[int]):
    """The argmax and the log-probabilities it came from (what the loop's greedy draw gives)."""
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.argmax(lp, axis=-1).item(), lp


class HeadDraft:
    """One row's draft level over ``head`` (shared between rows; the cache is this row's).

    ``precision``: how its forwards read weights (``w-upper``: the upper plane of 8-bit
    layers, the model's 8-bit LM head included). ``reads_hidden`` tells the decoder to hand
    it the model's final hidden states (DEVELOPERS.md, "The decoder's contracts")."""

    reads_hidden = True
    reads_context = True

    def __init__(self, model, head: NextTokenHead, name: str, at: Precision = FULL_PRECISION,
                 ends: ModelEnds | None = None, vocab_head=None, agreement: float | None = None):
        self.head, self.base, self.precision = _prepare(head), name, at
        self.agreement = agreement  # measured when it was trained (held-back text), if known
        self.ends = ends or ModelEnds(hooks.install(model))
        self.vocab = head["draft_vocab"] if "draft_vocab" in head else None
        if self.vocab is not None and vocab_head is None:
            vocab_head = self.ends.restricted_head(self.vocab)
        self.vocab_head = vocab_head
        self.vocab_size = rows_of(self.ends.embedding)
        self.reset()

    @property
    def name(self) -> str:
        """As --draft names it (``head+w-upper``)."""
        return self.base if self.precision.is_full else f"{self.base}+{self.precision.name}"

    def fresh(self) -> "HeadDraft":
        """The same head with a cache of its own (for another request)."""
        return self.reading(self.precision)

    def reading(self, at: Precision) -> "HeadDraft":
        """The same head read at ``at`` (``w-upper``: 8-bit layers as their upper plane), with
        a cache of its own: a copy sharing the prepared head and the model's ends (per request
        on the server's engine thread, so nothing is walked or evaluated again)."""
        other = copy.copy(self)
        other.precision = at
        other.reset()
        return other

    def step_reads(self) -> reads.ReadCounter:
        """What one draft step reads (its layers, the LM head or its draft rows, its KV):
        counted on a fresh cache, one entry long."""
        counter = reads.ReadCounter()
        self.fresh().propose([0, 0], None, 1, counter=counter)
        return counter

    def proposals(self, context, k: int, draw):
        """The decoder's level contract (``drafts.cascade``): ``context.tokens`` the row's ids
        (its pending token, then this block's proposals so far), ``context.cached`` how many
        are in the model's cache, ``context.hidden`` the model's final hidden states of the
        positions cached since the level last ran (at least the last one), ``context.reads``
        where reads are counted; ``draw(logprobs)`` the row's draw."""
        return self.propose(context.tokens, context.hidden, k,
                            lambda logits, _: draw(logits - mx.logsumexp(logits, axis=-1, keepdims=True)),
                            context.reads, getattr(context, "cached", None))

    def reset(self):
        """Forget every entry (a new conversation)."""
        self.cache = KVCache()
        self.tokens: list[int] = []  # the token of each entry
        self.exact: list[bool] = []  # whether its hidden state was the model's

    def _keep(self, context: list[int], m: int, start: int) -> int:
        """Entries still right for ``context`` (``m`` positions cached): their token matches
        it, and their hidden state is the model's or no model state is given for the position
        before them (before ``start``); never the pending token's (its output drafts)."""
        keep = 0
        limit = min(len(self.tokens), m)
        while (keep < limit and self.tokens[keep] == context[keep]
               and (self.exact[keep] or keep - 1 < start)):
            keep += 1
        return keep

    def _forward(self, tokens: list[int], hidden: mx.array, counter, last: bool = True):
        """The head over rows (tokens[j], hidden[j]) appended to its cache: the fed-back state
        of the last row and (``last``) its logits, the LM head's reads counted with the rest."""
        with precision.reading(self.precision), reads.counting(counter) if counter else nullcontext():
            emb = self.head.embed(mx.array(tokens, mx.uint32)[None], self.ends)
            back, normed = self.head(emb, hidden[None].astype(emb.dtype), self.cache)
            return back[0, -1:], self._logits(normed[:, -1]) if last else None

    def _logits(self, normed: mx.array) -> mx.array:
        """(1, vocabulary) logits: the head's own LM head, or the model's; with a draft
        vocabulary, its rows only and -inf elsewhere (no draft outside it)."""
        if "lm_head" in self.head:
            return self.head.lm_head(normed)
        if self.vocab_head is None:
            return self.ends.logits(normed)
        sub = self.vocab_head(normed)
        full = mx.full((sub.shape[0], self.vocab_size), -mx.inf, sub.dtype)
        full[:, self.vocab] = sub
        return full

    def propose(self, context: list[int], hidden: mx.array | None, k: int, draw=greedy_draw,
                counter: reads.ReadCounter | None = None, cached: int | None = None):
        """Up to ``k`` draft tokens after ``context`` and the distribution each was drawn from.

        ``context``: every token so far; ``cached`` of them are in the model's cache (default:
        all but the last, the pending one). Tokens after the pending one (this block's tokens
        so far: a lower level's proposals) run through the chain as given and drafting goes
        on after them. ``hidden``: (L, D) or (1, L, D), the model's final hidden states of the
        last L cached positions (None: none). ``draw(logits, tokens so far)`` returns ``(token,
        distribution)``, or None to end the block (the loop's sampler and p-min). ``counter``
        counts the head's reads (its own weights, the LM head, its KV)."""
        if k <= 0:
            return [], []
        m = len(context) - 1 if cached is None else cached
        hidden = (mx.zeros((0, self.ends.hidden_size)) if hidden is None
                  else hidden.reshape(-1, hidden.shape[-1]))
        start = m - hidden.shape[0]
        if start < 0:
            raise ValueError(f"{hidden.shape[0]} hidden states for {m} cached positions")
        keep = self._keep(context, m, start)
        self.cache.trim(self.cache.offset - keep)
        del self.tokens[keep:], self.exact[keep:]
        # entry j pairs context[j] with the hidden state of position j - 1 (zero before the
        # first position, and where none was given)
        gap = max(start + 1 - keep, 0)
        rows = mx.concatenate([mx.zeros((gap, hidden.shape[-1]), hidden.dtype),
                               hidden[max(keep - 1 - start, 0):]])
        tokens = context[keep:m + 1]
        for i in range(0, len(tokens), CATCH_UP_ROWS):
            back, logits = self._forward(tokens[i:i + CATCH_UP_ROWS], rows[i:i + CATCH_UP_ROWS],
                                         counter, last=i + CATCH_UP_ROWS >= len(tokens))
        self.tokens += tokens
        self.exact += [keep + j == 0 or keep + j - 1 >= start for j in range(len(tokens))]
        drafted, qs = [], []
        for t in context[m + 1:]:  # given, not drawn: chained like drafts
            back, logits = self._chain(t, back, counter)
        while (drawn := draw(logits, context + drafted)) is not None:
            drafted.append(drawn[0])
            qs.append(drawn[1])
            if len(drafted) == k:
                break
            back, logits = self._chain(drafted[-1], back, counter)
        return drafted, qs

    def _chain(self, token: int, back: mx.array, counter):
        """One chained row: ``token`` with the head's own last output as its hidden state."""
        self.tokens.append(token)
        self.exact.append(False)
        return self._forward([token], back, counter)


def _prepare(head: NextTokenHead) -> NextTokenHead:
    """What the model's forwards read through, for the head too (idempotent): QSpec layers
    (precision-read, reads counted) and our attention routing (KV reads counted)."""
    install_qspec(head)
    hooks.install_attention(head)
    mx.eval(head.parameters())  # here: a server's engine thread cannot evaluate them later
    return head


MTP, HEAD = "mtp", "head"  # the draft names of the two levels
NO_MTP = ("has no MTP layers{why}: convert its Hugging Face checkpoint with "
          "`python -m mlx_qspec.convert --model HF_MODEL --mlx-path DIR -q` (mlx-lm's convert drops "
          "them), or train a head with `python -m mlx_qspec.train_head --model MODEL --out HEAD_DIR` "
          "and draft with --draft head --draft-head HEAD_DIR")


def mtp_level(model, at: Precision = FULL_PRECISION) -> HeadDraft:
    """The ``mtp`` level: the checkpoint's own MTP layers, or a UserError naming what to do."""
    kept = attached(model)
    if not isinstance(kept, tuple):
        why = "" if kept is None else f" it can use ({kept})"
        raise UserError("draft 'mtp': this model " + NO_MTP.format(why=why))
    return HeadDraft(hooks.install(model), kept[0], MTP, at)


def head_level(model, path, at: Precision = FULL_PRECISION) -> HeadDraft:
    """The ``head`` level: the head in directory ``path`` (``--draft-head``), checked against
    the model; a UserError (one line) where there is none or it does not fit."""
    if path is None:
        raise UserError("draft 'head' needs --draft-head DIR (a head trained with "
                        "`python -m mlx_qspec.train_head --model MODEL --out DIR`)")
    ends = ModelEnds(hooks.install(model))
    head, cfg = load(path, model, ends, compute_dtype(model))
    agreement = cfg.get("source", {}).get("held_back_agreement")
    return HeadDraft(model, head, HEAD, at, ends, agreement=agreement)


def heads_available(model, draft_head=None) -> bool:
    """Whether ``auto`` could pick a head level: a head was given, or the model kept its
    MTP layers (the prefill then keeps the hidden states such a level reads)."""
    return draft_head is not None or isinstance(attached(model), tuple)
