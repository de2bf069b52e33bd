"""The draft/verify layers: one packed weight copy, read at the precision of the forward.

:func:`install` swaps every affine :class:`mlx.nn.QuantizedLinear` of a loaded model for a
:class:`QSpecLinear` and every affine :class:`mlx.nn.QuantizedEmbedding` for a
:class:`QSpecEmbedding`. 4-bit layers keep the *same* weight, scales and biases arrays;
8-bit layers are kept once as two 4-bit planes of the same codes (c = 16u + l), so the
verify reads the exact 8-bit result and a ``w-upper`` draft reads the upper plane only.
Each call reads :func:`mlx_qspec.precision.current` — nothing about the mode is stored in
the model, so a precision never outlives the forward that set it — and counts the bytes it
reads (:mod:`mlx_qspec.reads`). Plain decoding runs through these same layers, so a plain
step and every verify row take one kernel path. A model sharded over several machines
(mlx-lm's ``model.shard``) gets the same layers over its shards: the all-to-sharded linears
become :class:`QSpecLinear`, the sharded-to-all ones :class:`QSpecShardedToAllLinear`.
"""

from functools import reduce

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .. import kernels, precision, reads
from .activations import fake_quantize_activations
from .modes import draftable_layers


def _init_weights(module: nn.Module, layer: nn.Module):
    """Share ``layer``'s quantized arrays; 8-bit codes become upper and lower planes."""
    module.group_size, module.bits, module.mode = layer.group_size, layer.bits, layer.mode
    if layer.bits == 8:
        module.upper, module.lower = kernels.split_planes(layer.weight)
    else:
        module.weight = layer.weight
    module.scales, module.biases = layer.scales, layer.biases


def _describe(module: nn.Module) -> str:
    """``repr`` details (the stock ones read ``weight``, which 8-bit layers no longer have)."""
    packed = module["upper"] if "upper" in module else module["weight"]
    planes = ", two 4-bit planes" if "upper" in module else ""
    return (f"input_dims={packed.shape[1] * 32 // (4 if planes else module.bits)}, "
            f"output_dims={packed.shape[0]}, group_size={module.group_size}, "
            f"bits={module.bits}{planes}")


def _matmul(module: nn.Module, x: mx.array, act_draft: bool) -> mx.array:
    """``x @ W^T`` as the current precision reads W (and x, where ``act_draft``), in x's
    dtype: float32 scales (a k-quant GGUF's, kept exact) would otherwise promote a
    half-precision model's residual stream, and its KV cache, to float32."""
    y = _product(module, x, act_draft)
    return y if y.dtype == x.dtype else y.astype(x.dtype)


def _product(module: nn.Module, x: mx.array, act_draft: bool) -> mx.array:
    p = precision.current()
    quantize_x = act_draft and p.act_bits is not None
    s, b = module["scales"], module["biases"]
    if "upper" in module:
        upper_only = p.weights == precision.UPPER
        lower = None if upper_only else module["lower"]
        reads.count(reads.WEIGHTS, module["upper"], lower, s, b)
        if quantize_x:
            x = fake_quantize_activations(x, p.act_bits, p.act_group_size)
        return kernels.nested_matmul(x, module["upper"], lower, s, b,
                                     group_size=module.group_size, draft=upper_only)
    w = module["weight"]
    reads.count(reads.WEIGHTS, w, s, b)
    if quantize_x:
        return kernels.act_quant_matmul(x, w, s, b, group_size=module.group_size,
                                        bits=module.bits, act_bits=p.act_bits,
                                        act_group_size=p.act_group_size)
    return kernels.verify_matmul(x, w, s, b, group_size=module.group_size, bits=module.bits)


