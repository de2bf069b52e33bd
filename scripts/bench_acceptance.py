"""Acceptance of each draft (precision drafts, ``ngram``, ``skip-…``, cascades) on real
text: α, τ, verify passes per token, bytes read per token relative to plain decoding
(counted from the arrays each forward reads), and whether greedy speculative output matched
plain decoding, for each draft γ, on one of two workloads: ``free`` (continue English
prose) or ``grounded`` (a chat request to rewrite a given Python function: output that
copies its input, where the n-gram lookup drafts).

Counts, not speed: on MLX-CPU a verify of γ+1 rows costs ~γ+1 one-token steps, so
Linux timings say nothing about a Mac. Bytes are the regime a Mac decodes in (bound by
bytes read, docs/design.md §5): every draft step and every verify pass reads all weights once
(the verify kernel reads each weight byte once for its γ+1 rows), plain decoding once per
token, so ``bytes/tok`` = bytes read by drafts and verifies ÷ what plain decoding reads
per token at the same context; above 1 the draft costs more bytes than it saves, and its
inverse is the MODELED Mac speedup (``modeled×``: bytes-bound, a verify of γ+1 rows costing
its bytes — mlx_qspec/roofline.py puts a 5-row verify at ≤ 1.15× one row on every M1–M4 chip). Prompts are
real text shipped with every Python install (the license, stdlib docs and sources).

    python scripts/bench_acceptance.py --modes a8 a8-g32 a4 a4-g32 w-upper kv-upper \
        --kv-mode nested --gammas 1 2 4 8 \
        --json out/acceptance.json --plot out/acceptance.png
    python scripts/bench_acceptance.py --workload grounded --modes ngram skip-0.2 \
        "ngram>skip-0.2" --gammas 4 8 --max-tokens 128
"""

import inspect
import pydoc
import sys
import time
from pathlib import Path

import mlx.core as mx

from plotting import arguments, text_table, write
from mlx_qspec import load, settings
from mlx_qspec.cli import default_model_path, progress_of
from mlx_qspec.decoder import SpecStats
from mlx_qspec.drafts.cascade import build, resolve
from mlx_qspec.kv_cache import KV_MODES, make_cache
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

DOC_MODULES = ["json", "argparse", "logging", "unittest", "subprocess", "collections", "asyncio"]


def real_texts() -> list[str]:
    """Paragraph-sized English texts: the Python license's history, then stdlib module docs."""
    license_txt = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                   f"{sys.version_info.minor}" / "LICENSE.txt")
    texts = []
    if license_txt.is_file():
        paras = [p.strip() for p in license_txt.read_text().split("\n\n")]
        prose = [p for p in paras if len(p) > 400 and sum(map(str.isalpha, p)) > 0.7 * len(p)]
        texts += [" ".join(p.split()) for p in prose][:2]
    for name in DOC_MODULES:
        doc = pydoc.getdoc(__import__(name))
        if len(doc) > 300:
            texts.append(" ".join(doc.split()))
    return texts


# Input-grounded requests: a stdlib function (its first 25 lines) and what to do with it.
GROUNDED = [
    ("textwrap", "dedent", "Rewrite this function with a docstring and type hints:"),
    ("textwrap", "indent", "Add a comment to every line of this function:"),
    ("shlex", "quote", "Rename the variables of this function to longer names:"),
    ("string", "capwords", "Rewrite this function with a docstring and type hints:"),
    ("json", "dumps", "Add a comment to every line of this function:"),
    ("shlex", "split", "Rewrite this function with type hints:"),
]


def prompts(tokenizer, workload: str, n: int, length: int) -> list[list[int]]:
    """``free``: the first ``length`` tokens of ``n`` real texts; ``grounded``: ``n``
    chat-formatted requests to rewrite a given function (output copies the input)."""
    if workload == "free":
        texts = real_texts()
        if len(texts) < n:
            raise SystemExit(f"only {len(texts)} real texts found, asked for {n}")
        return [tokenizer.encode(t)[:length] for t in texts[:n]]
    if n > len(GROUNDED):
        raise SystemExit(f"only {len(GROUNDED)} grounded prompts, asked for {n}")
    out = []
    for module, name, ask in GROUNDED[:n]:
        src = "\n".join(inspect.getsource(getattr(__import__(module), name)).splitlines()[:25])
        msg = [{"role": "user", "content": f"{ask}\n\n```python\n{src}\n```"}]
        out.append(tokenizer.apply_chat_template(msg, add_generation_prompt=True))
    return out


