"""The chat server through the real ``openai`` client (and raw HTTP for what a client would
never send), on a loopback port, serving the SmolLM2 test model with an explicit draft."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from helpers.serving import (MAX_CONTEXT, VOCAB, Served, answered, check_interleaved, error_of,
                             serve_together)
from mlx_qspec import api as generate_module
from mlx_qspec.server import main

MODEL = "default_model"  # mlx-lm's name for whatever the server serves


@pytest.fixture(scope="module")
def served(smollm2):
    """The batching engine, one sequence at a time, one request waiting at most."""
    with Served("--decode-concurrency", "1", "--queue-size", "1", loaded=smollm2) as s:
        assert s.engine.batched  # its draft steps and verifies are batched forwards
        yield s


JOKE = [{"role": "user", "content": "Tell me a joke about cats."}]


def test_stream_equals_non_stream_equals_offline(served):
    full = served.client.chat.completions.create(model=MODEL, messages=JOKE,
                                                 max_tokens=6, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(served.chat_tokens(JOKE))
    spec = full.model_extra["speculative"]
    assert spec["draft"] == "a8" and spec["num_draft_tokens"] == 3
    assert 0 <= spec["acceptance"] <= 1
    assert spec["forwards"] == spec["verify_passes"] + spec["drafted"]

    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=JOKE, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == 6
    # the same prompt again: all but its last token came from the prompt cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1
    assert text == served.offline(served.chat_tokens(JOKE), 6)


def test_seeded_sampling_repeats(served):
    ask = lambda: served.client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=JOKE, max_tokens=4, temperature=0.9, top_p=0.95, seed=7)
    first, second = ask(), ask()
    assert first.usage.completion_tokens == 4
    assert first.choices[0].message.content == second.choices[0].message.content


def test_second_turn_reuses_the_cached_prefix(served):
    first = served.client.chat.completions.create(model=MODEL, messages=JOKE, max_tokens=4)
    turn2 = JOKE + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Another one."}]
    second = served.client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(served.chat_tokens(JOKE))
    assert second.usage.prompt_tokens == len(served.chat_tokens(turn2)) > cached
    assert second.choices[0].message.content == served.offline(served.chat_tokens(turn2), 4)


def test_completions_stop_string_and_logprobs(served):
    prompt = "The capital of France is"
    base = served.client.completions.create(model=MODEL,
                                            prompt=prompt, max_tokens=6, logprobs=2)
    text, lp = base.choices[0].text, base.choices[0].logprobs
    assert len(lp.tokens) == base.usage.completion_tokens == 6
    assert "".join(lp.tokens).lstrip() == text  # the detokenizer drops the leading space
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == logprob  # greedy: the likeliest
    stop = text[len(text) // 2:][:3]
    cut = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                           stop=[stop, "zzz"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stop=stop,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    health = httpx2.get(f"{served.url}/health").json()  # no key needed
    assert health == {"status": "ok", "queued": 0, "running": 0, "prefilling": [],
                      **served.engine.totals}


MSG = [{"role": "user", "content": "hi"}]
BAD = {
    "messages missing": ({"max_tokens": 2}, 400, "messages"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "messages empty": ({"messages": []}, 400, "messages"),
    "message not an object": ({"messages": ["hi"]}, 400, "messages[0]"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "content a number": ({"messages": [{"role": "user", "content": 3}]}, 400,
                         "messages[0].content"),
    "max_tokens zero": ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens a string": ({"messages": MSG, "max_tokens": "8"}, 400, "max_tokens"),
    "max_tokens over the context": ({"messages": MSG, "max_tokens": MAX_CONTEXT + 1}, 400,
                                    "max_tokens"),
    "negative temperature": ({"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    "top_p zero": ({"messages": MSG, "top_p": 0}, 400, "top_p"),
    "top_p over one": ({"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    "stream not a boolean": ({"messages": MSG, "stream": "yes"}, 400, "stream"),
    "stop a number": ({"messages": MSG, "stop": 3}, 400, "stop"),
    "top_logprobs without logprobs": ({"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    "unknown model": ({"messages": MSG, "model": "gpt-4"}, 404, "model"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "cat " * MAX_CONTEXT}],
                                 "max_tokens": 2}, 400, "messages"),
}


@pytest.mark.parametrize("body,status,param", BAD.values(), ids=BAD.keys())
def test_bad_request_fields(served, body, status, param):
    error_of(served.http.post("/v1/chat/completions", json=body), status, param)


def test_bad_requests_and_the_server_stays_up(served):
    post = served.http.post
    error_of(post("/v1/chat/completions", content=b"{not json"), 400)
    error_of(post("/v1/chat/completions", content=b"[1, 2]"), 400)
    error_of(post("/v1/completions", json={"prompt": {"a": 1}}), 400)
    error_of(post("/v1/nothing", json={}), 404)
    error_of(served.http.get("/v1/chat/completions"), 405)
    error_of(httpx2.post(f"{served.url}/v1/chat/completions", json={"messages": MSG}), 401)
    bad_key = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-4", messages=MSG, max_tokens=1)
    # unknown fields are ignored
    answered(post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1, "frobnicate": 1}))


@pytest.mark.parametrize("prompt", [[1, "a"], ["x"], [1, True], 5, {"ids": [1]}, None])
def test_a_prompt_neither_text_nor_token_ids_is_400(served, prompt):
    error = error_of(served.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}),
                     400, "prompt")
    assert error["message"] == "'prompt' must be a string or a list of token ids"
    assert error["code"] == "invalid_type"


@pytest.mark.parametrize("prompt,bad", [
    ([1, 2, -5], "-5"),  # a negative id: a segmentation fault in the embedding once
    ([1, VOCAB], str(VOCAB)),  # just past the vocabulary: out-of-bounds rows were read
    ([2**40], str(2**40)),
])
def test_token_ids_outside_the_vocabulary_are_400_and_the_server_stays_up(served, prompt, bad):
    error = error_of(served.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}),
                     400, "prompt")
    assert bad in error["message"]
    assert str(VOCAB) in error["message"] or bad.startswith("-")
    answered(served.http.post("/v1/completions", json={"prompt": [1, 2, VOCAB - 1], "max_tokens": 1}))


# A completion that runs long: counting on (an end-of-text token would end it early)
LONG = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": MAX_CONTEXT - 16, "stream": True}


def _first_text(response):
    """Read a completions stream up to its first generated text; returns the rest of its
    lines, which the caller holds to stay connected (an abandoned iterator is closed, and
    with it the connection: the server sees the client leave)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data:") and json.loads(line[5:])["choices"][0]["text"]:
            return lines
    raise AssertionError("the stream ended before any text")


