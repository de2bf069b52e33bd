"""Bytes, ALU work and a roofline time of the small-M matmul kernels, M = 1 … 16, on Apple GPUs.

Counted, on this machine, by the MSL emulator's counting build (tools/msl_emulator; rules in
msl.h, "ALU counting"): for the kernels that serve a verify or draft block — ``verify``
(w4a16_verify), ``nested-verify`` and ``nested-draft`` (8-bit weights as two 4-bit planes),
all three built from nested_matmul.metal — and each row count M, the lane-operations a launch issues
(``alu``) and the bytes it moves: ``bytes`` = the bytes of each input read at least once plus
the output written (what DRAM serves when caches keep every re-read: the activations of a
verify block are at most 16 × 14336 × 2 bytes), ``requested`` = every load request, re-reads
included (the traffic the GPU's caches serve). Shapes: the test model's linears (SmolLM2-135M:
hidden 576, FFN 1536, k/v 192; MLX group 32, as its Q4_1 GGUF) and an 8B model's (Llama-3-8B:
hidden 4096, FFN 14336, k/v 1024; group 64, mlx-community's default), activations and scales
float16 as on a Mac; ``layer`` sums the seven linears of one transformer layer. Where N is
larger than --slice, the kernel runs on the first --slice output rows at full K and the counts
are scaled by N / slice: exact, because every threadgroup does the same work (the activations'
footprint is not scaled; ``requested`` activation bytes are, as each threadgroup re-reads them).

Modeled (a roofline, not a measurement: mlx_qspec/roofline.py, ``--draft auto``'s prior on a
Mac): time = max(bytes ÷ achieved bandwidth, alu ÷ achieved lane-op rate) per launch, on its
chips, and the ratio to M = 1 of the same kernel, shape and chip. Both rates are calibrated to
public measurements (roofline.py says which): the bandwidth share per chip from llama.cpp's
decode speeds, the lane-op rate as one share (~0.59) of the FP32 FMA rate (GPU cores × 128 lanes
× clock = FP32 FLOPS ÷ 2), the share at which MLX's own qmv_wide, counted below, grows with rows
as measured on an M4 Pro. The forward's fixed cost is left out here: these are single launches.

MLX's own ``quantized_matmul`` (``mlx-qmm``, MODELED, not counted): ``roofline.mlx_qmm``, op
counts by hand from the structure of MLX's kernels (qmv on M1/M2, qmv_wide on M3+ for 2+ rows,
qmm past the batch limit). MLX's weight bytes are counted once (its re-reads across rows and
tiles, and split-K partial sums, assumed served by cache — this flatters qmv's bytes, not its
ALU). ``fma-floor`` (MODELED) is a bound for any kernel on the FP32 ALUs: the same bytes, M fmas
per weight and nothing else.

Records (``--json``): kernel, model, shape ("KxN" = inputs × outputs, or "layer"), M, chip,
bytes, alu, modeled_s, ratio_to_m1, requested_bytes (counted kernels), path (mlx-qmm),
counted (false for the modeled rows), group_size, dtype.

    python -m scripts.bench_kernels --json out/kernels.json --plot out/kernels.png

(from the repository root, as a module: the emulator is development tooling, ``tools``.)
"""

import time

import mlx.core as mx

from mlx_qspec import kernels, roofline
from mlx_qspec.bench import log
from mlx_qspec.roofline import CHIPS
from scripts.plotting import arguments, write
from tools.msl_emulator import KernelError, counting_alu, metal_kernel

