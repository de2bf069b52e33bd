"""``--draft auto`` against plain decoding, measured on this machine: is auto ever slower?

The product rule is that ``auto`` is never slower than plain decoding. On each prompt — a free
one (prose: the n-gram lookup finds little to copy) and an input-grounded one (an edit
request: the answer copies the prompt) — the first ``auto`` run starts from an empty store of
measured costs (its first-run cost: what it spends timing or exploring), then plain and
``auto`` runs alternate (the order reversed every round, so load on the machine falls on
both), ``auto`` starting from what earlier runs stored. Greedy; both must emit the same
tokens. The prompt is prefilled once and every run starts from a copy of that cache, so a
run's time — from the call to its last token, ``auto``'s setup included — is decoding only
(a shared prefill would flatter the ratio). Goal: auto ≥ 0.95× plain, first run included, as
the median over rounds of auto ÷ plain within a round (adjacent runs share the load other
processes put on the machine); the same on this process's CPU time is reported too.

On Linux this is an MLX-CPU timing (float32 compute), not a Mac number.

    PYTHONPATH=. python scripts/bench_auto.py --max-tokens 128 --repeats 3 --json auto.json --plot auto.png
"""

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from plotting import arguments, write
from mlx_qspec import load
from mlx_qspec.bench import EDIT_REQUEST, _fork, _prefilled, chat_tokens, drain, log, rounds
from mlx_qspec.generate import default_model_path, stream_generate

FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PROMPTS = {"free": FREE, "grounded": EDIT_REQUEST}


