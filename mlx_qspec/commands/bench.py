"""``python -m mlx_qspec.bench``: check and time mlx_qspec on the machine it runs on.

What a Mac owner runs (and shares: ``--out`` holds report.md, report.json, report.png). On
the default model, or ``--model``:

1. **kernels** — every Metal kernel against its MLX reference, on the device, and row
   invariance bit for bit at M ∈ {1, 2, 5, 8, 16} (row m of an M-row call equals the one-row
   call on it: what keeps speculative output equal to plain output on a Mac). Without Metal
   (Linux: MLX's CPU backend) this is skipped: the test suite runs the same kernels through
   an MSL emulator, which is not the device.
2. **exactness** — greedy speculative decoding equals plain decoding token for token, for
   each draft that applies to the model.
3. **timings**, measured here, each pair interleaved in one run: plain decoding, ours vs stock
   mlx-lm; a verify forward at 1–16 rows, and the model's largest linear at 1–16 rows with
   our kernel and with MLX's ``quantized_matmul``; each draft term's one-row step vs a plain
   step; ``ngram`` end to end on an edit prompt; ``kv-upper``'s step and a 5-row verify at 4k
   and 16k tokens of context.
4. the **report**, and the measured costs stored where ``--draft auto`` reads them
   (:func:`controller.default_store`), so that it starts from this machine's numbers.

``--quick`` keeps each part short (about a minute on the default model on a 2-core CPU). MLX's
CPU backend prefills about as fast as it decodes (a 16k context would take an hour), so there
the long contexts shrink to 1k and 2k, or with ``--quick`` are skipped; the report says so.
Every figure is labelled with the machine it was measured on; nothing here is modeled.

report.json (``schema`` 1): ``machine`` (system, device, backend, mlx, mlx_lm, cpus, load),
``model`` (path, fingerprint), ``quick``, ``seconds``; one object per section — ``kernels``,
``exactness``, ``decode``, ``verify_rows``, ``draft_steps``, ``ngram_edit``, ``kv_upper`` —
each with ``status`` (``ok``, ``failed``, ``skipped``, ``error``) and ``why`` where not ok,
and its numbers (seconds, tokens/s, ratios; see each function); ``stored`` (the store's path
and the keys written); ``skipped`` (one line per part not run, and why). Exit status 1 if a
check failed or a part raised, else 0.
"""

import argparse
import json
import os
import platform
import pydoc
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

from .. import controller, cost, kernels, store
from ..api import stream_generate
from ..caches import room
from ..cli import ArgumentParser, default_model_path, make_out_folder, run_cli
from ..decoder import prefill
from ..drafts.grammar import parse_precision
from ..errors import UserError
from ..hooks import install
from ..kv_cache import make_cache
from ..loader import default_dtype, load
from ..quant.linear import QSpecLinear, compute_dtype

KERNEL_ROWS = (1, 2, 5, 8, 16)
VERIFY_ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
GAMMA = 4
# (draft, KV mode): each checked against plain decoding in the same KV mode
DRAFTS = [("ngram", "fp"), ("a8-g32", "fp"), ("w-upper", "fp"), ("kv-upper", "nested"),
          ("ngram>a8-g32", "fp"), ("w-upper+kv-upper", "nested")]
DRAFT_TERMS = [("a8", "fp"), ("a8-g32", "fp"), ("a4-g32", "fp"), ("w-upper", "fp"),
               ("kv-upper", "nested")]
# A prose continuation (raw text: short, so prefills cost little on a CPU), and an edit
# request as a chat turn, whose answer copies much of the prompt (the n-gram lookup's case).
FREE_PROMPT = "The old lighthouse keeper climbed the stairs and"
EDIT_REQUEST = """Add type hints to this function:
```python
def add_all(values):
    total = 0
    for value in values:
        total += value
    return total
```"""
DOC_MODULES = ["json", "argparse", "logging", "unittest", "subprocess", "collections", "asyncio",
               "typing", "pathlib", "functools", "itertools", "re", "socket", "threading",
               "email", "http.client", "xml.dom.minidom", "tarfile", "zipfile", "decimal"]


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def long_text(tokenizer, n: int) -> list[int]:
    """``n`` tokens of real English: the docs of stdlib modules, one after another (repeated
    if they run out: a long context's timing does not depend on its words)."""
    ids = []
    for name in DOC_MODULES:
        module = __import__(name, fromlist=["_"])
        ids += tokenizer.encode(" ".join(pydoc.getdoc(module).split()))
        if len(ids) >= n:
            return ids[:n]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def chat_tokens(tokenizer, text: str) -> list[int]:
    """``text`` as the CLIs encode a prompt: a user's turn in the chat template if there is
    one, else the raw text."""
    if tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=not tokenizer.has_chat_template)


