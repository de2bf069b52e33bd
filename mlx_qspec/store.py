"""What mlx_qspec measured, kept between runs: one JSON object per file under
:func:`~mlx_qspec.cache_dir.cache_dir` (forward costs in ``costs.json``, layer-skip
calibrations in ``skip.json``), each entry keyed by the model's :func:`fingerprint`.
A missing or corrupt file reads as empty and is rewritten: deleting it loses nothing but
the time to measure again."""

import json

from mlx.utils import tree_flatten

from .cache_dir import cache_dir


def read(name: str) -> dict:
    """The JSON object stored as ``name``, or {} if it is missing or corrupt."""
    try:
        store = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return store if isinstance(store, dict) else {}


def write(name: str, store: dict) -> None:
    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1, sort_keys=True))


def fingerprint(model) -> str:
    """Model class, layer count and parameter bytes: enough to tell loaded models apart."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cls = type(model)
    return f"{cls.__module__}.{cls.__name__}:layers={len(model.layers)}:bytes={nbytes}"