class QSpecLinear(nn.QuantizedLinear):
    """A ``QuantizedLinear`` read at the forward's precision.

    Subclasses ``QuantizedLinear`` so code that inspects a quantized model sees nothing
    new. Verify goes through ``kernels.verify_matmul`` for every row count up to a verify
    block, so a one-token step and a γ+1-token verify take the same kernel path (MLX's own
    ``quantized_matmul`` elsewhere, where it is bit-identical to ``QuantizedLinear``).
    ``act_draft=False`` (the LM head) keeps activations at full precision in every draft.
    """

    def __init__(self, layer: nn.QuantizedLinear, act_draft: bool = True):
        nn.Module.__init__(self)
        _init_weights(self, layer)
        if "bias" in layer:
            self.bias = layer.bias
        self.act_draft = act_draft
        self.freeze()

    def _extra_repr(self):
        return _describe(self) + f", act_draft={self.act_draft}"

    def __call__(self, x):
        y = _matmul(self, x, self.act_draft)
        if "bias" in self:
            y = y + self["bias"]
        return y


class QSpecShardedToAllLinear(QSpecLinear):
    """mlx's ``QuantizedShardedToAllLinear`` read at the forward's precision: this rank's
    partial product over its slice of the input, summed over the ranks.

    The sum is an ``all_gather`` added in rank order, not mlx's ring ``all_sum``: the ring
    adds an element's partials in an order set by where the element falls in the flattened
    array, so a row of a γ+1-row verify could differ in its last bit from the same position
    decoded alone. Added elementwise in rank order, every rank gets the same bits for every
    row count. For a decode step's few rows the gather is also one ring pass where
    ``all_sum`` makes two (scatter-reduce, then gather).
    """

    def __init__(self, layer: QuantizedShardedToAllLinear, act_draft: bool = True):
        super().__init__(layer, act_draft)
        self.group = layer.group

    def __call__(self, x):
        partial = _matmul(self, x, self.act_draft)
        y = reduce(mx.add, mx.distributed.all_gather(partial[None], group=self.group))
        if "bias" in self:
            y = y + self["bias"]
        return y


# A forward of at most this many (token, expert) rows gathers its experts row by row (no
# expert sorting): kernels.MAX_M verify rows of up to 16 experts each. So a verify row and a
# one-token step take one kernel path (mlx-lm's SwitchGLU sorts from 64 rows, and sorted
# rows go to another Metal kernel); longer prompt chunks sort, in plain decoding alike.
UNSORTED_ROWS = kernels.MAX_M * 16


class QSpecSwitchLinear(QuantizedSwitchLinear):
    """mlx-lm's ``QuantizedSwitchLinear`` (a mixture's experts, same arrays) read at the
    forward's precision, counting only the experts its rows route to
    (:func:`reads.count_routed`; ``route_key`` names the expert layer its projections share).

    Activation drafts quantize the rows' activations before affine experts (4- or 8-bit).
    ``w-upper`` reads 8-bit experts whole (halving them would take a second copy of their
    scales), and other modes (mxfp4, nvfp4, mxfp8) are read as stored at every precision."""

    def __init__(self, layer: QuantizedSwitchLinear, route_key: str):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, layer.mode
        self.weight, self.scales, self.biases = layer.weight, layer.scales, layer.biases
        self.global_scale = layer.global_scale
        if "bias" in layer:
            self.bias = layer.bias
        self.route_key = route_key
        self.freeze()

    def __call__(self, x, indices, sorted_indices=False):
        p = precision.current()
        if self.mode == "affine" and p.act_bits is not None:
            x = fake_quantize_activations(x, p.act_bits, p.act_group_size)
        reads.count_routed(indices, self["weight"], self["scales"], self.get("biases"),
                           self.global_scale)
        return super().__call__(x, indices, sorted_indices and indices.size > UNSORTED_ROWS)


class CountedQuantizedLinear(nn.QuantizedLinear):
    """A non-affine ``QuantizedLinear`` (mxfp4, nvfp4, mxfp8) as MLX runs it, its bytes counted.
    No draft reads it with fewer bits (its codes have no second plane, activation drafts
    need affine weights)."""

    def __call__(self, x):
        reads.count(reads.WEIGHTS, self["weight"], self["scales"], self.get("biases"))
        return super().__call__(x)


