"""mlx-lm's attention, routed by cache: a :class:`NestedKVCache` to the nested-KV kernel,
anything else to mlx-lm's own function; the KV bytes attention reads are counted either way.

:func:`route` is what each mlx-lm module's ``scaled_dot_product_attention`` becomes once
:func:`mlx_qspec.hooks.install` has patched it: transparent for every other cache, and for a
nested one ``kernels.nested_attention`` reading only the upper planes when the current
precision says ``kv-upper``.
"""

from . import kernels, precision, reads
from .kv_cache import NestedKVCache


def _arrays(x):
    """The arrays in a fetched key/value: an array, or a tuple (quantized, nested)."""
    return x if isinstance(x, (tuple, list)) else (x,)


def route(original, queries, keys, values, cache, scale, mask, sinks=None):
    """Attention over ``cache`` as mlx-lm's ``original`` would compute it, or through the
    nested-KV kernel for a :class:`NestedKVCache`."""
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
