"""``mlx_qspec.server``: a local OpenAI-compatible server with self-speculative decoding.

The HTTP side is an ASGI app (Starlette) on uvicorn, the stack vLLM and llama-cpp-python
serve with; it parses and checks requests, tokenizes, and streams server-sent events. Every
MLX call runs on the engine's thread (:mod:`mlx_qspec.batch`), fed through a bounded queue,
so the event loop never waits on the model. Flags, URLs and request/response fields are
mlx-lm's server's (``mlx_lm.server``) plus ours (``--draft``, ``--num-draft-tokens``,
``--kv-mode``, …); every response carries its speculative statistics in an extra
``speculative`` field that OpenAI clients ignore.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
from jinja2 import TemplateError
from mlx_lm.server import convert_chat
from mlx_lm.utils import _parse_size
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import settings as decoding
from ..batch import BatchEngine, Job, QueueFull
from .. import cli, recurrent
from ..errors import ModelError, UserError
from ..loader import load
from ..vocabulary import check_token_ids, vocabulary_size

log = logging.getLogger("mlx_qspec.server")

ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_MODEL_ALIAS = "default_model"  # what mlx-lm's server takes for "the served model"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions: 5)
PREFILL_STEP_SIZE = 512  # prompt tokens per engine round (mlx-lm's 2048: a longer stall)
MAX_TEMPERATURE = 2.0  # OpenAI's limit; far past it a draw is all but uniform over the vocabulary
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # the engine holds back up to this much text while a stop may begin
MAX_BODY_BYTES = 16 << 20  # a 1M-token prompt as ids fits
MAX_JSON_DEPTH = 64  # a real request nests ~6 deep; 100,000 brackets exhausted the stack
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON escapes can spell them; UTF-8 cannot

# Request fields that would change what is generated and that this server does not
# implement: refused with a 400 naming the field unless absent, null, or at their "off"
# value (a client that relies on one must not get output that silently ignored it).
NOT_IMPLEMENTED = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),  # without tools, "auto" calls none
    "functions": lambda v: v == [],
    "function_call": lambda v: v in ("none", "auto"),
    "response_format": lambda v: v == {"type": "text"},
    "logit_bias": lambda v: v == {},
    "frequency_penalty": lambda v: v == 0,
    "presence_penalty": lambda v: v == 0,
    "repetition_penalty": lambda v: v in (0, 1),  # mlx-lm: 0 is off; 1 divides by one
    "xtc_probability": lambda v: v == 0,
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "adapters": lambda v: False,
    "chat_template_kwargs": lambda v: v == {},  # mlx-lm's; the server's flag sets them
}
COMPLETIONS_NOT_IMPLEMENTED = {
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
}


class APIError(Exception):
    """A request the server cannot serve, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        """The error as JSON in ASCII: whatever a message quotes, it encodes."""
        return Response(json.dumps(self.body()), status_code=self.status,
                        media_type="application/json")


@dataclass
class Settings:
    """What requests are checked against and default to (from the command line)."""

    model_id: str
    api_key: Optional[str]
    max_context: int
    max_tokens: int
    defaults: decoding.Settings  # the flags': a request's sampling defaults to them
    chat_template_args: dict


# ---------------------------------------------------------------- request checking


def _show(v) -> str:
    """A request value quoted in an error message (long ones cut)."""
    text = json.dumps(v)
    return text if len(text) <= 200 else text[:200] + "…"


def _value(body: dict, name: str, default, kinds, what: str, param: Optional[str] = None):
    """``body[name]`` (null or absent: ``default``), or a 400 naming the field (``param``:
    where it is, if not at the top) and the type."""
    v, param = body.get(name), param or name
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise APIError(400, f"'{param}' must be {what}, got {_show(v)}", param, "invalid_type")
    return v


def _number(body, name, default, low=None, high=None, low_open=False, integer=False):
    kinds, what = ((int,), "an integer") if integer else ((int, float), "a number")
    v = _value(body, name, default, kinds, what)
    if v is None:
        return v
    if low is not None and (v <= low if low_open else v < low) or high is not None and v > high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise APIError(400, f"'{name}' must be {' and '.join(x for x in (lo, hi) if x)}, "
                       f"got {_show(v)}", name, "invalid_value")
    return v


