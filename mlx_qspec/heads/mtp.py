"""The MTP (multi-token prediction) layers checkpoints ship, kept instead of dropped.

mlx-lm's ``sanitize`` drops them in every model that has them. Our loader builds the model
through :func:`keeping` instead: a stand-in class whose ``sanitize`` first takes the MTP
weights out (the model's own sanitize then sees a checkpoint without them), sanitizes them
with the architecture's own sanitize (expert stacking, fp8 dequantization, norm offsets), and
builds a :class:`~.block.NextTokenHead` from them; the model gets its own class back and the
head is kept beside it (:func:`attach`; not a child module, so saving, sharding and
fingerprints see the model mlx-lm sees).

Layouts (the first MTP module; further depths are left out, as llama.cpp does):
DeepSeek-V3 / GLM-4.5 (``model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.*,embed_tokens}``
beside a decoder layer's weights), Qwen3-Next (``mtp.{fc,pre_fc_norm_*,norm,layers.0.*}``),
MiMo (``model.mtp_layers.0.{token_layernorm,hidden_layernorm,input_proj,final_layernorm}``).
A converted directory keeps its MTP as a head directory ``DIR/mtp`` (:mod:`.store`'s format),
which stock mlx-lm does not read.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelError
from . import store
from .block import NORMED, RAW, NextTokenHead, decoder_layer_class, matching_layer, quantize

MTP_DIR = "mtp"  # a converted model's MTP head, in a directory of its own
_ATTR = "_mlx_qspec_mtp"
FIXED_INDEX = 0  # MTP keys are renamed to this layer while the architecture's sanitize runs


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its MTP weights and how its MTP layer computes."""

    prefix: str  # the first MTP module's keys ({L}: the number of hidden layers)
    extras: dict  # module under the prefix -> NextTokenHead module
    block: str = ""  # the decoder layer's weights under the prefix
    hidden_first: bool = False
    feed_back: str = NORMED
    drop: tuple = ()  # prefixes of every MTP key (all depths)

    def is_mtp(self, key: str, config: dict) -> bool:
        if self.drop:
            return key.startswith(self.drop)
        # model.layers.{i}.… with i >= the number of hidden layers
        return key.startswith("model.layers.") and int(key.split(".")[2]) >= config["num_hidden_layers"]


_DEEPSEEK = Layout("model.layers.{L}.", {
    "enorm": "embed_norm", "hnorm": "hidden_norm", "eh_proj": "fc", "shared_head.norm": "norm",
    "shared_head.head": "lm_head", "embed_tokens": "embed_tokens"}, feed_back=RAW)
LAYOUTS = {
    "deepseek_v3": _DEEPSEEK,
    "glm4_moe": _DEEPSEEK,
    "qwen3_next": Layout("mtp.", {"fc": "fc", "pre_fc_norm_embedding": "embed_norm",
                                  "pre_fc_norm_hidden": "hidden_norm", "norm": "norm"},
                         block="layers.0.", drop=("mtp.",)),
    "mimo": Layout("model.mtp_layers.0.", {"token_layernorm": "embed_norm",
                                           "hidden_layernorm": "hidden_norm", "input_proj": "fc",
                                           "final_layernorm": "norm"},
                   hidden_first=True, drop=("model.mtp_layers.",)),
}
_SHIFTED_NORMS = ("embed_norm", "hidden_norm", "norm")  # Gemma-style norms mlx-lm offsets by 1
GGUF_LAYOUT = _DEEPSEEK  # llama.cpp stores every nextn layer as DeepSeek's (blk.N.nextn.*)


def layout_of(config: dict) -> Layout | None:
    """The MTP layout of a checkpoint with this config: its architecture's, or DeepSeek's for
    a GGUF that carries nextn tensors (``gguf.model_config`` marks it); None: no MTP."""
    if config.get("gguf_nextn_layers"):
        return GGUF_LAYOUT
    return LAYOUTS.get(config.get("model_type"))


def attach(model: nn.Module, found) -> None:
    """Keep what loading found beside ``model``, outside its parameter tree: ``(head,
    config)``, or a string saying why the checkpoint's MTP weights could not be used."""
    object.__setattr__(model, _ATTR, found)


def attached(model: nn.Module):
    """``(head, config)`` of the model's MTP layers; a string (why they are unusable); or
    None (the checkpoint has none)."""
    return model.__dict__.get(_ATTR)


def split(weights: dict, config: dict) -> dict:
    """Take the MTP weights out of ``weights`` (in place); returns them (empty: none)."""
    layout = layout_of(config)
    if layout is None:
        return {}
    return {k: weights.pop(k) for k in [k for k in weights if layout.is_mtp(k, config)]}


