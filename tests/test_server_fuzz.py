"""The server fuzzed (issue 25): hypothesis generates request bodies for every endpoint —
wrong types, out-of-range and non-finite numbers, huge and empty strings and lists, nested
junk, lone surrogates, invalid UTF-8, odd headers — and every answer must be a 2xx or a 4xx
in OpenAI's error shape; afterwards the server still answers /health and a real request.
Then a soak: RSS after 200 requests within a bound of RSS after 20.

The server runs a tiny random-weight llama with the test model's tokenizer (so any request
that passes the checks is served in milliseconds) and a 64-token context. The budget is
small here; ``scripts/fuzz_server.py`` runs the same test with a larger one
(``MLX_QSPEC_FUZZ_EXAMPLES``) and reports how many requests it sent
(``MLX_QSPEC_FUZZ_REPORT``)."""

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx2
import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.serving import KEY, VOCAB, Served

EXAMPLES = int(os.environ.get("MLX_QSPEC_FUZZ_EXAMPLES", "200"))
REPORT = os.environ.get("MLX_QSPEC_FUZZ_REPORT")
CONTEXT = 64


@pytest.fixture(scope="module")
def served(tiny_served_dir):
    with Served("--model", str(tiny_served_dir), "--max-context", str(CONTEXT),
                "--max-tokens", "4", "--queue-size", "4") as s:
        yield s