class QSpecEmbedding(nn.QuantizedEmbedding):
    """A ``QuantizedEmbedding`` whose tied LM head (``as_linear``) is read at the forward's
    precision; lookups always read the exact rows (a few rows: nothing to save), given in
    the model's compute dtype (float32 k-quant scales would promote them)."""

    def __init__(self, layer: nn.QuantizedEmbedding, dtype: mx.Dtype | None = None):
        nn.Module.__init__(self)
        _init_weights(self, layer)
        self.num_embeddings, self.dims = layer.num_embeddings, layer.dims
        self.dtype_name = str(dtype or layer.scales.dtype).rsplit(".", 1)[-1]  # Dtype won't copy
        self.freeze()

    def _extra_repr(self):
        return _describe(self)

    def __call__(self, x):
        if "upper" in self:
            w = kernels.merge_planes(self["upper"][x.reshape(-1)], self["lower"][x.reshape(-1)])
            w = w.reshape(*x.shape, -1)
        else:
            w = self["weight"][x]
        rows = mx.dequantize(w, self["scales"][x], self["biases"][x],
                             group_size=self.group_size, bits=self.bits)
        dtype = getattr(mx, self.dtype_name)
        return rows if rows.dtype == dtype else rows.astype(dtype)

    def as_linear(self, x):
        return _matmul(self, x, act_draft=False)


def _swap_leaves(model: nn.Module, swap) -> None:
    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: that of its float parameters other than quantization
    scales and biases (norms, float layers); of the scales where it has no such parameter."""
    floats = [(k, p.dtype) for k, p in tree_flatten(model.parameters())
              if mx.issubdtype(p.dtype, mx.floating)]
    return next((d for k, d in floats if not k.endswith((".scales", ".biases"))),
                floats[0][1] if floats else mx.float32)


def install(model: nn.Module) -> nn.Module:
    """Put QSpec layers in ``model`` (idempotent; layers quantized later join on the next
    call) and return it. The layers hold no mode: they read the current precision."""
    sharded = []

    def wrap_sharded(_, m):
        """Sharded linears become QSpec layers first: as ``QuantizedLinear`` subclasses they
        are then draftable by the same rule as the others."""
        if getattr(m, "mode", None) != "affine" or isinstance(m, QSpecLinear):
            return m
        if isinstance(m, QuantizedShardedToAllLinear):
            sharded.append(QSpecShardedToAllLinear(m))
        elif isinstance(m, QuantizedAllToShardedLinear):  # its forward: its shard's matmul
            sharded.append(QSpecLinear(m))
        else:
            return m
        return sharded[-1]

    _swap_leaves(model, wrap_sharded)
    act = {id(m) for _, m in draftable_layers(model)}
    dtype = compute_dtype(model)
    for m in sharded:
        m.act_draft = id(m) in act

    def swap(path, m):
        if isinstance(m, (QSpecLinear, QSpecEmbedding, QSpecSwitchLinear, CountedQuantizedLinear)):
            return m
        if isinstance(m, QuantizedSwitchLinear):
            return QSpecSwitchLinear(m, route_key=path.rsplit(".", 1)[0])
        if getattr(m, "mode", "affine") != "affine" and type(m) is nn.QuantizedLinear:
            m.__class__ = CountedQuantizedLinear
            return m
        if getattr(m, "mode", None) != "affine":
            return m
        if isinstance(m, nn.QuantizedLinear):
            return QSpecLinear(m, act_draft=id(m) in act)
        if isinstance(m, nn.QuantizedEmbedding):
            return QSpecEmbedding(m, dtype)
        return m

    _swap_leaves(model, swap)
    return model


def is_installed(model: nn.Module) -> bool:
    return any(isinstance(m, (QSpecLinear, QSpecEmbedding, QSpecSwitchLinear))
               for _, m in model.named_modules())
