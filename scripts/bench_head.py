"""What a trained head (``--draft-head DIR``) or a checkpoint's MTP layers give as a draft: α
and τ at each γ on held-back text (continuing files ``train_head`` never read) and on chat
prompts, bytes a draft step reads ÷ a plain step, and the MODELED Mac speedup.

Greedy speculative decoding emits plain greedy decoding's tokens, so its blocks are
simulated exactly: the plain greedy continuation is decoded once, the model's hidden states
of every position come from one forward over prompt + continuation, and each block the level
proposes γ tokens from the hidden states of the positions cached since its last block (as
the decoder hands them over); the block accepts the drafts that equal the continuation and
moves on by accepted + 1. The head's own KV cache is the one the level keeps in the loop.

Counts, not speed (MLX-CPU). The modeled speedup is bytes-bound, from mlx_qspec/roofline.py
on the chip given: a draft step costs a plain step × its bytes ÷ a plain step's bytes (one row
is bound by bytes), a verify of γ+1 rows the roofline's forward of γ+1 rows.

    python scripts/bench_head.py --draft-head out/head --gammas 1 2 3 4 \
        --json out/head.json --plot out/head.png
"""

import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from bench_acceptance import tau_figure
from plotting import arguments, text_table, write
from mlx_qspec import load, precision, reads, roofline
from mlx_qspec.cli import default_model_path
from mlx_qspec.heads import capture, store
from mlx_qspec.heads.level import HeadDraft
from mlx_qspec.hooks import install as prepare
from mlx_qspec.speculative import plain_generate_step
from mlx_qspec.train_head import default_corpus

CHAT = [
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the sea.",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Give me three tips for learning a new language.",
    "What are the health benefits of regular exercise?",
    "Write a Python function that checks whether a number is prime.",
]


def workloads(tokenizer, n: int, prompt_tokens: int) -> dict[str, list[list[int]]]:
    """``held-back``: the first tokens of default-corpus files train_head never reads;
    ``chat``: chat-formatted questions."""
    text = []
    for f in default_corpus(held_back=True):
        ids = tokenizer.encode(f.read_text(errors="replace"))
        if len(ids) >= prompt_tokens:
            text.append(ids[:prompt_tokens])
        if len(text) == n:
            break
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in CHAT[:n]]
    return {"held-back": text, "chat": chat}


def reference(model, prompt: list[int], max_tokens: int, eos: set):
    """Plain greedy continuation (to the end of the turn), and the model's final hidden state
    at every position of prompt + continuation (one forward; the last token's is not needed)."""
    out = []
    for t, _, _ in plain_generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(t))
        if out[-1] in eos:
            break
    seq = prompt + out
    with capture.capturing() as rows, precision.reading(precision.FULL_PRECISION):
        model(mx.array(seq[:-1])[None])
    mx.eval(rows[0])
    return seq, rows[0][0]


def simulate(level: HeadDraft, seq: list[int], hidden, start: int, gamma: int) -> dict:
    """Greedy blocks over ``seq`` from position ``start`` (the first pending token)."""
    level.reset()
    drafted = accepted = blocks = 0
    p, seen = start, 0  # p: positions in the model's cache; seen: handed to the level so far
    while p + 1 < len(seq):
        k = min(gamma, len(seq) - p - 1)
        proposal, _ = level.propose(seq[:p + 1], hidden[seen:p], k)
        seen = p
        n = 0
        while n < len(proposal) and proposal[n] == seq[p + 1 + n]:
            n += 1
        drafted, accepted, blocks = drafted + len(proposal), accepted + n, blocks + 1
        p += n + 1
    return {"drafted": drafted, "accepted": accepted, "blocks": blocks, "emitted": len(seq) - start - 1}


def step_bytes(model, level: HeadDraft, seq: list[int], hidden) -> tuple[float, float]:
    """Bytes (Mac half precision) one plain step and one chained draft step read, at the
    context of ``seq``."""
    cache = make_prompt_cache(model)
    with precision.reading(precision.FULL_PRECISION):
        model(mx.array(seq[:-1])[None], cache=cache)
    with precision.reading(precision.FULL_PRECISION), reads.counting(reads.ReadCounter()) as plain:
        mx.eval(model(mx.array(seq[-1:])[None], cache=cache))
    level.reset()
    level.propose(seq, hidden, 1)
    draft = reads.ReadCounter()
    level.propose(seq, hidden[-1:], 2, counter=draft)  # catch-up row + one chained step
    return plain.bytes_f16(), draft.bytes_f16() / max(draft.forwards, 1)