def run_config(model, prompt_sets, plain_outs, mode, gamma, max_tokens, kv_mode="fp"):
    """One (mode, γ): totals over all prompts, and the greedy-match rate vs plain decode."""
    stats, matched, total = SpecStats(), 0, 0
    for prompt, ref in zip(prompt_sets, plain_outs):
        out = [t for t, _, _ in speculative_generate_step(
            mx.array(prompt), model, draft=mode, num_draft_tokens=gamma,
            max_tokens=max_tokens, stats=stats, prompt_cache=make_cache(model, kv_mode))]
        matched += sum(a == b for a, b in zip(out, ref))
        total += len(ref)
    b = stats.bytes_per_token(half=True)
    return {
        "draft": mode.name,
        "gamma": gamma,
        **{k: getattr(stats, k) for k in ("drafted", "accepted", "verify_passes", "emitted",
                                          "acceptance", "tokens_per_verify")},
        "verify_passes_per_token": stats.verify_passes / stats.emitted,
        "bytes_per_token_vs_plain": stats.bytes_per_token()["total"] / stats.bytes_per_token()["plain"],
        "modeled_mac_speedup": b["plain"] / b["total"],
        "level_counts": stats.level_counts,
        **{f"{k}_bytes_per_token": v for k, v in stats.bytes_per_token().items()},
        "greedy_match": matched / total,
        # τ if every draft were accepted: max_tokens cuts the last block short.
        "tokens_per_verify_ceiling": total / sum(-(-len(r) // (gamma + 1)) for r in plain_outs),
        "draft_time_s": stats.draft_time,
        "verify_time_s": stats.verify_time,
    }


def print_table(rows):
    print(text_table([
        ("draft", "draft", "{}"), ("γ", "gamma", "{}"), ("α", "acceptance", "{:.3f}"),
        ("τ", "tokens_per_verify", "{:.2f}"), ("τ max", "tokens_per_verify_ceiling", "{:.2f}"),
        ("verify/tok", "verify_passes_per_token", "{:.3f}"),
        ("bytes/tok", "bytes_per_token_vs_plain", "{:.2f}"), ("modeled×", "modeled_mac_speedup", "{:.2f}"),
        ("match", "greedy_match", "{:.3f}"), ("drafted", "drafted", "{}"), ("accepted", "accepted", "{}")],
        rows))


def tau_figure(plt, series: dict, decorate=None):
    """τ against γ: a line per ``series`` entry (label → its (γ, τ) points), over what
    ``decorate(ax)`` draws first; bench_head's too."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if decorate is not None:
        decorate(ax)
    for label, pts in series.items():
        ax.plot(*zip(*sorted(pts)), "o-", label=label)
    ax.set_xlabel("draft length γ")
    ax.set_ylabel("tokens per verify pass τ")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def figure(plt, rows):
    ceiling = dict(sorted((r["gamma"], r["tokens_per_verify_ceiling"]) for r in rows))
    gammas = list(ceiling)

    def ceiling_on_log2(ax):
        ax.plot(gammas, list(ceiling.values()), "k:", label="every draft accepted (at this max_tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gammas, [str(g) for g in gammas])

    return tau_figure(plt, {mode: [(r["gamma"], r["tokens_per_verify"]) for r in rows if r["draft"] == mode]
                            for mode in dict.fromkeys(r["draft"] for r in rows)}, ceiling_on_log2)


def main(argv=None):
    ap = arguments(__doc__)
    ap.add_argument("--modes", nargs="+", default=["a8", "a8-g32", "a4", "a4-g32"])
    ap.add_argument("--gammas", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--kv-mode", choices=KV_MODES, default="fp", help="KV cache for every run")
    ap.add_argument("--workload", choices=("free", "grounded"), default="free",
                    help="free: continue English prose; grounded: rewrite a given function")
    ap.add_argument("--prompts", type=int, default=3, help="number of real-text prompts")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="tokens of text per prompt")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens generated per prompt")
    args = ap.parse_args(argv)

    try:
        model, tokenizer = load(args.model or default_model_path())
        modes = [build(model, resolve(model, tokenizer, m, progress=progress_of("skip calibration")), args.kv_mode)
                 for m in args.modes]
        gammas = [settings.check("num_draft_tokens", g) for g in args.gammas]
    except ValueError as e:
        ap.exit(2, f"bench_acceptance: error: {e}\n")
    prompt_sets = prompts(tokenizer, args.workload, args.prompts, args.prompt_tokens)

    t0 = time.perf_counter()
    plain_outs = [[t for t, _, _ in plain_generate_step(
        mx.array(p), model, max_tokens=args.max_tokens, prompt_cache=make_cache(model, args.kv_mode))]
        for p in prompt_sets]
    print(f"plain decode: {len(prompt_sets)} prompts × {args.max_tokens} tokens "
          f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    rows, configs = [], [(m, g) for m in modes for g in gammas]
    for i, (mode, gamma) in enumerate(configs, 1):
        t = time.perf_counter()
        rows.append(run_config(model, prompt_sets, plain_outs, mode, gamma, args.max_tokens,
                               args.kv_mode))
        r = rows[-1]
        print(f"[{i}/{len(configs)}] {mode.name} γ={gamma}: α={r['acceptance']:.3f} "
              f"τ={r['tokens_per_verify']:.2f} match={r['greedy_match']:.3f} "
              f"({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)

    print_table(rows)
    meta = dict(model=str(args.model or default_model_path()), prompts=len(prompt_sets),
                prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                kv_mode=args.kv_mode, workload=args.workload)
    write(args, {"config": meta, "rows": rows}, lambda plt: figure(plt, rows), dpi=120)


if __name__ == "__main__":
    main()