ROWS = (1, 2, 4, 5, 8, 16)
# (K, N) of one layer's linears: q, k, v, o, gate, up, down
MODELS = {
    "test": dict(group=32, linears=[(576, 576), (576, 192), (576, 192), (576, 576),
                                    (576, 1536), (576, 1536), (1536, 576)]),
    "8b": dict(group=64, linears=[(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                  (4096, 14336), (4096, 14336), (14336, 4096)]),
}
KERNELS = ("verify", "nested-verify", "nested-draft")
MLX = "mlx-qmm"
FLOOR = "fma-floor"


# ------------------------------------------------------------------ counted kernels
def run_counted(kind, K, N, M, group, dtype):
    """One launch in the counting build: (alu, {buffer: unique bytes}, requested bytes)."""
    key = mx.random.key(K * 7 + N * 13 + M)
    x = mx.random.normal((M, K), key=key).astype(dtype)
    wf = mx.random.normal((N, K), key=mx.random.key(K + N))
    with counting_alu():
        if kind == "verify":
            w, s, b = mx.quantize(wf, group_size=group, bits=4)
            kernels.metal_verify_matmul(x, w, s.astype(dtype), b.astype(dtype), group_size=group)
            k = kernels._kernel("w4a16_verify")
        else:
            w8, s, b = mx.quantize(wf, group_size=group, bits=8)
            up, lo = kernels.split_planes(w8)
            draft = kind == "nested-draft"
            kernels.metal_nested_matmul(x, up, None if draft else lo, s.astype(dtype), b.astype(dtype),
                                        group_size=group, draft=draft)
            k = kernels._kernel("nested_matmul_draft" if draft else "nested_matmul_verify")
    return k.last_alu, dict(k.last_unique), sum(k.last_loads.values())


def counted(kind, K, N, M, group, dtype, slice_rows):
    """Counts for the full N: run ``slice_rows`` rows and scale where N is larger."""
    n = min(N, slice_rows)
    alu, unique, requested = run_counted(kind, K, n, M, group, dtype)
    f = N / n
    out_bytes = M * N * dtype.size
    dram = sum(v if b == "x" else v * f for b, v in unique.items()) + out_bytes
    return dict(bytes=dram, requested=requested * f + out_bytes, alu=alu * f)


# ------------------------------------------------------------------ modeled
MODELED = {
    MLX: roofline.mlx_qmm,
    # a lower bound for any kernel on the FP32 ALUs: M fmas per weight, nothing else
    FLOOR: lambda K, N, M, group, itemsize, gen: ("", roofline.qmm_bytes(K, N, M, group, itemsize),
                                                   M * N * K),
}


# ------------------------------------------------------------------ roofline
def cells_of(kind, K, N, M, group, dtype, slice_rows):
    """{chip: (bytes, alu, modeled_s, path, requested)} of one launch."""
    if kind in MODELED:
        out = {}
        for chip, c in CHIPS.items():
            path, b, a = MODELED[kind](K, N, M, group, dtype.size, c.gen)
            out[chip] = (b, a, roofline.seconds(b, a, chip), path, None)
        return out
    c = counted(kind, K, N, M, group, dtype, slice_rows)
    return {chip: (c["bytes"], c["alu"], roofline.seconds(c["bytes"], c["alu"], chip), None, c["requested"])
            for chip in CHIPS}


def bench(models, dtype, slice_rows, kinds):
    records, failed = [], {}
    for model in models:
        group, linears = MODELS[model]["group"], MODELS[model]["linears"]
        for kind in (*kinds, *MODELED):
            per = {}  # (K, N, M) or ("layer", M) → cells
            try:
                for K, N in dict.fromkeys(linears):
                    for M in ROWS:
                        t = time.perf_counter()
                        per[K, N, M] = cells_of(kind, K, N, M, group, dtype, slice_rows)
                        if kind not in MODELED:
                            log(f"  {model} {kind:13s} {K:5d}->{N:<5d} M={M:<2d} "
                                f"{time.perf_counter() - t:5.1f} s")
            except KernelError as e:
                failed[kind] = str(e).splitlines()[min(1, str(e).count("\n"))]
                log(f"{kind}: not countable here: {failed[kind]}")
                continue
            for M in ROWS:  # one layer: its seven launches one after another
                per["layer", M] = {}
                for chip in CHIPS:
                    cells = [per[K, N, M][chip] for K, N in linears]
                    req = None if kind in MODELED else sum(c[4] for c in cells)
                    per["layer", M][chip] = (*(sum(c[i] for c in cells) for i in range(3)), None, req)
            for key, cells in per.items():
                shape = "layer" if key[0] == "layer" else f"{key[0]}x{key[1]}"
                one = per[(*key[:-1], 1)]
                for chip, (b, a, secs, path, req) in cells.items():
                    rec = dict(kernel=kind, model=model, shape=shape, M=key[-1], chip=chip, bytes=round(b),
                               alu=round(a), modeled_s=secs, ratio_to_m1=secs / one[chip][2], group_size=group,
                               dtype=str(dtype).split(".")[-1], counted=kind not in MODELED)
                    if req is not None:
                        rec["requested_bytes"] = round(req)
                    if path:
                        rec["path"] = path
                    records.append(rec)
    return records, failed


# ------------------------------------------------------------------ output
def table(records):
    chips = list(CHIPS)
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["shape"], r["kernel"]), []).append(r)
    print("modeled time ÷ the same kernel's at M = 1 (roofline: max(bytes ÷ bandwidth, alu ÷ lane-op rate));"
          " MB = bytes a cache-perfect GPU fetches, req = load requests, alu/w = lane-ops per weight")
    for (model, shape, kernel), rs in groups.items():
        K, N = (map(int, shape.split("x")) if shape != "layer"
                else (None, sum(k * n for k, n in MODELS[model]["linears"])))
        weights = K * N if K else N
        label = " (MODELED)" if kernel in MODELED else ""
        print(f"\n{model} {shape} {kernel}{label}")
        print(f"  {'M':>2} {'MB':>8} {'req MB':>8} {'alu/w':>6}  " + " ".join(f"{c:>7}" for c in chips)
              + ("  path (M1, M3)" if kernel == MLX and shape != "layer" else ""))
        for M in ROWS:
            row = {r["chip"]: r for r in rs if r["M"] == M}
            r0 = row[chips[0]]
            req = f"{r0['requested_bytes'] / 1e6:8.3f}" if "requested_bytes" in r0 else f"{'-':>8}"
            paths = (f"  {row['M1']['path']}, {row['M3']['path']}" if "path" in row["M1"] else "")
            print(f"  {M:2d} {r0['bytes'] / 1e6:8.3f} {req} {r0['alu'] / weights:6.2f}  "
                  + " ".join(f"{row[c]['ratio_to_m1']:7.2f}" for c in chips) + paths)
    print("\nworst ratio to M = 1 over the shapes (and the layer), per chip")
    for model in dict.fromkeys(r["model"] for r in records):
        for kernel in dict.fromkeys(r["kernel"] for r in records):
            for M in (5, 16):
                cells = []
                for c in chips:
                    v = [r["ratio_to_m1"] for r in records
                         if (r["model"], r["kernel"], r["M"], r["chip"]) == (model, kernel, M, c)]
                    cells.append(f"{max(v):7.2f}" if v else f"{'-':>7}")
                print(f"  {model:4s} {kernel:13s} M={M:<2d} " + " ".join(cells))


