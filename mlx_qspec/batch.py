"""The server's engines: requests in, text out, on one thread of their own.

MLX work never runs on the HTTP event loop: the server hands each request to an engine as a
:class:`Job` through a bounded queue and gets its text back through the job's ``deliver``
callback. :class:`BatchEngine` serves the jobs in hand together (continuous batching): every
draft step and every verify is one forward over all active sequences, each row with its own
cache length and its own accepted count (:class:`RaggedKVCache`: rows left-aligned, so a
ragged rewind is a per-row length, and a per-row mask hides what lies past it). Jobs join
between steps and leave when done. :class:`Engine` serves one job at a time through
:func:`mlx_qspec.stream_generate` (what ``auto``, the nested and quantized KV caches and
models with sliding-window layers need).
Both reuse the longest cached prefix of each prompt from mlx-lm's :class:`LRUPromptCache`.
"""

import logging
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, generation_stream
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache

from . import precision
from .generate import stream_generate
from .kv_cache import make_cache
from .precision import FULL_PRECISION
from .quant.modes import NONE, check_draft
from .sampling import accept, make_sampler, resolve_sampler
from .speculative import DEFAULT_DRAFT_TOKENS, VERIFY_CHUNK, SpecStats, prefill, prepare
from .stop_strings import StopMatcher

log = logging.getLogger("mlx_qspec.server")


class QueueFull(Exception):
    """The engine's queue holds as many requests as it may: the caller answers 429."""