def drain(responses) -> tuple[list[int], object]:
    """The tokens of a generation's responses, and its last response."""
    tokens, last = [], None
    for last in responses:
        tokens.append(int(last.token))
    return tokens, last


def rounds(named, repeats: int) -> dict[str, list]:
    """What each ``name → call`` returns, ``repeats`` times, run in turns — the order reversed
    every other round — so that load on the machine falls on all alike."""
    names = list(named)
    out = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(named[n]())
    return out


def interleaved(named, repeats: int) -> dict[str, float]:
    """Median seconds of each ``name → call`` (a call returns its seconds), in :func:`rounds`."""
    return {n: statistics.median(t) for n, t in rounds(named, repeats).items()}


def _prefilled(model, ids: list[int], kv_mode: str = "fp", chunk: int = 2048) -> list:
    """A ``kv_mode`` cache holding ``ids`` (prefilled ``chunk`` tokens at a time)."""
    cache = make_cache(model, kv_mode)
    prefill(model, mx.array(ids, mx.uint32), cache, chunk)
    return cache


# ------------------------------------------------------------------ 1. kernels
def _distinct_rows(K: int, dtype, seed=0) -> mx.array:
    """16 rows that differ (outlier channels, one row scaled up): a row leaking into another
    would show."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(max(KERNEL_ROWS), K)) * np.where(np.arange(K) % 29 == 0, 10.0, 1.0)
    x[3] *= 50.0
    return mx.array(x.astype(np.float32)).astype(dtype)


def _check(name, kernel, reference, x, rtol, bitwise: bool | None = None) -> dict:
    """One kernel: its error against the reference on 16 rows (relative to the output's
    scale), and whether row m of every M-row call equals the one-row call bit for bit (or
    ``bitwise``, as the caller checked it)."""
    y, ref = (np.array(f(x).astype(mx.float32)) for f in (kernel, reference))
    error = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
    if bitwise is None:
        single = [np.array(kernel(x[i:i + 1])) for i in range(x.shape[0])]
        bitwise = all(np.array_equal(np.array(kernel(x[:m]))[i], single[i][0])
                      for m in KERNEL_ROWS for i in range(m))
    return dict(kernel=name, max_error=error, tolerance=rtol, rows_bitwise=bitwise,
                ok=error <= rtol and bitwise)


def _attention_checks(dtype, rtol, quantized: int = 256, buffered: int = 40, per_kv: int = 3) -> list[dict]:
    """nested_attention (draft and verify views) against its reference on a 16-row causal
    block over ``quantized`` positions in the planes and ``buffered`` in float (2 KV heads,
    ``per_kv`` query heads each); the last row of an L-row call equals the one-row call
    (L = 2, 5, 8, 16)."""
    from ..kv_cache import nest

    D, Tq, Tb = 64, quantized, buffered
    k = mx.random.normal((1, 2, Tq + Tb, D), key=mx.random.key(1)).astype(dtype)
    v = mx.random.normal((1, 2, Tq + Tb, D), key=mx.random.key(2)).astype(dtype)
    keys = (*nest(k[:, :, :Tq].swapaxes(-1, -2), 64), k[:, :, Tq:])
    values = (*nest(v[:, :, :Tq], 64), v[:, :, Tq:])
    q = (2 * mx.random.normal((1, 2 * per_kv, 16, D), key=mx.random.key(3))).astype(dtype)
    out = []
    for upper in (True, False):
        def attend(fn, qq, mask):
            return fn(qq, keys, values, scale=D ** -0.5, mask=mask, upper=upper, key_block=64,
                      value_group=64)
        bitwise = all(mx.array_equal(attend(kernels.metal_nested_attention, q[:, :, :L], "causal")[:, :, -1:],
                                     attend(kernels.metal_nested_attention, q[:, :, L - 1:L], None)).item()
                      for L in (2, 5, 8, 16))
        out.append(_check(f"nested_attention ({'draft' if upper else 'verify'})",
                          lambda qq: attend(kernels.metal_nested_attention, qq, "causal"),
                          lambda qq: attend(kernels.nested_attention_reference, qq, "causal"),
                          q, rtol, bitwise))
    return out


def matmul_cases(dtype, K: int, N: int, group: int) -> dict:
    """Each row-wise Metal kernel (the matmuls and the activation quantizer) as
    ``name → (kernel, its MLX reference)`` on one K → N linear of ``group``-sized groups."""
    w4, s4, b4 = mx.quantize(mx.random.normal((N, K), key=mx.random.key(4)), group_size=group, bits=4)
    w8, s8, b8 = mx.quantize(mx.random.normal((N, K), key=mx.random.key(5)), group_size=group, bits=8)
    s4, b4, s8, b8 = (a.astype(dtype) for a in (s4, b4, s8, b8))
    upper, lower = kernels.split_planes(w8)

    def int_matmul(bits):
        def call(x):
            codes, ascales, sums = kernels.metal_act_quant(x, bits, 32, sum_size=32)
            return kernels.metal_int_matmul(codes, ascales, sums, w4, s4, b4, group_size=group,
                                            act_group_size=32)

        def ref(x):
            codes, ascales, _ = kernels.act_quant_reference(x, bits, 32, sum_size=32)
            return kernels.int_matmul_reference(codes, ascales, w4, s4, b4, group_size=group,
                                                out_dtype=x.dtype)
        return call, ref

    def act_quant(fn):
        def call(x):
            codes, scales, sums = fn(x, 8, 32, sum_size=32)
            return mx.concatenate([codes.astype(mx.float32), scales.astype(mx.float32),
                                   sums.astype(mx.float32)], axis=-1)
        return call

    def nested(draft):
        return (lambda x: kernels.metal_nested_matmul(x, upper, None if draft else lower, s8, b8,
                                                      group_size=group, draft=draft),
                lambda x: kernels.nested_matmul_reference(x, upper, lower, s8, b8,
                                                          group_size=group, draft=draft))

    return {
        "w4a16_verify": (
            lambda x: kernels.metal_verify_matmul(x, w4, s4, b4, group_size=group),
            lambda x: mx.quantized_matmul(x, w4, s4, b4, transpose=True, group_size=group, bits=4)),
        "nested_matmul (draft)": nested(True),
        "nested_matmul (verify)": nested(False),
        "act_quant": (act_quant(kernels.metal_act_quant), act_quant(kernels.act_quant_reference)),
        "w4a_int_matmul (a8)": int_matmul(8),
        "w4a_int_matmul (a4)": int_matmul(4),
    }


def check_kernels(dtype=mx.float16, K: int = 576, N: int = 256, group: int = 32) -> dict:
    """Every Metal kernel against its MLX reference on this device (``dtype`` activations),
    rows bit for bit. Skipped without Metal."""
    if kernels.backend() != "metal":
        return dict(status="skipped", why="no Metal on this machine (MLX's CPU backend): the "
                    "test suite runs these kernels through an MSL emulator, which is not the device")
    rtol = 1e-5 if dtype == mx.float32 else 2.0 ** -9
    x = _distinct_rows(K, dtype)
    checks = [_check(name, kernel, ref, x, 0.0 if name == "act_quant" else rtol)
              for name, (kernel, ref) in matmul_cases(dtype, K, N, group).items()]
    checks += _attention_checks(dtype, rtol)
    failed = [c["kernel"] for c in checks if not c["ok"]]
    return dict(status="failed" if failed else "ok", checks=checks,
                **({"why": "failed: " + ", ".join(failed)} if failed else {}))


# ------------------------------------------------------------------ 2. exactness
def _generate(model, tokenizer, prompt, tokens: int, draft: str, **options):
    """The tokens of one greedy generation (γ = GAMMA), and its last response."""
    return drain(stream_generate(model, tokenizer, prompt, max_tokens=tokens, draft=draft,
                                 num_draft_tokens=None if draft == "none" else GAMMA, **options))


def check_exactness(model, tokenizer, prompt, tokens: int, drafts) -> dict:
    """Greedy speculative == plain decoding for each (draft, KV mode), plain computed once
    per KV mode. A draft the model cannot run is reported as not applicable, with why."""
    plain, rows = {}, []
    for draft, kv_mode in drafts:
        try:
            if kv_mode not in plain:
                plain[kv_mode] = _generate(model, tokenizer, prompt, tokens, "none", kv_mode=kv_mode)[0]
            spec, last = _generate(model, tokenizer, prompt, tokens, draft, kv_mode=kv_mode)
        except UserError as e:  # this model cannot run the draft, or that KV mode
            rows.append(dict(draft=draft, kv_mode=kv_mode, equal=None, why=f"not applicable: {e}"))
            continue
        stats = last.stats
        rows.append(dict(draft=draft, kv_mode=kv_mode, equal=spec == plain[kv_mode], tokens=len(spec),
                         acceptance=stats.acceptance, tokens_per_verify=stats.tokens_per_verify))
        log(f"  {draft:18s} {'equal' if rows[-1]['equal'] else 'DIFFERS'} "
            f"(acceptance {stats.acceptance:.2f}, {stats.tokens_per_verify:.2f} tokens per verify)")
    differ = [r["draft"] for r in rows if r["equal"] is False]
    return dict(status="failed" if differ else "ok", tokens=tokens, drafts=rows,
                **({"why": "speculative output differs from plain for " + ", ".join(differ)}
                   if differ else {}))


# ------------------------------------------------------------------ 3. timings
def stock_mlx_lm(model_path: Path, workdir: Path):
    """The same model loaded by stock mlx-lm (a GGUF converted to an mlx directory first),
    computing in the dtype ours does."""
    from .convert import convert

    source = str(model_path)
    if model_path.suffix.lower() == ".gguf":
        dtype = "float32" if default_dtype() == mx.float32 else None
        source = str(convert(str(model_path), str(workdir / "mlx-lm-model"), dtype=dtype))
    return mlx_lm.load(source)


def plain_decode(engine: str, model, tokenizer, prompt, tokens: int):
    """Greedy plain decoding by ``ours`` or stock ``mlx-lm``: its tokens and last response."""
    if engine == "ours":
        return drain(stream_generate(model, tokenizer, prompt, max_tokens=tokens, draft="none"))
    return drain(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=tokens))


def time_decode(ours, theirs, prompt, tokens: int, repeats: int) -> dict:
    """Plain decoding tokens/s, ours vs stock mlx-lm, interleaved; whether they agree."""
    engines = {"ours": ours, "mlx-lm": theirs}
    for engine, (model, tokenizer) in engines.items():
        plain_decode(engine, model, tokenizer, prompt, 2)  # warm-up
    runs = rounds({e: (lambda e=e: plain_decode(e, *engines[e], prompt, tokens)) for e in engines}, repeats)
    tps = {engine: [last.generation_tps for _, last in r] for engine, r in runs.items()}
    pairs = [a / b for a, b in zip(tps["ours"], tps["mlx-lm"])]
    return dict(status="ok", max_tokens=tokens, repeats=repeats, ours_tps=tps["ours"],
                mlx_lm_tps=tps["mlx-lm"], ratio=statistics.median(pairs),
                tokens_equal=runs["ours"][-1][0] == runs["mlx-lm"][-1][0])


def _largest_4bit_linear(model):
    """(weight, scales, biases, group) of the model's largest 4-bit linear."""
    found = [m for _, m in model.named_modules() if isinstance(m, QSpecLinear) and m.bits == 4
             and "weight" in m]
    if not found:
        return None
    m = max(found, key=lambda m: m["weight"].size)
    return m["weight"], m["scales"], m["biases"], m.group_size


