"""How far rotation moves the model, and how much it lifts draft/verify agreement.

For the original model and each rotated variant (residual rotation × float/RTN/GPTQ; "float"
is the rotated model before re-quantization, which must match the original), on real text
that ships with every Python (its LICENSE.txt and stdlib sources), teacher-forced:

- greedy match: how often the variant's argmax token equals the original's, and perplexity;
- draft/verify top-1 agreement for draft modes a8, a8-g32, a4, a4-g32: the draft is the same
  model with every linear's input fake-quantized (quantize → dequantize), except the LM head
  and the embedding; the verify reads activations in float32.

Compute path (deliberate): every model here runs on *dequantized float32 weights* through
dense matmuls, so that MLX can use a preloaded OpenBLAS (measured: 70× faster than
quantized_matmul on MLX-CPU). Dequantizing is exact, so logits equal the quantized model's
up to float rounding; all models and modes in one comparison use this same path. Run with

    PYTHONPATH=. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_rotation.py --json rotation.json

GPTQ calibrates on text disjoint from the evaluation text.
"""

import json
import math
import os
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.utils import dequantize_model

from plotting import arguments, write
from mlx_qspec import load
from mlx_qspec.bench import log
from mlx_qspec.cli import default_model_path
from mlx_qspec.controller import expected_tokens
from mlx_qspec.quant.activations import fake_quantize_activations
from mlx_qspec.calibration_text import calibration_tokens
from mlx_qspec.rotate import (
    build_model,
    rotate_model,
    rotate_weights,
    rotated_config,
)

MODES = {"a8": (8, None), "a8-g32": (8, 32), "a4": (4, None), "a4-g32": (4, 32)}
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Disjoint from calibration_text.CALIBRATION_FILES (GPTQ's calibration text).
EVAL_TEXTS = [STDLIB / "LICENSE.txt", STDLIB / "argparse.py", STDLIB / "json" / "__init__.py"]


def densify(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float32 ones holding the dequantized weights (exact)."""
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


class ActQuant(nn.Module):
    """Fake-quantizes a linear's input while ``state["mode"]`` names a draft mode."""

    def __init__(self, linear: nn.Module, state: dict):
        super().__init__()
        self.linear = linear
        self.switch = state

    def __call__(self, x):
        mode = self.switch["mode"]
        if mode is not None:
            x = fake_quantize_activations(x, *MODES[mode])
        return self.linear(x)


def add_draft(model: nn.Module) -> dict:
    """Wrap every linear except the LM head; returns the shared mode state."""
    state = {"mode": None}

    def wrap(path, m):
        if isinstance(m, nn.Linear) and not path.endswith("lm_head"):
            return ActQuant(m, state)
        return m

    model.update_modules(tree_map_with_path(wrap, model.leaf_modules(),
                                            is_leaf=nn.Module.is_module))
    return state


def measure(model, state, texts, ref_argmax=None) -> dict:
    """Perplexity, match with the reference argmax, and draft agreement per mode."""
    nll, count, match, agree = 0.0, 0, 0, {m: 0 for m in MODES}
    argmaxes = []
    for i, toks in enumerate(texts):
        state["mode"] = None
        logits = model(toks[None])[0]
        am = logits.argmax(-1)
        argmaxes.append(am)
        ce = nn.losses.cross_entropy(logits[:-1], toks[1:], reduction="sum")
        nll += ce.item()
        count += toks.size - 1
        if ref_argmax is not None:
            match += (am == ref_argmax[i]).sum().item()
        for m in MODES:
            state["mode"] = m
            agree[m] += (model(toks[None])[0].argmax(-1) == am).sum().item()
    state["mode"] = None
    total = sum(t.size for t in texts)
    return {
        "perplexity": math.exp(nll / count),
        "greedy_match": None if ref_argmax is None else match / total,
        "agreement": {m: agree[m] / total for m in MODES},
        "argmax": argmaxes,
    }


def main():
    ap = arguments(__doc__, plot=False)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per evaluation text")
    ap.add_argument("--residuals", default="hadamard,random")
    ap.add_argument("--methods", default="float,rtn,gptq")
    ap.add_argument("--calib-tokens", type=int, default=256, help="tokens per GPTQ sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if "openblas" not in os.environ.get("LD_PRELOAD", ""):
        log("note: OpenBLAS not preloaded; dense matmuls will be ~70x slower (see docstring)")

    # The rotation source keeps its stored dtypes, so rotated scales are stored as a
    # converter would store them (float16 for GGUF); measurements cast to float32.
    args.model = str(args.model or default_model_path())
    original, tokenizer, config = load(args.model, dtype=None, return_config=True)
    texts = [mx.array(tokenizer.encode(p.read_text(errors="replace"))[:args.tokens]) for p in EVAL_TEXTS]
    calib = calibration_tokens(tokenizer, length=args.calib_tokens)

    rows = {}
    variants = [("original", None, None)] + [
        (f"rot-{r}-{m}", r, m) for m in args.methods.split(",") for r in args.residuals.split(",")
    ]
    ref = None
    for name, residual, method in variants:
        t0 = time.time()
        extra = {}
        if residual is None:
            model = load(args.model)[0]  # a copy: densify/add_draft change it in place
        elif method == "float":
            cfg = rotated_config(config, residual=residual, seed=args.seed, method=method)
            del cfg["quantization"]
            model = build_model(rotate_weights(original, config, residual=residual,
                                               seed=args.seed), cfg)
        else:
            weights, cfg = rotate_model(original, config, method=method, calibration=calib,
                                        residual=residual, seed=args.seed)
            model = build_model(weights, cfg)
            head = {k: v for k, v in weights.items() if k.startswith("lm_head.")}
            extra = {"untied_lm_head_bytes": sum(v.nbytes for v in head.values()),
                     "lm_head_scales_dtype": str(head["lm_head.scales"].dtype),
                     "weights_bytes": sum(v.nbytes for v in weights.values())}
            del weights
        built = time.time() - t0
        model = densify(model)
        state = add_draft(model)
        res = measure(model, state, texts, ref)
        if ref is None:
            ref = res["argmax"]
        del res["argmax"]
        res["build_s"] = round(built, 1)
        res.update(extra)
        rows[name] = res
        log(f"{name}: {json.dumps(res)}")
        del model

    heads = ["model", "ppl", "greedy-match"] + list(MODES) + ["tau(a4) g=4", "tau(a4-g32)"]
    print(" | ".join(heads))
    for name, r in rows.items():
        a = r["agreement"]
        gm = "-" if r["greedy_match"] is None else f"{r['greedy_match']:.3f}"
        print(" | ".join([name, f"{r['perplexity']:.2f}", gm] + [f"{a[m]:.3f}" for m in MODES]
                         + [f"{expected_tokens(a[m], 4):.2f}" for m in ("a4", "a4-g32")]))
    for name, r in rows.items():
        if "untied_lm_head_bytes" in r:
            print(f"{name}: untied LM head {r['untied_lm_head_bytes'] / 2**20:.1f} MiB "
                  f"({r['lm_head_scales_dtype']} scales) of {r['weights_bytes'] / 2**20:.1f} MiB")
    write(args, {
        "model": args.model, "eval_texts": [str(p) for p in EVAL_TEXTS],
        "tokens_per_text": args.tokens, "calibration_samples": calib.shape[0],
        "calibration_tokens": args.calib_tokens, "path": "dequantized float32, dense matmul",
        "results": rows}, indent=2)


if __name__ == "__main__":
    main()
