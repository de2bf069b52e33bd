"""Every patch mlx_qspec makes to mlx-lm and ``mx.distributed``, in one place, each undoable.

- Layers: each affine ``QuantizedLinear`` / ``QuantizedEmbedding`` of a model becomes a QSpec
  layer (:mod:`mlx_qspec.quant.linear`) that reads the forward's precision.
- Attention: mlx-lm's models call ``scaled_dot_product_attention`` by its name in their own
  module, so that module global is the one place to reach every architecture's attention
  without copying it; it becomes :func:`mlx_qspec.attention.route` (a nested KV cache to our
  kernel, KV reads counted, anything else to the original).
- Blocks: each transformer block's class becomes a subclass that passes its input through
  when the current precision skips it (layer-skip drafts).
- The LM head: its class becomes a subclass that records its input (the final hidden state)
  inside :func:`mlx_qspec.heads.capture.capturing` (drafts that read the hidden state).
- Recurrent mixers (hybrid models): their short convolutions exact sums of shifted products,
  their calls recording into a rewindable cache, the recurrences of their mlx-lm modules
  wrapped (:func:`mlx_qspec.recurrent.install`).
- Collectives: each ``mx.distributed`` collective calls a counter first
  (:func:`mlx_qspec.distributed.counting`).

:func:`install` / :func:`uninstall` do the first five for a model (idempotent; uninstall puts
back the very modules, classes and functions that were there, an attention global once no
installed model uses it); :func:`install_collective_counting` /
:func:`uninstall_collective_counting` the last. Plain decoding, the decoder and the server
install before they run; nothing else patches.
"""

import sys
import weakref

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import attention, precision, recurrent
from .heads import capture
from .quant import linear

ATTENTION = "scaled_dot_product_attention"
COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "sum_scatter",
               "send", "recv", "recv_like")

_layers: dict[int, dict] = {}  # id(model) → {path: the module install replaced}
_attention_users: dict[str, set[int]] = {}  # mlx-lm module name → ids of installed models
_skippable_classes: dict[type, type] = {}  # block class → its skippable subclass


def _leaves(model: nn.Module) -> dict:
    return dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))


def _skippable(cls: type) -> type:
    """A subclass of a transformer block class that returns its input when the current
    precision skips it (its ``skip_index``)."""
    if cls not in _skippable_classes:
        def __call__(self, x, *args, **kwargs):
            if self.skip_index in precision.current().skip:
                return x
            return cls.__call__(self, x, *args, **kwargs)

        _skippable_classes[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _skippable_classes[cls]


def install_skippable_blocks(model: nn.Module) -> nn.Module:
    """Make every transformer block skippable, in place (no weight moves; idempotent)."""
    for i, block in enumerate(model.layers):
        if type(block) not in _skippable_classes.values():
            block.__class__ = _skippable(type(block))
        block.skip_index = i
    return model


def _dispatcher(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        return attention.route(original, queries, keys, values, cache, scale, mask, sinks)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


def install(model: nn.Module) -> nn.Module:
    """QSpec layers, our attention, the LM head's capture, recurrent mixers and skippable
    blocks on ``model``; returns it. Installing an installed model again does nothing (to add
    layers quantized since, uninstall first)."""
    if id(model) in _layers:
        return model
    before = _leaves(model)
    linear.install(model)
    mx.eval(model.parameters())  # 8-bit planes built now: any thread may run the model
    after = _leaves(model)
    _layers[id(model)] = {p: m for p, m in before.items() if after.get(p) is not m}
    weakref.finalize(model, _forget, id(model))
    capture.install(model)
    install_attention(model)
    recurrent.install(model)
    return install_skippable_blocks(model)


def install_attention(module: nn.Module) -> nn.Module:
    """Our attention for every mlx-lm module ``module``'s classes come from (idempotent):
    the model's, or a draft head's block (:mod:`mlx_qspec.heads`)."""
    for name in {type(m).__module__ for m in (module, *module.modules())}:
        found = sys.modules.get(name)
        fn = getattr(found, ATTENTION, None)
        if fn is None:
            continue
        if not hasattr(fn, "original"):
            setattr(found, ATTENTION, _dispatcher(fn))
        _attention_users.setdefault(name, set()).add(id(module))
    return module


def _forget(model_id: int) -> None:
    _layers.pop(model_id, None)
    for name, users in list(_attention_users.items()):
        users.discard(model_id)
        if not users:
            _restore_attention(name)


def _restore_attention(name: str) -> None:
    _attention_users.pop(name, None)
    module = sys.modules.get(name)
    fn = getattr(module, ATTENTION, None)
    if hasattr(fn, "original"):
        setattr(module, ATTENTION, fn.original)


def uninstall(model: nn.Module) -> nn.Module:
    """Undo :func:`install` on ``model``: its original layers, block and mixer classes come
    back, and the attention and recurrences of each mlx-lm module no other installed model
    uses."""
    capture.uninstall(model)
    recurrent.uninstall(model)
    originals = _layers.pop(id(model), {})
    if originals:
        model.update_modules(tree_unflatten(list(originals.items())))
    for block in model.layers:
        if type(block) in _skippable_classes.values():
            block.__class__ = type(block).__bases__[0]
    _forget(id(model))
    return model


def _counted(fn, on_call):
    def collective(*args, **kwargs):
        on_call()
        return fn(*args, **kwargs)

    collective.original = fn
    return collective


def install_collective_counting(on_call) -> None:
    """Have every ``mx.distributed`` collective call ``on_call()`` first (idempotent).
    Models call them by their module name at each forward, so that name is the one place
    to see them all, whoever shards the model."""
    for name in COLLECTIVES:
        fn = getattr(mx.distributed, name, None)
        if fn is not None and not hasattr(fn, "original"):
            setattr(mx.distributed, name, _counted(fn, on_call))


def uninstall_collective_counting() -> None:
    for name in COLLECTIVES:
        fn = getattr(mx.distributed, name, None)
        if hasattr(fn, "original"):
            setattr(mx.distributed, name, fn.original)
