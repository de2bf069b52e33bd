"""What mlx_qspec measured, kept between runs: one JSON object per file under
:func:`~mlx_qspec.cache_dir.cache_dir` (layer-skip calibrations in ``skip.json``), each entry
keyed by the model's :func:`fingerprint`. A missing or corrupt file reads as empty and is
rewritten: deleting it loses nothing but the time to measure again. Where the folder cannot
be written, what was stored stays in memory for this process (one line says so)."""

import hashlib
import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache_dir import cache_dir, write_file

_MEMORY: dict = {}  # path -> what was stored there in this process


def read(name: str) -> dict:
    """The JSON object stored as ``name`` (or {} if it is missing or corrupt), with what this
    process stored in memory on top."""
    path = cache_dir() / name
    try:
        store = json.loads(path.read_text())
    except (OSError, ValueError):
        store = {}
    return {**(store if isinstance(store, dict) else {}), **_MEMORY.get(path, {})}


def write(name: str, store: dict) -> None:
    path = cache_dir() / name
    _MEMORY[path] = dict(store)
    write_file(path, json.dumps(store, indent=1, sort_keys=True))


def fingerprint(model) -> str:
    """Model class, layer count and parameter bytes: enough to tell loaded models apart."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cls = type(model)
    return f"{cls.__module__}.{cls.__name__}:layers={len(model.layers)}:bytes={nbytes}"


def weights_fingerprint(model) -> str:
    """:func:`fingerprint` and a digest of the first values of every parameter: tells apart
    models of the same shape and size too (another file saved at the same path), in
    milliseconds. What a prompt cache records of the model it was made with."""
    digest = hashlib.sha256()
    for name, value in tree_flatten(model.parameters()):
        digest.update(name.encode())
        digest.update(np.array(value.reshape(-1)[:64].view(mx.uint8)).tobytes())
    return f"{fingerprint(model)}:weights={digest.hexdigest()[:16]}"
