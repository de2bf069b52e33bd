"""``--draft auto`` against plain decoding, measured on this machine: is auto ever slower?

The product rule is that ``auto`` is never slower than plain decoding. On each prompt — a free
one (prose: the n-gram lookup finds little to copy) and an input-grounded one (an edit
request: the answer copies the prompt) — the first ``auto`` run starts from an empty store of
measured costs (its first-run cost: what it spends timing or exploring), then plain and
``auto`` runs alternate (the order reversed every round, so load on the machine falls on
both), ``auto`` starting from what earlier runs stored. Greedy; both must emit the same
tokens. A run's decode time is its wall-clock time from the call to the last token, less
plain decoding's prompt time on that prompt (the same prefill for both: leaving it in would
flatter the ratio); tokens/s = tokens ÷ decode time. Goal: auto ≥ 0.95× plain, first run
included.

On Linux this is an MLX-CPU timing (float32 compute), not a Mac number.

    PYTHONPATH=. python scripts/bench_auto.py --max-tokens 128 --repeats 3 --json auto.json --plot auto.png
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from plotting import pyplot
from mlx_qspec import load
from mlx_qspec.bench import EDIT_REQUEST
from mlx_qspec.generate import default_model_path, stream_generate

FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PROMPTS = {"free": FREE, "grounded": EDIT_REQUEST}


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """A chat turn, as the CLI builds it."""
    if tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def run_once(model, tokenizer, prompt, draft: str, max_tokens: int) -> dict:
    """One greedy generation: wall seconds from the call to the last token, the tokens, the
    prompt time stream_generate reports, and auto's reason."""
    start = time.perf_counter()
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, draft=draft):
        tokens.append(int(last.token))
    wall = time.perf_counter() - start
    return dict(draft=draft, wall_s=wall, tokens=tokens, prompt_s=last.prompt_tokens / last.prompt_tps,
                generation_tps=last.generation_tps, auto_reason=last.stats.auto_reason,
                chosen=last.stats.draft)


def rate(run: dict, prefill_s: float) -> float:
    return len(run["tokens"]) / max(run["wall_s"] - prefill_s, 1e-9)


def bench_prompt(model, tokenizer, name, text, max_tokens, repeats, log) -> dict:
    prompt = prompt_tokens(tokenizer, text)
    first = run_once(model, tokenizer, prompt, "auto", max_tokens)  # an empty store
    log(f"{name}: first auto run {first['wall_s']:.1f} s ({first['auto_reason']})")
    runs = []
    for r in range(repeats):
        for draft in (("none", "auto") if r % 2 == 0 else ("auto", "none")):
            runs.append(run_once(model, tokenizer, prompt, draft, max_tokens))
            log(f"{name}: round {r + 1} {draft:5s} {runs[-1]['wall_s']:.1f} s "
                f"{runs[-1]['auto_reason']}")
    plain = [x for x in runs if x["draft"] == "none"]
    auto = [x for x in runs if x["draft"] == "auto"]
    prefill = statistics.median(x["prompt_s"] for x in plain)
    plain_tps = statistics.median(rate(x, prefill) for x in plain)
    auto_tps = statistics.median(rate(x, prefill) for x in auto)
    return dict(prompt=name, prompt_tokens=len(prompt), prefill_s=prefill, plain_tps=plain_tps,
                auto_tps=auto_tps, ratio=auto_tps / plain_tps,
                first_run_tps=rate(first, prefill), first_run_ratio=rate(first, prefill) / plain_tps,
                first_run_extra_s=first["wall_s"] - statistics.median(x["wall_s"] for x in plain),
                same_tokens=all(x["tokens"] == plain[0]["tokens"] for x in [first, *runs]),
                auto_reasons=sorted({x["auto_reason"] for x in [first, *auto]}),
                runs=[{k: v for k, v in x.items() if k != "tokens"} for x in [first, *runs]])


def table(results) -> str:
    head = (f"{'prompt':<9} {'plain tok/s':>11} {'auto tok/s':>10} {'ratio':>6} "
            f"{'first run':>9} {'ratio':>6} {'extra s':>7}  same  auto_reason")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['prompt']:<9} {r['plain_tps']:11.2f} {r['auto_tps']:10.2f} {r['ratio']:6.3f} "
                     f"{r['first_run_tps']:9.2f} {r['first_run_ratio']:6.3f} {r['first_run_extra_s']:7.1f}  "
                     f"{'yes' if r['same_tokens'] else 'NO':4}  {' / '.join(r['auto_reasons'])}")
    return "\n".join(lines)


def plot(results, path):
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [r["prompt"] for r in results]
    x = range(len(names))
    for i, (key, label) in enumerate((("plain_tps", "plain"), ("auto_tps", "auto (stored costs)"),
                                      ("first_run_tps", "auto, first run (empty store)"))):
        ax.bar([j + 0.27 * (i - 1) for j in x], [r[key] for r in results], 0.27, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s (decode: wall − prefill)")
    ax.set_title(f"--draft auto vs plain, MEASURED on {platform.system()} "
                 f"({'Metal' if mx.metal.is_available() else 'CPU backend'})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path (default: the SmolLM2 test GGUF)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (plain, auto) per prompt")
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    if args.max_tokens < 1 or args.repeats < 1:
        ap.error("--max-tokens and --repeats must be >= 1")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model, tokenizer = load(str(args.model or default_model_path()))
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as store:
        for name in args.prompts:
            os.environ["MLX_QSPEC_CACHE"] = str(Path(store) / name)  # each prompt starts empty
            results.append(bench_prompt(model, tokenizer, name, PROMPTS[name], args.max_tokens,
                                        args.repeats, log))
    note = (f"{platform.system()} {platform.machine()}, MLX {mx.__version__}, "
            f"{'Metal' if mx.metal.is_available() else 'CPU backend (not a Mac number)'}, "
            f"{os.cpu_count()} CPUs, 1-min load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"--draft auto vs plain, greedy, {args.max_tokens} max tokens, {args.repeats} rounds, medians")
    print(note)
    print(table(results))
    worst = min(min(r["ratio"], r["first_run_ratio"]) for r in results)
    print(f"goal auto >= 0.95x plain (first run included): {'met' if worst >= 0.95 else 'NOT met'} "
          f"(worst {worst:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=vars(args), platform=note, results=results),
                                              indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
