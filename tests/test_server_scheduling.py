"""Fair scheduling (issue 27): a long prompt prefills a chunk per engine round, between the
decode steps of the running requests, so they keep decoding and a short request that comes
later starts within a few steps, not after the whole prefill; a prefill whose client left
stops at its next chunk; /health shows what is running and prefilling. Counted in engine
steps, never timed. A tiny random llama with the test model's tokenizer serves, at one
token per step (no draft) and chunks of CHUNK tokens."""

import threading
import time

import httpx2
import pytest

from helpers.serving import Served
from mlx_qspec import decoder as decoder_module, settings
from mlx_qspec.api import stream_generate
from mlx_qspec.batch import BatchEngine, Job

CHUNK = 4
LONG = list(range(5000, 5081))  # 80 tokens to prefill: 20 chunks
SHORT = [6000, 6001, 6002]  # one chunk
RUNNING = [7000, 7001]


@pytest.fixture(scope="module")
def served(tiny_served_dir):
    with Served("--model", str(tiny_served_dir), "--draft", "none", "--prefill-step-size",
                str(CHUNK), "--prompt-cache-size", "0") as s:
        yield s


class Watch:
    """A job's deliver callback (it runs on the engine thread, between a round's steps):
    the tokens, and what ``on_token`` makes of the engine's state at each."""

    def __init__(self, engine, on_token=None):
        self.engine, self.on_token = engine, on_token
        self.ids, self.kinds, self.ended = [], [], threading.Event()

    def __call__(self, event):
        if event["type"] == "text":
            for e in event["logprobs"]:
                self.ids.append(e["id"])
                if self.on_token:
                    self.on_token(self)
        else:
            self.kinds.append(event["type"])
            self.done = event
            self.ended.set()

    @property
    def steps(self) -> int:
        return self.engine.totals["decode_steps"]


def _prefilled(engine, job):
    """Prompt tokens of ``job`` in its cache, as /health last reported (None: not
    prefilling)."""
    return next((p["processed_tokens"] for p in engine.progress["prefilling"]
                 if p["id"] == job.rid), None)


def _plain(served, prompt, n):
    """The prompt's greedy answer from the API, prefilled in the same chunks."""
    model, tokenizer = served.engine.model, served.engine.tokenizer
    return [r.token for r in stream_generate(
        model, tokenizer, prompt, max_tokens=n, draft="none", prefill_step_size=CHUNK)]


def test_a_short_request_starts_within_steps_while_a_long_prompt_prefills(served):
    engine = served.engine
    seen = []  # (decode step, LONG's prefilled tokens) at each of the running request's tokens
    short_at = {}

    def on_running_token(watch):
        prefilled = _prefilled(engine, long_job)
        seen.append((watch.steps, prefilled))
        if "submitted" not in short_at and (prefilled or 0) >= 2 * CHUNK:
            short_at["submitted"] = watch.steps
            engine.submit(short_job)

    def on_short_token(watch):
        short_at.setdefault("first", (watch.steps, _prefilled(engine, long_job)))

    running = Watch(engine, on_running_token)
    long_watch, short_watch = Watch(engine), Watch(engine, on_short_token)
    running_job = Job(RUNNING, 200, running, logprobs=True)
    long_job = Job(LONG, 3, long_watch, logprobs=True)
    short_job = Job(SHORT, 3, short_watch, logprobs=True)
    with engine.ready:
        engine.submit(running_job)
        engine.submit(long_job)
    assert long_watch.ended.wait(60)
    assert "submitted" in short_at, "LONG was prefilled with no decode step in between"
    assert short_watch.ended.wait(60)
    running_job.cancel()
    assert long_watch.kinds == short_watch.kinds == ["done"]

    # The short request's first token came within 3 steps, while LONG was still prefilling.
    first_step, long_prefilled = short_at["first"]
    assert first_step - short_at["submitted"] <= 3
    assert long_prefilled is not None and long_prefilled < len(LONG) - 1
    # The running request decoded all along LONG's prefill, at most a chunk of it a step.
    during = [(step, n) for step, n in seen if n is not None]
    assert len(during) >= (len(LONG) - 1) // CHUNK - 3
    assert all(b - a <= CHUNK for (_, a), (_, b) in zip(during, during[1:]))
    assert all(s2 == s1 + 1 for (s1, _), (s2, _) in zip(seen, seen[1:]))  # one token a step
    # Chunked and interleaved, every answer is still plain decoding's.
    assert long_watch.ids == _plain(served, LONG, 3)
    assert short_watch.ids == _plain(served, SHORT, 3)
    assert running.ids[:8] == _plain(served, RUNNING, 8)


