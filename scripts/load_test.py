"""Load test of the chat server against its peer, stock ``mlx_lm.server``, on one model.

For each concurrency C: N streamed greedy chat requests, sent to our server and to
``mlx_lm.server`` in the same run (the two take turns level by level, the first alternating,
so drift in the machine's load falls on both): latency p50/p95 (request sent → last event),
time to first token p50/p95, completion tokens/s over the level's wall time, errors, each
server process's RSS before and after the level, and — ours only, from ``/health`` — model
forwards per emitted token (all, and verifies). Bounded in count (``--requests``) and time
(``--time-limit`` per level: requests not started by then are skipped and counted).

Greedy outputs are compared: ours against mlx_lm.server's for every prompt, and each
server's concurrent outputs against the same prompts sent one at a time (replayed after the
levels, untimed). Every request has its own text, so no level reuses another's prompts from
a prompt cache.

Both servers load the same mlx directory (``--model``; default: the test GGUF converted
once with ``python -m mlx_qspec.convert`` under the mlx_qspec cache dir). On Linux these are
MLX-CPU timings, not a Mac's; the JSON records the load average around the run.

    PYTHONPATH=. python scripts/load_test.py --concurrency 1,4,8 --requests 16 --max-tokens 32 \\
        --json load.json --png load.png
"""

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plotting import arguments, text_table, write  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works to a child.",
    "List tips for writing clear Python code.",
    "What is the difference between a virus and a bacterium?",
    "Describe the water cycle.",
    "Give me a recipe for tomato soup.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
]
OURS, PEER = "mlx_qspec", "mlx_lm"


@dataclass
class Server:
    """A server under test: its URL, and its process when this script started it."""

    name: str
    url: str
    proc: Optional[subprocess.Popen] = None

    def rss_mib(self) -> Optional[float]:
        """Resident set size of the server process (None: not ours to see)."""
        if self.proc is None:
            return None
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.proc.pid)],
                             capture_output=True, text=True).stdout.strip()
        return int(out) / 1024 if out else None

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, module: str, args: list, ready_timeout: float, log: Path) -> Server:
    """``python -m module`` on a free loopback port (its output to ``log``), once its
    ``/health`` answers and it has served one short request (the first one compiles)."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "--port", str(port), "--log-level", "WARNING", *args]
    with open(log, "w") as out:
        server = Server(name, f"http://127.0.0.1:{port}",
                        subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
    end = time.monotonic() + ready_timeout
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise SystemExit(f"{name} exited with {server.proc.returncode} (log: {log}): "
                             f"{shlex.join(cmd)}")
        try:
            httpx2.get(f"{server.url}/health", timeout=1).raise_for_status()
            break
        except httpx2.HTTPError:
            time.sleep(0.5)
    else:
        server.stop()
        raise SystemExit(f"{name} did not answer /health within {ready_timeout:.0f} s (log: {log})")
    with httpx2.Client(base_url=server.url, timeout=ready_timeout) as client:
        warm = one_request(client, "Hello!", 2, float("inf"))
    if "error" in warm:
        server.stop()
        raise SystemExit(f"{name} failed its first request: {warm['error']} (log: {log})")
    return server


def one_request(client: httpx2.Client, text: str, max_tokens: int, deadline: float) -> dict:
    """One streamed greedy chat request: latency, time to first token, completion tokens,
    and the text it generated."""
    if time.monotonic() > deadline:
        return {"skipped": True}
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, out = None, None, []
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - t0
                        out.append(piece)
    except httpx2.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "text": "".join(out),
            "tokens": usage["completion_tokens"] if usage else 0}


def percentile(values, q):
    """Nearest-rank percentile (None for no values)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def send_all(server: Server, texts: list, concurrency: int, max_tokens: int,
             time_limit: float) -> tuple:
    """``(results, wall seconds, /health before, after)`` of ``texts`` at ``concurrency``."""
    with httpx2.Client(base_url=server.url, timeout=time_limit + 60,
                       limits=httpx2.Limits(max_connections=concurrency + 2)) as client:
        before = client.get("/health").json()
        t0 = time.perf_counter()
        deadline = time.monotonic() + time_limit
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda t: one_request(client, t, max_tokens, deadline),
                                    texts))
        wall = time.perf_counter() - t0
        after = client.get("/health").json()
    return results, wall, before, after


