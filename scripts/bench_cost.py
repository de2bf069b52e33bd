"""Modeled Mac speed of the drafts that read fewer bytes, from measured τ and counted bytes.

Measured here (MLX-CPU, the test model by default): acceptance α and tokens per verify τ of
each draft at γ on a long real-text context held in a nested KV cache (float buffer smaller
than the context), and the bytes each draft and verify forward reads (counted from the arrays
it touches, float arrays as a Mac's float16). Also counted: what plain decoding reads per
token with a float16 KV cache and with an 8-bit one, at the same context.

Modeled (labelled so in the table and JSON): tokens/s on M1 … M4 Max by the calibrated roofline
(mlx_qspec/roofline.py: a forward costs the chip's fixed cost plus its bytes at the bandwidth
it achieves, both fitted to public measurements; a verify of γ+1 rows costing its bytes) at
contexts 1k, 4k, 16k, 32k — plane bytes scaled linearly from the measured context, the float buffer kept, τ taken from
the measured context. ``auto`` is modeled as the best draft or plain decoding, whichever is
faster: never below 1.0×.

    python scripts/bench_cost.py --context 1024 --max-tokens 64 --json out/cost.json --plot out/cost.png
"""

import sys
import time

import mlx.core as mx

from plotting import arguments, write
from mlx_qspec import cost, load, reads
from mlx_qspec.bench import log, long_text
from mlx_qspec.roofline import CHIPS, tokens_per_s
from mlx_qspec.cli import default_model_path
from mlx_qspec.decoder import SpecStats, prefill
from mlx_qspec.drafts.cascade import build
from mlx_qspec.hooks import install
from mlx_qspec.kv_cache import NestedKVCache, make_cache
from mlx_qspec.speculative import speculative_generate_step

CONTEXTS = (1024, 4096, 16384, 32768)
MODES = ("kv-upper", "w-upper+kv-upper", "w-upper", "a8-g32", "ngram", "ngram>kv-upper")


def per_forward(counter: reads.ReadCounter) -> dict:
    """Mean f16 bytes per forward: weights and KV."""
    f = max(counter.forwards, 1)
    return {"weights": counter.bytes_f16(reads.WEIGHTS) / f, "kv": counter.bytes_f16(reads.KV) / f}


def plain_reads(model, kv_mode: str, context: int) -> dict:
    """Bytes one plain step reads at ``context`` with an fp or 8-bit cache. What is read does
    not depend on the cached values, so the cache is filled with zeros, not prefilled."""
    cache = make_cache(model, kv_mode)
    args = model.args
    heads = args.num_key_value_heads
    dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    zeros = mx.zeros((1, heads, context, dim), mx.float32)
    for c in cache:
        c.update_and_fetch(zeros, zeros)
    return per_forward(cost.counted(model, cache))


def run_mode(model, prompt_last, state, mode, gamma, max_tokens):
    cache = [NestedKVCache.from_state(s, m) for s, m in state]
    stats = SpecStats()
    t = time.perf_counter()
    for _ in speculative_generate_step(prompt_last, model, draft=mode, num_draft_tokens=gamma,
                                       max_tokens=max_tokens, prompt_cache=cache, stats=stats):
        pass
    kb = cache[0].state[4]  # the float key buffer (B, Hkv, nb, D): values' is the same size
    return {
        "buffer_kv_per_forward": 2 * 2 * kb.size * len(cache),  # K and V, float16
        "buffer_tokens": kb.shape[2],
        "draft": mode, "gamma": gamma, "acceptance": stats.acceptance,
        "tokens_per_verify": stats.tokens_per_verify, "emitted": stats.emitted,
        "draft_per_forward": per_forward(stats.draft_reads),
        "verify_per_forward": per_forward(stats.verify_reads),
        # Forwards per emitted token: a cascade's levels and the lookup (none) differ from γ/τ.
        "draft_forwards_per_token": stats.draft_reads.forwards / stats.emitted,
        "verify_forwards_per_token": stats.verify_reads.forwards / stats.emitted,
        "bytes_per_token_f16": stats.bytes_per_token(half=True),
        "seconds_cpu": time.perf_counter() - t,
    }