def time_verify_rows(model, context: list[int], rows, repeats: int) -> dict:
    """A verify forward at each row count (the prompt in the cache), and the largest 4-bit
    linear at each row count with our kernel and with MLX's quantized_matmul."""
    cache = _prefilled(model, context)
    cost.forward(model, cache)  # warm-up
    forward = interleaved({r: (lambda r=r: cost.forward(model, cache, r)) for r in rows}, repeats)
    out = dict(status="ok", context=len(context), rows=list(rows),
               forward_s=[forward[r] for r in rows], our_kernel=kernels.backend())
    linear = _largest_4bit_linear(model)
    if linear is None:
        out["linear_why"] = "the model has no 4-bit linear"
        return out
    w, s, b, group = linear
    dtype, calls = compute_dtype(model), 10

    def per_call(fn, m):
        x = mx.random.normal((m, w.shape[1] * 8), key=mx.random.key(m)).astype(dtype)
        mx.eval(fn(x))
        return timeit.timeit(lambda: mx.eval([fn(x + i) for i in range(calls)]), number=1) / calls

    ours = lambda x: kernels.verify_matmul(x, w, s, b, group_size=group)  # noqa: E731
    theirs = lambda x: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=4)  # noqa: E731
    named = {("mlx", r): (lambda r=r: per_call(theirs, r)) for r in rows}
    if kernels.backend() == "metal":
        named.update({("ours", r): (lambda r=r: per_call(ours, r)) for r in rows})
    else:
        out["ours_why"] = "our kernel needs Metal: on this backend both are MLX's quantized_matmul"
    t = interleaved(named, repeats)
    out.update(linear=dict(K=w.shape[1] * 8, N=w.shape[0], group=group),
               mlx_s=[t["mlx", r] for r in rows],
               ours_s=[t["ours", r] for r in rows] if ("ours", 1) in t else None)
    return out


