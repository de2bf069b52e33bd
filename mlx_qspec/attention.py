"""Route mlx-lm's attention to the nested-KV kernel, and count the KV bytes attention reads.

mlx-lm's models call ``scaled_dot_product_attention`` by its name in their own module
(``from .base import scaled_dot_product_attention``), so the one place to intercept every
architecture's attention without copying it is that module global. :func:`install` replaces
it with a dispatcher that is transparent for every other cache: a :class:`NestedKVCache` goes
to ``kernels.nested_attention`` (reading only the upper planes when the current precision says
``kv-upper``), anything else to the original function.
"""

import sys

import mlx.nn as nn

from . import kernels, precision, reads
from .kv_cache import NestedKVCache

NAME = "scaled_dot_product_attention"


def _arrays(x):
    """The arrays in a fetched key/value: an array, or a tuple (quantized, nested)."""
    return x if isinstance(x, (tuple, list)) else (x,)


def _dispatcher(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        upper = precision.current().kv == precision.UPPER
        if not isinstance(cache, NestedKVCache):
            if upper:
                raise ValueError("kv-upper needs --kv-mode nested")
            reads.count(reads.KV, *_arrays(keys), *_arrays(values))
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        if sinks is not None:
            raise ValueError("attention sinks are not supported with a nested KV cache")
        for u, lo, s, m, buf in (keys, values):
            reads.count(reads.KV, u, None if upper else lo, s, m, buf)
        return kernels.nested_attention(queries, keys, values, scale=scale, mask=mask, upper=upper,
                      key_block=cache.block_size, value_group=cache.value_group_size)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


def install(model: nn.Module):
    """Patch the attention of every mlx-lm module ``model``'s classes come from (idempotent)."""
    for name in {type(m).__module__ for m in (model, *model.modules())}:
        module = sys.modules.get(name)
        fn = getattr(module, NAME, None)
        if fn is not None and not hasattr(fn, "original"):
            setattr(module, NAME, _dispatcher(fn))
    return model
