"""The server's engine: requests in, text out, on one thread of its own.

MLX work never runs on the HTTP event loop: the server hands each request to the engine as a
:class:`Job` through a bounded queue and gets its text back through the job's ``deliver``
callback. The engine decodes every request with the decoder (:mod:`mlx_qspec.decoder`) in
rounds: admit what fits, one block for every running request, then up to
``prefill_step_size`` prompt tokens of prefill, a chunk at a time, the prompts taking turns
(mlx-lm's ``BatchGenerator`` interleaves the same way). So a long prompt delays everyone else
by one chunk per round, never by its whole prefill, and one whose client left stops at its
next chunk.

- where the served draft can share a batched forward (one precision level or none, on an fp
  cache of full-attention layers, no ``kv_bits``, no window, no p-min), the requests are the
  rows of one decoder over a :class:`~mlx_qspec.ragged_cache.RaggedKVCache`: every draft
  step and every verify is one forward over all of them, each row with its own length and
  accepted count (up to ``decode_concurrency`` rows; new ones are prefilled alone, in the
  chunks and on the cache a single request gets, and join between steps);
- otherwise (a draft model, a cascade or the lookup, ``auto``, an 8-bit or nested cache,
  sliding windows, recurrent layers, ``kv_bits``) each request is a decoder of its own at
  batch 1 on the model's own caches, and the engine steps them one block each in turn,
  interleaved. (A hybrid's recurrent state rewinds by replay per row, and the ragged batch
  holds attention's K/V only.)

Greedy output is the CLI's token for token either way (the CLI's ``--prefill-step-size``
the same). Both reuse the longest cached prefix of each prompt from mlx-lm's
:class:`LRUPromptCache`.

Whatever one request raises — in its prefill, its block (a forward, a draft, its sampler), its
text — fails that request alone, with a 500 that names its request id (logged with the
traceback): a batched block that raises is run again row by row from where it began, so only
the rows that raise again fail and the others' text is what it would have been. The prompt
cache only ever hands out copies and takes finished requests' caches.
"""
import copy
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import (
    ArraysCache, CacheList, LRUPromptCache, make_prompt_cache, trim_prompt_cache,
)

from . import hooks
from .caches import position, positions, rewind
from .decoder import VERIFY, Decoder, Row, prefill, quantize_kv
from .drafts.auto import AutoPolicy
from .drafts.cascade import DraftModel, build
from .heads.level import heads_available
from .kv_cache import WINDOWS, check_kv_bits, make_cache, make_generation_cache
from .policy import FixedGamma
from .ragged_cache import RaggedKVCache
from .sampling import make_sampler
from .settings import Settings
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
    rid: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:12]}")  # in logs, errors
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

    def __init__(self, model, kv_mode: str, max_size: int, max_bytes: Optional[int],
                 max_kv_size: Optional[int] = None):
        self.model, self.kv_mode, self.max_kv_size = model, kv_mode, max_kv_size
        self.lru = LRUPromptCache(max_size, max_bytes if max_bytes is not None else 1 << 63)

    def fresh(self) -> list:
        """An empty cache of the served kind (a window of ``max_kv_size``: rewindable)."""
        return make_generation_cache(self.model, self.kv_mode, self.max_kv_size)

    def fetch(self, prompt: List[int]):
        """``(cache, cached)``: a cache holding ``prompt[:cached]``."""
        try:
            cache, rest = self.lru.fetch_nearest_cache("model", prompt)
        except ValueError:  # a nested cache or a window cannot rewind that far
            cache = None
        if cache is None:
            return self.fresh(), 0
        if not rest:  # the whole prompt is cached: feed its last token again
            try:
                trimmed = trim_prompt_cache(cache, 1)
            except ValueError:  # ours cannot go back there
                trimmed = 0
            if trimmed != 1:  # (mlx-lm's wrapped window trims nothing, silently)
                return self.fresh(), 0
            rest = prompt[-1:]
        return cache, len(prompt) - len(rest)

    def store(self, tokens: List[int], cache):
        """Keep ``cache``; it holds a prefix of ``tokens`` (the prompt and generated text)."""
        self.lru.insert_cache("model", tokens[:position(cache)], cache)