def time_draft_steps(model, context: list[int], terms, repeats: int) -> dict:
    """Each draft term's one-row forward against a plain one-row forward (same cache kind),
    interleaved; a term the model cannot run is listed with why."""
    caches, out, skipped = {}, {}, {}
    for name, kv_mode in terms:
        try:
            if kv_mode not in caches:
                caches[kv_mode] = _prefilled(model, context, kv_mode)
            cache, read = caches[kv_mode], parse_precision(name)
            cost.forward(model, cache, 1, read)  # warm-up; raises where it cannot run
        except ValueError as e:  # UserError included: this model cannot run it
            skipped[name] = str(e)
            continue
        t = interleaved({"plain": lambda: cost.forward(model, cache),
                         name: lambda: cost.forward(model, cache, 1, read)}, repeats)
        out[name] = dict(kv_mode=kv_mode, seconds=t[name], plain_s=t["plain"], ratio=t[name] / t["plain"])
    return dict(status="ok", context=len(context), drafts=out, skipped=skipped)


def _fork(cache) -> list:
    """A copy of a prefilled mlx-lm cache that runs on without changing the original (its
    state is sliced out: new arrays, which the copy's in-place updates do not share)."""
    forks = []
    for c in cache:
        fork = type(c).from_state(c.state)
        if hasattr(c, "meta_state"):  # windows: their size and position
            fork.meta_state = c.meta_state
        forks.append(fork)
    return forks


