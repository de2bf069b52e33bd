"""One next-token block over the model's hidden state: the shape every MTP layer and
EAGLE-style head shares (DeepSeek-V3's MTP module, Qwen3-Next's ``mtp``, MiMo's
``mtp_layers``, EAGLE's draft layer).

Row i takes the embedding of token x_{i+1} and the hidden state h_i that predicted it, each
RMS-normalized, projects their concatenation back to the hidden size, runs one decoder block
of the model's own architecture (mlx-lm's class, with a KV cache of its own) and predicts
x_{i+2} through the model's LM head after a final norm (or its own head, where a checkpoint
ships one). Chained drafting feeds the block's output back as the next row's hidden state.
"""

import importlib
import inspect
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.utils import infer_quant_config

from ..errors import ModelError

NORMED, RAW = "normed", "raw"  # what a chained step feeds back: after the final norm, or before


class NextTokenHead(nn.Module):
    """``hidden_first``: the concatenation order (MiMo puts the hidden state first; DeepSeek,
    Qwen3-Next and our trained heads the embedding). ``feed_back``: ``normed`` (Qwen3-Next,
    MiMo, ours: the fed-back state lives where the model's final hidden state does) or ``raw``
    (DeepSeek-V3, GLM: the block's output before the final norm). ``own_lm_head`` /
    ``own_embedding``: the checkpoint's MTP carries its own (DeepSeek's ``shared_head.head``,
    ``embed_tokens``); otherwise the model's are used. ``draft_vocab``: the size of a reduced
    vocabulary (a trained head's most frequent tokens): its logits are the LM head's rows of
    those tokens only, so a draft step reads a fraction of the LM head (EAGLE-3's idea)."""

    def __init__(self, block: nn.Module, hidden_size: int, vocab_size: int, eps: float, *,
                 hidden_first: bool = False, feed_back: str = NORMED,
                 own_lm_head: bool = False, own_embedding: bool = False, draft_vocab: int = 0):
        super().__init__()
        if feed_back not in (NORMED, RAW):
            raise ValueError(f"feed_back must be {NORMED!r} or {RAW!r}, got {feed_back!r}")
        self.embed_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.hidden_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        if own_lm_head:
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if own_embedding:
            self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        if draft_vocab:  # the token ids it drafts from (EAGLE-3's reduced vocabulary)
            self.draft_vocab = mx.zeros((draft_vocab,), mx.uint32)
            self.freeze(keys=["draft_vocab"], recurse=False)
        self.hidden_first, self.feed_back = hidden_first, feed_back

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache=None):
        """``(fed back, normed)`` for rows of (embedding of x_{i+1}, h_i), each (B, L, D):
        ``normed`` goes to the LM head, ``fed back`` is the next chained row's hidden state."""
        e, h = self.embed_norm(embeddings), self.hidden_norm(hidden)
        x = self.fc(mx.concatenate([h, e] if self.hidden_first else [e, h], axis=-1))
        out = self.block(x, create_attention_mask(x, cache, return_array=True), cache)  # DeepSeek MLA needs an array
        normed = self.norm(out)
        return (normed if self.feed_back == NORMED else out), normed

    def embed(self, tokens: mx.array, ends) -> mx.array:
        """Embedding rows of ``tokens``: the head's own table, else the model's (``ends``:
        :class:`~mlx_qspec.heads.capture.ModelEnds`)."""
        return self.embed_tokens(tokens) if "embed_tokens" in self else ends.embed(tokens)


def decoder_layer_class(model: nn.Module) -> type:
    """mlx-lm's decoder-layer class of ``model`` (under any subclass of ours, e.g. a
    skippable block)."""
    for cls in type(model.layers[0]).__mro__:
        if cls.__module__.startswith("mlx_lm."):
            return cls
    raise ModelError(f"{type(model.layers[0]).__name__}: not an mlx-lm decoder layer")


def layer_class(model_type: str, class_name: str) -> type:
    """A decoder-layer class by its mlx-lm module and name (what a head's config records)."""
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise ModelError(f"model type '{model_type}' is not one mlx-lm knows") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelError(f"mlx-lm's {model_type} has no class {class_name}")
    return cls


def _args_class(cls: type) -> type:
    """The arguments class a decoder layer's ``__init__`` takes first (its annotation, which
    may be a string under ``from __future__ import annotations``)."""
    first = list(inspect.signature(cls.__init__).parameters.values())[1]
    ann = first.annotation
    if isinstance(ann, str):
        ann = getattr(sys.modules[cls.__module__], ann, None)
    if not isinstance(ann, type) or not hasattr(ann, "from_dict"):
        ann = getattr(sys.modules[cls.__module__], "ModelArgs")
    return ann


def build_layer(cls: type, config: dict, layer_index: int) -> nn.Module:
    """One decoder layer of class ``cls`` as the model builds its layer ``layer_index`` (which,
    in hybrid and MoE models, decides attention or recurrence, MoE or dense). ``config``: the
    model's config.json (a nested ``text_config`` is read first)."""
    args = _args_class(cls).from_dict({**config, **config.get("text_config", {})})
    params = list(inspect.signature(cls.__init__).parameters)[2:]
    if params and params[0] in ("layer_idx", "layer_index", "idx"):
        return cls(args, layer_index)
    return cls(args)


def matching_layer(cls: type, config: dict, names: set[str], candidates) -> tuple[nn.Module, int]:
    """The first of ``candidates`` (layer indices) whose layer has exactly the parameters
    ``names`` (quantization scales and biases aside): which of the architecture's layer kinds
    (attention or recurrent, MoE or dense) a checkpoint's MTP block is. Parameters stay lazy."""
    wanted = {n for n in names if not n.endswith((".scales", ".biases"))}
    for i in candidates:
        layer = build_layer(cls, config, i)
        if {k for k, _ in tree_flatten(layer.parameters())} == wanted:
            return layer, i
    raise ModelError(f"the MTP block's weights match no {cls.__name__} of this architecture "
                     f"(e.g. {sorted(wanted)[:3]})")


def quantize(module: nn.Module, group_size: int, bits: int, weights: dict | None = None) -> None:
    """Quantize ``module``'s linears and embeddings as mlx-lm quantizes a model (every layer
    whose input size the group divides); with ``weights``, exactly those stored quantized, each
    at the bits and group size it was stored with."""
    def predicate(path, m):
        if not hasattr(m, "to_quantized"):
            return False
        if weights is not None:
            return f"{path}.scales" in weights and infer_quant_config(path, m, weights)
        return m.weight.shape[-1] % group_size == 0

    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=predicate)
