"""The model's final hidden state (the LM head's input) of every position a forward computes,
recorded while the forward runs: a draft that reads it costs no second forward.

:func:`install` makes the LM head report its input — ``lm_head`` where the model has one,
else the tied embedding's ``as_linear`` — by giving that one module a subclass of its own class
(as ``layer_skip`` does with blocks: no weight moves, the parameter tree is unchanged; float,
quantized and QSpec heads alike). Outside :func:`capturing` nothing is recorded and nothing is
slower.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..errors import UserError
from ..quant.linear import QSpecLinear
from ..vocabulary import vocabulary_size

_open: ContextVar[list | None] = ContextVar("mlx_qspec_hidden_capture", default=None)


@cache
def _capturing(cls: type, method: str) -> type:
    """A subclass of ``cls`` (one per class and method) whose ``method`` (``__call__`` of a
    linear head, ``as_linear`` of a tied embedding) records its input in the open capture first."""
    def hooked(self, x, *args, **kwargs):
        rows = _open.get()
        if rows is not None:
            rows.append(x)
        return getattr(cls, method)(self, x, *args, **kwargs)

    return type(cls.__name__, (cls,), {method: hooked, "_head_base": cls})


def find_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """``(path, module)`` of the model's input token embedding (its vocabulary-sized
    embedding; ``embed_tokens`` where several qualify)."""
    vocab = vocabulary_size(model)
    found = [(p, m) for p, m in model.named_modules()
             if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
             and (vocab is None or rows_of(m) == vocab)]
    if not found:
        raise UserError(f"model type {getattr(model, 'model_type', '?')}: no token embedding found")
    return next(((p, m) for p, m in found if p.endswith("embed_tokens")), found[0])


def rows_of(m: nn.Module) -> int:
    """Rows of an embedding (its vocabulary)."""
    return m.num_embeddings if hasattr(m, "num_embeddings") else m.weight.shape[0]


def find_head(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module, method)`` that computes the logits: ``lm_head``'s ``__call__``, or the tied
    embedding's ``as_linear``."""
    heads = [m for p, m in model.named_modules() if p.split(".")[-1] == "lm_head"]
    if heads:
        return heads[0], "__call__"
    return find_embedding(model)[1], "as_linear"


def install(model: nn.Module) -> nn.Module:
    """Make ``model``'s LM head record its input inside :func:`capturing` (idempotent).
    :func:`mlx_qspec.hooks.install` calls it after the QSpec layers are in (installed later,
    they would replace the hooked head)."""
    head, method = find_head(model)
    if not hasattr(type(head), "_head_base"):
        head.__class__ = _capturing(type(head), method)
    return model


@contextmanager
def capturing():
    """Record the LM head's input of every forward built inside the block: a list that gets
    one ``(batch, rows, hidden)`` array per forward, in order."""
    rows: list = []
    token = _open.set(rows)
    try:
        yield rows
    finally:
        _open.reset(token)


class ModelEnds:
    """The model's own token embedding and LM head, found once: what a head embeds its next
    token with and predicts through. The LM head is called without recording its input (a
    draft's own rows must not pass for the model's)."""

    def __init__(self, model: nn.Module):
        """``model`` with :func:`mlx_qspec.hooks.install` done (the head found here stays)."""
        self.head, self.method = find_head(model)
        self.embedding = find_embedding(model)[1]
        self._call = getattr(getattr(type(self.head), "_head_base", type(self.head)), self.method)
        self.bias = self.head["bias"] if self.method == "__call__" and "bias" in self.head else None
        self.hidden_size = int(self.embed(mx.array([0])).shape[-1])  # the width the LM head reads

    def logits(self, hidden: mx.array) -> mx.array:
        return self._call(self.head, hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.embedding(tokens)

    def restricted_head(self, ids: mx.array) -> nn.Module:
        """A linear layer computing only the logits of ``ids`` (a head's draft vocabulary):
        those rows of the LM head, copied once, stored and read like the model's (QSpec layers
        for quantized heads: precision-read, reads counted)."""
        m, dims = self.head, self.hidden_size
        if "scales" in m:
            out = nn.QuantizedLinear(dims, ids.size, bias=False, group_size=m.group_size, bits=m.bits)
            out.weight = kernels.merge_planes(m["upper"][ids], m["lower"][ids]) if "upper" in m else m["weight"][ids]
            out.scales, out.biases = m["scales"][ids], m["biases"][ids]
        else:
            out = nn.Linear(dims, ids.size, bias=False)
            out.weight = m["weight"][ids]
        if self.bias is not None:
            out.bias = self.bias[ids]
        mx.eval(out.parameters())
        return QSpecLinear(out, act_draft=False) if "scales" in m else out


def uninstall(model: nn.Module) -> nn.Module:
    """Undo :func:`install`'s hook: the LM head gets its own class back."""
    head, _ = find_head(model)
    base = getattr(type(head), "_head_base", None)
    if base is not None:
        head.__class__ = base
    return model