@dataclass
class Job:
    """One request as the engine sees it: prompt tokens, sampling, stop strings, and where its
    events go. ``deliver`` is called from the engine thread with dicts of type ``text``
    (a piece of text and, when asked for, its tokens' logprobs), then one ``done`` or
    ``error``. Text that could still turn into a stop string is held back until it cannot,
    and so is a trailing U+FFFD, which a streaming detokenizer emits only for the bytes of a
    character that the last token left incomplete: at the end it is dropped, so a response
    cut inside a character (``max_tokens``) ends with the last whole character, streamed or
    not (a model that generated U+FFFD itself as its very last character loses it too)."""

    prompt: List[int]
    max_tokens: int
    deliver: Callable[[dict], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    held: str = ""  # generated, not yet delivered

    def __post_init__(self):
        self.stops = StopMatcher(self.stop)

    def cancel(self):
        """The client went away: the engine stops this job at its next token."""
        self.cancelled.set()

    def add(self, segment: str, logprobs: Optional[list]) -> bool:
        """Append generated text; deliver what no stop string can still claim. True when a
        stop string ended the text (it and anything after it are never delivered). Time
        linear in the text (:class:`StopMatcher`)."""
        start = self.stops.feed(segment)
        text, self.held = self.held + segment, ""
        if start is not None:
            self._send(text[:len(text) - len(segment) + start], logprobs)
            return True
        keep = len(text) - max(self.stops.partial, _replacement_tail(text))
        self._send(text[:keep], logprobs)
        self.held = text[keep:]
        return False

    def flush(self):
        """Deliver the held-back tail, less an incomplete last character: generation ended
        without a stop string."""
        text, self.held = self.held[:len(self.held) - _replacement_tail(self.held)], ""
        self._send(text, None)

    def _send(self, text: str, logprobs: Optional[list]):
        if text or logprobs:
            self.deliver({"type": "text", "text": text, "logprobs": logprobs or []})


def _replacement_tail(text: str) -> int:
    """How many U+FFFD end ``text``."""
    return len(text) - len(text.rstrip("\ufffd"))


class PromptCache:
    """mlx-lm's LRU prompt cache, keyed by the exact tokens a KV cache holds. ``fetch`` gives
    a private copy holding the longest cached prefix of a prompt (at least one prompt token
    is left to feed); ``store`` keeps a finished request's cache for the next turn."""

    def __init__(self, model, kv_mode: str, max_size: int, max_bytes: Optional[int]):
        self.model, self.kv_mode = model, kv_mode
        self.lru = LRUPromptCache(max_size, max_bytes if max_bytes is not None else 1 << 63)

    def fetch(self, prompt: List[int]):
        """``(cache, cached)``: a cache holding ``prompt[:cached]``."""
        try:
            cache, rest = self.lru.fetch_nearest_cache("model", prompt)
        except ValueError:  # a nested cache or a window cannot rewind that far
            cache = None
        if cache is None:
            return make_cache(self.model, self.kv_mode), 0
        if not rest:  # the whole prompt is cached: feed its last token again
            try:
                trimmed = trim_prompt_cache(cache, 1)
            except ValueError:  # ours cannot go back there
                trimmed = 0
            if trimmed != 1:  # (mlx-lm's wrapped window trims nothing, silently)
                return make_cache(self.model, self.kv_mode), 0
            rest = prompt[-1:]
        return cache, len(prompt) - len(rest)

    def store(self, tokens: List[int], cache):
        """Keep ``cache``; it holds a prefix of ``tokens`` (the prompt and generated text)."""
        held = cache[0].offset
        if not 0 < held <= len(tokens):
            raise RuntimeError(f"cache holds {held} positions, the request {len(tokens)} tokens")
        self.lru.insert_cache("model", tokens[:held], cache)


class Engine:
    """One thread that serves queued jobs one at a time (see the module docstring).

    ``generation`` holds what every request decodes with: ``draft``, ``num_draft_tokens``,
    ``kv_mode`` and mlx-lm's KV-quantization arguments. Totals (requests, emitted tokens,
    model forwards while decoding, of which verifies or plain steps) are kept for ``/health``
    and the load test."""

    def __init__(self, model, tokenizer, *, generation: dict, queue_size: int,
                 prompt_cache_size: int, prompt_cache_bytes: Optional[int]):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.queue_size = queue_size
        self.waiting: "deque[Optional[Job]]" = deque()  # None: stop
        self.ready = threading.Condition()
        self.prompt_cache = PromptCache(model, generation["kv_mode"], prompt_cache_size,
                                        prompt_cache_bytes)
        self.totals = {"requests": 0, "emitted_tokens": 0, "forwards": 0, "verify_forwards": 0}
        self.thread = threading.Thread(target=self._run, name="mlx_qspec-engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Finish the job in hand, then end the thread (queued jobs are dropped)."""
        with self.ready:
            self.waiting.clear()
            self.waiting.append(None)
            self.ready.notify()
        self.thread.join()

    def queued(self) -> int:
        """Jobs waiting whose clients are still there."""
        with self.ready:
            return sum(not job.cancelled.is_set() for job in self.waiting if job)

    def submit(self, job: Job):
        """Queue ``job``, or QueueFull when ``queue_size`` live jobs wait (the cancelled ones
        leave the queue here, not only when the engine reaches them)."""
        with self.ready:
            for gone in [j for j in self.waiting if j and j.cancelled.is_set()]:
                self.waiting.remove(gone)
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"the server is busy: {self.queue_size} requests are queued")
            self.waiting.append(job)
            self.ready.notify()

    def _next(self) -> Optional[Job]:
        with self.ready:
            while not self.waiting:
                self.ready.wait()
            return self.waiting.popleft()

    def _run(self):
        while (job := self._next()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._serve(job)
            except Exception as e:  # a bug: this request fails with it, the server stays up
                log.error("request failed:\n%s", traceback.format_exc())
                job.deliver({"type": "error", "message": f"{type(e).__name__}: {e}"})

    def _logprobs(self, token: int, logprobs: mx.array, top: int) -> dict:
        """OpenAI's logprob entry of one token (and its ``top`` most likely alternatives)."""
        entry = self._entry(token, logprobs[token].item())
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            ids = ids[mx.argsort(-logprobs[ids])].tolist()
            entry["top_logprobs"] = [self._entry(i, v) for i, v in
                                     zip(ids, logprobs[mx.array(ids)].tolist())]
        else:
            entry["top_logprobs"] = []
        return entry

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"id": token, "token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _serve(self, job: Job):
        cache, cached = self.prompt_cache.fetch(job.prompt)
        if job.seed is not None:
            mx.random.seed(job.seed)
        sampler = make_sampler(job.temperature, job.top_p, job.min_p, top_k=job.top_k)
        tokens, stats, finish, stopped = [], None, "length", False
        responses = stream_generate(self.model, self.tokenizer, job.prompt[cached:],
                                    max_tokens=job.max_tokens, sampler=sampler,
                                    prompt_cache=cache, cached_tokens=job.prompt[:cached],
                                    **self.generation)
        try:
            for r in responses:
                if job.cancelled.is_set():
                    return  # the cache goes with the request
                tokens.append(r.token)
                stats = r.stats
                lp = ([self._logprobs(r.token, r.logprobs, job.top_logprobs)] if job.logprobs
                      else None)
                if job.add(r.text, lp):
                    finish, stopped = "stop", True
                    break
                finish = r.finish_reason or finish
        finally:
            responses.close()
        if not stopped:
            job.flush()
        self.prompt_cache.store(job.prompt + tokens, cache)
        forwards = stats.draft_reads.forwards + stats.verify_reads.forwards
        self.totals["forwards"] += forwards
        self.totals["verify_forwards"] += stats.verify_reads.forwards
        self._done(job, tokens, cached, finish, stats.as_dict(), forwards)

    def _done(self, job: Job, tokens: list, cached: int, finish: str, stats: dict, forwards: int):
        """Count the job in the totals and send its last event (``forwards``: those the job
        took part in; the engine counts its forwards itself)."""
        self.totals["requests"] += 1
        self.totals["emitted_tokens"] += len(tokens)
        job.deliver({
            "type": "done",
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": len(job.prompt),
                "completion_tokens": len(tokens),
                "total_tokens": len(job.prompt) + len(tokens),
                "prompt_tokens_details": {"cached_tokens": cached},
            },
            "speculative": {
                **{k: stats[k] for k in ("draft", "num_draft_tokens", "acceptance",
                                         "tokens_per_verify", "drafted", "accepted",
                                         "verify_passes")},
                "forwards": forwards,
            },
        })


class RaggedKVCache:
    """One layer's K/V for a batch of sequences of different lengths, for mlx-lm's attention.

    Row b holds its positions at ``0 .. lengths[b]`` (left-aligned): a forward of N tokens
    writes each row's at its own length, RoPE reads each row's own ``offset``, and the mask
    lets query j of row b see positions ≤ lengths[b] + j only — whatever lies past a row's
    length (rejected drafts, or nothing) is never read. So rewinding a row by its own count
    is ``lengths[b] -= n``: mlx-lm's ``BatchKVCache`` rewinds every row alike."""

    step = 256

    def __init__(self, rows: list):
        """``rows``: one ``(keys, values)`` pair per sequence, each ``(1, heads, L, dim)``, or
        ``(None, None)`` for a sequence with no positions yet."""
        self.lengths = [0 if k is None else k.shape[2] for k, _ in rows]
        self.keys = self.values = None
        some = next(((k, v) for k, v in rows if k is not None), None)
        if some is not None:
            cap = self._capacity(max(self.lengths))
            self.keys = mx.concatenate([self._pad(k, cap, some[0]) for k, _ in rows])
            self.values = mx.concatenate([self._pad(v, cap, some[1]) for _, v in rows])

    @classmethod
    def _capacity(cls, n):
        return (n // cls.step + 1) * cls.step

    @staticmethod
    def _pad(x, cap, like=None):
        """``x`` padded to ``cap`` positions; None: zeros shaped as ``like``."""
        if x is None:
            return mx.zeros((1, like.shape[1], cap, like.shape[3]), like.dtype)
        return mx.pad(x, [(0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)])

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths)

    def row(self, b: int, n: int):
        """Row b's first ``n`` positions as ``(keys, values)``."""
        return self.keys[b:b + 1, :, :n], self.values[b:b + 1, :, :n]

    def trim(self, counts):
        """Rewind row b by ``counts[b]`` positions."""
        self.lengths = [n - c for n, c in zip(self.lengths, counts)]

    def update_and_fetch(self, keys, values):
        B, N = keys.shape[0], keys.shape[2]
        end = max(self.lengths) + N
        if self.keys is None:
            cap = self._capacity(end)
            self.keys = mx.concatenate([self._pad(None, cap, keys)] * B)
            self.values = mx.concatenate([self._pad(None, cap, values)] * B)
        elif end > self.keys.shape[2]:
            cap = self._capacity(end)
            self.keys, self.values = self._pad(self.keys, cap), self._pad(self.values, cap)
        for b, n in enumerate(self.lengths):
            self.keys[b:b + 1, :, n:n + N] = keys[b:b + 1]
            self.values[b:b + 1, :, n:n + N] = values[b:b + 1]
        self.lengths = [n + N for n in self.lengths]
        return self.keys[:, :, :end], self.values[:, :, :end]

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """``(B, 1, N, max length + N)``: query j of row b sees positions ≤ lengths[b] + j."""
        end = max(self.lengths) + N
        query = mx.array(self.lengths)[:, None, None, None] + mx.arange(N)[None, None, :, None]
        return mx.arange(end)[None, None, None, :] <= query


def _trimmed_cache(model, rows: list):
    """An mlx-lm cache (one KVCache per layer) holding the given ``(keys, values)``."""
    cache = make_prompt_cache(model)
    for c, (k, v) in zip(cache, rows):
        c.state = (k, v, k.shape[2])
    return cache


@dataclass
class _Row:
    """A job being decoded in the batch: its tokens so far, where its text stands, the token
    the next step starts from, and its share of the speculative counts."""

    job: Job
    cached: int
    y: int
    detokenizer: Any
    dist: Optional[Any]
    key: Optional[mx.array]
    tokens: List[int] = field(default_factory=list)
    finish: Optional[str] = None
    stopped: bool = False
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    forwards: int = 0

    def split_key(self):
        """A fresh PRNG key for one draw (None: mlx's global generator)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


class BatchEngine(Engine):
    """Continuous batching with self-speculation (see the module docstring): up to
    ``decode_concurrency`` jobs decode together; new ones are prefilled one by one (the same
    chunks and cache as a single request) and join between steps. Greedy output equals
    :class:`Engine`'s token for token wherever the forwards are row-invariant (their row
    for a sequence does not depend on the other rows or on masked positions)."""

    def __init__(self, model, tokenizer, *, decode_concurrency: int, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        g = self.generation
        self.draft = check_draft(model, g["draft"], g["kv_mode"])
        self.gamma = (g["num_draft_tokens"] or DEFAULT_DRAFT_TOKENS) if self.draft else 0
        self.decode_concurrency = decode_concurrency

    def _run(self):
        prepare(self.model)  # here: arrays built on another thread's stream cannot run here
        rows, cache = [], None
        while True:
            joined = []
            with self.ready:
                while not rows and not self.waiting:
                    self.ready.wait()
                while self.waiting and len(rows) + len(joined) < self.decode_concurrency:
                    job = self.waiting.popleft()
                    if job is None:
                        return
                    if not job.cancelled.is_set():
                        joined.append(job)
            kept = [(b, r) for b, r in enumerate(rows) if not r.job.cancelled.is_set()]
            new = []
            for job in joined:
                try:
                    new.append(self._admit(job))
                except Exception as e:  # a bug: this request fails with it, the others go on
                    log.error("request failed:\n%s", traceback.format_exc())
                    job.deliver({"type": "error", "message": f"{type(e).__name__}: {e}"})
            if new or len(kept) < len(rows):
                cache = self._regroup(cache, [b for b, _ in kept], new)
                rows = [r for _, r in kept] + [r for r, _ in new]
            if not rows:
                continue
            try:
                self._step(rows, cache)
            except Exception as e:  # a bug: the jobs in hand fail with it, the server stays up
                log.error("batch step failed:\n%s", traceback.format_exc())
                for r in rows:
                    r.job.deliver({"type": "error", "message": f"{type(e).__name__}: {e}"})
                rows, cache = [], None
                continue
            done = [b for b, r in enumerate(rows) if r.finish]
            for b in done:
                self._retire(rows[b], cache, b)
            if done:
                keep = [b for b in range(len(rows)) if b not in done]
                cache = self._regroup(cache, keep, [])
                rows = [rows[b] for b in keep]

    def _regroup(self, cache, keep: list, new: list):
        """The batch cache with rows ``keep`` of ``cache`` and the new ``(row, layers)``."""
        per_layer = []
        for i in range(len(self.model.layers)):
            old = [cache[i].row(b, cache[i].lengths[b]) for b in keep] if cache else []
            per_layer.append(old + [layers[i] for _, layers in new])
        if not per_layer[0]:
            return None
        cache = [RaggedKVCache(rows) for rows in per_layer]
        mx.eval([(c.keys, c.values) for c in cache if c.keys is not None])
        return cache

    def _admit(self, job: Job):
        """Prefill ``job`` alone (after its cached prefix) and make it a batch row."""
        cache, cached = self.prompt_cache.fetch(job.prompt)
        prompt = mx.array(job.prompt[cached:], mx.uint32)
        with mx.stream(generation_stream):  # in the chunks a single request is prefilled in
            prefill(self.model, prompt[:-1], cache, DEFAULT_PREFILL_STEP_SIZE)
        sampler = make_sampler(job.temperature, job.top_p, job.min_p, top_k=job.top_k)
        dist = resolve_sampler(sampler)
        key = mx.random.key(job.seed) if job.seed is not None and dist is not None else None
        detokenizer = self.tokenizer.detokenizer
        row = _Row(job=job, cached=cached, y=job.prompt[-1], detokenizer=detokenizer,
                   dist=dist, key=key)
        return row, [(c.keys[:, :, :c.offset], c.values[:, :, :c.offset]) if c.offset
                     else (None, None) for c in cache]

    def _forward(self, tokens, cache, at, rows):
        """Log-probs of one forward over every row, read at precision ``at``."""
        with precision.reading(at):
            logits = self.model(tokens, cache=cache)
        self.totals["forwards"] += 1
        self.totals["verify_forwards"] += at is FULL_PRECISION
        for r in rows:
            r.forwards += 1
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _pick(self, lp, rows):
        """One token per row from log-probs ``(B, V)``: argmax, or a draw from the row's
        distribution (returned too: the rejection rule needs it)."""
        if all(r.dist is None for r in rows):
            return mx.argmax(lp, axis=-1), [None] * len(rows)
        toks, qs = [], []
        for b, r in enumerate(rows):
            if r.dist is None:
                toks.append(mx.argmax(lp[b], axis=-1, keepdims=True))
                qs.append(None)
            else:
                q = r.dist.distribution(lp[b:b + 1])
                toks.append(mx.random.categorical(q, key=r.split_key()))
                qs.append(q)
        return mx.concatenate(toks), qs

    def _step(self, rows, cache):
        """One block for every row: k draft forwards, one verify, per-row accept and rewind."""
        with mx.stream(generation_stream):
            k = min(self.gamma, max(r.job.max_tokens - len(r.tokens) for r in rows) - 1)
            k = max(k, 0)
            y = mx.array([[r.y] for r in rows], mx.uint32)
            drafts, qs = [], []
            x = y
            for _ in range(k):
                lp = self._forward(x, cache, self.draft, rows)[:, -1]
                tok, q = self._pick(lp, rows)
                drafts.append(tok.astype(mx.uint32))
                qs.append(q)
                x = drafts[-1][:, None]
            if k:
                mx.eval(drafts)
                for c in cache:
                    c.trim([k] * len(rows))
            inputs = mx.concatenate([y, *[d[:, None] for d in drafts]], axis=1)
            lp = mx.concatenate([
                self._forward(inputs[:, i:i + VERIFY_CHUNK], cache, FULL_PRECISION, rows)
                for i in range(0, k + 1, VERIFY_CHUNK)
            ], axis=1)
            drafts = mx.stack(drafts, axis=1) if k else mx.zeros((len(rows), 0), mx.uint32)
            accepted = [accept(lp[b], drafts[b], [q[b] for q in qs], r.dist, r.split_key)
                        for b, r in enumerate(rows)]
            mx.eval(lp, accepted)
            drafts = drafts.tolist()
            flags = [ok.tolist() for ok, _ in accepted]
            counts = [f.index(False) if False in f else k for f in flags]
            for c in cache:
                c.trim([k - n for n in counts])
            for b, (r, a, n) in enumerate(zip(rows, accepted, counts)):
                r.drafted += k
                r.accepted += n
                r.verify_passes += 1
                out = drafts[b][:n] + [a[1].tolist()[n]]
                r.y = out[-1]
                for i, tok in enumerate(out):
                    if self._emit(r, tok, lp[b, i]):
                        break

    def _emit(self, r: _Row, token: int, logprobs: mx.array) -> bool:
        """Hand one token to the row's job as ``stream_generate`` would; True once done."""
        job = r.job
        r.tokens.append(token)
        lp = [self._logprobs(token, logprobs, job.top_logprobs)] if job.logprobs else None
        eos = token in self.tokenizer.eos_token_ids
        if not eos:
            r.detokenizer.add_token(token)
        if eos or len(r.tokens) == job.max_tokens:
            r.detokenizer.finalize()
            r.finish = "stop" if eos else "length"
        if job.add(r.detokenizer.last_segment, lp):
            r.finish, r.stopped = "stop", True
        return r.finish is not None

    def _retire(self, r: _Row, cache, b: int):
        """Send the job's last text and event; keep its cache (up to what it emitted)."""
        if r.job.cancelled.is_set():
            return
        if not r.stopped:
            r.job.flush()
        tokens = r.job.prompt + r.tokens
        held = min(cache[0].lengths[b], len(tokens))
        self.prompt_cache.store(tokens, _trimmed_cache(self.model, [c.row(b, held) for c in cache]))
        stats = SpecStats(draft=self.draft.name if self.draft else NONE,
                          num_draft_tokens=self.gamma, drafted=r.drafted, accepted=r.accepted,
                          verify_passes=r.verify_passes, emitted=len(r.tokens))
        self._done(r.job, r.tokens, r.cached, r.finish, stats.as_dict(), r.forwards)