def test_a_cancelled_prefill_stops_at_its_next_chunk(served):
    engine = served.engine
    cancelled_at = {}

    def on_running_token(watch):
        prefilled = _prefilled(engine, long_job)
        if "tokens" not in cancelled_at and (prefilled or 0) >= 3 * CHUNK:
            long_job.cancel()
            cancelled_at.update(tokens=engine.totals["prefill_tokens"], step=watch.steps)
        if "tokens" in cancelled_at and watch.steps >= cancelled_at["step"] + 3:
            running_job.cancel()
            watch.ended.set()

    running, long_watch = Watch(engine, on_running_token), Watch(engine)
    running_job = Job(RUNNING, 200, running, logprobs=True)
    long_job = Job(LONG, 3, long_watch)
    requests = engine.totals["requests"]
    with engine.ready:
        engine.submit(running_job)
        engine.submit(long_job)
    assert running.ended.wait(60)
    # Three more rounds went by: not one more prompt token was fed, and the job is gone.
    assert engine.totals["prefill_tokens"] == cancelled_at["tokens"]
    assert _prefilled(engine, long_job) is None and long_watch.kinds == []
    assert engine.totals["requests"] == requests


def test_health_shows_a_prefill_and_a_client_that_leaves_stops_it(served, monkeypatch):
    """Over HTTP: a streamed completion with a long prompt is listed in /health as prefilling
    with its progress; its client leaves; the prefill stops before the prompt's end.
    (Each chunk is slowed so the client can leave mid-prefill; what is checked is counted.)"""
    real = decoder_module.forward

    def slow(model, tokens, cache, *args, **kwargs):
        if tokens.shape[1] == CHUNK:
            time.sleep(0.1)  # the prompt's 20 chunks: 2 s
        return real(model, tokens, cache, *args, **kwargs)

    monkeypatch.setattr(decoder_module, "forward", slow)
    fed = served.engine.totals["prefill_tokens"]
    health = lambda: httpx2.get(f"{served.url}/health").json()  # noqa: E731
    with served.http.stream("POST", "/v1/completions",
                            json={"prompt": LONG, "max_tokens": 2, "stream": True}):
        for _ in range(200):
            listed = health()["prefilling"]
            if listed and listed[0]["processed_tokens"] >= 2 * CHUNK:
                break
            time.sleep(0.02)
        assert listed[0]["prompt_tokens"] == len(LONG) and listed[0]["id"].startswith("cmpl-")
    for _ in range(200):  # the client is gone; the server notices
        state = health()
        if not state["prefilling"]:
            break
        time.sleep(0.02)
    assert state["prefilling"] == [] and state["running"] == 0
    assert served.engine.totals["prefill_tokens"] - fed < len(LONG) - 1


def test_auto_reports_the_num_draft_tokens_it_was_given_as_the_api_does(served):
    """``auto`` served at batch 1 reports the γ cap it was given, as the API's stats do (it
    reported 0)."""
    model, tokenizer = served.engine.model, served.engine.tokenizer
    engine = BatchEngine(model, tokenizer, prompt_cache_size=0,
                         settings=settings.Settings(draft="auto", num_draft_tokens=3))
    watch = Watch(engine)
    engine.start()
    try:
        engine.submit(Job(SHORT, 3, watch))
        assert watch.ended.wait(120)
    finally:
        engine.stop()
    *_, last = stream_generate(model, tokenizer, SHORT, max_tokens=3, draft="auto",
                               num_draft_tokens=3)
    assert watch.kinds == ["done"]
    assert watch.done["speculative"]["num_draft_tokens"] == last.stats.num_draft_tokens == 3
