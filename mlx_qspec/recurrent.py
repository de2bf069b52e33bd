"""Rewindable recurrent state, so hybrid models (Qwen3.5 / Qwen3-Next, LFM2, Mamba-2,
Nemotron-H, Granite 4, Falcon-H1, …) speculate like attention-only ones.

mlx-lm keeps a recurrent layer's state in an ``ArraysCache``: slots each forward overwrites
(a short convolution's last K − 1 inputs, a recurrence's state), with no way back. A
speculative block must end on the state plain decoding has after exactly the accepted
tokens. :class:`RecurrentCache` gets there by *replay*: it keeps its slots as they were at
the last :meth:`~RecurrentCache.commit` and, for every position since, what the layer's
convolutions and recurrence took in (the convolution's input rows; the recurrence's
per-position inputs: q, k, v and gates, or x, B, C and dt). ``trim(n)`` rebuilds the slots
from them: a convolution state is a slice of the kept rows, a recurrence state the
recurrence re-run over the kept positions from the kept state (it reads the state twice
and no weights). Why replay and not a state per position: ``scripts/bench_rewind.py``.

Exact by construction, on Metal too: a block of up to ``BLOCK_ROWS`` positions (a verify,
and a short prompt chunk in plain decoding alike) computes each position with the
arithmetic of a one-token step, so the state after its i-th position is plain decoding's:
- a depthwise short convolution runs as :class:`ShiftedConv1d`, an explicit sum of shifted
  products: elementwise, so each output row is the same arithmetic whatever the number of
  rows (mlx's ``conv1d`` picks its algorithm by shape);
- the gated-delta recurrence (mlx-lm's Metal kernels and its ops fallback alike) loops over
  the positions inside one call, carrying the state in float32 exactly as it stores it
  between one-token calls: a T-token call is T one-token calls, so it runs as mlx-lm's;
- Mamba-2's SSD (``ssm_update``) computes a multi-token block in a chunked parallel form
  unlike its one-token step, so such blocks run as one-token steps of mlx-lm's own function.

:func:`install` puts these in a model (and :func:`uninstall` takes them out): the model's
convolutions swapped, its recurrent mixers made to record into a :class:`RecurrentCache`
they are given, the recurrence functions of their mlx-lm modules wrapped. With mlx-lm's own
``ArraysCache`` (plain decoding) nothing is recorded; the arithmetic is the same.
"""

import inspect
import sys
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, CacheList, make_prompt_cache

from . import reads, store
from .errors import UserError
from .kernels import MAX_M

# The most positions a verify forward has (the loop cuts longer blocks, kernels.MAX_M): a
# forward of up to this many is computed one-token-step exact and can be rewound into; a
# longer one (a prompt chunk) keeps no replay inputs, and the cache commits after it. So does
# a cache this many positions past its last commit (plain decoding through mlx-lm's
# generate_step never commits).
BLOCK_ROWS = MAX_M
AUTO_COMMIT = 8 * BLOCK_ROWS
GATED_DELTA, SSM = "gated_delta_update", "ssm_update"


@dataclass(frozen=True)
class Mixer:
    """Where a recurrent mixer of mlx-lm keeps what: each depthwise convolution (its path in
    the mixer) → the cache slot of its state, and the slot of the recurrence's state (None:
    convolutions only), advanced by its module's ``recurrence`` function."""

    convs: dict = field(default_factory=dict)
    state: int | None = None
    recurrence: str | None = None