def _sanitized(model_class, model, layout: Layout, config: dict, mtp: dict) -> tuple[dict, dict]:
    """The first MTP module's weights sanitized by the architecture's own sanitize: renamed to
    layer FIXED_INDEX meanwhile (sanitizers process, or drop, layers by index), then split
    into (block weights, NextTokenHead extras)."""
    prefix, fixed = layout.prefix.format(L=config["num_hidden_layers"]), f"model.layers.{FIXED_INDEX}."
    mine = {fixed + k.removeprefix(prefix).removeprefix(layout.block): v
            for k, v in mtp.items() if k.startswith(prefix)}
    before = {k: v for k, v in mine.items() if k.endswith("input_layernorm.weight")}
    if hasattr(model_class, "sanitize"):
        mine = model_class.sanitize(model, mine)
    mine = {k[len(fixed):]: v for k, v in mine.items() if k.startswith(fixed)}
    shifted = any(not mx.array_equal(v, mine.get(k[len(fixed):], v)).item() for k, v in before.items())
    block, extras = {}, {}
    for k, v in mine.items():
        module, param = k.rsplit(".", 1)
        if module in layout.extras:
            name = layout.extras[module]
            extras[f"{name}.{param}"] = v + 1.0 if shifted and name in _SHIFTED_NORMS else v
        else:
            block[k] = v
    return block, extras


def build(model_class, model: nn.Module, config: dict, mtp: dict):
    """``(head, head config)`` from a checkpoint's MTP weights (as found by :func:`split`)."""
    layout = layout_of(config)
    block_weights, extras = _sanitized(model_class, model, layout, config, mtp)
    if not block_weights or "fc.weight" not in extras:
        raise ModelError(f"{config['model_type']}: the checkpoint's MTP weights are incomplete "
                         f"(found {sorted(mtp)[:4]})")
    cls, n = decoder_layer_class(model), config["num_hidden_layers"]
    layer, index = matching_layer(cls, config, set(block_weights), [n, *range(n)])
    head = NextTokenHead(layer, config["hidden_size"], config["vocab_size"], config.get("rms_norm_eps", 1e-6),
                         hidden_first=layout.hidden_first, feed_back=layout.feed_back,
                         own_lm_head="lm_head.weight" in extras,
                         own_embedding="embed_tokens.weight" in extras)
    weights = {**extras, **{f"block.{k}": v for k, v in block_weights.items()}}
    if q := config.get("quantization"):
        quantize(head, q["group_size"], q["bits"], weights)
    try:
        head.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"{config['model_type']}: cannot load the MTP weights: {e}") from None
    cfg = store.head_config(head, cls.__module__.rsplit(".", 1)[-1], index, config, {"kind": "mtp"})
    return head, cfg


def keeping(get_classes, found: dict):
    """A ``get_model_classes`` for mlx-lm's ``load_model`` (and our ``build_model``) whose model
    class keeps the MTP weights: ``found["class"]`` is the model's own class (give it back
    after loading), ``found["mtp"]`` what :func:`attach` takes, where the checkpoint has MTP
    weights."""
    def classes(config):
        model_class, args_class = get_classes(config=config)
        if layout_of(config) is None:
            return model_class, args_class

        def sanitize(self, weights):
            mtp = split(weights, config)
            if mtp:
                try:
                    found["mtp"] = build(model_class, self, config, mtp)
                except ModelError as e:  # the model itself still loads; --draft mtp says why not
                    found["mtp"] = str(e)
            return model_class.sanitize(self, weights) if hasattr(model_class, "sanitize") else weights

        stand_in = type(model_class.__name__, (model_class,), {"sanitize": sanitize})
        stand_in.__module__ = model_class.__module__
        found["class"] = model_class
        return stand_in, args_class

    return classes


def restore(model: nn.Module, found: dict) -> nn.Module:
    """After loading through :func:`keeping`: the model's own class back, its MTP attached."""
    if "class" in found:
        model.__class__ = found["class"]
    if "mtp" in found:
        attach(model, found["mtp"])
    return model


def load_converted(path) -> tuple | str | None:
    """The MTP head a converted directory keeps in ``path/mtp`` (``(head, config)``), a
    string saying why it cannot be used, or None."""
    folder = Path(path) / MTP_DIR
    if not (folder / store.CONFIG).is_file():
        return None
    try:
        cfg = store.read_config(folder)
        head = store.build(cfg, folder)
    except (ModelError, KeyError, ValueError, RuntimeError) as e:
        return f"{folder}: {' '.join(str(e).split())[:200]}"
    return head, cfg
