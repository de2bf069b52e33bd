"""Modeled Mac verdicts of ``--draft auto`` for the models Mac users run now, from their shapes
alone (no weights): a Qwen3-30B-A3B-shaped mixture of experts and a Qwen3.5-9B-shaped hybrid
(gated delta 3:1 with full attention), 4-bit (group 64), float16 KV cache, at 1k and 16k.

Every figure here is MODELED, not measured: a forward of r rows costs, on the roofline of
``roofline.py``, its dense matmuls (bytes or ALU, whichever binds), the experts its rows read
(``moe.expected_distinct``: the union of r rows' top-k, uniform routing — routes seen while
decoding are usually fewer), the KV cache its attention reads, and the recurrent state it
reads and writes (plus a rewind's replay, charged to every verify of several rows: an upper
bound), as ``cost.ForwardShape`` models a loaded model. ``auto``'s measured controller
(``controller.Controller``) starts from these costs as its prior (``controller.Costs``) and
the drafts' prior acceptance (``cost.PRIOR_ACCEPTANCE``): the lookup (free) and A8 (reads
what the verify reads); its first choice, before it has timed anything, is the verdict.

    python scripts/model_moe_hybrid.py --chip "M3 Max" --json out/moe_hybrid.json --plot out/moe_hybrid.png
"""

from dataclasses import dataclass

from plotting import arguments, write
from mlx_qspec import controller, cost, moe
from mlx_qspec.roofline import CHIPS, Linear

BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes, a float16 scale and bias per 64 weights
CONTEXTS = (1024, 16384)
ROWS = range(1, max(controller.GAMMAS) + 2)
DRAFTS = ("ngram", "a8-g32")


def linear(K: int, N: int) -> Linear:
    return Linear(K, N, 4, round(K * N * BYTES_PER_WEIGHT), 2)


@dataclass(frozen=True)
class Shape:
    """What one forward of the model reads, per kind of layer."""

    name: str
    dense: list  # roofline.Linear of every dense matmul (LM head included)
    attention_layers: int
    kv_heads: int
    head_dim: int
    experts: tuple = ()  # moe.ExpertLayer of every expert layer
    state_bytes: int = 0  # every recurrent layer's state, float32, together

    def at(self, context: int) -> cost.ForwardShape:
        """Its forwards at ``context``, as ``cost`` models a loaded model's: the state read and
        written (twice where a verify's rewind replays it)."""
        kv = self.attention_layers * 2 * self.kv_heads * self.head_dim * (context + 1) * 2
        state = 2 * self.state_bytes
        return cost.ForwardShape(self.dense, list(self.experts), kv, state, state, context)


def qwen3_30b_a3b() -> Shape:
    h, layers = 2048, 48
    per_layer = [linear(h, 32 * 128), linear(h, 4 * 128), linear(h, 4 * 128), linear(32 * 128, h),
                 linear(h, 128)]  # q, k, v, o, router
    per_expert = 3 * h * 768  # gate, up, down
    experts = [moe.ExpertLayer(str(i), 128, 8, per_expert * BYTES_PER_WEIGHT, per_expert)
               for i in range(layers)]  # 128 experts, top 8
    return Shape("Qwen3-30B-A3B-shaped MoE", per_layer * layers + [linear(h, 151936)], layers, 4, 128,
                 experts)


def qwen3_5_9b() -> Shape:
    h, layers, attention = 4096, 32, 8  # every 4th layer full attention
    gdn = 2 * 16 * 128 + 32 * 128  # q, k (16 heads), v (32 heads) of 128
    mlp = [linear(h, 12288), linear(h, 12288), linear(12288, h)]
    full = [linear(h, 2 * 16 * 256), linear(h, 4 * 256), linear(h, 4 * 256), linear(16 * 256, h)]
    delta = [linear(h, gdn), linear(h, 32 * 128), linear(h, 32), linear(h, 32), linear(32 * 128, h)]
    dense = (full + mlp) * attention + (delta + mlp) * (layers - attention) + [linear(h, 248320)]
    state = (layers - attention) * (32 * 128 * 128 * 4 + 3 * gdn * 2)  # + the convolution rows
    return Shape("Qwen3.5-9B-shaped hybrid", dense, attention, 4, 256, state_bytes=state)


def verdict(shape: Shape, context: int, chip: str) -> dict:
    """``auto``'s first choice on the modeled costs: the controller started from them as
    ``AutoPolicy`` starts it on a Mac (before any block is timed)."""
    verify = {r: shape.at(context).seconds(r, chip) for r in ROWS}
    costs = controller.Costs.from_table(verify, {"ngram": 0.0, "a8-g32": verify[1]},
                                        f"modeled({chip.replace(' ', '_')})")
    auto = controller.Controller({n: cost.PRIOR_ACCEPTANCE[n] for n in DRAFTS}, prior=costs)
    d, g = auto.current, auto.gamma
    speedup = 1.0 if d is None else (
        controller.expected_tokens(cost.PRIOR_ACCEPTANCE[d], g) * costs.step
        / (costs.block + g * (costs.row + costs.draft[d])))
    return {"model": shape.name, "context": context, "chip": chip, "draft": d or "none",
            "gamma": g if d else 0, "modeled_speedup": round(speedup, 3),
            "auto_reason": auto.reason, "step_ms": 1e3 * verify[1],
            "verify_over_step": {r: round(verify[r] / verify[1], 3) for r in ROWS}}


def main():
    p = arguments(__doc__, model=None, whole_doc=True)
    p.add_argument("--chip", default="M3 Max", choices=sorted(CHIPS))
    a = p.parse_args()
    rows = [verdict(s, c, chip) for s in (qwen3_30b_a3b(), qwen3_5_9b()) for c in CONTEXTS
            for chip in sorted(CHIPS)]
    mine = [r for r in rows if r["chip"] == a.chip]
    print(f"MODELED on {a.chip} (roofline, 4-bit g64, fp16 KV): auto's verdict")
    print(f"{'model':28} {'ctx':>6} {'step ms':>8} {'verify/step at 2,5,9 rows':>26} {'auto':>14}  reason")
    for r in mine:
        v = r["verify_over_step"]
        pick = f"{r['draft']}/γ{r['gamma']}" if r["gamma"] else "plain"
        print(f"{r['model']:28} {r['context']:>6} {r['step_ms']:8.2f} "
              f"{v[2]:8.2f} {v[5]:8.2f} {v[9]:8.2f} {pick:>14}  {r['auto_reason']}")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in mine:
            ax.plot(list(ROWS), [r["verify_over_step"][n] for n in ROWS], marker="o",
                    label=f"{r['model']}, {r['context'] // 1024}k")
        ax.set(title=f"MODELED verify cost on {a.chip}", xlabel="rows verified at once",
               ylabel="× one decode step")
        ax.legend(fontsize=7)
        return fig

    write(a, {"modeled": True, "verdicts": rows}, draw)


if __name__ == "__main__":
    main()