def time_ngram_edit(model, tokenizer, tokens: int, repeats: int) -> dict:
    """``ngram`` end to end against plain decoding on an edit request (its answer repeats
    the prompt), interleaved; the prompt is prefilled once and each run starts from a copy."""
    ids = chat_tokens(tokenizer, EDIT_REQUEST)
    cache = _prefilled(model, ids[:-1])
    runs = rounds({d: (lambda d=d: _generate(model, tokenizer, ids[-1:], tokens, d, prompt_cache=_fork(cache),
                                            cached_tokens=ids[:-1])) for d in ("none", "ngram")}, repeats)
    plain, ngram = (statistics.median(last.generation_tps for _, last in runs[d]) for d in ("none", "ngram"))
    stats = runs["ngram"][-1][1].stats
    return dict(status="ok", prompt_tokens=len(ids), max_tokens=tokens, repeats=repeats,
                plain_tps=plain, ngram_tps=ngram, speedup=ngram / plain, acceptance=stats.acceptance,
                tokens_per_verify=stats.tokens_per_verify, equal=runs["none"][-1][0] == runs["ngram"][-1][0])


def time_kv_upper(model, tokenizer, contexts, repeats: int) -> dict:
    """At each context (real text in a nested KV cache): a plain step, a ``kv-upper`` draft
    step and a verify of γ+1 rows (fewer where the cache's buffer has less room)."""
    rows_out = []
    for n in contexts:
        t0 = time.perf_counter()
        try:
            read = parse_precision("kv-upper")
            cache = _prefilled(model, long_text(tokenizer, n), "nested", 512)
            cost.forward(model, cache, 1, read)
        except ValueError as e:
            return dict(status="skipped", why=f"kv-upper cannot run on this model: {e}")
        rows = min(GAMMA + 1, room(cache) + 1)
        t = interleaved({"plain": lambda: cost.forward(model, cache),
                         "kv-upper": lambda: cost.forward(model, cache, 1, read),
                         "verify": lambda: cost.forward(model, cache, rows)}, repeats)
        rows_out.append(dict(context=n, plain_step_s=t["plain"], draft_step_s=t["kv-upper"],
                             verify_rows=rows, verify_s=t["verify"], ratio=t["kv-upper"] / t["plain"]))
        log(f"  {n} tokens: prefill {time.perf_counter() - t0:.0f} s; kv-upper step "
            f"{t['kv-upper'] / t['plain']:.2f}× a plain step, {rows}-row verify "
            f"{t['verify'] / t['plain']:.2f}×")
        del cache
        mx.clear_cache()
    return dict(status="ok", contexts=rows_out)


