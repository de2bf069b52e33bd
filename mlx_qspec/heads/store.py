"""A head's directory, what ``--draft-head DIR`` loads and ``train_head`` / ``convert`` write:
``config.json`` (the block's architecture, sizes, layout, quantization, where it came from)
and ``model.safetensors`` (:class:`~.block.NextTokenHead`'s parameters under their own names).

Loading checks it against the model (hidden size, vocabulary): a head belongs to one model,
and every mistake is one line naming the directory and what does not fit.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelError
from ..vocabulary import vocabulary_size
from .block import NextTokenHead, build_layer, layer_class, quantize

FORMAT = "mlx_qspec.head"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
TRAIN_HINT = "train one with: python -m mlx_qspec.train_head --model MODEL --out DIR"


def head_config(head: NextTokenHead, model_type: str, layer_index: int, config: dict,
                source: dict) -> dict:
    """What :func:`build` needs to rebuild ``head``: ``config`` is the model's config.json
    (the block's arguments), ``source`` says where the head came from."""
    quantized = [m for _, m in head.named_modules() if isinstance(m, nn.QuantizedLinear)]
    return {
        "format": FORMAT,
        "model_type": model_type,
        "block_class": type(head.block).__name__,
        "layer_index": layer_index,
        "hidden_size": head.fc.weight.shape[0],
        "vocab_size": config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"),
        "rms_norm_eps": head.norm.eps,
        "hidden_first": head.hidden_first,
        "feed_back": head.feed_back,
        "own_lm_head": "lm_head" in head,
        "own_embedding": "embed_tokens" in head,
        "draft_vocab": head["draft_vocab"].size if "draft_vocab" in head else 0,
        "quantization": ({"group_size": quantized[0].group_size, "bits": quantized[0].bits}
                         if quantized else None),
        "block_config": {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")},
        "source": source,
    }


def build(cfg: dict, directory) -> NextTokenHead:
    """The NextTokenHead a head config describes, with the weights in ``directory`` (quantized
    as ``cfg`` says: exactly the layers the weights store quantized)."""
    weights = mx.load(str(Path(directory) / WEIGHTS))
    cls = layer_class(cfg["model_type"], cfg["block_class"])
    block = build_layer(cls, cfg["block_config"], cfg["layer_index"])
    head = NextTokenHead(block, cfg["hidden_size"], cfg["vocab_size"], cfg["rms_norm_eps"],
                         hidden_first=cfg["hidden_first"], feed_back=cfg["feed_back"],
                         own_lm_head=cfg["own_lm_head"], own_embedding=cfg["own_embedding"],
                         draft_vocab=cfg.get("draft_vocab", 0))
    if q := cfg.get("quantization"):
        quantize(head, q["group_size"], q["bits"], weights)
    head.load_weights(list(weights.items()), strict=True)
    return head


def save(directory, head: NextTokenHead, cfg: dict) -> Path:
    """Write ``head`` and its config into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / WEIGHTS), dict(tree_flatten(head.parameters())),
                        metadata={"format": "mlx"})
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return directory


def read_config(directory) -> dict:
    """A head directory's config, or a one-line ModelError naming what is missing."""
    directory = Path(directory)
    where = f"--draft-head '{directory}'"
    if not directory.is_dir():
        raise ModelError(f"{where} is not a directory; {TRAIN_HINT}")
    file = directory / CONFIG
    if not file.is_file():
        raise ModelError(f"{where} has no {CONFIG} (not a head directory); {TRAIN_HINT}")
    if not (directory / WEIGHTS).is_file():
        raise ModelError(f"{where} has no {WEIGHTS}; {TRAIN_HINT}")
    cfg = json_object(file)
    if cfg.get("format") != FORMAT:
        raise ModelError(f"{file}: not an mlx_qspec head (no \"format\": \"{FORMAT}\")")
    return cfg


def json_object(file: Path) -> dict:
    """``file``'s JSON object, or a ModelError naming the file and what is wrong (a head's
    config and the loader's config files alike)."""
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def check(cfg: dict, model: nn.Module, ends, where: str) -> None:
    """ModelError unless the head fits ``model``: same hidden size, same vocabulary."""
    hidden, vocab = ends.hidden_size, vocabulary_size(model)
    if cfg.get("hidden_size") != hidden:
        raise ModelError(f"{where}: the head reads hidden states of size {cfg.get('hidden_size')}, "
                         f"the model's are {hidden} (a head is trained for one model); {TRAIN_HINT}")
    if vocab is not None and cfg.get("vocab_size") != vocab:
        raise ModelError(f"{where}: the head's vocabulary has {cfg.get('vocab_size')} tokens, the "
                         f"model's {vocab} (a head is trained for one model); {TRAIN_HINT}")


def load(directory, model: nn.Module, ends, dtype=None) -> tuple[NextTokenHead, dict]:
    """``(head, config)`` from ``directory``, checked against ``model`` (``ends``: its
    :class:`~mlx_qspec.heads.capture.ModelEnds`); floats cast to ``dtype`` (the model's
    compute dtype) if given."""
    directory = Path(directory)
    where = f"--draft-head '{directory}'"
    cfg = read_config(directory)
    check(cfg, model, ends, where)
    try:
        head = build(cfg, directory)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"{where}: the weights do not fit its config ({' '.join(str(e).split())[:200]})") from None
    if dtype is not None:  # scales included: a head is stored at the precision it was written in
        head.set_dtype(dtype)
    return head, cfg
