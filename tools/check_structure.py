"""The house rules a reader cannot see at a glance, checked: the import graph of
``mlx_qspec`` (lazy imports included) has no cycle, the lower layers import only lower
layers, the engine never reaches ``argparse``, and the floors from ``errors`` up to
``server`` number at most ten; no function is longer than 80 lines or takes more than 8
positional parameters (``self`` / ``cls`` not counted).

    python tools/check_structure.py        # prints the report; exit 1 on a broken rule
"""

import ast
import graphlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mlx_qspec"
# What sits at the bottom: it may import only from this set.
LOWER = {"errors", "cache_dir", "store", "calibration_text", "vocabulary", "reads", "precision",
         "kernels", "quant", "quant.activations", "quant.hadamard", "quant.modes",
         "quant.linear", "recurrent", "moe", "kv_cache", "caches", "ragged_cache", "policy"}
ENGINE = {"decoder", "speculative", "batch", "api"}  # never reaches argparse
MAX_FLOORS, MAX_LINES, MAX_POSITIONAL = 10, 80, 8


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = path
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, known) -> list[str]:
    """The package modules a ``from … import …`` names (its submodules where it names them)."""
    if node.level == 0:
        if not (node.module or "").startswith(PACKAGE):
            return []
        base = node.module[len(PACKAGE) + 1:] if node.module != PACKAGE else ""
    else:
        parts = importer.split(".") if importer else []
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        found.append(sub if sub in known else base)
    return [m for m in found if m in known]


def imports(known: dict) -> dict[str, set]:
    """Module → the package modules it imports, at any depth of its code; and → stdlib."""
    graph, external = {}, {}
    for name, path in known.items():
        deps, ext = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                deps.update(_resolve(name, path.name == "__init__.py", node, known))
                if node.level == 0 and node.module:
                    ext.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE + "."):
                        deps.add(alias.name[len(PACKAGE) + 1:])
                    ext.add(alias.name.split(".")[0])
        deps.discard(name)
        graph[name], external[name] = deps, ext
    return graph, external


def cycle(graph) -> list[str]:
    """An import cycle (each module imports the next, the first again at the end), or []."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1][::-1]  # graphlib lists each module before the one importing it
    return []


def longest_path(graph, start: str, end: str) -> list[str]:
    """The longest import chain from ``start`` down to ``end`` (the graph has no cycle)."""
    memo = {}

    def down(v):
        if v not in memo:
            best = [v] if v == end else None
            for w in graph[v]:
                tail = down(w)
                if tail and (best is None or len(tail) + 1 > len(best)):
                    best = [v, *tail]
            memo[v] = best
        return memo[v]

    return down(start) or []


def reaches(graph, external, start: str, target: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if target in external[v]:
            return True
        todo.extend(graph[v])
    return False


def functions(known: dict):
    """``(module, name, lines, positional parameters)`` of every function and method."""
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [a.arg for a in node.args.posonlyargs + node.args.args]
                positional = len([a for a in args if a not in ("self", "cls")])
                yield name, node.name, node.end_lineno - node.lineno + 1, positional


def main() -> int:
    known = modules()
    graph, external = imports(known)
    problems = []
    if loop := cycle(graph):
        problems.append(f"import cycle: {' -> '.join(loop)}")
    for m in sorted(LOWER & set(graph)):
        if up := sorted(graph[m] - LOWER):
            problems.append(f"lower layer {m} imports higher {', '.join(up)}")
    for m in sorted(ENGINE & set(graph)):
        if reaches(graph, external, m, "argparse"):
            problems.append(f"engine module {m} reaches argparse")
    floors = longest_path(graph, "commands.server", "errors") if not loop else []
    if len(floors) > MAX_FLOORS:
        problems.append(f"{len(floors)} floors from errors to server (at most {MAX_FLOORS})")
    sizes = list(functions(known))
    long = [f for f in sizes if f[2] > MAX_LINES]
    wide = [f for f in sizes if f[3] > MAX_POSITIONAL]
    problems += [f"{m}.{n}: {lines} lines (at most {MAX_LINES})" for m, n, lines, _ in long]
    problems += [f"{m}.{n}: {p} positional parameters (at most {MAX_POSITIONAL})"
                 for m, n, _, p in wide]
    edges = sum(map(len, graph.values()))
    print(f"{len(known)} modules, {edges} imports between them (lazy ones included), "
          f"{'an import cycle' if loop else '0 cycles'}")
    print(f"floors from errors to server: {len(floors)}: {' -> '.join(reversed(floors))}")
    print(f"lower layers ({len(LOWER & set(graph))} modules) import only lower layers: "
          f"{not any('lower layer' in p for p in problems)}")
    print(f"engine modules reaching argparse: "
          f"{[m for m in sorted(ENGINE) if reaches(graph, external, m, 'argparse')]}")
    top = sorted(sizes, key=lambda f: -f[2])[:3]
    print(f"{len(sizes)} functions; longest: "
          + ", ".join(f"{m}.{n} {lines} lines" for m, n, lines, _ in top)
          + f"; most positional parameters: {max(f[3] for f in sizes)}")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