# ------------------------------------------------------------------ 4. what auto reads
def store_costs(model, verify: dict, steps: dict, exactness: dict, decode: dict,
                kv_upper: dict) -> dict:
    """The measured costs, as ``--draft auto``'s controller reads them: per KV mode and
    context bucket, a plain step, a block's fixed part and each further verify row, each
    draft's step, and the acceptance seen in the exactness runs."""
    measured, keys, written = controller.default_store(), [], []

    def save(kv_mode: str, context: int, costs: controller.Costs):
        key = cost.store_key(model, kv_mode)
        written.append(measured.save(key, context, costs))
        keys.append(f"{key}|ctx={controller.context_bucket(context)}")

    acceptance = {r["draft"]: r["acceptance"] for r in exactness.get("drafts", []) if r.get("equal")}
    if verify.get("status") == "ok":
        for kv_mode in ("fp", "nested"):
            drafts = {n: d["seconds"] for n, d in steps.get("drafts", {}).items()
                      if d["kv_mode"] == kv_mode or kv_mode == "nested"}
            costs = controller.Costs.from_table(dict(zip(verify["rows"], verify["forward_s"])),
                                                drafts, "measured")
            if decode.get("status") == "ok":  # a plain step as plain decoding runs it
                costs.step = 1 / statistics.median(decode["ours_tps"])
            costs.acceptance = {n: a for n, a in acceptance.items() if n in drafts}
            save(kv_mode, verify["context"], costs)
    for c in kv_upper.get("contexts", []):
        table = {c["verify_rows"]: c["verify_s"], 1: c["plain_step_s"]}
        save("nested", c["context"], controller.Costs.from_table(
            table, {"kv-upper": c["draft_step_s"]}, "measured"))
    return dict(path=str(measured.path), written=all(written), keys=keys)


# ------------------------------------------------------------------ the report
def markdown(report: dict) -> str:
    """The report as Markdown tables: what a Mac owner pastes into an issue."""
    m, s = report["machine"], report["sections"]
    lines = [f"# mlx_qspec bench — {m['device']} ({m['backend']})", "",
             f"Measured on this machine: {m['system']}, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, "
             f"{m['cpus']} CPUs, load {m['load'][0]:.1f} → {m['load'][1]:.1f}; model "
             f"`{report['model']['path']}`; {'--quick, ' if report['quick'] else ''}"
             f"{report['seconds']:.0f} s."]
    lines += _table("part | status | result", [(n, sec["status"], _summary(n, sec)) for n, sec in s.items()])
    if s["kernels"].get("checks"):
        lines += _table("kernel | max error | tolerance | rows bit for bit", [
            (c["kernel"], f"{c['max_error']:.2e}", f"{c['tolerance']:.0e}",
             "yes" if c["rows_bitwise"] else "NO") for c in s["kernels"]["checks"]])
    v = s["verify_rows"]
    if v.get("forward_s"):
        def ratios(key):  # each row count's time ÷ one row's
            return [f"{t / v[key][0]:.2f}" for t in v[key]] if v.get(key) else ["-"] * len(v["rows"])
        head = "rows | verify forward ÷ 1 row | MLX quantized_matmul ÷ 1 row | our kernel ÷ 1 row"
        lines += _table(head, zip(v["rows"], ratios("forward_s"), ratios("mlx_s"), ratios("ours_s")))
    d = s["draft_steps"]
    if d.get("drafts"):
        lines += _table("draft term | step (ms) | ÷ plain step", [
            (n, f"{x['seconds'] * 1e3:.2f}", f"{x['ratio']:.2f}") for n, x in d["drafts"].items()])
    kv = s.get("kv_upper", {})
    if kv.get("contexts"):
        lines += _table("context | plain step (ms) | kv-upper step ÷ plain | verify ÷ plain", [
            (c["context"], f"{c['plain_step_s'] * 1e3:.2f}", f"{c['ratio']:.2f}",
             f"{c['verify_s'] / c['plain_step_s']:.2f} ({c['verify_rows']} rows)") for c in kv["contexts"]])
    if report["skipped"]:
        lines += ["", "Not run:"] + [f"- {why}" for why in report["skipped"]]
    return "\n".join(lines) + "\n"


def _table(head: str, rows) -> list[str]:
    """A Markdown table after a blank line: ``head``'s cells and each row's, between bars."""
    rule = "|" + "---|" * len(head.split(" | "))
    return ["", f"| {head} |", rule] + [f"| {' | '.join(map(str, row))} |" for row in rows]


