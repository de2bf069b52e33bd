"""Load test of the chat server: N streamed chat requests at concurrency C, on loopback.

For each concurrency: latency p50/p95 (request sent → last event), time to first token
p50/p95, completion tokens/s over the wall time of the level, errors, and the model forwards
per emitted token while decoding, all and verifies only (from the server's ``/health``
totals: a batched forward counts once, however many sequences it carries). Bounded in count
(``--requests``) and time (``--time-limit`` per level: requests not started by then are
skipped and counted).

Starts ``python -m mlx_qspec.server`` on a free loopback port with ``--server-args`` (or
uses ``--url``). Every request has its own text, so no level reuses another's prompts from
the prompt cache. On Linux these are MLX-CPU timings, not a Mac's.

    PYTHONPATH=. python scripts/load_test.py --concurrency 1,4,8 --requests 8 --max-tokens 32 \\
        --json load.json
"""

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_args: str, ready_timeout: float):
    """The server as a subprocess; returns ``(process, url)`` once ``/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_qspec.server", "--port", str(port),
           "--log-level", "WARNING", *shlex.split(server_args)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + ready_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {shlex.join(cmd)}")
        try:
            httpx2.get(f"{url}/health", timeout=1).raise_for_status()
            return proc, url
        except httpx2.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {ready_timeout:.0f} s")


def one_request(client: httpx2.Client, text: str, max_tokens: int, deadline: float) -> dict:
    """One streamed chat request: its latency, time to first token and completion tokens."""
    if time.monotonic() > deadline:
        return {"skipped": True}
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    usage = event["usage"]
                elif ttft is None and event["choices"] and \
                        event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    except httpx2.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - t0, "ttft": ttft,
            "tokens": usage["completion_tokens"] if usage else 0}


def percentile(values, q):
    """Nearest-rank percentile (None for no values)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def run_level(url, concurrency, requests, max_tokens, time_limit, tag) -> dict:
    with httpx2.Client(base_url=url, timeout=time_limit + 60,
                       limits=httpx2.Limits(max_connections=concurrency + 2)) as client:
        before = client.get("/health").json()
        texts = [f"{QUESTIONS[i % len(QUESTIONS)]} ({tag}, request {i})" for i in range(requests)]
        t0 = time.perf_counter()
        deadline = time.monotonic() + time_limit
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda t: one_request(client, t, max_tokens, deadline), texts))
        wall = time.perf_counter() - t0
        after = client.get("/health").json()
    done = [r for r in results if "latency" in r]
    emitted = after["emitted_tokens"] - before["emitted_tokens"]
    forwards = after["forwards"] - before["forwards"]
    verifies = after["verify_forwards"] - before["verify_forwards"]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completed": len(done),
        "errors": sum("error" in r for r in results),
        "skipped": sum("skipped" in r for r in results),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        "latency_p50_s": percentile([r["latency"] for r in done], 50),
        "latency_p95_s": percentile([r["latency"] for r in done], 95),
        "ttft_p50_s": percentile([r["ttft"] for r in done], 50),
        "ttft_p95_s": percentile([r["ttft"] for r in done], 95),
        "completion_tokens": sum(r["tokens"] for r in done),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall if wall else 0.0,
        "forwards": forwards,
        "emitted_tokens": emitted,
        "forwards_per_token": forwards / emitted if emitted else None,
        "verify_forwards": verifies,
        "verify_forwards_per_token": verifies / emitted if emitted else None,
    }


def table(levels) -> str:
    cols = [("C", "concurrency", "{}"), ("done", "completed", "{}"), ("err", "errors", "{}"),
            ("skip", "skipped", "{}"), ("p50 s", "latency_p50_s", "{:.2f}"),
            ("p95 s", "latency_p95_s", "{:.2f}"), ("TTFT p50", "ttft_p50_s", "{:.2f}"),
            ("TTFT p95", "ttft_p95_s", "{:.2f}"), ("tok/s", "tokens_per_s", "{:.2f}"),
            ("fwd/tok", "forwards_per_token", "{:.3f}"),
            ("verify fwd/tok", "verify_forwards_per_token", "{:.3f}")]
    fmt = lambda f, v: "-" if v is None else f.format(v)  # noqa: E731
    rows = [[name for name, _, _ in cols]] + [[fmt(f, lv[k]) for _, k, f in cols] for lv in levels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="A running server (default: start one)")
    parser.add_argument("--server-args", default="--draft a8 --num-draft-tokens 3",
                        help="Flags for the server this script starts")
    parser.add_argument("--concurrency", default="1,4,8", help="Comma-separated levels")
    parser.add_argument("--requests", type=int, default=8, help="Requests per level")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="Seconds per level after which no new request starts")
    parser.add_argument("--json", type=Path, help="Write the results here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or args.max_tokens < 1 or min(levels) < 1:
        parser.error("--requests, --max-tokens and every --concurrency level must be >= 1")

    proc, url = (None, args.url) if args.url else start_server(args.server_args, 300)
    try:
        results = []
        for c in levels:
            print(f"concurrency {c}: {args.requests} requests …", file=sys.stderr, flush=True)
            results.append(run_level(url, c, args.requests, args.max_tokens, args.time_limit,
                                     f"C{c}"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({
            "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "note": "MLX-CPU timings on Linux, not a Mac's" if platform.system() == "Linux" else "",
            "server_args": None if args.url else args.server_args,
            "max_tokens": args.max_tokens,
            "levels": results,
        }, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