def _setting(body: dict, field: str, default, name: Optional[str] = None, **bounds):
    """The request's ``field`` (:func:`_number`, in ``bounds``) through its setting's one
    check (:func:`mlx_qspec.settings.check`; ``name``: the setting, if not ``field``), or a
    400 naming ``field``."""
    value = _number(body, field, default, **bounds)
    try:
        return decoding.check(name or field, value)
    except decoding.SettingError as e:
        raise APIError(400, f"'{field}' {e.problem}", field, "invalid_value") from None


def _sampling(body: dict, s: Settings, chat: bool, vocab_size: int) -> dict:
    """The fields both endpoints share, checked."""
    _refuse_not_implemented(body, NOT_IMPLEMENTED if chat else
                            {**NOT_IMPLEMENTED, **COMPLETIONS_NOT_IMPLEMENTED})
    model = _value(body, "model", None, (str,), "a string")
    if model not in (None, s.model_id, DEFAULT_MODEL_ALIAS):
        raise APIError(404, f"The model {_show(model)} does not exist: this server serves "
                       f"'{s.model_id}'", "model", "model_not_found")
    if _number(body, "n", 1, low=1, integer=True) != 1:
        raise APIError(400, "'n' must be 1: one choice per request", "n", "invalid_value")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, name, None, low=1, high=s.max_context, integer=True)
    stream_options = _value(body, "stream_options", {}, (dict,), "an object")
    return dict(
        max_tokens=max_tokens,
        temperature=float(_setting(body, "temperature", s.defaults.temp, "temp",
                                   high=MAX_TEMPERATURE)),
        top_p=float(_setting(body, "top_p", s.defaults.top_p, low=0, low_open=True)),
        top_k=_setting(body, "top_k", s.defaults.top_k, high=vocab_size - 1, integer=True),
        min_p=float(_setting(body, "min_p", s.defaults.min_p)),
        seed=_setting(body, "seed", None, integer=True),
        stop=_stop(body),
        stream=_value(body, "stream", False, (bool,), "a boolean"),
        include_usage=_value(stream_options, "include_usage", False, (bool,), "a boolean"),
    )


def _stop(body: dict) -> list:
    """``stop``: up to MAX_STOPS non-empty strings of at most MAX_STOP_CHARS characters."""
    stop = _value(body, "stop", [], (str, list), "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", "stop",
                       "invalid_type")
    if len(stop) > MAX_STOPS:
        raise APIError(400, f"'stop' may hold at most {MAX_STOPS} strings, got {len(stop)}",
                       "stop", "invalid_value")
    if max(map(len, stop), default=0) > MAX_STOP_CHARS:
        raise APIError(400, f"each 'stop' string may be at most {MAX_STOP_CHARS} characters, "
                       f"got one of {max(map(len, stop))}", "stop", "invalid_value")
    return stop


def _refuse_not_implemented(body: dict, fields: dict):
    """A 400 naming the first field that asks for something this server does not do."""
    for name, off in fields.items():
        v = body.get(name)
        if v is not None and not off(v):
            raise APIError(400, f"'{name}' is not supported by this server (it would be ignored "
                           f"otherwise), got {_show(v)}", name,
                           "unsupported_parameter")


def _messages(body: dict) -> list:
    """``messages`` checked; text parts of a content list joined (as mlx-lm does)."""
    if "messages" not in body:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    messages = _value(body, "messages", None, (list,), "a list of messages")
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", "messages",
                       "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got "
                           f"{_show(role)}", f"{where}.role", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"'{where}.content' parts must be text parts "
                               '({"type": "text", "text": ...})', f"{where}.content",
                               "invalid_type")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str) and not (content is None and role == "assistant"):
            raise APIError(400, f"'{where}.content' must be a string or a list of text parts",
                           f"{where}.content", "invalid_type")
        if m.get("tool_calls") not in (None, []):
            raise APIError(400, f"'{where}.tool_calls': tool calls are not supported by this "
                           "server", f"{where}.tool_calls", "unsupported_parameter")
        message = {"role": role, "content": content or ""}
        if (name := _value(m, "name", None, (str,), "a string", f"{where}.name")) is not None:
            message["name"] = name
        out.append(message)  # what the chat template reads, and nothing else
    return out