def _trimmed_cache(model, rows: list):
    """An mlx-lm cache (one KVCache per layer) holding the given ``(keys, values)``."""
    cache = make_prompt_cache(model)
    for c, (k, v) in zip(cache, rows):
        c.state = (k, v, k.shape[2])
    return cache


@dataclass(eq=False)
class _Prefill:
    """A job whose prompt goes into its cache a chunk at a time, between decode steps."""

    job: Job
    cache: list
    cached: int  # prompt tokens the prompt cache held
    done: int  # prompt tokens in the cache so far
    hidden: Optional[list]  # the chunks' final hidden states (levels that read them)

    @property
    def total(self) -> int:
        """Prompt tokens in the cache when decoding starts: all but the last."""
        return len(self.job.prompt) - 1


@dataclass(eq=False)
class _Request:
    """A job being decoded: its decoder row, its tokens so far, where its text stands, and
    at batch 1 its own decoder (on its own cache)."""

    job: Job
    cached: int
    row: Row
    detokenizer: Any
    tokens: List[int] = field(default_factory=list)
    finish: Optional[str] = None
    stopped: bool = False
    failed: bool = False
    decoder: Optional[Decoder] = None


class BatchEngine:
    """One thread that decodes the queued jobs (see the module docstring). ``settings``:
    what every request decodes with but its sampling values (a request's own);
    ``draft_model``: the smaller model of ``--draft-model``; ``draft_head``: the head of
    ``--draft-head``. Totals (requests served and failed, emitted tokens, model forwards while
    decoding and of them verifies, decode steps, prefill chunks and tokens) are kept for
    ``/health`` and the load test; :attr:`progress` says what is running and prefilling."""

    def __init__(self, model, tokenizer, *, settings: Settings, draft_model=None, draft_head=None,
                 decode_concurrency: int = 32, queue_size: int = 64,
                 prompt_cache_size: int = 10, prompt_cache_bytes: Optional[int] = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.decode_concurrency, self.queue_size = decode_concurrency, queue_size
        caches = make_cache(model, settings.kv_mode)  # what the layers can hold, checked now
        check_kv_bits(caches, settings.kv_bits)
        self.draft_model = None if draft_model is None else DraftModel(draft_model)
        d = settings.draft
        self.draft_head = draft_head  # --draft-head: each request drafts with a fresh() copy
        self.cascade = None if d.auto or (d.none and self.draft_model is None) else build(
            model, d, settings.kv_mode, settings.ngram, self.draft_model, draft_head)
        self.keep_hidden = (heads_available(model, draft_head) if d.auto
                            else self.cascade is not None and self.cascade.reads_hidden)
        one = self.cascade is None or (self.cascade.precision is not None
                                       and not self.cascade.precision.skip)
        self.batched = (one and not d.auto and settings.kv_mode == "fp" and not settings.kv_bits
                        and settings.max_kv_size is None and not settings.draft_p_min
                        and not any(isinstance(c, (*WINDOWS, ArraysCache, CacheList))
                                    for c in caches))
        self.prompt_cache = PromptCache(model, settings.kv_mode, prompt_cache_size,
                                        prompt_cache_bytes, settings.max_kv_size)
        self.waiting: "deque[Optional[Job]]" = deque()  # None: stop
        self.ready = threading.Condition()
        # The engine thread's own: requests decoding (in the batch's row order), the batch's
        # decoder (batched mode), prompts being prefilled (round robin).
        self.running: List[_Request] = []
        self.batch: Optional[Decoder] = None
        self.prefilling: "deque[_Prefill]" = deque()
        self.totals = {"requests": 0, "failed": 0, "emitted_tokens": 0, "forwards": 0,
                       "verify_forwards": 0, "decode_steps": 0, "prefill_chunks": 0,
                       "prefill_tokens": 0}
        self.progress = {"running": 0, "prefilling": []}  # replaced whole after each round
        self.thread = threading.Thread(target=self._run, name="mlx_qspec-engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Finish the round in hand, then end the thread (queued jobs are dropped)."""
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

    # ------------------------------------------------------------ the rounds
    def _run(self):
        # Installed here: arrays built on another thread's stream cannot run on this one.
        hooks.install(self.model)
        if self.draft_model is not None:
            hooks.install(self.draft_model.model)
        while True:
            try:
                if not self._round():
                    return
            except Exception as e:
                # A bug in the engine's own bookkeeping, which no one request brought: the
                # requests in hand fail with it, and the engine goes on with the next.
                log.error("the engine's round failed; the requests in hand fail with it",
                          exc_info=e)
                for job in [r.job for r in self.running] + [p.job for p in self.prefilling]:
                    self._fail(job, e)
                self.running, self.batch = [], None
                self.prefilling.clear()

    def _round(self) -> bool:
        """Admit what fits, one block for every running request, a round's worth of prefill
        (see the module docstring). False: stop."""
        joined = self._take()
        if joined is None:
            return False
        for job in joined:
            try:
                self._start(job)
            except Exception as e:
                self._fail(job, e)
        self._leave([r for r in self.running if r.job.cancelled.is_set()])
        if self.running:
            self._decode()
        self._prefill()
        self.progress = {"running": len(self.running), "prefilling": [
            {"id": p.job.rid, "prompt_tokens": len(p.job.prompt), "processed_tokens": p.done}
            for p in self.prefilling]}
        return True

    def _take(self) -> Optional[list]:
        """The jobs to admit now (up to ``decode_concurrency`` running and prefilling), waiting
        while there is nothing to do; None: stop."""
        joined = []
        with self.ready:
            while not (self.running or self.prefilling or self.waiting):
                self.ready.wait()
            room = self.decode_concurrency - len(self.running) - len(self.prefilling)
            while self.waiting and (len(joined) < room or self.waiting[0] is None):
                job = self.waiting.popleft()
                if job is None:
                    return None
                if not job.cancelled.is_set():
                    joined.append(job)
        return joined

    # ------------------------------------------------------------ prefill
    def _start(self, job: Job):
        """``job`` joins the prefill line, on the longest cached prefix of its prompt."""
        cache, cached = self.prompt_cache.fetch(job.prompt)
        hidden = [] if self.keep_hidden else None  # levels that read it (never batched)
        self.prefilling.append(_Prefill(job, cache, cached, cached, hidden))

    def _prefill(self):
        """Up to ``prefill_step_size`` prompt tokens this round, a whole chunk at a time (the
        first always): many short prompts start together, a long one advances a chunk per
        round. The prefills take turns (those fed this round go behind those that waited);
        one whose client left stops here; a finished one starts decoding."""
        fed, step, line, later = 0, self.settings.prefill_step_size, self.prefilling, []
        self.prefilling = deque()
        for p in line:
            if p.job.cancelled.is_set():
                continue
            n = min(step, p.total - p.done)
            if fed and fed + n > step:  # no room left this round
                self.prefilling.append(p)
                continue
            try:
                if n:
                    self._chunk(p, n)
                    fed += n
                if p.done < p.total:
                    later.append(p)
                else:
                    self._join(p)
            except Exception as e:  # this request fails alone; its cache was its own
                self._fail(p.job, e)
        self.prefilling.extend(later)

    def _chunk(self, p: _Prefill, n: int):
        """Feed the next ``n`` prompt tokens (``prefill_step_size`` but for the last chunk):
        the chunks a single request is prefilled in (the CLI's, with the same flag), so the
        cache is the CLI's."""
        with mx.stream(generation_stream):
            prefill(self.model, mx.array(p.job.prompt[p.done:p.done + n], mx.uint32), p.cache,
                    n, lambda: quantize_kv(p.cache, self.settings), p.hidden)
        p.done += n
        self.totals["prefill_chunks"] += 1
        self.totals["prefill_tokens"] += n

    def _join(self, p: _Prefill):
        """A prefilled job starts decoding: a row of the batch, or a decoder of its own."""
        job = p.job
        sampler = make_sampler(job.temperature, job.top_p, job.min_p, top_k=job.top_k)
        row = Row.new(job.prompt[-1], sampler, job.seed, job.max_tokens)
        if p.hidden:
            row.keep_hidden(mx.concatenate(p.hidden, axis=1)[0])
        request = _Request(job, p.cached, row, self.tokenizer.detokenizer)
        if self.batched:
            layers = [(c.keys[:, :, :c.offset], c.values[:, :, :c.offset]) if c.offset
                      else (None, None) for c in p.cache]
            self._reshape(list(range(len(self.running))), [(request, layers)])
            return
        # Its own policy: auto's (chosen on its prefilled cache), or the served draft at a
        # fixed γ (a fresh draft-model cache of its own), or plain.
        s = self.settings
        policy = (AutoPolicy(self.model, p.cache, s.ngram, s.num_draft_tokens,
                             self.draft_head and self.draft_head.fresh()) if s.draft.auto
                  else FixedGamma(self.cascade and self.cascade.fresh(), s.gamma))
        if policy.reads_context:
            row.context = list(job.prompt)
        request.decoder = Decoder(self.model, p.cache, [row], policy, s, keep_hidden=self.keep_hidden)
        self.running.append(request)

    # ------------------------------------------------------------ the batch's shape
    def _reshape(self, keep: list, new: list):
        """The running requests become those at ``keep`` and the ``new`` ``(request, its
        layers' K/V)``; in batched mode the batch's decoder is rebuilt over their K/V."""
        if self.batched:
            self.batch = self._regroup(self.batch, keep, new)
        self.running = [self.running[b] for b in keep] + [r for r, _ in new]

    def _leave(self, gone: list):
        """The requests ``gone`` (finished, failed, or their clients left) stop decoding."""
        if gone:
            self._reshape([b for b, r in enumerate(self.running) if r not in gone], [])

    def _regroup(self, batch: Optional[Decoder], keep: list, new: list) -> Optional[Decoder]:
        """The batch decoder with rows ``keep`` of ``batch`` and the new ``(request, layers)``."""
        per_layer = []
        for i in range(len(self.model.layers)):
            old = [batch.cache[i].row(b, batch.cache[i].lengths[b]) for b in keep] if batch else []
            per_layer.append(old + [layers[i] for _, layers in new])
        if not per_layer[0]:
            return None
        cache = [RaggedKVCache(rows) for rows in per_layer]
        mx.eval([(c.keys, c.values) for c in cache if c.keys is not None])
        rows = ([batch.rows[b] for b in keep] if batch else []) + [r.row for r, _ in new]
        return Decoder(self.model, cache, rows, FixedGamma(self.cascade, self.settings.gamma),
                       self.settings)

    # ------------------------------------------------------------ decode
    def _decode(self):
        """One block for every running request (the batch's, then each batch-1 decoder's in
        turn), then their text; a request whose block or text raises fails alone. The
        finished are answered and leave."""
        with mx.stream(generation_stream):
            outs = self._batch_block() if self.batch is not None else []
            for r in self.running:
                if r.decoder is not None:
                    try:
                        outs.append((r, self._counted(r.decoder)[0]))
                    except Exception as e:  # its cache is its own: dropped with it
                        self._fail_request(r, e)
            for r, out in outs:
                try:
                    self._emit(r, out)
                except Exception as e:
                    self._fail_request(r, e)
        self.totals["decode_steps"] += 1
        done = [r for r in self.running if r.finish or r.failed]
        for r in done:
            if not r.failed:
                try:
                    self._retire(r)
                except Exception as e:
                    self._fail(r.job, e)
        self._leave(done)

    def _batch_block(self) -> list:
        """One block over the batch: ``[(request, what it emits)]``. Should it raise, every
        row is put back as it stood and tries the block alone (:meth:`_isolate`), so a fault
        that one request brings (its sampler, its tokens in a forward) fails that request
        only, and one that passes leaves everyone's text as it would have been."""
        batch = self.batch
        lengths, saved = positions(batch.cache), [copy.copy(row) for row in batch.rows]
        try:
            return list(zip(self.running, self._counted(batch)))
        except Exception:
            log.warning("a batched block over %d requests failed; each tries it alone",
                        len(self.running), exc_info=True)
        for row, was in zip(batch.rows, saved):  # its key, token and budget before the block
            vars(row).update(vars(was))
        rewind(batch.cache, lengths)
        return self._isolate(lengths)

    def _isolate(self, lengths: list) -> list:
        """The block again for each of the batch's rows alone, on a copy of its K/V (the
        positions before the block, which a block never writes): a row whose block raises
        again fails, the others emit what their block gave and are batched again."""
        outs, alone = [], []
        for b, r in enumerate(self.running):
            try:
                layers = [c.row(b, lengths[b]) for c in self.batch.cache]
                mx.eval(layers)
                single = Decoder(self.model, [RaggedKVCache([kv]) for kv in layers], [r.row],
                                 FixedGamma(self.cascade, self.settings.gamma), self.settings)
                outs.append((r, self._counted(single)[0]))
                alone.append((r, [c.row(0, c.lengths[0]) for c in single.cache]))
            except Exception as e:
                self._fail_request(r, e)
        self.running, self.batch = [], None
        self._reshape([], alone)
        return outs

    def _counted(self, decoder: Decoder) -> list:
        """``decoder.step()``, its model forwards added to the totals."""
        before = dict(decoder.forwards)
        out = decoder.step()
        self.totals["forwards"] += sum(decoder.forwards.values()) - sum(before.values())
        self.totals["verify_forwards"] += decoder.forwards[VERIFY] - before[VERIFY]
        return out

    def _fail_request(self, r: _Request, error: Exception):
        r.failed = True
        self._fail(r.job, error)

    def _fail(self, job: Job, error: Exception):
        """``job`` fails alone: logged with its request id and answered with a 500 that names
        it (the log has the traceback; the client gets the kind of error)."""
        self.totals["failed"] += 1
        log.error("request %s failed", job.rid, exc_info=error)
        try:
            job.deliver({"type": "error", "message": f"the server failed on this request "
                         f"({type(error).__name__}); request id {job.rid}"})
        except Exception:  # nobody to tell
            log.exception("request %s: its error could not be delivered", job.rid)

    # ------------------------------------------------------------ text out
    def _emit(self, r: _Request, out: list):
        """Hand a block's ``(token, logprobs, from_draft)`` to the request's job one token at
        a time, as ``stream_generate`` would, until it is done."""
        job = r.job
        for token, logprobs, _ in out:
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
            if r.finish is not None:
                return

    def _retire(self, r: _Request):
        """Send the job's last text and event, the job counted in the totals; keep its cache
        (up to what it emitted)."""
        job = r.job
        if job.cancelled.is_set():
            return
        if not r.stopped:
            job.flush()
        tokens = job.prompt + r.tokens
        if r.decoder is None:
            b = self.running.index(r)
            held = min(self.batch.cache[0].lengths[b], len(tokens))
            self.prompt_cache.store(tokens, _trimmed_cache(
                self.model, [c.row(b, held) for c in self.batch.cache]))
        else:
            r.decoder.close()  # auto stores what it measured
            cache = r.decoder.cache
            try:
                rewind(cache, min(position(cache), len(tokens)))
                self.prompt_cache.store(tokens, cache)
            except ValueError:  # a nested cache cannot go back that far: not kept
                pass
        stats, n = r.row.stats, len(r.tokens)
        stats.emitted = n
        self.totals["requests"] += 1
        self.totals["emitted_tokens"] += n
        job.deliver({
            "type": "done",
            "finish_reason": r.finish,
            "usage": {
                "prompt_tokens": len(job.prompt),
                "completion_tokens": n,
                "total_tokens": len(job.prompt) + n,
                "prompt_tokens_details": {"cached_tokens": r.cached},
            },
            "speculative": {
                **{k: getattr(stats, k) for k in ("draft", "num_draft_tokens", "acceptance",
                                                  "tokens_per_verify", "drafted", "accepted",
                                                  "verify_passes")},
                "forwards": stats.forwards,  # those the job took part in
            },
        })

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