def plot(plt, records):
    chips = list(CHIPS)
    rows = -(-len(chips) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(14, 3.25 * rows), sharex=True, sharey=True)
    styles = {"test": "--", "8b": "-"}
    kinds = list(dict.fromkeys(r["kernel"] for r in records))
    colors = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(kinds, "osx^v*"))  # verify and nested-draft coincide: tell them apart
    for ax, chip in zip(axes.flat, chips):
        for model in dict.fromkeys(r["model"] for r in records):
            for kind in kinds:
                rs = sorted((r for r in records if (r["model"], r["kernel"], r["shape"], r["chip"])
                             == (model, kind, "layer", chip)), key=lambda r: r["M"])
                if rs:
                    ax.plot([r["M"] for r in rs], [r["ratio_to_m1"] for r in rs], styles.get(model, ":"),
                            marker=markers[kind], ms=4, color=colors[kind],
                            label=f"{kind}{' (modeled)' if kind in MODELED else ''}, {model}")
        ax.axhline(1.15, color="k", lw=0.6, ls=":")
        ax.axhline(1.5, color="k", lw=0.6, ls=":")
        ax.set(title=chip, xticks=ROWS)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("rows M")
    for ax in axes[:, 0]:
        ax.set_ylabel("modeled time ÷ M = 1 (one layer)")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("MODELED roofline from emulator-counted bytes and ALU work (dotted: 1.15×, 1.5×)")
    return fig


def main(argv=None):
    ap = arguments(__doc__, model=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--slice", type=int, default=256,
                    help="emulate at most this many output rows and scale (whole threadgroups)")
    args = ap.parse_args(argv)
    per_tg = 4 * kernels._LANE_ROWS * kernels._NSG
    if args.slice % per_tg:
        ap.error(f"--slice must be a multiple of {per_tg} (whole threadgroups)")
    mx.fast.metal_kernel = metal_kernel
    kernels.clear_kernel_cache()
    records, failed = bench(args.models, getattr(mx, args.dtype), args.slice, args.kernels)
    table(records)
    for kind, why in failed.items():
        print(f"\n{kind}: not counted ({why})")
    write(args, records, lambda plt: plot(plt, records), dpi=110)


if __name__ == "__main__":
    main()
