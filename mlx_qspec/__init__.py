"""mlx_qspec: exactly-lossless self-speculative decoding for 4-bit LLMs on MLX.

The API's names are imported on first use (PEP 562), so that ``python -m mlx_qspec.<command>``
starts in milliseconds and handles Ctrl-C before MLX and transformers load
(:mod:`mlx_qspec.command`)."""

import importlib

# The generate command's package first (light): imported after the API's ``generate`` were
# bound, it would make ``mlx_qspec.generate`` the package again. The name is the API's.
from . import generate as _generate_command  # noqa: F401

del generate  # noqa: F821  (bound by the import above; looked up below on first use)

_API = {"generate": "api", "stream_generate": "api", "load": "loader", "make_sampler": "sampling",
        "default_model_path": "loader"}
__all__ = ["load", "generate", "stream_generate", "make_sampler", "default_model_path"]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'mlx_qspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value