_MAMBA2 = Mixer({"conv1d": 0}, 1, SSM)
_GATED_DELTA = Mixer({"conv1d": 0}, 1, GATED_DELTA)
_GATED_DELTA_QKV = Mixer({"q_conv1d": 0, "k_conv1d": 1, "v_conv1d": 2}, 3, GATED_DELTA)
# mlx-lm 0.32's mixers that keep state in an ArraysCache and whose state this module rewinds,
# by (module, class). Others (mamba, jamba, rwkv7, recurrent_gemma, …) advance their state in
# code of their own: :func:`unsupported` names them and speculation is refused.
MIXERS = {
    ("mlx_lm.models.qwen3_next", "Qwen3NextGatedDeltaNet"): _GATED_DELTA,
    ("mlx_lm.models.qwen3_5", "GatedDeltaNet"): _GATED_DELTA,
    ("mlx_lm.models.olmo_hybrid", "GatedDeltaNet"): _GATED_DELTA_QKV,
    ("mlx_lm.models.kimi_linear", "KimiDeltaAttention"): Mixer(
        {"q_conv.conv": 0, "k_conv.conv": 1, "v_conv.conv": 2}, 3, GATED_DELTA),
    ("mlx_lm.models.lfm2", "ShortConv"): Mixer({"conv": 0}),
    ("mlx_lm.models.lfm2_moe", "ShortConv"): Mixer({"conv": 0}),
    ("mlx_lm.models.mamba2", "Mamba2Block"): _MAMBA2,
    ("mlx_lm.models.nemotron_h", "NemotronHMamba2Mixer"): _MAMBA2,
    ("mlx_lm.models.granitemoehybrid", "GraniteMoeHybridMamba2Mixer"): _MAMBA2,
    ("mlx_lm.models.falcon_h1", "FalconH1Mixer"): _MAMBA2,
    ("mlx_lm.models.plamo2", "Mamba"): _MAMBA2,
}

# Inside a prepared mixer's call: whether (the wrapped recurrences act only there, so other
# models of the same mlx-lm module run as mlx-lm's), and the cache it records into, if any.
_inside: ContextVar[bool] = ContextVar("mlx_qspec_recurrent_mixer", default=False)
_recording: ContextVar["RecurrentCache | None"] = ContextVar("mlx_qspec_recurrent", default=None)


def _count_state(*arrays):
    """Recurrent state read or written: float32 on a Mac as here, so counted as stored."""
    reads.count(reads.STATE, *arrays, as_stored=True)


class _Segment:
    """What one forward of ``length`` positions fed a layer: each convolution's input rows
    (its K − 1 state rows, then one per position) and the recurrence's per-position inputs."""

    def __init__(self, length: int):
        self.length = length
        self.convs: dict[int, mx.array] = {}
        self.inputs: tuple | None = None
        self.replay = None

    def cut(self, n: int) -> "_Segment":
        """The first ``n`` positions of this segment."""
        out = _Segment(n)
        out.convs = {s: x[:, : x.shape[1] - self.length + n] for s, x in self.convs.items()}
        out.inputs = None if self.inputs is None else tuple(
            None if a is None else a[:, :n] for a in self.inputs)
        out.replay = self.replay
        return out


def _cat(parts):
    """Concatenate along positions (axis 1); None stays None (an absent mask)."""
    return None if parts[0] is None else mx.concatenate(parts, axis=1)