def _rss_bytes() -> int:
    """This process's resident set size."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(os.getpid())])) * 1024


def test_rss_after_200_requests_stays_near_rss_after_20(served):
    """Short prompts, one or two tokens each, every prompt its own (so the prompt cache
    turns over): what the process holds stops growing once the caches are full."""
    def ask(i):
        r = served.http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"request {i}"}],
            "max_tokens": 1 + i % 2, "stream": i % 3 == 0})
        assert r.status_code == 200, r.text

    for i in range(20):
        ask(i)
    rss, active = _rss_bytes(), mx.get_active_memory()
    for i in range(20, 200):
        ask(i)
    grown, active_grown = _rss_bytes() - rss, mx.get_active_memory() - active
    print(f"RSS after 20 requests {rss / 2**20:.1f} MiB, after 200 {grown / 2**20:+.2f} MiB; "
          f"MLX active memory {active_grown / 2**20:+.2f} MiB")
    assert grown < 16 * 2**20, grown  # a leak of 100 KB a request would show 18 MB
    assert active_grown < 4 * 2**20, active_grown


# ---------------------------------------------------------------- what the fuzzer sends

HUGE = st.sampled_from(["x" * 100_000, "🐱" * 20_000, "\n" * 50_000])
STRINGS = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.just(""), HUGE)
NUMBERS = st.one_of(
    st.integers(), st.floats(),  # floats: NaN, ±Infinity, ±0.0, subnormals, 1e308
    st.sampled_from([-1, 0, 1, 2, 2**63, 2**64 - 1, 2**64, 10**30, VOCAB - 1, VOCAB, 1e308,
                     -1e-308, CONTEXT, CONTEXT + 1]))
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(STRINGS, inner, max_size=4)),
    max_leaves=12)
DEEP = st.integers(1, 500).map(lambda n: json.loads("[" * n + "]" * n))
BIG_LISTS = st.sampled_from([list(range(5000)), [0] * 70, [[1, 2]] * 3, []])
VALUE = st.one_of(JUNK, DEEP, BIG_LISTS)


TOKENS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
     "content": st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": st.text(max_size=20)}), max_size=3))},
    optional={"name": st.text(max_size=10)})
GOOD = {  # plausible values: a body of these alone is served
    "model": st.sampled_from(["default_model", "gpt-4"]),
    "max_tokens": st.integers(1, 6), "max_completion_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
    "min_p": st.floats(0, 1), "seed": st.integers(0, 2**64 - 1), "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(st.text(min_size=1, max_size=5),
                      st.lists(st.text(min_size=1, max_size=5), max_size=4)),
    "tools": st.just([]), "tool_choice": st.just("none"),
    "response_format": st.just({"type": "text"}), "logit_bias": st.just({}),
    "presence_penalty": st.just(0), "user": st.text(max_size=10),
}
CHAT = {**GOOD, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
COMPLETION = {**GOOD, "logprobs": st.integers(0, 5), "echo": st.just(False)}
NAMES = sorted({*CHAT, *COMPLETION, "messages", "prompt", "best_of", "suffix",
                "frequency_penalty", "functions", "audio"})
JUNK_VALUES = {  # what a careless or hostile client puts there instead
    "messages": st.one_of(VALUE, st.lists(st.one_of(MESSAGE, JUNK.map(lambda v: {"role": v}),
                                                    st.fixed_dictionaries({
                                                        "role": st.just("user"),
                                                        "content": VALUE,
                                                        "tool_calls": VALUE})), max_size=3)),
    "prompt": st.one_of(VALUE, st.lists(st.one_of(st.integers(), st.booleans(), st.floats()),
                                        max_size=70), st.lists(TOKENS, max_size=2)),
    "stop": st.one_of(VALUE, st.lists(st.text(max_size=300), max_size=6)),
}


@st.composite
def _body(draw, required: dict, fields: dict):
    """A plausible body with up to three fields replaced by junk (or dropped)."""
    body = draw(st.fixed_dictionaries(required, optional=fields))
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3)):
        if draw(st.integers(0, 9)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(JUNK_VALUES.get(name, VALUE))
    return body


CHAT_BODY = _body({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, CHAT)
COMPLETION_BODY = _body({"prompt": st.one_of(st.text(max_size=40), TOKENS)}, COMPLETION)


def _encode(body) -> bytes:
    """JSON as Python writes it (NaN and Infinity included: Python's json reads them),
    lone surrogates as escapes."""
    return json.dumps(body).encode()


def _tamper(data: bytes, cut: int, junk: bytes) -> bytes:
    """Invalid UTF-8 spliced in, or the text cut short."""
    at = cut % (len(data) + 1)
    return data[:at] + junk + data[at:] if junk else data[:at]


BODY = st.one_of(
    CHAT_BODY.map(_encode), COMPLETION_BODY.map(_encode),
    CHAT_BODY.map(_encode), COMPLETION_BODY.map(_encode),
    JUNK.map(_encode),
    st.builds(_tamper, st.one_of(CHAT_BODY, COMPLETION_BODY).map(_encode),
              st.integers(0, 2**16),
              st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                               b"\x00"])),
    st.binary(max_size=64))
# Mostly what a client sends (so most bodies reach the field checks and the engine), and
# sometimes anything else.
COMMON = st.sampled_from([("POST", "/v1/chat/completions"), ("POST", "/v1/completions")] * 6
                         + [("POST", "/chat/completions"), ("GET", "/v1/models"),
                            ("GET", "/health")])
RARE = st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
                 st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models",
                                  "/health", "/v1/nothing"]))
ENDPOINT = st.integers(0, 19).flatmap(lambda i: RARE if i == 19 else COMMON)
CONTENT_TYPE = st.integers(0, 9).flatmap(
    lambda i: st.sampled_from([None, "application/json"]) if i < 9 else st.sampled_from(
        ["application/json; charset=utf-8", "text/plain", "application/json; charset=utf-16",
         "*/*", ""]))
AUTH = st.integers(0, 9).flatmap(lambda i: st.just(f"Bearer {KEY}") if i < 9 else st.sampled_from([
    f"bearer {KEY}", "Bearer wrong", "", "Bearer", f"Basic {KEY}",
    f"Bearer {KEY}\u00e9".encode("latin-1")]))


def _check_answer(response):
    """A 2xx with the endpoint's object, or a 4xx in OpenAI's error shape."""
    status = response.status_code
    assert status < 500, (status, response.text[:500])
    assert 200 <= status < 300 or 400 <= status < 500, status
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = [x for x in response.text.split("\n") if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for x in lines[:-1]:
            assert "error" not in json.loads(x[6:]), x
    else:
        assert isinstance(response.json(), dict)


def test_fuzzed_requests_get_a_2xx_or_an_openai_4xx_and_the_server_survives(served):
    sent = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              derandomize="MLX_QSPEC_FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=list(HealthCheck))
    @given(endpoint=ENDPOINT, body=BODY, kind=CONTENT_TYPE, auth=AUTH)
    def one(endpoint, body, kind, auth):
        method, path = endpoint
        headers = {"Authorization": auth}
        if kind is not None:
            headers["Content-Type"] = kind
        response = served.http.request(method, path, content=body, headers=headers)
        sent.append(response.status_code)
        _check_answer(response)

    started = time.monotonic()
    one()
    statuses = Counter(sent)
    summary = {"requests": len(sent), "statuses": dict(sorted(statuses.items())),
               "seconds": round(time.monotonic() - started, 1)}
    print(f"fuzz: {summary}")
    if REPORT:
        Path(REPORT).write_text(json.dumps(summary))
    assert len(sent) >= EXAMPLES
    assert statuses.get(200, 0) >= EXAMPLES // 10, statuses  # many reached the engine

    assert httpx2.get(f"{served.url}/health").json()["status"] == "ok"
    real = served.client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert real.usage.completion_tokens == 3
    assert real.choices[0].message.content == served.offline(
        served.chat_tokens([{"role": "user", "content": "hi"}]), 3)