async def _json_body(request: Request) -> dict:
    """The body as a JSON object: a JSON (or unlabelled) body of at most MAX_BODY_BYTES,
    UTF-8, strict JSON (no NaN or Infinity), nested at most MAX_JSON_DEPTH deep, every
    string encodable; else a 4xx naming the problem. Parsed off the event loop."""
    kind = request.headers.get("content-type")
    if kind is not None:
        media, _, params = kind.partition(";")
        media = media.strip().lower()
        charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", params, re.IGNORECASE)
        if media != "application/json" and not media.endswith("+json") or \
                charset and charset.group(1).lower().replace("-", "") != "utf8":
            raise APIError(415, f"the request body must be JSON in UTF-8: send 'Content-Type: "
                           f"application/json', got {json.dumps(kind)}", None,
                           "unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise _too_large()
    return await run_in_threadpool(_parse_json, bytes(raw))


def _too_large() -> APIError:
    return APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", None,
                    "request_too_large")


def _not_json(message: str) -> APIError:
    return APIError(400, f"the request body is not valid JSON: {message}", None, "invalid_json")


def _reject_constant(name: str):
    raise _not_json(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _not_json(f"the number {text[:40]} is out of range")
    return x


def _parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_json(f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})")
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _not_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as e:  # not JSON (a JSONDecodeError), or an integer of more digits than
        raise _not_json(str(e).split(";")[0])  # Python converts: its message's first clause
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_type")
    _check_structure(body)
    return body


def _check_structure(body: dict):
    """Depth at most MAX_JSON_DEPTH; no lone surrogate (a JSON escape like \\ud800) in any
    string or key: the tokenizer and every UTF-8 writer would fail on it."""
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _not_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
        for v in [*node, *node.values()] if isinstance(node, dict) else node:  # keys too
            if isinstance(v, str) and _SURROGATE.search(v):
                raise APIError(400, "the request holds a string that is not Unicode text (a "
                               "lone surrogate, such as \\ud800)", None, "invalid_value")
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))


# ---------------------------------------------------------------- the app