def modeled_speedup(model, alpha_tau: dict, gamma: int, ratio: float, chip: str) -> float:
    """Plain seconds per token ÷ speculative, bytes-bound on ``chip`` (roofline)."""
    linears = roofline.linears(model)
    step = lambda rows: roofline.forward_seconds(linears, 0.0, rows, chip)  # noqa: E731
    per_block = alpha_tau["drafted"] / alpha_tau["blocks"] * ratio * step(1) + step(gamma + 1)
    return alpha_tau["emitted"] / alpha_tau["blocks"] * step(1) / per_block


def measure(model, level, refs, g, read, workload, args, *, plain_b, draft_b) -> dict:
    """One table row: the level at γ = ``g`` over every reference of a workload."""
    tot = {"drafted": 0, "accepted": 0, "blocks": 0, "emitted": 0}
    for (seq, hidden), start in refs:
        for k, v in simulate(level, seq, hidden, start, g).items():
            tot[k] += v
    row = {"workload": workload, "draft": args.draft, "read": read, "gamma": g, **tot,
           "acceptance": tot["accepted"] / max(tot["drafted"], 1),
           "tokens_per_verify": tot["emitted"] / tot["blocks"],
           "draft_step_bytes": draft_b, "plain_step_bytes": plain_b,
           "draft_step_vs_plain": draft_b / plain_b, "chip": args.chip}
    row["modeled_mac_speedup"] = modeled_speedup(model, tot, g, row["draft_step_vs_plain"], args.chip)
    return row


def main(argv=None):
    ap = arguments(__doc__)
    ap.add_argument("--draft-head", required=True, help="the head directory to measure")
    ap.add_argument("--draft", default="head", help="the level's name in the table")
    ap.add_argument("--reads", nargs="+", default=["verify"],
                    help="how the head reads weights: verify (all bits), w-upper (the upper plane "
                    "of 8-bit layers: the test model's LM head)")
    ap.add_argument("--gammas", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    ap.add_argument("--prompt-tokens", type=int, default=96, help="held-back text tokens per prompt")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens generated per prompt")
    ap.add_argument("--chip", default="M2 Max", help="chip of the modeled speedup")
    args = ap.parse_args(argv)
    model, tokenizer = load(args.model or default_model_path())
    prepare(model)
    ends = capture.ModelEnds(model)
    head, _ = store.load(args.draft_head, model, ends)
    levels = {read: HeadDraft(model, head, args.draft, precision.parse(read)
                              if read != "verify" else precision.FULL_PRECISION, ends)
              for read in args.reads}
    rows, t0 = [], time.perf_counter()
    for workload, prompts in workloads(tokenizer, args.prompts, args.prompt_tokens).items():
        eos = set(tokenizer.eos_token_ids)
        refs = [(reference(model, p, args.max_tokens, eos), len(p) - 1) for p in prompts]
        for read, level in levels.items():
            plain_b, draft_b = step_bytes(model, level, *refs[0][0])
            for g in args.gammas:
                rows.append(measure(model, level, refs, g, read, workload, args,
                                    plain_b=plain_b, draft_b=draft_b))
        print(f"{workload}: {len(prompts)} prompts, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_table(rows)
    write(args, rows, lambda plt: figure(plt, rows), indent=2, dpi=120)


def print_table(rows):
    print(text_table([
        ("workload", "workload", "{}"), ("draft", "draft", "{}"), ("read", "read", "{}"),
        ("γ", "gamma", "{}"), ("α", "acceptance", "{:.3f}"), ("τ", "tokens_per_verify", "{:.2f}"),
        ("draft/plain bytes", "draft_step_vs_plain", "{:.3f}"),
        (f"modeled× ({rows[0]['chip']})", "modeled_mac_speedup", "{:.2f}")], rows))


def figure(plt, rows):
    return tau_figure(plt, {f"τ, {w}, {read}": [(r["gamma"], r["tokens_per_verify"]) for r in rows
                                                 if r["workload"] == w and r["read"] == read]
                            for w in dict.fromkeys(r["workload"] for r in rows)
                            for read in dict.fromkeys(r["read"] for r in rows)})


if __name__ == "__main__":
    main()
