"""One request can never take the server down (issue 25): a fault injected into the engine
while it serves one request — in that request's forward mid-batch, its sampler, its prefill,
or the engine's own bookkeeping — fails that request alone with a 500 in OpenAI's error
shape naming a request id that the log names too, and the requests batched with it finish
with the text they get alone. A tiny random llama with the test model's tokenizer serves."""

import json
import logging
from dataclasses import dataclass

import pytest

from helpers.serving import Served, answered, error_of, serve_together
from mlx_qspec import decoder as decoder_module
from mlx_qspec.ragged_cache import RaggedKVCache

# Three prompts of different lengths: the victim's is the longest, so its row is the only one
# whose cache reaches VICTIM + 3 positions (the others stop at most at 6 + 12 + 3 drafts).
PROMPTS = {"a": list(range(1000, 1005)), "b": list(range(2000, 2006)),
           "victim": list(range(3000, 3024))}
MAX_TOKENS = {"a": 12, "b": 12, "victim": 12}
FAULT_AT = len(PROMPTS["victim"]) + 3  # a few tokens into its answer
FRESH = list(range(4000, 4010))  # a prompt no earlier request left in the prompt cache


@pytest.fixture(scope="module")
def served(tiny_served_dir):
    with Served("--model", str(tiny_served_dir), "--prompt-cache-size", "4") as s:
        assert s.engine.batched  # the requests are rows of one batched decoder
        yield s


@dataclass
class Collected:
    """A job's events."""

    events: list

    @property
    def ids(self):
        return [e["id"] for ev in self.events if ev["type"] == "text" for e in ev["logprobs"]]

    @property
    def text(self):
        return "".join(ev["text"] for ev in self.events if ev["type"] == "text")

    @property
    def kinds(self):
        return [ev["type"] for ev in self.events if ev["type"] != "text"]


