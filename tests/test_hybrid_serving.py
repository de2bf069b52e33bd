"""A hybrid model (the tiny qwen3_5: gated delta beside full attention) served and chatted
with: the server's engine decodes requests queued together each at batch 1, interleaved, and
each gets plain decoding's tokens; a chat's position after each turn is the cache's
(``caches.position``), and its second turn is plain decoding of the whole conversation."""

import pytest

from helpers.hybrid_models import save
from helpers.serving import check_interleaved, serve_together
from mlx_qspec import load, settings
from mlx_qspec.api import stream_generate
from mlx_qspec.batch import BatchEngine
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
                         settings=settings.Settings(draft=draft, num_draft_tokens=3))
    assert not engine.batched  # the ragged batch holds attention's K/V, not recurrent state
    engine.start()
    try:
        _, events = serve_together(engine, [tokenizer.encode(p) for p in PROMPTS], TOKENS, 120)
    finally:
        engine.stop()
    check_interleaved(events, [plain[p] for p in PROMPTS], draft)
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
