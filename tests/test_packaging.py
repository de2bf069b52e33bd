"""What `pip install mlx-qspec` gets: the wheel, built offline from a copy of the tree, must
carry the Metal sources (else a Mac silently runs the MLX fallbacks), every module, the
LICENSE, and a declared dependency for every third-party import."""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(file name → bytes, METADATA text) of a wheel built from the repository's sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mlx_qspec", "metal"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "dist").glob("mlx_qspec-*.whl")
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    metadata = next(v.decode() for n, v in files.items() if n.endswith(".dist-info/METADATA"))
    return files, metadata


def test_wheel_carries_the_metal_sources_inside_the_package(wheel):
    files, _ = wheel
    sources = sorted((ROOT / "metal").glob("*.metal"))
    assert sources
    for path in sources:
        assert files.get(f"mlx_qspec/metal/{path.name}") == path.read_bytes(), path.name
    assert not [n for n in files if n.startswith("metal/")]  # nothing loose in site-packages


def test_wheel_carries_every_module(wheel):
    """A subpackage missing from pyproject's list would install a broken package."""
    files, _ = wheel
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "mlx_qspec").rglob("*.py")
               if "__pycache__" not in p.parts]
    assert modules and [m for m in modules if m not in files] == []


def test_license_and_metadata(wheel):
    files, metadata = wheel
    license_file = next(v for n, v in files.items() if n.endswith(".dist-info/licenses/LICENSE"))
    assert license_file == (ROOT / "LICENSE").read_bytes()
    assert b"MIT License" in license_file
    assert "License-Expression: MIT" in metadata


def _names(node) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return {node.module.split(".")[0]}
    return set()


def third_party_imports() -> tuple[set[str], set[str]]:
    """What ``mlx_qspec`` imports from other distributions: always, and only where an
    ImportError is caught (an optional extra, e.g. matplotlib for the bench's plot)."""
    names, optional = set(), set()
    for path in (ROOT / "mlx_qspec").rglob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                           for h in t.handlers)
                   for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            (optional if id(node) in guarded else names).update(_names(node))
    ours = set(sys.stdlib_module_names) | {"mlx_qspec"}
    return names - ours, optional - names - ours


def test_every_import_is_a_declared_dependency(wheel):
    """Every import is a dependency; one guarded by ``except ImportError`` may be an extra."""
    _, metadata = wheel
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    requires = [line[len("Requires-Dist: "):] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    dist = lambda line: norm(re.match(r"[A-Za-z0-9._-]+", line).group())  # noqa: E731
    declared = {dist(r) for r in requires if "extra ==" not in r}
    extras = {dist(r) for r in requires if "extra ==" in r}
    imports, optional = third_party_imports()
    assert {"mlx", "mlx_lm", "tokenizers"} <= imports
    owners = packages_distributions()
    undeclared = [m for m in imports if not {norm(d) for d in owners.get(m, [m])} & declared]
    assert undeclared == [], f"imported but not in pyproject's dependencies: {undeclared}"
    unlisted = [m for m in optional
                if not {norm(d) for d in owners.get(m, [m])} & (declared | extras)]
    assert unlisted == [], f"imported where optional but in no extra: {unlisted}"


def test_installed_wheel_finds_the_metal_sources(wheel, tmp_path):
    """A wheel install, not the source tree, must feed kernels.py its sources."""
    files, _ = wheel
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    code = "import mlx_qspec.kernels as k; print(k.METAL_DIR); print(sorted(k._read_sources()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "mlx_qspec" / "metal") in proc.stdout
    assert all(p.stem in proc.stdout for p in (ROOT / "metal").glob("*.metal"))