class RecurrentCache(ArraysCache):
    """mlx-lm's ``ArraysCache`` that can be rewound to any position since its last
    :meth:`commit` (the speculative loop commits after each settled block and prompt chunk).

    It counts positions (``offset``), keeps its slots as of the last commit and, for each
    forward since, the inputs of the layer's convolutions and recurrence (recorded by the
    mixer :func:`install` prepares); ``trim(n)`` replays them up to the new end. A forward
    of more than ``BLOCK_ROWS`` positions keeps nothing and commits after it, as does a
    cache ``AUTO_COMMIT`` positions past its last commit.
    """

    def __init__(self, size: int, left_padding=None):
        super().__init__(size, left_padding)
        self.offset = 0
        self._open = self._mixer = None
        self._settle()

    def commit(self):
        """The state as it stands is settled: once the next forward starts, trims go back to
        here and no further. Until then the replay inputs since the commit before are kept, so
        a consumer that stops inside a settled block (the decoder commits as the block
        settles, before handing out its tokens) can still take back what it did not use."""
        self._committed = True

    def _settle(self):
        """Drop the replay inputs: the slots as they stand are the new rewind point."""
        self._base, self._base_offset, self._segments = list(self.cache), self.offset, []
        self._committed = False

    def is_trimmable(self):
        return True

    @property
    def rewindable(self) -> int:
        """Positions ``trim`` can take back now."""
        return self.offset - self._base_offset

    # -- recording (called by the prepared mixer and the operations under it)
    def _begin(self, mixer: Mixer, length: int):
        if self._committed or self.rewindable > AUTO_COMMIT:
            self._settle()
        self._mixer = mixer
        self._open = _Segment(length)

    def _record_conv(self, slot: int, padded: mx.array):
        if self._open is not None:
            self._open.convs[slot] = padded

    def _record_recurrence(self, replay, inputs: tuple):
        if self._open is not None:
            self._open.replay, self._open.inputs = replay, inputs

    def _end(self, length: int):
        seg, self._open = self._open, None
        self.offset += length
        if length > BLOCK_ROWS or self.lengths is not None:
            self._settle()  # a prompt chunk, or ragged rows: no going back past it
            return
        if set(seg.convs) != set(self._mixer.convs.values()) or (
                seg.inputs is None) != (self._mixer.state is None):
            raise RuntimeError(f"a recurrent mixer wrote state it did not record ({self._mixer}): "
                               "mlx-lm's mixer differs from what mlx_qspec.recurrent expects")
        self._segments.append(seg)

    # -- rewinding
    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n <= 0:
            return 0
        if n > self.rewindable:
            raise ValueError(
                f"cannot trim {n} positions of a recurrent state: it rewinds only to its last "
                f"commit, {self.rewindable} positions back"
            )
        self._rewind_to(self.offset - n - self._base_offset)
        self.offset -= n
        return n

    def _rewind_to(self, m: int):
        """Slots as they were ``m`` positions after the last commit, by replay."""
        kept, left = [], m
        for seg in self._segments:
            if left == 0:
                break
            kept.append(seg if seg.length <= left else seg.cut(left))
            left -= kept[-1].length
        self._segments = kept
        self.cache = list(self._base)
        if m == 0:
            return
        for slot in self._mixer.convs.values():
            first = kept[0].convs[slot]
            keep = first.shape[1] - kept[0].length  # K − 1
            rows = _cat([first] + [s.convs[slot][:, keep:] for s in kept[1:]])
            self.cache[slot] = rows[:, m : m + keep]
            reads.count(reads.STATE, self.cache[slot])
        if self._mixer.state is not None:
            inputs = [_cat(parts) for parts in zip(*(s.inputs for s in kept))]
            before = self._base[self._mixer.state]
            self.cache[self._mixer.state] = kept[0].replay(before, *inputs)


class RecurrentCacheList(CacheList):
    """mlx-lm's ``CacheList`` (Falcon-H1: a mixer's state beside attention's KV in one
    layer) with the rewind protocol: offset, commit and trim through its caches."""

    @property
    def offset(self) -> int:
        return next(c.offset for c in self.caches if hasattr(c, "offset"))

    def commit(self):
        for c in self.caches:
            if hasattr(c, "commit"):
                c.commit()