def create_app(engine: BatchEngine, tokenizer, settings: Settings) -> Starlette:
    """The ASGI app serving ``engine`` (which must be started) under OpenAI's URLs."""
    service = _Service(engine, tokenizer, settings)

    async def api_error(request: Request, e: APIError):
        return e.response()

    async def http_error(request: Request, e: HTTPException):
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        None, "not_found" if e.status_code == 404 else "method_not_allowed"
                        ).response()

    return Starlette(
        middleware=[Middleware(_CatchAll)],
        routes=[
            Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
            Route("/chat/completions", service.chat_completions, methods=["POST"]),
            Route("/v1/completions", service.completions, methods=["POST"]),
            Route("/v1/models", service.models, methods=["GET"]),
            Route("/health", service.health, methods=["GET"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error},
    )


def _token_ids(prompt: list, vocab_size) -> list[int] | None:
    """A completions prompt of token ids, checked against the vocabulary; None where it is
    not a list of ints at all (then it is the wrong type, not a bad id)."""
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return check_token_ids(prompt, vocab_size, "prompt")
    return None


class _Service:
    """The endpoints: each checks its request, queues a job on the engine and answers with its
    events, as one JSON body or a stream of server-sent events."""

    def __init__(self, engine: BatchEngine, tokenizer, settings: Settings):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.created = int(time.time())
        self.vocab_size = vocabulary_size(engine.model) or len(tokenizer.get_vocab())

    def authorize(self, request: Request):
        """``Authorization: Bearer KEY`` (the scheme in any case, RFC 9110), compared in
        constant time."""
        if self.settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), self.settings.api_key.encode()):
            raise APIError(401, "a missing or wrong API key: send 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")

    def budget(self, prompt: list, max_tokens: Optional[int], field: str) -> int:
        """Tokens the request may generate: its ``max_tokens``, or the server's default cut
        to the context left; a 400 past the context."""
        if not prompt:
            raise APIError(400, "the prompt is empty", None, "invalid_value")
        context = self.settings.max_context
        room = context - len(prompt)
        if room < 1 or max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} "
                           f"tokens; the request needs {len(prompt) + (max_tokens or 1)} "
                           f"({len(prompt)} in the prompt, {max_tokens or 1} to generate)",
                           field, "context_length_exceeded")
        return min(self.settings.max_tokens, room) if max_tokens is None else max_tokens

    def chat_prompt(self, messages: list) -> list:
        if not self.tokenizer.has_chat_template:
            return self.tokenizer.encode(convert_chat(messages))
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True,
                **self.settings.chat_template_args)
        except TemplateError as e:  # the template's own raise_exception: messages it refuses
            raise APIError(400, f"the model's chat template refused the messages: {e}",
                           "messages", "invalid_value")

    def envelope(self, rid: str, obj: str) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()),
                "model": self.settings.model_id,
                "system_fingerprint": f"mlx_qspec-{mx.__version__}"}

    # ------------------------------------------------------------ a job's life
    async def run_job(self, request: Request, field: str, prompt: list, params: dict,
                      logprobs: tuple, build):
        """Queue the job (``field`` holds the prompt; ``logprobs``: whether asked for, and how
        many alternatives); answer with one JSON body or a stream of events.
        ``build.chunk(text, logprobs)`` and ``build.final(text, logprobs, done event,
        with_usage)`` make the OpenAI objects; ``build.rid`` names the job in logs and
        errors."""
        params = dict(params, max_tokens=self.budget(prompt, params["max_tokens"], field))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                job.cancel()

        job = Job(prompt=prompt, deliver=deliver, logprobs=logprobs[0],
                  top_logprobs=logprobs[1], rid=build.rid,
                  **{k: params[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                            "min_p", "seed", "stop")})
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), None, "server_busy", type="server_overloaded")
        if not build.stream:
            return await _answer(request, job, events, build)
        return StreamingResponse(_stream(job, events, build, params["include_usage"]),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request):
        self.authorize(request)
        body = await _json_body(request)
        messages = _messages(body)
        params = _sampling(body, self.settings, chat=True, vocab_size=self.vocab_size)
        logprobs = _value(body, "logprobs", False, (bool,), "a boolean")
        top = _number(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS, integer=True)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs",
                           "invalid_value")
        prompt = await run_in_threadpool(self.chat_prompt, messages)
        build = _ChatObjects(self.envelope, f"chatcmpl-{uuid.uuid4()}", params["stream"],
                             logprobs)
        return await self.run_job(request, "messages", prompt, params, (logprobs, top), build)

    async def completions(self, request: Request):
        self.authorize(request)
        body = await _json_body(request)
        if "prompt" not in body:
            raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
        prompt, tokens = body["prompt"], None
        if isinstance(prompt, list):  # off the event loop: a long list is walked twice
            try:
                tokens = await run_in_threadpool(_token_ids, prompt, self.vocab_size)
            except UserError as e:
                raise APIError(400, str(e), "prompt", "invalid_value") from None
        elif isinstance(prompt, str):
            tokens = await run_in_threadpool(self.tokenizer.encode, prompt)
        if tokens is None:
            raise APIError(400, "'prompt' must be a string or a list of token ids", "prompt",
                           "invalid_type")
        params = _sampling(body, self.settings, chat=False, vocab_size=self.vocab_size)
        top = _number(body, "logprobs", None, low=0, high=5, integer=True)
        build = _CompletionObjects(self.envelope, f"cmpl-{uuid.uuid4()}", params["stream"], top)
        return await self.run_job(request, "prompt", tokens, params, (top is not None, top or 0),
                                  build)

    async def models(self, request: Request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_id, "object": "model", "created": self.created,
             "owned_by": "mlx_qspec"}]})

    async def health(self, request: Request):
        """Liveness, what the engine holds — requests queued, running, and prefilling with
        their progress (prompt tokens in the cache so far) — and its totals (model forwards
        per emitted token for the load test). Open without an API key, as a load balancer's
        probe is."""
        return JSONResponse({"status": "ok", "queued": self.engine.queued(),
                             **self.engine.progress, **self.engine.totals})


async def _answer(request: Request, job: Job, events: asyncio.Queue, build):
    """The job's events gathered into one JSON body (499 when the client leaves first)."""
    text, lps = "", []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), 0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse({}, status_code=499)
            continue
        if event["type"] == "text":
            text += event["text"]
            lps += event["logprobs"]
        elif event["type"] == "error":
            raise APIError(500, event["message"], None, "internal_error", "server_error")
        else:
            return JSONResponse(build.final(text, lps, event, with_usage=True))


