"""Where mlx_qspec keeps what it measured or rebuilt, to reuse on later runs: forward costs
and skip calibrations (``controller``, ``drafts.layer_skip``: JSON objects keyed by the model's
``store.fingerprint``, :func:`read_json` / :func:`write_json`), tokenizers rebuilt from GGUF
metadata (``loader``). ``$MLX_QSPEC_CACHE``, else ``~/.cache/mlx_qspec``; deleting it loses nothing
but time.

Every writer goes through :func:`write_file` / :func:`publish_folder`: where the folder
cannot be written (a read-only home, a sandboxed app, a full disk, a path that is a file)
they return False / None and say so once per folder, in one line; the caller keeps what it
made in memory for this run. Caching must never stop decoding.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

_WARNED: set = set()  # folders already reported as not writable (one line each per process)
_MEMORY: dict = {}  # path -> the JSON object this process last stored there


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_QSPEC_CACHE") or Path.home() / ".cache" / "mlx_qspec")


def _cannot_write(path: Path, error: OSError) -> None:
    """One line per folder and process: which folder, why, and what happens instead."""
    root = cache_dir()
    folder = root if root in path.parents else path.parent
    if folder in _WARNED:
        return
    _WARNED.add(folder)
    print(f"mlx_qspec: warning: cannot write to the cache folder {folder} "
          f"({error.strerror or error}); keeping what it would hold in memory for this run "
          "(set MLX_QSPEC_CACHE to a writable folder)", file=sys.stderr, flush=True)


def write_file(path: Path, text: str) -> bool:
    """``text`` as the file ``path`` (its folders made), whole or not at all: a reader never
    sees half a file. False, with one line, where it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                         prefix=f".{path.stem}-", suffix=path.suffix) as f:
            f.write(text)
        try:
            os.replace(f.name, path)
        except OSError:
            os.unlink(f.name)
            raise
    except OSError as e:
        _cannot_write(path, e)
        return False
    return True


def read_json(name) -> dict:
    """The JSON object stored as ``name`` under :func:`cache_dir` (or at the path ``name``), {}
    if it is missing or corrupt (deleting it loses nothing but the time to measure again),
    with what this process stored there on top: kept in memory where it could not be written."""
    path = cache_dir() / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return {**(data if isinstance(data, dict) else {}), **_MEMORY.get(path, {})}


def write_json(name, data: dict) -> bool:
    """``data`` as the JSON file :func:`read_json` reads; False, with one line, where it
    cannot be written (it is then kept in memory for this process)."""
    path = cache_dir() / name
    _MEMORY[path] = dict(data)
    return write_file(path, json.dumps(data, indent=1, sort_keys=True))


def publish_folder(path: Path, fill: Callable[[Path], None]) -> Optional[Path]:
    """The folder ``path``, filled by ``fill(staging)`` in a staging folder beside it and then
    moved into place whole (a concurrent run that got there first wins); ``path`` where it
    already exists. None, with one line, where the cache cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent))
    except OSError as e:
        _cannot_write(path, e)
        return None
    try:
        fill(staging)
    except OSError as e:  # a full disk: nothing complete to keep
        shutil.rmtree(staging, ignore_errors=True)
        _cannot_write(path, e)
        return None
    try:
        os.replace(staging, path)
    except OSError:
        pass  # another run stored it first
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once moved; else what is left
    return path