def test_disconnect_stops_generation_and_the_next_request_is_served(served):
    before = dict(served.engine.totals)
    with served.http.stream("POST", "/v1/completions", json=LONG) as r:
        _first_text(r)
    full = served.client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
    assert full.usage.completion_tokens == 3
    # the dropped request ended early and was not counted as served; its cache was dropped
    assert served.engine.totals["requests"] == before["requests"] + 1
    assert served.engine.totals["emitted_tokens"] == before["emitted_tokens"] + 3


def _wait_idle(served, seconds=30):
    """Until the server has seen both clients leave (it learns of it asynchronously)."""
    end = time.monotonic() + seconds
    while served.engine.queued() and time.monotonic() < end:
        time.sleep(0.05)


def test_full_queue_is_429(served):
    """Queue size 1: one request decoding, one waiting, the third is refused."""
    with served.http.stream("POST", "/v1/completions", json=LONG) as running:
        rest = _first_text(running)  # the engine has it
        with served.http.stream("POST", "/v1/completions", json=LONG) as waiting:
            assert waiting.status_code == 200 and served.engine.queued() == 1
            error = error_of(served.http.post("/v1/completions", json=LONG), 429)
            assert "busy" in error["message"]
        assert next(line for line in rest if line).startswith("data:")  # still streaming
    _wait_idle(served)
    assert served.client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices


STARTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,",
          "The best way to learn", "Dear Sir,", "In 1969 the", "Roses are red,"]


def test_concurrent_requests_are_batched_and_give_the_same_text(smollm2):
    """8 greedy requests at once give what each gives alone, in fewer (batched) forwards.
    No prompt cache, so both runs prefill the same way."""
    with Served("--prompt-cache-size", "0", "--queue-size", "8", loaded=smollm2) as s:
        ask = lambda p: s.client.completions.create(  # noqa: E731
            model=MODEL, prompt=p, max_tokens=3).choices[0].text
        start = s.engine.totals["forwards"]
        alone = [ask(p) for p in STARTS]
        sequential = s.engine.totals["forwards"] - start
        with ThreadPoolExecutor(len(STARTS)) as pool:  # all at once
            together = list(pool.map(ask, STARTS))
        batched = s.engine.totals["forwards"] - start - sequential
        assert together == alone and all(alone)
        assert batched < sequential / 2, (batched, sequential)