def run_once(model, tokenizer, ids, cache, draft: str, max_tokens: int) -> dict:
    """One greedy generation from a copy of the prefilled ``cache``: wall and CPU seconds from
    the call to the last token (auto's setup included), the tokens, auto's reason."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens, last = drain(stream_generate(model, tokenizer, ids[-1:], max_tokens=max_tokens, draft=draft,
                                         prompt_cache=_fork(cache), cached_tokens=ids[:-1]))
    return dict(draft=draft, wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu,
                tokens=tokens, auto_reason=last.stats.auto_reason, chosen=last.stats.draft,
                measured_speedup=last.stats.measured_speedup)


def tps(run: dict, clock: str = "wall_s") -> float:
    return len(run["tokens"]) / run[clock]


def bench_prompt(model, tokenizer, name, text, max_tokens, repeats) -> dict:
    ids = chat_tokens(tokenizer, text)
    cache = _prefilled(model, ids[:-1])
    first = run_once(model, tokenizer, ids, cache, "auto", max_tokens)  # an empty store
    log(f"{name}: first auto run {first['wall_s']:.1f} s ({first['auto_reason']})")
    runs = []  # in the order they ran

    def timed(draft):
        runs.append(run_once(model, tokenizer, ids, cache, draft, max_tokens))
        log(f"{name}: round {(len(runs) + 1) // 2} {draft:5s} {runs[-1]['wall_s']:.1f} s "
            f"(CPU {runs[-1]['cpu_s']:.1f} s) {runs[-1]['auto_reason']}")
        return runs[-1]

    by_draft = rounds({draft: lambda draft=draft: timed(draft) for draft in ("none", "auto")}, repeats)
    plain, auto = by_draft["none"], by_draft["auto"]
    out = dict(prompt=name, prompt_tokens=len(ids), same_tokens=all(
        x["tokens"] == plain[0]["tokens"] for x in [first, *runs]),
        auto_reasons=sorted({x["auto_reason"] for x in [first, *auto]}),
        runs=[{k: v for k, v in x.items() if k != "tokens"} for x in [first, *runs]])
    for clock, tag in (("wall_s", ""), ("cpu_s", "cpu_")):
        # Runs of a round are adjacent in time: their ratio is the one least moved by the
        # load other processes put on the machine (the first run pairs with the first plain).
        pairs = [tps(a, clock) / tps(p, clock) for a, p in zip(auto, plain)]
        out.update({f"{tag}plain_tps": statistics.median(tps(x, clock) for x in plain),
                    f"{tag}auto_tps": statistics.median(tps(x, clock) for x in auto),
                    f"{tag}pair_ratio": statistics.median(pairs), f"{tag}pair_ratios": pairs,
                    f"{tag}first_run_ratio": tps(first, clock) / tps(plain[0], clock)})
    out["first_run_extra_s"] = first["wall_s"] - statistics.median(x["wall_s"] for x in plain)
    return out


def table(results) -> str:
    head = (f"{'prompt':<9} {'plain tok/s':>11} {'auto tok/s':>10} {'auto÷plain':>10} {'first run':>9} "
            f"{'CPU-time auto÷plain':>19} {'first run':>9}  same  auto_reason")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['prompt']:<9} {r['plain_tps']:11.2f} {r['auto_tps']:10.2f} "
                     f"{r['pair_ratio']:10.3f} {r['first_run_ratio']:9.3f} {r['cpu_pair_ratio']:19.3f} "
                     f"{r['cpu_first_run_ratio']:9.3f}  {'yes' if r['same_tokens'] else 'NO':4}  "
                     f"{' / '.join(r['auto_reasons'])}")
    lines.append("tok/s: medians, wall clock; auto÷plain: median over rounds of the ratio within a "
                 "round; first run: auto from an empty store ÷ the first plain run; CPU-time: the "
                 "same with this process's CPU seconds (less moved by other processes' load)")
    return "\n".join(lines)


def plot(plt, results):
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [r["prompt"] for r in results]
    x = range(len(names))
    for i, (key, label) in enumerate((("plain_tps", "plain"), ("auto_tps", "auto (stored costs)"),
                                      ("first_run_tps", "auto, first run (empty store)"))):
        values = [r[key] if key != "first_run_tps" else r["first_run_ratio"] * r["plain_tps"]
                  for r in results]
        ax.bar([j + 0.27 * (i - 1) for j in x], values, 0.27, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s (decoding, wall clock)")
    ax.set_title(f"--draft auto vs plain, MEASURED on {platform.system()} "
                 f"({'Metal' if mx.metal.is_available() else 'CPU backend'})")
    ax.legend(fontsize=7)
    return fig


def main(argv=None):
    ap = arguments(__doc__)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (plain, auto) per prompt")
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    args = ap.parse_args(argv)
    if args.max_tokens < 1 or args.repeats < 1:
        ap.error("--max-tokens and --repeats must be >= 1")
    model, tokenizer = load(str(args.model or default_model_path()))
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as store:
        for name in args.prompts:
            os.environ["MLX_QSPEC_CACHE"] = str(Path(store) / name)  # each prompt starts empty
            results.append(bench_prompt(model, tokenizer, name, PROMPTS[name], args.max_tokens,
                                        args.repeats))
    note = (f"{platform.system()} {platform.machine()}, MLX {mx.__version__}, "
            f"{'Metal' if mx.metal.is_available() else 'CPU backend (not a Mac number)'}, "
            f"{os.cpu_count()} CPUs, 1-min load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"--draft auto vs plain, greedy, {args.max_tokens} max tokens, {args.repeats} rounds, medians")
    print(note)
    print(table(results))
    worst = min(min(r["pair_ratio"], r["first_run_ratio"]) for r in results)
    cpu_worst = min(min(r["cpu_pair_ratio"], r["cpu_first_run_ratio"]) for r in results)
    print(f"goal auto >= 0.95x plain (first run included): {'met' if worst >= 0.95 else 'NOT met'} "
          f"on the wall clock (worst {worst:.3f}); on CPU time worst {cpu_worst:.3f}")
    write(args, dict(config=vars(args), platform=note, results=results),
          lambda plt: plot(plt, results), dpi=120)


if __name__ == "__main__":
    main()