def _summary(name: str, sec: dict) -> str:
    """One cell: the section's headline number, or why it did not run."""
    if sec["status"] in ("skipped", "error") or (sec["status"] == "failed" and name == "kernels"):
        return sec.get("why", "")
    if name == "kernels":
        return f"{len(sec['checks'])} kernels within tolerance, rows bit for bit"
    if name == "exactness":
        ran = [r for r in sec["drafts"] if r["equal"] is not None]
        same = sum(r["equal"] for r in ran)
        return f"{same}/{len(ran)} drafts equal plain over {sec['tokens']} tokens" + (
            f"; {sec['why']}" if "why" in sec else "")
    if name == "decode":
        return (f"ours {statistics.median(sec['ours_tps']):.1f} tok/s, mlx-lm "
                f"{statistics.median(sec['mlx_lm_tps']):.1f} (×{sec['ratio']:.2f}); "
                f"same tokens: {'yes' if sec['tokens_equal'] else 'NO'}")
    if name == "verify_rows":
        f = sec["forward_s"]
        return f"{sec['rows'][-1]}-row verify forward ×{f[-1] / f[0]:.2f} a 1-row one"
    if name == "draft_steps":
        return ", ".join(f"{n} ×{x['ratio']:.2f}" for n, x in sec["drafts"].items()) + " a plain step"
    if name == "ngram_edit":
        return (f"ngram {sec['ngram_tps']:.1f} tok/s vs plain {sec['plain_tps']:.1f} (×{sec['speedup']:.2f}), "
                f"{sec['tokens_per_verify']:.2f} tokens per verify")
    return ", ".join(f"{c['context']}: kv-upper step ×{c['ratio']:.2f}" for c in sec["contexts"])


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None where matplotlib
    is not installed (it is optional; the benchmark scripts draw through this too)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(report: dict, path: Path) -> str | None:
    """report.png: row growth of a verify, draft steps, decode speeds, kv-upper by context.
    Returns why not where matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install 'mlx-qspec[bench]'): no PNG"
    s = report["sections"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    v, ax = s["verify_rows"], axes[0, 0]
    if v.get("forward_s"):
        for key, label in (("forward_s", "verify forward"), ("mlx_s", "MLX quantized_matmul"),
                           ("ours_s", "our verify kernel")):
            if v.get(key):
                ax.plot(v["rows"], [t / v[key][0] for t in v[key]], "o-" if key == "forward_s" else "s--",
                        label=label)
        ax.legend(fontsize=7)
    ax.set(xlabel="rows", ylabel="time ÷ 1 row", title="verify cost by rows")
    d, ax = s["draft_steps"], axes[0, 1]
    if d.get("drafts"):
        ax.bar(list(d["drafts"]), [x["ratio"] for x in d["drafts"].values()])
        ax.axhline(1.0, color="k", lw=0.8)
    ax.set(ylabel="draft step ÷ plain step", title="draft steps")
    ax = axes[1, 0]
    bars = {}
    if s["decode"].get("ours_tps"):
        bars.update({"plain (ours)": statistics.median(s["decode"]["ours_tps"]),
                     "plain (mlx-lm)": statistics.median(s["decode"]["mlx_lm_tps"])})
    if s["ngram_edit"].get("ngram_tps"):
        bars.update({"edit: plain": s["ngram_edit"]["plain_tps"], "edit: ngram": s["ngram_edit"]["ngram_tps"]})
    ax.bar(list(bars), list(bars.values()))
    ax.set(ylabel="tokens/s", title="decoding")
    ax.tick_params(axis="x", labelsize=7)
    kv, ax = s.get("kv_upper", {}), axes[1, 1]
    if kv.get("contexts"):
        ctx = [c["context"] for c in kv["contexts"]]
        ax.plot(ctx, [c["ratio"] for c in kv["contexts"]], "o-", label="kv-upper step ÷ plain step")
        ax.plot(ctx, [c["verify_s"] / c["plain_step_s"] for c in kv["contexts"]], "s--", label="verify ÷ plain step")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    ax.set(xlabel="context (tokens)", title="kv-upper by context")
    for ax in axes.flat:  # a part that did not run says so where its plot would be
        if not ax.has_data():
            ax.text(0.5, 0.5, "not run (see report.md)", ha="center", transform=ax.transAxes)
    fig.suptitle(f"MEASURED on {report['machine']['device']} ({report['machine']['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------ the command
def _section(name: str, fn, report: dict):
    """Run one part; a part that raises is reported (status error) and the rest still run."""
    log(f"[{name}]")
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001  a bench reports every part it can
        out = dict(status="error", why=f"{type(e).__name__}: {e}")
    out["seconds"] = time.perf_counter() - start
    report["sections"][name] = out
    if out["status"] in ("skipped", "error"):
        report["skipped"].append(f"{name}: {out.get('why', '')}")
    log(f"  {out['status']} ({out['seconds']:.1f} s){': ' + out['why'] if 'why' in out else ''}")
    return out


def machine() -> dict:
    return dict(system=f"{platform.system()} {platform.machine()}", device=cost.device_name(),
                backend=kernels.backend(), mlx=mx.__version__, mlx_lm=mlx_lm.__version__,
                python=platform.python_version(), cpus=os.cpu_count(), load=list(os.getloadavg()[:1]))


def plan(quick: bool, metal: bool) -> dict:
    """How much of each part to run: ``--quick`` about a minute on the default model on
    this CPU; long contexts only where a prefill of them takes seconds (Metal)."""
    p = dict(repeats=2, tokens=8, drafts=[DRAFTS[i] for i in (0, 1, 3)], rows=KERNEL_ROWS,
             row_repeats=1, edit_tokens=12, edit_repeats=1) if quick else dict(
        repeats=3, tokens=48, drafts=DRAFTS, rows=VERIFY_ROWS, row_repeats=3, edit_tokens=96, edit_repeats=3)
    p.update(contexts=(4096, 16384), skipped=[])
    if not metal:  # a CPU prefills about as fast as it decodes: 16k tokens take an hour
        p["contexts"] = () if quick else (1024, 2048)
        p["skipped"].append("kv_upper: 4k and 16k context " + (
            "skipped (--quick on the CPU backend: a long prefill takes minutes here)" if quick
            else "shrunk to 1k and 2k (the CPU backend prefills about as fast as it decodes)"))
    return p


def run(args, parser):
    start = time.perf_counter()
    make_out_folder(Path(args.out), "; name a folder for the report")  # before any work
    model_path = Path(args.model) if args.model else default_model_path()
    model, tokenizer = load(str(model_path))
    install(model)
    log(f"loaded {model_path} ({time.perf_counter() - start:.0f} s)")
    p = plan(args.quick, kernels.backend() == "metal")
    report = dict(schema=1, machine=machine(), quick=args.quick, sections={}, skipped=p["skipped"],
                  model=dict(path=str(model_path), fingerprint=store.fingerprint(model)))
    prompt = tokenizer.encode(FREE_PROMPT)
    sec = lambda name, fn: _section(name, fn, report)  # noqa: E731
    sec("kernels", check_kernels)
    exact = sec("exactness", lambda: check_exactness(model, tokenizer, prompt, p["tokens"], p["drafts"]))
    with tempfile.TemporaryDirectory() as tmp:
        decode = sec("decode", lambda: time_decode((model, tokenizer), stock_mlx_lm(model_path, Path(tmp)),
                                                   prompt, 2 * p["tokens"], p["repeats"]))
    verify = sec("verify_rows", lambda: time_verify_rows(model, prompt, p["rows"], p["row_repeats"]))
    steps = sec("draft_steps", lambda: time_draft_steps(model, prompt, DRAFT_TERMS, p["repeats"]))
    sec("ngram_edit", lambda: time_ngram_edit(model, tokenizer, p["edit_tokens"], p["edit_repeats"]))
    kv = (sec("kv_upper", lambda: time_kv_upper(model, tokenizer, p["contexts"], p["repeats"]))
          if p["contexts"] else {})
    if not args.no_store:
        report["stored"] = store_costs(model, verify, steps, exact, decode, kv)
    report["machine"]["load"].append(os.getloadavg()[0])
    report["seconds"] = time.perf_counter() - start
    write(report, Path(args.out))
    if any(s["status"] in ("failed", "error") for s in report["sections"].values()):
        sys.exit(1)


def write(report: dict, out: Path):
    """report.md (also printed), report.json, report.png under the folder ``out``."""
    why = plot(report, out / "report.png")
    if why:  # (before the text is written: report.md lists it)
        report["skipped"].append(f"plot: {why}")
    text = markdown(report)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(text)
    log(f"wrote {out / 'report.md'}, report.json{'' if why else ', report.png'} "
        f"({report['seconds']:.0f} s in all)")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mlx_qspec.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file or an mlx directory (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (about a minute on the default model); the long "
                        "contexts are skipped on the CPU backend")
    parser.add_argument("--out", default="mlx_qspec-bench",
                        help="folder for report.md, report.json and report.png (default: %(default)s)")
    parser.add_argument("--no-store", action="store_true",
                        help="do not store the measured costs for --draft auto")
    return parser


def main(argv=None):
    run_cli(setup_arg_parser(), argv, run)

