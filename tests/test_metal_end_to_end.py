"""Speculative and plain decoding with the Metal kernels dispatched as a Mac runs them.

``mx.metal.is_available`` is patched to say yes (so ``kernels.backend()`` is "metal" and
every dispatcher takes its Metal path) and ``mx.fast.metal_kernel`` is the MSL emulator,
which runs the exact source MLX would compile. Then greedy speculative decoding must equal
plain decoding token for token and logprob for logprob — in float32, and in float16 (the
dtype a Mac computes in).

What "plain" means on Metal: plain decoding runs the *same* QSpec layers (``install``),
whose verify reads every step through the verify kernel — a one-token step and each row of
a γ+1-token verify are one function (row invariance: ``test_row_invariance.py``). That is
what mlx_qspec's ``draft="none"`` does; here plain is built explicitly as mlx-lm's
``generate_step`` on the installed model (mlx_qspec's plain path also installs its
attention dispatcher, which hands an ordinary KV cache straight to mlx-lm's attention).
Stock ``QuantizedLinear`` layers run MLX's own matmul instead (qmv on a Mac, the CPU
``quantized_matmul`` here): a different float rounding, which the last test shows.

Shapes: the tiny model (hidden 128, FFN 256, 4-bit group 32, vocab 256) runs entirely
inside what the kernels take (K a multiple of the weight group, ≤ 16 rows per call), and
the prompt is short enough (8 tokens: a 7-row prefill) that even the prefill goes
through the verify kernel, so no forward of either side falls back to MLX's CPU matmul.
"""

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step

from helpers import build_tiny_model
from mlx_qspec.quant.linear import install
from mlx_qspec.decoder import SpecStats
from mlx_qspec.speculative import speculative_generate_step
from tools.msl_emulator import recording

PROMPT = [5, 77, 140, 3, 250, 19, 64, 8]
MAX_TOKENS = 12
GAMMA = 4


def plain(model, prompt, max_tokens):
    """Plain greedy decoding as ``draft="none"`` runs it: mlx-lm's generate_step on the
    model with QSpec layers installed (the verify kernel for every step)."""
    install(model)
    return [(t, lp) for t, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def tiny(dtype=mx.float32):
    model = build_tiny_model()
    if dtype != mx.float32:  # what a Mac computes in: scales, biases, norms, embeddings
        model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating)
                              else p, model.parameters()))
    return model


@pytest.mark.parametrize("dtype, draft", [
    (mx.float32, "a8-g32"),   # drafts mostly kept
    (mx.float32, "a4"),       # drafts often cut: the correction path
    (mx.float16, "a4"),       # a Mac's compute dtype
], ids=["f32-a8-g32", "f32-a4", "f16-a4"])
def test_speculative_equals_plain_through_the_metal_kernels(mac, dtype, draft):
    model = tiny(dtype)
    with recording() as runs:
        ref = plain(model, PROMPT, MAX_TOKENS)
    assert {name for name, _ in runs} == {"w4a16_verify"}
    assert ref[0][1].dtype == dtype
    # every linear forward of plain decoding ran the verify kernel (7 per layer, 2 layers,
    # + LM head where the QSpec layers include it): nothing fell back to MLX's matmul
    assert len(runs) >= 14 * (MAX_TOKENS + 1)

    stats = SpecStats()
    with recording() as runs:
        out = list(speculative_generate_step(mx.array(PROMPT), model, draft=draft,
                                             num_draft_tokens=GAMMA, max_tokens=MAX_TOKENS,
                                             stats=stats))
    kinds = {name for name, _ in runs}
    assert {"w4a16_verify", "act_quant", "w4a_int_matmul"} <= kinds, kinds

    assert [t for t, _, _ in out] == [t for t, _ in ref]
    for i, ((_, lp, _), (_, ref_lp)) in enumerate(zip(out, ref)):
        assert mx.array_equal(lp, ref_lp).item(), f"logprobs of token {i} differ"
    assert stats.emitted == MAX_TOKENS
    assert stats.accepted > 0 and stats.verify_passes < MAX_TOKENS  # drafts were kept
    if draft == "a4":
        assert stats.accepted < stats.drafted  # and cut: the correction path ran


def test_stock_layers_compute_other_numbers_on_metal(mac):
    """Why plain must run the QSpec layers on a Mac: stock QuantizedLinear (MLX's own
    matmul) and the verify kernel differ in float rounding, so a comparison against stock
    layers could not be bit-exact. (The tokens may still agree; the logprobs do not.)"""
    stock = build_tiny_model()
    stock_lps = [lp for _, lp in generate_step(mx.array(PROMPT), stock, max_tokens=4)]
    ours = [lp for _, lp in plain(build_tiny_model(), PROMPT, 4)]
    assert not all(mx.array_equal(a, b).item() for a, b in zip(stock_lps, ours))
    assert max(mx.abs(a - b).max().item() for a, b in zip(stock_lps, ours)) < 1e-3