async def _stream(job: Job, events: asyncio.Queue, build, include_usage: bool):
    """Server-sent events; a client that leaves cancels this generator, and the job."""
    try:
        first = build.chunk("", [], role=True)
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            event = await events.get()
            if event["type"] == "text":
                yield f"data: {json.dumps(build.chunk(event['text'], event['logprobs']))}\n\n"
            elif event["type"] == "error":
                err = APIError(500, event["message"], None, "internal_error", "server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                yield f"data: {json.dumps(build.final('', [], event, with_usage=False))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(build.final('', [], event, with_usage=True))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _done(envelope: dict, choices: list, event: dict, with_usage: bool) -> dict:
    """A job's last object (streamed: ``with_usage``, the usage chunk after it, no choices)."""
    usage = {"usage": event["usage"]} if with_usage else {}
    return dict(envelope, choices=choices, speculative=event["speculative"], **usage)


@dataclass
class _ChatObjects:
    """Chat completions' response objects: streamed chunks and the final one."""

    envelope: Any
    rid: str
    stream: bool
    logprobs: bool

    def chunk(self, text, lps, role=False):
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": None,
                  "logprobs": {"content": lps} if lps else None}
        return dict(self.envelope(self.rid, "chat.completion.chunk"), choices=[choice])

    def final(self, text, lps, event, with_usage):
        if self.stream:
            last = {"index": 0, "delta": {}, "finish_reason": event["finish_reason"],
                    "logprobs": None}
            return _done(self.envelope(self.rid, "chat.completion.chunk"),
                         [] if with_usage else [last], event, with_usage)
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": event["finish_reason"],
                  "logprobs": {"content": lps} if self.logprobs else None}
        return _done(self.envelope(self.rid, "chat.completion"), [choice], event, True)


@dataclass
class _CompletionObjects:
    """Completions' response objects; ``top``: the logprobs asked for (None: none)."""

    envelope: Any
    rid: str
    stream: bool
    top: Optional[int]

    @staticmethod
    def legacy(lps):
        """Completions' logprobs: parallel lists, top alternatives as {token: logprob}."""
        offsets, at = [], 0
        for e in lps:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in lps],
                "token_logprobs": [e["logprob"] for e in lps],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in lps],
                "text_offset": offsets}

    def chunk(self, text, lps, role=False):
        if role:
            return None
        choice = {"index": 0, "text": text, "finish_reason": None,
                  "logprobs": self.legacy(lps) if self.top is not None else None}
        return dict(self.envelope(self.rid, "text_completion"), choices=[choice])

    def final(self, text, lps, event, with_usage):
        choice = {"index": 0, "text": text, "finish_reason": event["finish_reason"],
                  "logprobs": self.legacy(lps) if self.top is not None and not self.stream
                  else None}
        return _done(self.envelope(self.rid, "text_completion"),
                     [] if self.stream and with_usage else [choice], event, with_usage)


