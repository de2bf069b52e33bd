"""What rewinding a recurrent layer costs, two ways: replay (what ``recurrent.py`` does) or a
state kept per position. One layer at real shapes, per speculative block of γ + 1 verify rows
of which m are kept (the rest rejected).

- replay: the verify runs the recurrence over its rows as the model's one multi-token call
  (gated delta: one T-token call, which is T one-token steps inside; Mamba-2: T one-token
  steps, for exactness) and keeps each row's inputs; a rejection re-runs the recurrence over
  the m kept rows from the block's starting state.
- per position: the verify runs T one-token calls and keeps every state; a rejection picks one.

Bytes per block are a Mac's memory traffic for the state (float32 on a Mac too): read and
written per call; what each way keeps alive is the memory column. Times are this machine's
(MLX on CPU, float32, medians): never a Mac's speed.

    python scripts/bench_rewind.py --json out/rewind.json --plot out/rewind.png
"""

import statistics
import timeit

import mlx.core as mx
from mlx_lm.models.gated_delta import gated_delta_update
from mlx_lm.models.ssm import ssm_update

from plotting import arguments, write

# Qwen3.5 / Qwen3-Next gated-delta layers; Mamba-2 2.7B's SSD layers.
SHAPES = {
    "gated_delta(Qwen3.5)": dict(Hk=16, Hv=32, Dk=128, Dv=128),
    "ssm(Mamba-2 2.7B)": dict(H=80, Dh=64, Ds=128, G=1),
}
GAMMAS = (1, 4, 8)


def inputs(kind: str, T: int, s: dict):
    """Random per-position inputs of ``T`` rows and a starting state."""
    r = mx.random.normal
    if kind.startswith("gated"):
        q, k = r((1, T, s["Hk"], s["Dk"])) * 0.1, r((1, T, s["Hk"], s["Dk"])) * 0.1
        args = (q, k, r((1, T, s["Hv"], s["Dv"])), r((1, T, s["Hv"])), r((1, T, s["Hv"])),
                mx.zeros(s["Hv"]), mx.ones(s["Hv"]))
        return args, r((1, s["Hv"], s["Dv"], s["Dk"])) * 0.1
    args = (r((1, T, s["H"], s["Dh"])), mx.zeros(s["H"]), r((1, T, s["G"], s["Ds"])),
            r((1, T, s["G"], s["Ds"])), mx.ones(s["H"]), r((1, T, s["H"])), mx.ones(s["H"]))
    return args, r((1, s["H"], s["Dh"], s["Ds"])) * 0.1


def rows(args, kind, a, b):
    """The per-position inputs of rows a..b (the constants as they are)."""
    per = (0, 1, 2, 3, 4) if kind.startswith("gated") else (0, 2, 3, 5)
    return tuple(x[:, a:b] if i in per else x for i, x in enumerate(args))


def run(kind, args, state):
    """The recurrence over ``args``' rows from ``state``: the new state."""
    if kind.startswith("gated"):
        return gated_delta_update(*args, state)[1]
    return ssm_update(*args[:6], args[6], state, (0.0, float("inf")))[1]


def steps(kind, args, state, T, keep=False):
    """``T`` one-token calls; every state when ``keep``."""
    out = []
    for t in range(T):
        state = run(kind, rows(args, kind, t, t + 1), state)
        out.append(state)
    return out if keep else state


def timed(fn, repeats):
    return statistics.median(timeit.repeat(lambda: mx.eval(fn()), number=1, repeat=repeats))


def measure(kind: str, shape: dict, gamma: int, repeats: int) -> dict:
    T, m = gamma + 1, (gamma + 1) // 2  # a block cut halfway
    args, state = inputs(kind, T, shape)
    mx.eval(args, state)
    S = state.nbytes
    one_call = kind.startswith("gated")  # a T-token call is exact only for gated delta
    verify = (lambda: run(kind, args, state)) if one_call else (lambda: steps(kind, args, state, T))
    replay = (lambda: run(kind, rows(args, kind, 0, m), state)) if one_call else (
        lambda: steps(kind, rows(args, kind, 0, m), state, m))
    kept_inputs = sum(a.nbytes for i, a in enumerate(rows(args, kind, 0, T)) if a.ndim > 1)
    replay_calls = 1 if one_call else m
    return {
        "layer": kind, "gamma": gamma, "rows": T, "kept": m, "state_bytes": S,
        "replay": {
            "verify_bytes": 2 * S * (1 if one_call else T),
            "rewind_bytes": 2 * S * replay_calls,
            "memory_bytes": S + kept_inputs,
            "verify_s": timed(verify, repeats),
            "rewind_s": timed(replay, repeats),
        },
        "per_position": {
            "verify_bytes": 2 * S * T,
            "rewind_bytes": 0,
            "memory_bytes": S * (T + 1),
            "verify_s": timed(lambda: steps(kind, args, state, T, keep=True), repeats),
            "rewind_s": 0.0,
        },
    }


def main():
    p = arguments(__doc__, model=None, whole_doc=True)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    mx.random.seed(0)
    results = [measure(k, s, g, a.repeats) for k, s in SHAPES.items() for g in GAMMAS]
    mb = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
    print(f"{'layer':22} {'γ':>2} {'way':12} {'verify MB':>9} {'rewind MB':>9} {'total MB':>9} "
          f"{'live MB':>8} {'verify ms':>9} {'rewind ms':>9}   (ms: this CPU, MLX float32)")
    for r in results:
        for way in ("replay", "per_position"):
            w = r[way]
            print(f"{r['layer']:22} {r['gamma']:>2} {way:12} {mb(w['verify_bytes'])} "
                  f"{mb(w['rewind_bytes'])} {mb(w['verify_bytes'] + w['rewind_bytes'])} "
                  f"{mb(w['memory_bytes'])} {1e3 * w['verify_s']:9.2f} {1e3 * w['rewind_s']:9.2f}")

    def draw(plt):
        fig, axes = plt.subplots(1, len(SHAPES), figsize=(10, 4))
        for ax, kind in zip(axes, SHAPES):
            rs = [r for r in results if r["layer"] == kind]
            for way in ("replay", "per_position"):
                ax.plot([r["gamma"] for r in rs],
                        [(r[way]["verify_bytes"] + r[way]["rewind_bytes"]) / 2**20 for r in rs],
                        marker="o", label=way)
            ax.set(title=kind, xlabel="γ (block of γ+1 rows, half kept)", ylabel="state MB per block")
            ax.legend()
        return fig

    write(a, {"device": str(mx.default_device()), "results": results}, draw)


if __name__ == "__main__":
    main()