def _run(engine, names) -> dict:
    """The named prompts queued together (all taken in one round), run to their end: each
    name's job and what it got."""
    jobs, events = serve_together(engine, [PROMPTS.get(name, FRESH) for name in names],
                                  [MAX_TOKENS.get(name, 4) for name in names], timeout=60)
    return {name: (jobs[i], Collected([e for j, e in events if j == i]))
            for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def alone(served):
    """Each prompt's greedy answer served alone: the reference."""
    return {name: _run(served.engine, [name])[name][1] for name in PROMPTS}


def _faulty_forward(monkeypatch, when):
    """Every forward (prefill and decoding) raises where ``when(tokens, cache)`` holds."""
    real, seen = decoder_module.forward, []

    def forward(model, tokens, cache, *args, **kwargs):
        if when(tokens, cache):
            seen.append(list(cache[0].lengths) if isinstance(cache[0], RaggedKVCache) else None)
            raise RuntimeError("injected fault")
        return real(model, tokens, cache, *args, **kwargs)

    monkeypatch.setattr(decoder_module, "forward", forward)
    return seen


def _failed_alone(engine, jobs, alone, victim, caplog):
    """The victim got an error naming its request id (logged with it); everyone else their
    text alone; the engine's counts say one failed."""
    job, got = jobs[victim]
    assert got.kinds == ["error"], got.events
    message = got.events[-1]["message"]
    assert "RuntimeError" in message and f"request id {job.rid}" in message
    assert any(f"request {job.rid} failed" in r.getMessage() and r.exc_info
               for r in caplog.records)
    for name, (_, other) in jobs.items():
        if name != victim:
            assert other.kinds == ["done"], (name, other.events)
            assert (other.ids, other.text) == (alone[name].ids, alone[name].text), name


def test_a_fault_in_one_rows_forward_mid_batch_fails_that_request_alone(served, alone,
                                                                         monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="mlx_qspec.server")
    failed = served.engine.totals["failed"]
    seen = _faulty_forward(monkeypatch, lambda tokens, cache: isinstance(
        cache[0], RaggedKVCache) and max(cache[0].lengths) >= FAULT_AT)
    jobs = _run(served.engine, list(PROMPTS))
    assert len(seen[0]) == 3  # it struck a batched forward of all three, mid-answer
    assert [len(lengths) for lengths in seen[1:]] == [1]  # then the victim's row alone
    _failed_alone(served.engine, jobs, alone, "victim", caplog)
    assert served.engine.totals["failed"] == failed + 1
    monkeypatch.undo()
    # The engine and its prompt cache are as they were: the victim's prompt is served again.
    again = _run(served.engine, ["victim", "a"])
    assert [(got.ids, got.kinds) for _, got in again.values()] == [
        (alone[name].ids, ["done"]) for name in again]
    assert served.engine.progress == {"running": 0, "prefilling": []}


def test_at_batch_1_a_fault_in_one_requests_block_fails_it_alone(tiny_served_dir, alone,
                                                                  monkeypatch, caplog):
    """The engine that steps each request's own decoder in turn (a lookup draft): the
    others still get their greedy text, which is plain decoding's whatever the draft."""
    caplog.set_level(logging.ERROR, logger="mlx_qspec.server")
    with Served("--model", str(tiny_served_dir), "--draft", "ngram", "--ngram-min", "1") as s:
        assert not s.engine.batched
        _faulty_forward(monkeypatch, lambda tokens, cache: not isinstance(
            cache[0], RaggedKVCache) and cache[0].offset >= FAULT_AT)
        _failed_alone(s.engine, _run(s.engine, list(PROMPTS)), alone, "victim", caplog)


def test_a_fault_in_one_prefill_fails_that_request_alone(served, alone, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="mlx_qspec.server")
    _faulty_forward(monkeypatch, lambda tokens, cache: not isinstance(
        cache[0], RaggedKVCache) and FRESH[0] in tokens.tolist()[0])
    _failed_alone(served.engine, _run(served.engine, ["a", "fresh", "b"]), alone, "fresh",
                  caplog)


def test_a_sampler_fault_is_a_500_in_openai_shape_naming_the_logged_request_id(
        served, monkeypatch, caplog):
    """Over HTTP, answered and streamed: the rejection rule raises for sampled rows only."""
    caplog.set_level(logging.ERROR, logger="mlx_qspec.server")
    real = decoder_module.accept

    def accept(lp, drafts, q, sampler, split_key):
        if sampler is not None:
            raise ValueError("injected sampler fault")
        return real(lp, drafts, q, sampler, split_key)

    monkeypatch.setattr(decoder_module, "accept", accept)
    body = {"prompt": PROMPTS["a"], "max_tokens": 4, "temperature": 0.8, "seed": 3}
    error = error_of(served.http.post("/v1/completions", json=body), 500)
    assert error["type"] == "server_error" and "ValueError" in error["message"]
    rid = error["message"].split("request id ")[1]
    assert rid.startswith("cmpl-") and any(f"request {rid} failed" in x.getMessage()
                                           for x in caplog.records)
    streamed = served.http.post("/v1/completions", json={**body, "stream": True})
    lines = [x[6:] for x in streamed.text.split("\n") if x.startswith("data: ")]
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["type"] == "server_error"
    answered(served.http.post("/v1/completions", json={**body, "temperature": 0}), 4)


def test_a_fault_in_the_engines_own_bookkeeping_fails_the_requests_in_hand_not_the_engine(
        served, alone, monkeypatch):
    calls = []

    def broken(gone):
        calls.append(gone)
        raise RuntimeError("injected bookkeeping fault")

    monkeypatch.setattr(served.engine, "_leave", broken)
    jobs = _run(served.engine, ["a", "b"])
    assert calls and all(got.kinds == ["error"] for _, got in jobs.values())
    monkeypatch.undo()
    after = _run(served.engine, ["a", "b"])
    assert [got.ids for _, got in after.values()] == [alone["a"].ids, alone["b"].ids]