def run_level(server: Server, concurrency: int, texts: list, max_tokens: int,
              time_limit: float) -> dict:
    rss_before = server.rss_mib()
    results, wall, before, after = send_all(server, texts, concurrency, max_tokens, time_limit)
    done = [r for r in results if "latency" in r]
    counted = "emitted_tokens" in after  # ours: engine totals in /health
    emitted, forwards, verifies = (after[k] - before[k] if counted else None
                                   for k in ("emitted_tokens", "forwards", "verify_forwards"))
    return {
        "server": server.name,
        "concurrency": concurrency,
        "requests": len(texts),
        "completed": len(done),
        "errors": sum("error" in r for r in results),
        "skipped": sum("skipped" in r for r in results),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        **{f"{k}_p{q}_s": percentile([r[k] for r in done], q)
           for k in ("latency", "ttft") for q in (50, 95)},
        "completion_tokens": sum(r["tokens"] for r in done),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall if wall else 0.0,
        "rss_before_mib": rss_before,
        "rss_after_mib": server.rss_mib(),
        "forwards_per_token": forwards / emitted if emitted else None,
        "verify_forwards_per_token": verifies / emitted if emitted else None,
        "outputs": {t: r["text"] for t, r in zip(texts, results) if "text" in r},
    }


def compare(a: dict, b: dict) -> dict:
    """Texts of the prompts both dicts answered: how many, how many differ, and a few."""
    both = sorted(a.keys() & b.keys())
    differ = [t for t in both if a[t] != b[t]]
    return {"compared": len(both), "mismatches": len(differ),
            "examples": [{"prompt": t, "a": a[t], "b": b[t]} for t in differ[:3]]}


def table(levels) -> str:
    return text_table([
        ("server", "server", "{}"), ("C", "concurrency", "{}"), ("done", "completed", "{}"),
        ("err", "errors", "{}"), ("skip", "skipped", "{}"),
        ("p50 s", "latency_p50_s", "{:.2f}"), ("p95 s", "latency_p95_s", "{:.2f}"),
        ("TTFT p50", "ttft_p50_s", "{:.2f}"), ("TTFT p95", "ttft_p95_s", "{:.2f}"),
        ("tok/s", "tokens_per_s", "{:.2f}"), ("RSS before", "rss_before_mib", "{:.0f}"),
        ("RSS after", "rss_after_mib", "{:.0f}"), ("fwd/tok", "forwards_per_token", "{:.3f}"),
        ("verify fwd/tok", "verify_forwards_per_token", "{:.3f}")], levels)