def model_rows(measured, plain_fp, plain_8bit, context0):
    """Modeled rows: per chip × context, plain (fp16 KV, 8-bit KV) and each draft. A forward
    costs what roofline.tokens_per_s says of its bytes (the chip's fixed cost, then the bytes
    at its achieved bandwidth); a verify of γ+1 rows costs its bytes, as one row."""
    scale = lambda kv, ctx: kv * ctx / context0  # noqa: E731  KV bytes grow with context
    rows = []

    def nested(kv, m, ctx):
        """The float buffer stays (≤ 2 blocks); only the planes grow with the context."""
        buf, nb = m["buffer_kv_per_forward"], m["buffer_tokens"]
        return buf + (kv - buf) * (ctx - nb) / (context0 - nb)

    for ctx in CONTEXTS:
        plain16 = plain_fp["weights"] + scale(plain_fp["kv"], ctx)
        plain8 = plain_8bit["weights"] + scale(plain_8bit["kv"], ctx)
        forwards = {}  # draft → (draft forwards per token, their bytes, verify forwards, bytes)
        for m in measured:
            d, v = m["draft_per_forward"], m["verify_per_forward"]
            draft_fwd = d["weights"] + nested(d["kv"], m, ctx) if m["draft_forwards_per_token"] else 0.0
            forwards[m["draft"]] = (m["draft_forwards_per_token"], draft_fwd,
                                    m["verify_forwards_per_token"], v["weights"] + nested(v["kv"], m, ctx))
        for chip in CHIPS:
            t = lambda nbytes: 1 / tokens_per_s(nbytes, chip)  # noqa: E731
            drafts = {}
            for name, (n_draft, draft_fwd, n_verify, verify_fwd) in forwards.items():
                per_token = (n_draft * t(draft_fwd) if n_draft else 0.0) + n_verify * t(verify_fwd)
                drafts[name] = {"vs_fp16_plain": t(plain16) / per_token,
                                "vs_8bit_plain": t(plain8) / per_token,
                                "draft_over_verify_bytes": draft_fwd / verify_fwd}
            best = max(drafts, key=lambda k: drafts[k]["vs_8bit_plain"])
            rows.append({
                "chip": chip, "context": ctx, "modeled": True,
                "plain_fp16kv_tps": tokens_per_s(plain16, chip),
                "plain_8bitkv_tps": tokens_per_s(plain8, chip),
                **{f"{k}_x_fp16": v["vs_fp16_plain"] for k, v in drafts.items()},
                **{f"{k}_x_8bit": v["vs_8bit_plain"] for k, v in drafts.items()},
                "auto": best if drafts[best]["vs_8bit_plain"] > 1 else "none",
                "auto_x_8bit": max(1.0, drafts[best]["vs_8bit_plain"]),
                "draft_over_verify_bytes": {k: v["draft_over_verify_bytes"] for k, v in drafts.items()},
            })
    return rows


def print_tables(measured, rows, context0):
    print(f"measured at context {context0} (MLX-CPU counts; bytes as float16):")
    print(f"{'draft':18} {'α':>6} {'τ':>5} {'draft B/fwd':>12} {'verify B/fwd':>13}")
    for m in measured:
        d, v = m["draft_per_forward"], m["verify_per_forward"]
        print(f"{m['draft']:18} {m['acceptance']:6.3f} {m['tokens_per_verify']:5.2f} "
              f"{d['weights'] + d['kv']:12.0f} {v['weights'] + v['kv']:13.0f}")
    names = [m["draft"] for m in measured]
    print("\nMODELED speedup over plain decoding (a forward: the chip's fixed cost + its bytes "
          "at the achieved bandwidth; the chips with the largest and smallest fixed share):")
    print(f"{'context':>7} {'plain16 tok/s':>13} " + " ".join(f"{n + ' x16/x8':>26}" for n in names)
          + f" {'auto':>18}")
    for r in rows:
        if r["chip"] not in ("M1", "M4 Max"):
            continue
        cells = " ".join(f"{r[n + '_x_fp16']:12.2f}/{r[n + '_x_8bit']:<13.2f}" for n in names)
        print(f"{r['context']:7d} {r['plain_fp16kv_tps']:13.0f} {cells} "
              f"{r['auto']:>12}{r['auto_x_8bit']:6.2f}  {r['chip']}")


def plot(plt, rows, names):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pts = [r for r in rows if r["chip"] == "M4 Max"]
    for n in names:
        ax.plot([r["context"] for r in pts], [r[n + "_x_fp16"] for r in pts], "o-", label=f"{n} vs fp16-KV plain")
        ax.plot([r["context"] for r in pts], [r[n + "_x_8bit"] for r in pts], "x--", label=f"{n} vs 8-bit-KV plain")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context (tokens)", ylabel="modeled speedup on an M4 Max (calibrated roofline)",
           title="MODELED Mac speedup from measured τ and counted bytes")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return fig


def main(argv=None):
    ap = arguments(__doc__)
    ap.add_argument("--context", type=int, default=1024, help="tokens of real text before generating")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per draft")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    args = ap.parse_args(argv)

    model, tokenizer = load(args.model or default_model_path())
    install(model)
    try:
        for m in args.modes:
            build(model, m, "nested")
    except ValueError as e:
        ap.exit(2, f"bench_cost: error: {e}\n")
    ids = mx.array(long_text(tokenizer, args.context + 1))
    t = time.perf_counter()
    cache = make_cache(model, "nested")
    log(f"prefill {args.context} tokens into a nested cache ...")
    prefill(model, ids[:-1], cache, 256,
            progress=lambda done, total: print(".", end="", file=sys.stderr, flush=True))
    log(f" {time.perf_counter() - t:.0f}s")
    state = [(c.state, c.meta_state) for c in cache]
    measured = []
    for i, mode in enumerate(args.modes, 1):
        measured.append(run_mode(model, ids[-1:], state, mode, args.gamma, args.max_tokens))
        m = measured[-1]
        log(f"[{i}/{len(args.modes)}] {mode}: α={m['acceptance']:.3f} τ={m['tokens_per_verify']:.2f} "
            f"({m['seconds_cpu']:.0f}s CPU)")
    plain_fp = plain_reads(model, "fp", args.context)
    plain_8bit = plain_reads(model, "8bit", args.context)
    rows = model_rows(measured, plain_fp, plain_8bit, args.context)
    print_tables(measured, rows, args.context)
    write(args, {"config": vars(args), "measured": measured, "plain_fp16kv_per_forward": plain_fp,
                 "plain_8bitkv_per_forward": plain_8bit, "modeled_rows": rows},
          lambda plt: plot(plt, rows, [m["draft"] for m in measured]), dpi=120)


if __name__ == "__main__":
    main()