class _CatchAll:
    """Whatever a request raises that no handler turned into an answer becomes a 500 in
    OpenAI's error shape (Starlette's own is plain text), logged with a request id that the
    answer names. Once a response has started (a stream) it can only be cut: re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:  # it left while sending its body: nobody to answer
            return
        except Exception as e:
            rid = f"req-{uuid.uuid4().hex[:12]}"
            log.error("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"),
                      exc_info=e)
            if started:
                raise
            await APIError(500, f"the server failed on this request ({type(e).__name__}); "
                           f"request id {rid}", None, "internal_error", "server_error"
                           ).response()(scope, receive, send)


# ---------------------------------------------------------------- CLI


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog="mlx_qspec.server",
        description="OpenAI-compatible chat server with exactly-lossless self-speculative "
        "decoding (mlx-lm's server flags, plus the draft's: --draft, --num-draft-tokens, "
        "--kv-mode, --draft-model, …).",
    )
    parser.add_argument("--model", help=cli.MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="Host to bind (default: 127.0.0.1). Set --api-key before binding "
                        "any other interface (refused without one): the server runs whatever "
                        "it is sent")
    parser.add_argument("--port", type=cli.integer(1, name="--port"), default=8080,
                        help="Port (default: 8080)")
    parser.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on every request but /health")
    parser.add_argument("--insecure-no-api-key", action="store_true",
                        help="Serve a --host other than loopback without --api-key (refused "
                        "otherwise): anyone who reaches the port runs the model")
    parser.add_argument("--max-tokens", type=cli.integer(1, name="--max-tokens"), default=512,
                        help="Default maximum number of tokens to generate (default: 512)")
    cli.add_sampling_args(parser, extended=False, named=True)  # the requests' defaults
    parser.add_argument("--chat-template-args", type=cli.template_config, default={},
                        help="JSON object of arguments for the tokenizer's apply_chat_template, "
                        "e.g. '{\"enable_thinking\": false}' (not "
                        f"{', '.join(cli.TEMPLATE_ARGS)}: the server sets them)")
    parser.add_argument("--prompt-cache-size", type=cli.integer(0, name="--prompt-cache-size"),
                        default=10, help="Maximum number of KV caches kept for reuse by later "
                        "requests sharing a prefix (default: 10)")
    parser.add_argument("--prompt-cache-bytes", type=_parse_size, default=None,
                        help="Maximum size of the kept KV caches (e.g. 2GB)")
    parser.add_argument("--max-context", type=cli.integer(1, name="--max-context"), default=None,
                        help="Longest prompt + completion a request may ask for (default: the "
                        "model's max_position_embeddings)")
    parser.add_argument("--decode-concurrency", default=32,
                        type=cli.integer(1, name="--decode-concurrency"),
                        help="Requests decoded together (default: 32): with a draft of one "
                        "precision level or none, on an fp cache, their draft and verify "
                        "forwards are batched; every other draft, --kv-mode 8bit/nested, "
                        "--kv-bits and windows decode each request at batch 1, in turn")
    parser.add_argument("--queue-size", type=cli.integer(1, name="--queue-size"), default=64,
                        help="Requests that may wait for the engine; more get 429 (default: 64)")
    cli.add_kv_args(parser, named=True)
    cli.add_draft_args(parser, named=True, prefill_help=(
        "Prompts are prefilled this many tokens per round, between the running requests' "
        "decode steps: smaller values keep them flowing while a long prompt prefills (the "
        "same value at the CLI builds the same cache)"))
    parser.set_defaults(prefill_step_size=PREFILL_STEP_SIZE)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return parser


def build(args, loaded: Optional[tuple] = None) -> tuple:
    """``(app, engine)`` from parsed flags: checks them, loads the model (or takes
    ``loaded``, a ``(model, tokenizer)`` already in memory), starts the engine."""
    settings = cli.check_before_load(args)  # its mistakes before the model loads
    model, tokenizer = loaded or load(args.model or cli.default_model_path())
    recurrent.check_conversational(model, "mlx_qspec.server")
    _, draft_model, draft_head, settings = cli.load_drafts(args, settings, model, tokenizer, show=False)
    max_context = args.max_context or getattr(model.args, "max_position_embeddings", None)
    if max_context is None:
        raise ModelError("the model does not say its context length: pass --max-context")
    server = Settings(model_id=args.model or cli.DEFAULT_GGUF_FILE, api_key=args.api_key,
                      max_context=max_context, max_tokens=args.max_tokens, defaults=settings,
                      chat_template_args=args.chat_template_args)
    engine = BatchEngine(model, tokenizer, settings=settings, draft_model=draft_model,
                         draft_head=draft_head,
                         decode_concurrency=args.decode_concurrency,
                         queue_size=args.queue_size, prompt_cache_size=args.prompt_cache_size,
                         prompt_cache_bytes=args.prompt_cache_bytes)
    engine.start()
    return create_app(engine, tokenizer, server), engine


def check_host(host: str, api_key: Optional[str], insecure: bool) -> Optional[str]:
    """May ``host`` be bound? None: yes; a warning to print: only because
    ``--insecure-no-api-key`` says so; a UserError: no (a server that runs whatever it is
    sent must not listen beyond this machine without a key)."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    if api_key is not None or _is_loopback(host):
        return None
    host = host or "''"
    if insecure:
        return (f"--host {host} is served WITHOUT an API key (--insecure-no-api-key): anyone "
                "who can reach this port can run the model")
    raise UserError(f"--host {host} is not a loopback address: set --api-key KEY to serve it, "
                    "or --insecure-no-api-key to serve it open")


def _is_loopback(host: str) -> bool:
    """Every address ``host`` resolves to is a loopback address ('' binds every interface)."""
    if not host.strip():
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host} cannot be resolved: {e}")
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def main(argv=None):
    """Serve until stopped; a mistake in the flags is one line, exit 2 (:func:`cli.run_cli`,
    as every command)."""
    cli.run_cli(setup_arg_parser(), argv, _serve)


def _serve(args, parser) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    warning = check_host(args.host, args.api_key, args.insecure_no_api_key)
    if warning:
        log.warning(warning)
    app, engine = build(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        engine.stop()
