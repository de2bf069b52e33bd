"""The draft/verify linear layer: one packed 4-bit weight read two ways.

:func:`install` swaps every affine :class:`mlx.nn.QuantizedLinear` of a loaded
model (not the LM head, not embeddings) for a :class:`QSpecLinear` that holds the
*same* weight, scales and biases arrays. All of a model's QSpec layers read one
:class:`ModeSwitch`, so switching draft ↔ verify is one attribute write: no
module is rebuilt and nothing is copied.
"""

from contextlib import contextmanager

import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .. import kernels
from .modes import DraftMode, check_draft, draftable_layers, parse_draft


class ModeSwitch:
    """The one mode all QSpec layers of a model read: ``draft`` None means verify."""

    def __init__(self):
        self.draft: DraftMode | None = None

    @contextmanager
    def drafting(self, mode: DraftMode | None):
        """Run the block in ``mode`` (None: verify) and restore the previous mode after."""
        prev, self.draft = self.draft, mode
        try:
            yield
        finally:
            self.draft = prev


class QSpecLinear(nn.QuantizedLinear):
    """A ``QuantizedLinear`` whose input is quantized when its switch is in a draft mode.

    Subclasses ``QuantizedLinear`` (same parameter names) so code that saves, inspects
    or counts a quantized model sees nothing new. Verify goes through
    ``kernels.verify_matmul`` for every row count up to a verify block, so a one-token
    step and a γ+1-token verify take the same kernel path (MLX's own
    ``quantized_matmul`` elsewhere, where it is bit-identical to ``QuantizedLinear``).
    """

    def __init__(self, layer: nn.QuantizedLinear, switch: ModeSwitch):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, layer.mode
        self.weight, self.scales, self.biases = layer.weight, layer.scales, layer.biases
        if "bias" in layer:
            self.bias = layer.bias
        self.switch = switch
        self.freeze()

    def __call__(self, x):
        draft = self.switch.draft
        args = (x, self["weight"], self["scales"], self["biases"])
        if draft is None:
            y = kernels.verify_matmul(*args, group_size=self.group_size, bits=self.bits)
        else:
            y = kernels.act_quant_matmul(
                *args,
                group_size=self.group_size,
                bits=self.bits,
                act_bits=draft.act_bits,
                act_group_size=draft.act_group_size,
            )
        if "bias" in self:
            y = y + self["bias"]
        return y


def find_switch(model: nn.Module) -> ModeSwitch | None:
    """The switch of an installed model, or None if :func:`install` has not run."""
    for _, m in model.named_modules():
        if isinstance(m, QSpecLinear):
            return m.switch
    return None


def install(model: nn.Module) -> ModeSwitch:
    """Put QSpec layers in ``model`` (idempotent) and return its mode switch.

    Layers quantized after an earlier install join the existing switch.
    """
    switch = find_switch(model) or ModeSwitch()
    targets = {id(m) for _, m in draftable_layers(model) if not isinstance(m, QSpecLinear)}
    if targets:

        def swap(_, m):
            return QSpecLinear(m, switch) if id(m) in targets else m

        leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
        model.update_modules(leaves)
    return switch


def set_mode(model: nn.Module, mode: "str | DraftMode | None") -> ModeSwitch:
    """Switch the whole model to a draft mode (name or :class:`DraftMode`) or to verify (None/'none').

    Validates the mode against the model first: a mode it cannot run raises ValueError.
    """
    mode = check_draft(model, parse_draft(mode))
    switch = install(model)
    switch.draft = mode
    return switch
