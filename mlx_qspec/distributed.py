"""Speculation over several machines: one process per Mac started by ``mlx.launch``, joined
by ``mx.distributed`` and sharded by mlx-lm's ``sharded_load`` (tensor parallel where the
model has ``shard``, pipeline where ``model.model.pipeline`` exists).

Every rank runs the same loop on the same tokens, and each decides accept/reject itself:
the decisions agree because every rank computes the same logits bit for bit. A pipeline's
last stage hands its hidden state to all ranks (``all_gather``: copied bytes), and a tensor-
parallel layer's partial sums are gathered and added in rank order on every rank
(:class:`~mlx_qspec.quant.linear.QSpecShardedToAllLinear`), so norm, head and argmax see
identical inputs everywhere — in a verify row as in a plain step — and run the same kernels
(as mlx-lm's own sharded generation assumes: Macs of one chip family, one MLX version).
Draws at temperature > 0 agree because every rank draws from the same key (:func:`same_seed`:
rank 0's seed, passed to the generation) and makes the same draws.

What speculation saves here: a forward pays its collectives (per layer, or per stage) once
for all its rows, so the verify of γ+1 tokens pays them once. A draft forward through the
sharded model pays them too, so only drafts that skip that forward (``ngram``) or part of
it (skipped layers) lower the calls per token (:func:`collective_fields`).
"""

import os
import signal
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model, sharded_load

from . import hooks, precision
from .errors import ModelError, UserError
from .loader import ROTATED_PREFIX, cast_floats, default_dtype, read_config, resolve

DEFAULT_CONNECT_TIMEOUT = 60.0  # seconds for every rank to reach the others


class DistributedError(UserError):
    """The ranks cannot run together: unreachable, or a model they cannot share."""


def group() -> mx.distributed.Group:
    """The group of every rank ``mlx.launch`` started (size 1 when run alone); call
    :func:`connect` first, which bounds the wait for the others."""
    return mx.distributed.init()


def launched_rank() -> int:
    """This process's rank as the launcher set it, readable before (or without) a group."""
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def is_main() -> bool:
    """Rank 0: the one rank that prints."""
    return launched_rank() == 0


def connect(timeout: float = DEFAULT_CONNECT_TIMEOUT) -> mx.distributed.Group:
    """Join the ranks ``mlx.launch`` started and wait until every one answers, or raise
    DistributedError after ``timeout`` seconds (from the main thread only).

    MLX's ring backend waits for a missing peer without end: an alarm interrupts that wait
    (its handler does nothing; the interrupted wait fails). A rank still retrying its
    connect gives up by itself after about 31 s."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    deadline = time.monotonic() + timeout
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        g = mx.distributed.init()
        if g.size() > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1), group=g, stream=mx.cpu))
        return g
    except RuntimeError as e:
        late = time.monotonic() >= deadline
        why = f"no answer within {timeout:g} s" if late else str(e)
        raise DistributedError(
            f"rank {launched_rank()} cannot reach the other ranks ({why}); check the hosts "
            "given to mlx.launch, that every one runs it, and that their ports are open"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def from_rank0(x: mx.array, g: mx.distributed.Group | None = None) -> mx.array:
    """Rank 0's ``x`` on every rank: a sum of it and zeros, so its exact bits."""
    g = g or group()
    return mx.distributed.all_sum(x if g.rank() == 0 else mx.zeros_like(x), group=g,
                                  stream=mx.cpu)


def same_seed(seed: int | None) -> int:
    """The seed every rank generates with: ``seed``, or rank 0's clock when there is none.
    Passed to the generation (its draws' key), it makes drafts, accept draws and samples at
    temperature > 0 match on every rank."""
    if seed is None:
        seed = from_rank0(mx.array(time.time_ns() % 2**31, mx.int32)).item()
    return seed


# ---------------------------------------------------------------- loading


