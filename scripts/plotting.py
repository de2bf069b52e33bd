"""What the benchmark scripts share: their common flags, their table, their JSON and PNG
(matplotlib is optional: :func:`mlx_qspec.bench.pyplot`)."""

import argparse
import json
import sys
from pathlib import Path

from mlx_qspec import bench

MODEL_HELP = "model path (default: the SmolLM2 test GGUF)"


def pyplot(path):
    """``matplotlib.pyplot`` on the Agg backend, or None (and a message) when not installed."""
    plt = bench.pyplot()
    if plt is None:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): no plot written to {path}",
              file=sys.stderr)
    return plt


def arguments(doc: str, model: str | None = MODEL_HELP, plot: bool = True, whole_doc: bool = False):
    """A script's parser: ``--model`` (its help) where it loads one, ``--json``, ``--plot``
    where it draws; described by its docstring's first paragraph, or by all of it."""
    p = argparse.ArgumentParser(description=doc if whole_doc else doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("--model", help=model)
    p.add_argument("--json", help="write the results here")
    if plot:
        p.add_argument("--plot", help="write a PNG here (needs matplotlib)")
    return p


def write(args, results, draw=None, indent: int = 1, dpi=None):
    """``results`` as JSON at ``--json``, and the figure ``draw(plt)`` returns as a PNG at
    ``--plot``, each where asked (its folder made)."""
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=indent))
    plt = pyplot(args.plot) if draw and args.plot else None
    if plt:
        fig = draw(plt)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=dpi)


def text_table(columns, rows) -> str:
    """A fixed-width table: ``columns`` are ``(header, key or function of a row, format)``,
    each column as wide as its widest cell, right-aligned; None prints as ``-``."""
    def cell(row, key, fmt):
        value = key(row) if callable(key) else row[key]
        return "-" if value is None else fmt.format(value)

    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
