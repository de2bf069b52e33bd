"""A hybrid model (the tiny qwen3_5: gated delta beside full attention) served and chatted
with: the server's engine decodes requests queued together each at batch 1, interleaved, and
each gets plain decoding's tokens; a chat's position after each turn is the cache's
(``caches.position``), and its second turn is plain decoding of the whole conversation."""

import threading

import pytest

from helpers.hybrid_models import save
from mlx_qspec import load, settings
from mlx_qspec.api import stream_generate
from mlx_qspec.batch import BatchEngine, Job
from mlx_qspec.chat import Conversation, setup_arg_parser
from mlx_qspec.cli import settings_from_args

PROMPTS = ["hello hello hello", "abcabcabc"]
TOKENS = 8


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """``(model, tokenizer)`` of the tiny qwen3_5, loaded from disk as a user's would be."""
    return load(str(save("qwen3_5", tmp_path_factory.mktemp("qwen3_5"))))


def _tokens(responses) -> list:
    return [r.token for r in responses]


@pytest.fixture(scope="module")
def plain(hybrid):
    """Plain decoding of each prompt through the API: the reference, computed once."""
    model, tokenizer = hybrid
    return {p: _tokens(stream_generate(model, tokenizer, tokenizer.encode(p), max_tokens=TOKENS))
            for p in PROMPTS}


@pytest.mark.parametrize("draft", ["ngram", "a8-g32", "auto"])
def test_requests_served_together_get_plain_decodings_tokens(hybrid, plain, draft):
    model, tokenizer = hybrid
    engine = BatchEngine(model, tokenizer, prompt_cache_size=0,
                         settings=settings.from_kwargs({}, draft=draft, num_draft_tokens=3))
    assert not engine.batched  # the ragged batch holds attention's K/V, not recurrent state
    events, done = [], threading.Semaphore(0)

    def deliver(i):
        def on(event):
            events.append((i, event))
            if event["type"] in ("done", "error"):
                done.release()
        return on

    engine.start()
    try:
        with engine.ready:  # all queued before the engine takes any
            for i, p in enumerate(PROMPTS):
                engine.submit(Job(tokenizer.encode(p), TOKENS, deliver(i), logprobs=True))
        for _ in PROMPTS:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert not [e for _, e in events if e["type"] == "error"], events
    for i, p in enumerate(PROMPTS):
        ids = [x["id"] for j, e in events if j == i for x in e.get("logprobs", [])]
        assert ids == plain[p], draft
    first_done = next(n for n, (_, e) in enumerate(events) if e["type"] == "done")
    assert {i for i, e in events[:first_done] if e.get("logprobs")} == {0, 1}  # interleaved
    if draft != "auto":
        assert sum(e["speculative"]["drafted"] for _, e in events if e["type"] == "done") > 0


def test_a_chat_keeps_its_position_and_its_second_turn_is_plain_decoding(hybrid):
    model, tokenizer = hybrid
    args = setup_arg_parser().parse_args(["--max-tokens", str(TOKENS), "--draft", "a8-g32"])
    conversation = Conversation(model, tokenizer, args, settings_from_args(args))
    history = []
    for question in PROMPTS:
        prompt = conversation.prompt_tokens(question)
        answer = _tokens(conversation.reply(question))
        history += prompt
        assert answer == _tokens(stream_generate(model, tokenizer, history, max_tokens=TOKENS))
        history += answer
        assert conversation.offset == len(history)
