"""Where mlx_qspec keeps what it measured or rebuilt, to reuse on later runs: forward costs
and skip calibrations (``cost``, ``layer_skip``), tokenizers rebuilt from GGUF metadata
(``loader``). ``$MLX_QSPEC_CACHE``, else ``~/.cache/mlx_qspec``; deleting it loses nothing
but time."""

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_QSPEC_CACHE") or Path.home() / ".cache" / "mlx_qspec")