def figure(plt, levels, title: str):
    """Tokens/s, latency p50 and TTFT p50 against concurrency, one line per server."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, [("tokens_per_s", "completion tokens/s"),
                                       ("latency_p50_s", "latency p50 (s)"),
                                       ("ttft_p50_s", "time to first token p50 (s)")]):
        for name in sorted({lv["server"] for lv in levels}):
            mine = [lv for lv in levels if lv["server"] == name and lv[key] is not None]
            ax.plot([lv["concurrency"] for lv in mine], [lv[key] for lv in mine], "o-",
                    label=name)
        ax.set_xlabel("concurrent requests")
        ax.set_ylim(bottom=0)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    return fig


def converted_model(model: Optional[str]) -> str:
    """``model``, or the test GGUF converted to an mlx directory (once, then reused)."""
    if model:
        return model
    from mlx_qspec.cache_dir import cache_dir
    from mlx_qspec.cli import default_model_path

    gguf = default_model_path()
    path = cache_dir() / "load_test" / gguf.stem
    if not (path / "config.json").exists():
        print(f"converting {gguf.name} to {path} …", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "mlx_qspec.convert", "--model", str(gguf),
                        "--mlx-path", str(path)], check=True)
    return str(path)


def parse_args(argv):
    parser = arguments(__doc__, model="mlx model directory both servers load (default: the "
                       "test GGUF, converted once)", plot=False)
    parser.add_argument("--url", help="Our server, already running (default: start one)")
    parser.add_argument("--server-args", default="--draft a8 --num-draft-tokens 3",
                        help="Flags for our server")
    parser.add_argument("--peer-args", default="", help="Flags for mlx_lm.server")
    parser.add_argument("--no-peer", action="store_true", help="Load our server only")
    parser.add_argument("--concurrency", default="1,4,8", help="Comma-separated levels")
    parser.add_argument("--requests", type=int, default=8, help="Requests per level")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="Seconds per level after which no new request starts")
    parser.add_argument("--png", dest="plot", metavar="PNG", help="Plot the levels here")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be integers joined by commas, got {args.concurrency!r}")
    if args.requests < 1 or args.max_tokens < 1 or min(args.levels) < 1:
        parser.error("--requests, --max-tokens and every --concurrency level must be >= 1")
    return args


def run(args, servers: list) -> dict:
    """Every level on every server (first server alternating), then the sequential replay
    and the comparisons."""
    levels = []
    for i, c in enumerate(args.levels):
        texts = [f"{QUESTIONS[j % len(QUESTIONS)]} (C{c}, request {j})"
                 for j in range(args.requests)]
        for server in (servers if i % 2 == 0 else servers[::-1]):
            print(f"{server.name}, concurrency {c}: {args.requests} requests …",
                  file=sys.stderr, flush=True)
            levels.append(run_level(server, c, texts, args.max_tokens, args.time_limit))
    outputs = {s.name: {} for s in servers}
    sequential = {s.name: {} for s in servers}
    for lv in levels:
        outputs[lv["server"]].update(lv["outputs"])
        if lv["concurrency"] == 1:
            sequential[lv["server"]].update(lv["outputs"])
    comparisons = {}
    for server in servers:
        replay = sorted(outputs[server.name].keys() - sequential[server.name].keys())
        print(f"{server.name}: {len(replay)} prompts again, one at a time …", file=sys.stderr,
              flush=True)
        results, *_ = send_all(server, replay, 1, args.max_tokens, 10 * args.time_limit)
        sequential[server.name].update({t: r["text"] for t, r in zip(replay, results)
                                        if "text" in r})
        comparisons[f"{server.name} concurrent vs one at a time"] = compare(
            outputs[server.name], sequential[server.name])
    if len(servers) == 2:
        comparisons[f"{OURS} vs {PEER}"] = compare(outputs[OURS], outputs[PEER])
    for lv in levels:
        del lv["outputs"]
    return {"levels": levels, "greedy_comparisons": comparisons}


def main(argv=None):
    args = parse_args(argv)
    model = converted_model(args.model) if not args.url or not args.no_peer else None
    load_before = os.getloadavg()
    servers = []
    logs = Path(tempfile.mkdtemp(prefix="load_test_"))
    try:
        servers.append(Server(OURS, args.url) if args.url else start_server(
            OURS, "mlx_qspec.server", ["--model", model, *shlex.split(args.server_args)], 300,
            logs / f"{OURS}.log"))
        if not args.no_peer:
            servers.append(start_server(PEER, "mlx_lm.server",
                                        ["--model", model, *shlex.split(args.peer_args)], 300,
                                        logs / f"{PEER}.log"))
        result = run(args, servers)
    finally:
        for server in servers:
            server.stop()
    print(f"server logs: {logs}", file=sys.stderr)
    print(table(result["levels"]))
    for name, c in result["greedy_comparisons"].items():
        print(f"greedy outputs, {name}: {c['mismatches']} of {c['compared']} differ")
    note = (f"MLX-CPU timings on Linux, not a Mac's; load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs"
            if platform.system() == "Linux" else "")
    title = f"{args.requests} greedy chat requests per level, max_tokens {args.max_tokens}. {note}"
    write(args, {
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "note": note, "nice": os.nice(0), "model": model,
        "server_args": None if args.url else args.server_args,
        "peer_args": None if args.no_peer else args.peer_args,
        "max_tokens": args.max_tokens, **result,
    }, lambda plt: figure(plt, result["levels"], title), dpi=110)


if __name__ == "__main__":
    main()