# ---------------------------------------------------------------- exact operations
class ShiftedConv1d(nn.Module):
    """A depthwise ``nn.Conv1d`` (no padding, stride 1) as an explicit sum of shifted
    products, ``y[t] = Σ_j x[t + j] · w[j] (+ bias)`` added in ``j`` order in float32: every
    output row is the same elementwise arithmetic however many rows there are, so a T-token
    block and T one-token steps agree bit for bit. Records its input (the state rows, then the
    new ones) into the cache being written, as the state of ``slot``."""

    def __init__(self, conv: nn.Conv1d, slot: int):
        super().__init__()
        C, K, per_group = conv.weight.shape
        if per_group != 1 or conv.groups != C or conv.padding or conv.stride != 1 or conv.dilation != 1:
            raise ValueError(f"not a depthwise short convolution: {conv}")
        self.weight = conv.weight
        if "bias" in conv:
            self.bias = conv.bias
        self.slot = slot

    def as_conv1d(self) -> nn.Conv1d:
        """mlx's layer with these weights."""
        C, K, _ = self.weight.shape
        conv = nn.Conv1d(C, C, K, groups=C, bias="bias" in self)
        conv.update(self.parameters())
        return conv

    def __call__(self, x: mx.array) -> mx.array:
        cache = _recording.get()
        if cache is not None:
            cache._record_conv(self.slot, x)
        w = self.weight[:, :, 0]  # (C, K)
        K = w.shape[1]
        T = x.shape[1] - K + 1
        reads.count(reads.WEIGHTS, self.weight, self.get("bias"))
        reads.count(reads.STATE, x[:, : K - 1], x[:, T:])  # the state read, the state written
        dtype = mx.result_type(x, w)
        xf, wf = x.astype(mx.float32), w.astype(mx.float32)  # summed in float32
        y = xf[:, :T] * wf[:, 0]
        for j in range(1, K):
            y = y + xf[:, j : j + T] * wf[:, j]
        y = y.astype(dtype)
        return y + self["bias"] if "bias" in self else y


# The per-position inputs a recurrence's replay takes again, by their names in mlx-lm.
_DELTA_INPUTS = ("q", "k", "v", "a", "b", "mask")
_SSM_INPUTS = ("hidden_states", "B", "C", "dt", "mask")