def check_shardable(model: nn.Module, config: dict, size: int, pipeline: bool) -> None:
    """What mlx-lm's sharding would get wrong or fail on deep inside, as one line before
    any weight is read: no such sharding, or heads / layers a group of ``size`` does not
    divide (mlx-lm's ``shard`` would split a head's features across ranks silently)."""
    kind = config.get("model_type", type(model).__name__)
    can_pipe = hasattr(model, "model") and hasattr(model.model, "pipeline")
    can_split = hasattr(model, "shard")
    if not (can_pipe or can_split):
        raise DistributedError(f"model type '{kind}' supports neither tensor-parallel nor "
                               "pipeline sharding in mlx-lm; run it on one machine")
    if pipeline and not can_pipe:
        raise DistributedError(f"model type '{kind}' has no pipeline sharding in mlx-lm; "
                               "leave out --pipeline (tensor parallel)")
    if not pipeline and not can_split:
        raise DistributedError(f"model type '{kind}' has no tensor-parallel sharding in "
                               "mlx-lm; pass --pipeline")
    if pipeline:
        layers = len(model.model.layers)
        if layers < size:
            raise DistributedError(f"{layers} layers cannot be split into {size} pipeline "
                                   f"stages; use at most {layers} ranks")
        return
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if heads and (heads % size or kv_heads % size):
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        hint = f"use {' or '.join(map(str, fits))} ranks" if fits else "use one machine"
        raise DistributedError(
            f"{size} ranks do not divide the model's {heads} query and {kv_heads} key/value "
            f"heads for tensor parallelism; {hint}, or pass --pipeline")


def load_sharded(path_or_repo, pipeline: bool = False, *, dtype="auto",
                 revision: str | None = None, tokenizer_config: dict | None = None,
                 trust_remote_code: bool = False):
    """``(model, tokenizer)`` with this rank's shard, through mlx-lm's ``sharded_load``
    (an mlx directory or hub id; a GGUF file must be converted first). Other arguments as
    :func:`mlx_qspec.loader.load`: float32 on the CPU backend, stored dtype on Metal."""
    g = group()
    path = resolve(str(path_or_repo), revision)
    if path.is_file():
        raise ModelError(f"'{path}': a GGUF file cannot be sharded across machines; convert "
                         f"it first with `python -m mlx_qspec.convert --model {path} "
                         "--mlx-path <dir>` and pass that directory")
    config = read_config(path)
    if config["model_type"].startswith(ROTATED_PREFIX):  # its online Hadamards span a layer
        raise DistributedError("a rotated model (convert --rotate) cannot be sharded across "
                               "machines; convert it without --rotate")
    try:
        lazy_model, _ = load_model(path, lazy=True, strict=False,
                                   trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: cannot load the model: {e}") from None
    check_shardable(lazy_model, config, g.size(), pipeline)
    del lazy_model
    try:
        model, tokenizer = sharded_load(
            str(path), g if pipeline else None, None if pipeline else g,
            # explicit: given nothing, sharded_load would trust the tokenizer's remote code
            tokenizer_config={"trust_remote_code": trust_remote_code, **(tokenizer_config or {})},
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot shard the model over {g.size()} ranks: {e}") from None
    cast_floats(model, default_dtype() if dtype == "auto" else dtype)
    mx.eval(model.parameters())
    # QSpec layers now: the sharded linears are then the quantized linears that draft
    # names are checked against (mlx's sharded classes do not subclass QuantizedLinear)
    return hooks.install(model), tokenizer


# ---------------------------------------------------------------- counting collectives


@dataclass
class CollectiveCounter:
    """Collective calls made while it was open, by the precision of the forward that made
    them (``verify`` for full precision, else the draft's name)."""

    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


_active: ContextVar[CollectiveCounter | None] = ContextVar("mlx_qspec_collectives",
                                                          default=None)


def _count_call() -> None:
    counter = _active.get()
    if counter is not None:
        name = precision.current().name
        counter.calls[name] = counter.calls.get(name, 0) + 1


@contextmanager
def counting(counter: CollectiveCounter):
    """Count into ``counter`` the collectives of the graphs built inside the block."""
    hooks.install_collective_counting(_count_call)
    token = _active.set(counter)
    try:
        yield counter
    finally:
        _active.reset(token)


def collectives_per_forward(model: nn.Module) -> int:
    """Collective calls this rank makes in one forward, counted on a one-token forward with
    a throwaway cache: every forward of a sharded model makes the same calls, whatever its
    row count or precision. A collective itself, so every rank must call it."""
    counter = CollectiveCounter()
    with counting(counter):
        mx.eval(model(mx.zeros((1, 1), mx.uint32), cache=make_prompt_cache(model)))
    return counter.total


def collective_fields(stats, counter: CollectiveCounter, per_forward: int) -> dict:
    """``--verbose`` fields: the rank count and collective calls per emitted token — as
    counted over the generation (prefill, ``auto``'s timing, drafts, verifies), and as
    plain decoding pays them (one forward per token). ``stats``: the run's SpecStats."""
    return {
        "ranks": group().size(),
        "collectives_per_forward": per_forward,
        "collectives_per_token": f"{counter.total / max(stats.emitted, 1):.2f}",
        "plain_collectives_per_token": per_forward,
    }
