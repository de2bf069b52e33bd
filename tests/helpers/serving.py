"""A chat server started inside the test process on a free loopback port, and the offline
generation its answers are compared with (shared by the server's test modules)."""

import socket
import threading
import time

import httpx2
import openai
import uvicorn
from mlx_lm.utils import save_config, save_model

from helpers import TINY, build_tiny_model
from mlx_qspec import generate
from mlx_qspec.batch import Job
from mlx_qspec.server import build, setup_arg_parser

KEY = "test-key"
MAX_CONTEXT = 256
DRAFT = ["--draft", "a8", "--num-draft-tokens", "3"]
VOCAB = 49152  # the test model's tokenizer's


def write_tiny_model_dir(path, tokenizer):
    """An mlx model directory at ``path``: a tiny 4-bit llama over the test model's
    vocabulary, with ``tokenizer`` (the test model's) and its chat template — served in
    milliseconds, so a test can send it many requests or long prompts."""
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128)
    save_model(path, build_tiny_model(**sizes))
    save_config({**TINY, **sizes, "quantization": {"group_size": 32, "bits": 4}},
                path / "config.json")
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server serving the model already loaded (``loaded``, else ``--model``'s) with the
    ``a8`` draft and an API key, which offline generation below uses too; ``flags`` are
    added to (and override) those."""

    def __init__(self, *flags, loaded=None):
        args = setup_arg_parser().parse_args(
            [*DRAFT, "--api-key", KEY, "--max-context", str(MAX_CONTEXT), *flags])
        self.app, self.engine = build(args, loaded)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)
        self.http = httpx2.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"},
                                  timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def offline(self, prompt_tokens, max_tokens, **kwargs) -> str:
        """What the offline API gives for the same tokens and draft."""
        return generate(self.engine.model, self.engine.tokenizer, prompt_tokens,
                        max_tokens=max_tokens, draft="a8", num_draft_tokens=3, **kwargs)

    def chat_tokens(self, messages):
        return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def error_of(response, status, param=None) -> dict:
    """The body of an OpenAI-shaped error with ``status`` (and ``param``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def answered(response, tokens=1) -> dict:
    """The body of a 200 that generated ``tokens`` tokens."""
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == tokens
    return response.json()


def serve_together(engine, prompts: list, max_tokens, timeout=300) -> tuple:
    """Jobs (logprobs on) for ``prompts`` (token lists) of ``max_tokens`` (one count, or one
    each), all queued before the engine takes any, run to their end: ``(jobs, events)``,
    every event as ``(job's index, event)`` in the order delivered."""
    events, done = [], threading.Semaphore(0)

    def deliver(i):
        def on(event):
            events.append((i, event))
            if event["type"] in ("done", "error"):
                done.release()
        return on

    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    jobs = [Job(p, n, deliver(i), logprobs=True) for i, (p, n) in enumerate(zip(prompts, counts))]
    with engine.ready:
        for job in jobs:
            engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=timeout)
    return jobs, events


def check_interleaved(events, expected: list, note=None):
    """Of :func:`serve_together`'s ``events``: no job failed, job i emitted the tokens
    ``expected[i]``, and every job emitted some before any finished (decoded in turn)."""
    assert not [e for _, e in events if e["type"] == "error"], events
    for i, tokens in enumerate(expected):
        assert [x["id"] for j, e in events if j == i for x in e.get("logprobs", [])] == tokens, note
    first_done = next(n for n, (_, e) in enumerate(events) if e["type"] == "done")
    assert {i for i, e in events[:first_done] if e.get("logprobs")} == set(range(len(expected)))