def _arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """A call's arguments by name, defaults filled in (mlx-lm passes them by position)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _gated_delta(original):
    """mlx-lm's ``gated_delta_update`` (a T-token call is T one-token calls already, see the
    module docstring), recording its per-position inputs and counting its state traffic."""
    signature = inspect.signature(original)

    def gated_delta_update(*args, **kwargs):
        y, new = original(*args, **kwargs)
        if not _inside.get():
            return y, new
        given = _arguments(signature, args, kwargs)
        _count_state(given["state"], new)
        cache = _recording.get()
        if cache is not None:
            def replay(state, q, k, v, a, b, mask):
                new = original(**{**given, "q": q, "k": k, "v": v, "a": a, "b": b,
                                  "state": state, "mask": mask})[1]
                _count_state(state, new)
                return new

            cache._record_recurrence(replay, tuple(given[n] for n in _DELTA_INPUTS))
        return y, new

    gated_delta_update.original = original
    return gated_delta_update


def _ssm_steps(original, given: dict, state):
    """``ssm_update`` over the call ``given`` (by name) as one-token steps from ``state``:
    ``(y, state after its last position)``; each step reads and writes the state."""
    x, B, C, dt, mask = (given[n] for n in _SSM_INPUTS)
    ys = []
    for t in range(x.shape[1]):
        one = slice(t, t + 1)
        y, new = original(**{**given, "hidden_states": x[:, one], "B": B[:, one], "C": C[:, one],
                             "dt": dt[:, one], "state": state, "lengths": None,
                             "mask": None if mask is None else mask[:, one]})
        _count_state(state, new)
        ys.append(y)
        state = new
    return mx.concatenate(ys, axis=1), state


def _ssm(original):
    """mlx-lm's ``ssm_update`` with blocks of 2..BLOCK_ROWS positions run as one-token
    steps of itself (its multi-token form is SSD's parallel one, other arithmetic), recording
    its per-position inputs and counting its state traffic (each step reads and writes it)."""
    signature = inspect.signature(original)

    def ssm_update(*args, **kwargs):
        if not _inside.get():
            return original(*args, **kwargs)
        given = _arguments(signature, args, kwargs)
        if given["lengths"] is None and given["hidden_states"].shape[1] <= BLOCK_ROWS:
            y, new = _ssm_steps(original, given, given["state"])
        else:
            y, new = original(**given)
            _count_state(given["state"], new)
        cache = _recording.get()
        if cache is not None:
            def replay(state, x, B, C, dt, mask):
                block = {**given, "hidden_states": x, "B": B, "C": C, "dt": dt, "mask": mask}
                return _ssm_steps(original, block, state)[1]

            cache._record_recurrence(replay, tuple(given[n] for n in _SSM_INPUTS))
        return y, new

    ssm_update.original = original
    return ssm_update


_WRAPPERS = {GATED_DELTA: _gated_delta, SSM: _ssm}


# ---------------------------------------------------------------- install / uninstall
_recording_classes: dict[type, type] = {}


def _recording_class(cls: type, mixer: Mixer) -> type:
    """A subclass of a mixer class whose call, given a :class:`RecurrentCache`, records into
    it and advances its offset by the positions of the call's input (B, T, D)."""
    if cls not in _recording_classes:
        def __call__(self, *args, **kwargs):
            values = (*args, *kwargs.values())
            cache = next((a for a in values if isinstance(a, RecurrentCache)), None)
            length = next(a for a in values if isinstance(a, mx.array)).shape[1]
            if cache is not None:
                cache._begin(mixer, length)
            tokens = _inside.set(True), _recording.set(cache)
            try:
                out = cls.__call__(self, *args, **kwargs)
            finally:
                _inside.reset(tokens[0])
                _recording.reset(tokens[1])
            if cache is not None:
                cache._end(length)
            return out

        _recording_classes[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _recording_classes[cls]


def _mlx_lm_class(module: nn.Module) -> type:
    """The mlx-lm class of a module, prepared or not."""
    cls = type(module)
    return cls.__bases__[0] if cls in _recording_classes.values() else cls


def _spec(module: nn.Module) -> Mixer | None:
    cls = _mlx_lm_class(module)
    return MIXERS.get((cls.__module__, cls.__name__))


def mixers(model: nn.Module) -> list[tuple[nn.Module, Mixer]]:
    """``(mixer, where it keeps what)`` for every recurrent mixer of ``model`` this module
    rewinds."""
    return [(m, spec) for _, m in model.named_modules() if (spec := _spec(m)) is not None]


def unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s recurrent state cannot be rewound (it has more recurrent layers than
    mixers listed in :data:`MIXERS`), or None: a one-line reason for a refusal. Worked out once
    per loaded model (asked for at every cache made, on the server's engine thread too)."""
    return store.per_model(model, "unsupported", lambda: _unsupported(model))


def _unsupported(model: nn.Module) -> str | None:
    def recurrent(c):
        return isinstance(c, ArraysCache) or (isinstance(c, CacheList) and any(map(recurrent, c.caches)))

    layers = sum(map(recurrent, make_prompt_cache(model)))
    if layers and layers != len(mixers(model)):
        kind = type(model).__module__.rsplit(".", 1)[-1]
        known = sorted({module.rsplit(".", 1)[-1] for module, _ in MIXERS})
        return (f"this model ({kind}) keeps recurrent state mlx_qspec cannot rewind "
                f"(it rewinds {', '.join(known)})")
    return None


def check_conversational(model: nn.Module, command: str) -> None:
    """A chat or a server keeps each conversation's position in its cache list: a UserError
    (one line, what runs the model instead) where no cache counts positions — a model whose
    only state is recurrent and not rewindable here (Mamba 1, RWKV-7)."""
    why = unsupported(model)
    if why and not any(hasattr(c, "offset") for c in make_prompt_cache(model)):
        raise UserError(f"{command} cannot run it: {why}, and no attention layer that counts "
                        "a conversation's positions (python -m mlx_qspec.generate runs it plainly)")


def _convs(mixer: nn.Module, spec: Mixer):
    """``(owner, attribute name, module, slot)`` for each convolution of a mixer."""
    for path, slot in spec.convs.items():
        *parents, name = path.split(".")
        owner = mixer
        for p in parents:
            owner = getattr(owner, p)
        yield owner, name, getattr(owner, name), slot


_prepared: dict[str, list] = {}  # mlx-lm module → weak references to its prepared mixers


def install(model: nn.Module) -> nn.Module:
    """Prepare ``model``'s recurrent mixers (idempotent): exact convolutions, calls that
    record into a :class:`RecurrentCache`, and the recurrence functions of their mlx-lm
    modules wrapped."""
    for mixer, spec in mixers(model):
        for owner, name, conv, slot in _convs(mixer, spec):
            if not isinstance(conv, ShiftedConv1d):
                setattr(owner, name, ShiftedConv1d(conv, slot))
        cls = _mlx_lm_class(mixer)
        mixer.__class__ = _recording_class(cls, spec)
        refs = _prepared.setdefault(cls.__module__, [])
        if not any(r() is mixer for r in refs):
            refs.append(weakref.ref(mixer))
        module = sys.modules[cls.__module__]
        fn = getattr(module, spec.recurrence) if spec.recurrence else None
        if fn is not None and not hasattr(fn, "original"):
            setattr(module, spec.recurrence, _WRAPPERS[spec.recurrence](fn))
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Undo :func:`install` on ``model``: its convolutions and mixer classes mlx-lm's again,
    and the recurrence functions of their modules unwrapped once no prepared mixer of the
    module is left (the wrappers act only inside prepared mixers anyway)."""
    for mixer, spec in mixers(model):
        for owner, name, conv, _ in _convs(mixer, spec):
            if isinstance(conv, ShiftedConv1d):
                setattr(owner, name, conv.as_conv1d())
        cls = mixer.__class__ = _mlx_lm_class(mixer)
        refs = _prepared.get(cls.__module__, [])
        refs[:] = [r for r in refs if r() is not None and r() is not mixer]
        module = sys.modules[cls.__module__]
        fn = getattr(module, spec.recurrence) if spec.recurrence else None
        if fn is not None and hasattr(fn, "original") and not refs:
            setattr(module, spec.recurrence, fn.original)
    return model


# ---------------------------------------------------------------- conversion
def _offset_hint(caches) -> int | None:
    """The positions a list's caches hold, from the first that counts them."""
    for c in caches:
        found = c.offset if hasattr(c, "offset") else (
            _offset_hint(c.caches) if isinstance(c, CacheList) else None)
        if found is not None:
            return found
    return None


def _convert(c, offset: int):
    """An mlx-lm ``ArraysCache`` (or a ``CacheList`` holding one) as a rewindable one."""
    if type(c) is ArraysCache:
        if not c.empty() and offset is None:
            raise UserError("a filled mlx-lm ArraysCache does not record how many tokens it "
                            "holds: make the prompt cache with mlx_qspec to speculate from it")
        new = RecurrentCache(len(c.cache))
        new.cache, new.left_padding, new.lengths = list(c.cache), c.left_padding, c.lengths
        new.offset = 0 if c.empty() else offset
        new._settle()
        return new
    if type(c) is CacheList:
        return RecurrentCacheList(*(_convert(x, offset) for x in c.caches))
    return c


def make_rewindable(cache: list, model: nn.Module) -> list:
    """``cache`` (``model``'s, changed in place) with every mlx-lm ``ArraysCache`` a
    :class:`RecurrentCache` holding the same state, its offset that of the list's other
    layers (which saw the same tokens). Other caches are left as they are, and so is every
    cache of a model whose recurrent state this module cannot rewind (:func:`unsupported`):
    its mixers would not count a RecurrentCache's positions."""
    if unsupported(model):
        return cache
    offset = _offset_hint(cache)
    for i, c in enumerate(cache):
        cache[i] = _convert(c, offset)
    return cache
