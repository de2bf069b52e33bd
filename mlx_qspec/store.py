"""What tells models apart in what mlx_qspec keeps between runs: the entries of the JSON
files under :func:`~mlx_qspec.cache_dir.cache_dir` (layer-skip calibrations in ``skip.json``,
measured costs in ``measured.json``) are keyed by the model's :func:`fingerprint`; a prompt
cache records its :func:`weights_fingerprint`. And what is computed once per loaded model
(:func:`per_model`)."""

import hashlib
import weakref

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

_MODELS: dict = {}  # id(model) → what was computed of it, dropped with the model


def per_model(model, what: str, compute):
    """``compute()``, once per loaded model and ``what``: what does not change while it is
    loaded (its fingerprint, the drafts it can run) but is asked for on every request (on
    the server's engine thread too)."""
    memo = _MODELS.get(id(model))
    if memo is None:
        memo = _MODELS[id(model)] = {}
        weakref.finalize(model, _MODELS.pop, id(model), None)
    if what not in memo:
        memo[what] = compute()
    return memo[what]


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