def test_one_at_a_time_engine_for_an_8bit_cache(smollm2):
    """An 8-bit KV cache (no ragged batch) is served request by request at batch 1."""
    with Served("--kv-mode", "8bit", loaded=smollm2) as s:
        assert not s.engine.batched  # each request decoded at batch 1
        prompt = "The capital of France is"
        full = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
        assert full.usage.completion_tokens == 3
        tokens = s.engine.tokenizer.encode(prompt)
        assert full.choices[0].text == s.offline(tokens, 3, kv_mode="8bit")


@pytest.mark.parametrize("flags,message", [
    (["--draft", "kv-upper"], "--kv-mode nested"),
    (["--port", "zero"], "--port must be an integer"),
    (["--num-draft-tokens", "99"], "num_draft_tokens must be an integer from 1 to 32"),
    # (accepted, it made every chat request a 500: apply_chat_template got tokenize twice)
    (["--chat-template-args", '{"tokenize": false}'], "--chat-template-args: cannot set tokenize"),
    (["--chat-template-args", "[1]"], "--chat-template-args: must be a JSON object"),
])
def test_bad_flags_exit_2_with_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        main(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) <= 2


def test_help_says_to_set_a_key_before_binding_elsewhere(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Set --api-key before binding" in " ".join(capsys.readouterr().out.split())


PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):", "1, 2, 3, 4, 5, 6,"]
SERVED_TOKENS = 5


@pytest.fixture(scope="module")
def plain_texts(smollm2):
    """Plain greedy decoding of each prompt through the API: computed once, the reference
    for every draft the server serves."""
    model, tokenizer = smollm2
    return [[r.token for r in generate_module.stream_generate(
        model, tokenizer, tokenizer.encode(p), max_tokens=SERVED_TOKENS, draft="none")]
        for p in PROMPTS]


@pytest.fixture(scope="module")
def smollm2_head(smollm2, tmp_path_factory):
    """A head for the test model with random weights (a draft's quality is not exactness)."""
    from mlx_qspec.heads import store
    from mlx_qspec.heads.block import NextTokenHead, build_layer, decoder_layer_class, quantize

    model, _ = smollm2
    config = {**vars(model.args)}
    block = build_layer(decoder_layer_class(model), config, len(model.layers) - 1)
    head = NextTokenHead(block, model.args.hidden_size, model.args.vocab_size, 1e-5)
    quantize(head, 32, 4)
    return store.save(tmp_path_factory.mktemp("head") / "head", head,
                      store.head_config(head, "llama", len(model.layers) - 1, config, {}))


@pytest.mark.parametrize("flags", [
    ["--draft", "ngram", "--ngram-min", "2"],
    ["--draft", "ngram>a8-g32", "--num-draft-tokens", "5"],
    ["--kv-mode", "nested", "--draft", "kv-upper"],
    ["--draft-model", "MODEL", "--num-draft-tokens", "3"],
    ["--draft", "ngram>head", "--draft-head", "HEAD"],
], ids=["ngram", "cascade", "nested-kv-upper", "draft-model", "head"])
def test_every_draft_is_served_concurrently_with_plain_decodings_text(smollm2, smollm2_gguf,
                                                                      smollm2_head, plain_texts,
                                                                      flags):
    """Drafts no batched forward can share run as decoders of their own at batch 1, stepped
    in turn: requests queued together all emit before any finishes, and each gets the
    tokens plain decoding gives its prompt."""
    flags = [{"MODEL": str(smollm2_gguf), "HEAD": str(smollm2_head)}.get(f, f) for f in flags]
    with Served("--prompt-cache-size", "0", *flags, loaded=smollm2) as s:
        assert not s.engine.batched
        _, events = serve_together(s.engine, [s.engine.tokenizer.encode(p) for p in PROMPTS],
                                   SERVED_TOKENS)
        check_interleaved(events, plain_texts, flags)
