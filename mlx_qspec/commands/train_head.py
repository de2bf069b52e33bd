"""``python -m mlx_qspec.train_head --model M --out DIR``: train a one-block draft head for
any model by self-distillation, and write a directory ``--draft-head DIR`` loads.

The head (:class:`~mlx_qspec.heads.block.NextTokenHead`: one decoder block of the model's own
architecture, warm-started from its last attention layer) learns to map (embedding of x_{i+1},
the model's final hidden state h_i) to h_{i+1}, the model's next final hidden state, and
through the model's own LM head to the model's next-token distribution: EAGLE's feature
regression plus the distribution loss. Targets are the model's own (no labels): its hidden
states on text the user gives (``--text``), or by default Python stdlib sources and licence
texts found on this machine (files whose name hashes to 0 mod 8 are held back for
measuring).

Two phases within ``--minutes``: the model reads the text once (its hidden states are kept),
then the head trains for epochs over them. Progress is shown; a checkpoint is written every
minute under DIR/checkpoint, and running the same command again resumes from it. On MLX's
CPU backend the model is dequantized to float32 for the teacher pass (dense matmuls; ~20-70x
faster with OpenBLAS preloaded, see docs/design.md), and the head is quantized like the model
when it is written.
"""

import argparse
import itertools
import json
import math
import random
import resource
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model

from ..cli import (MODEL_HELP, ArgumentParser, check_before_load, default_model_path, integer,
                   make_out_folder, run_cli)
from ..errors import UserError
from ..heads import capture, store
from ..heads.block import NextTokenHead, build_layer, decoder_layer_class, quantize
from ..loader import load
from ..rotate import float_weight

DEFAULT_MINUTES = 15.0
TEACHER_SHARE = 0.6  # of the time budget: the model reading the text (fresh text generalizes;
# at 0.4 the test model's head saw 10 epochs of 14k tokens and agreed 32 % on them, 13 % held back)
CHECKPOINT_SECONDS = 60
KL_WEIGHT = 1.0  # the distribution loss beside the feature regression (EAGLE: 0.1; here
# measured to learn several times faster at 1 on the test model)
KL_ROWS = 512  # rows per step scored through the LM head when it is the full vocabulary
DRAFT_VOCAB = 8192  # default reduced vocabulary, for vocabularies over twice its size
HELD_BACK_MOD = 8  # default-corpus files whose name hashes to 0 mod this are kept for measuring


def default_corpus(held_back: bool = False) -> list[Path]:
    """Python stdlib sources (tests and site-packages aside) and licence texts on this
    machine, in a fixed shuffled order; ``held_back`` selects the measuring share instead."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.rglob("*.py"))
             if not {"test", "tests", "site-packages", "idlelib"} & set(p.relative_to(stdlib).parts)]
    for folder, pattern in ((Path("/usr/share/common-licenses"), "*"),
                            (Path(sysconfig.get_paths()["purelib"]), "*.dist-info/LICENSE*")):
        files += sorted(p for p in folder.glob(pattern) if p.is_file())
    random.Random(0).shuffle(files)
    return [p for p in files if (zlib.crc32(p.name.encode()) % HELD_BACK_MOD == 0) == held_back]


def user_corpus(texts: list[str]) -> list[Path]:
    """The files ``--text`` names (a folder: its files, recursively)."""
    files = []
    for t in texts:
        p = Path(t).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--text '{t}' does not exist")
    if not files:
        raise UserError(f"--text {' '.join(texts)}: no files")
    return files


def windows(tokenizer, files: list[Path], length: int):
    """Token windows of ``length`` from the files, in order (each file's tail is dropped)."""
    for f in files:
        ids = tokenizer.encode(f.read_text(errors="replace"))
        for i in range(0, len(ids) - length + 1, length):
            yield ids[i:i + length]


class TeacherEnds(capture.ModelEnds):
    """The model's ends (:class:`~mlx_qspec.heads.capture.ModelEnds`) with a float copy of
    its LM head (the loss differentiates through the head, which quantized kernels need not
    support), or of its rows for a draft vocabulary (:meth:`restrict`)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.weight = float_weight(self.head)

    def restrict(self, ids: mx.array):
        """Logits of ``ids`` only from now on (teacher and student alike)."""
        self.weight = self.weight[ids]
        self.bias = None if self.bias is None else self.bias[ids]
        mx.eval(self.weight)

    def logits(self, h):
        y = h @ self.weight.T
        return y if self.bias is None else y + self.bias


def _attention_layer(model: nn.Module) -> int:
    """The last layer that attends (a hybrid model's recurrent layers have no KV to rewind)."""
    idx = [i for i, layer in enumerate(model.layers) if "self_attn" in layer or "attention" in layer]
    return idx[-1] if idx else len(model.layers) - 1


def new_head(model: nn.Module, config: dict, ends: TeacherEnds, vocab: mx.array | None):
    """A float head for ``model``: a fresh block of its last attention layer's kind (random
    init learned faster than a copy of that layer on the test model) and, as the final norm,
    the model's (its outputs then start on the scale of the hidden states it regresses);
    and where its block comes from, ``(model type, layer index)``, for the head's config."""
    cls, index = decoder_layer_class(model), _attention_layer(model)
    block = build_layer(cls, config, index)
    hidden, n_vocab = ends.hidden_size, int(ends.weight.shape[0])
    norms = [m for _, m in model.named_modules() if isinstance(m, nn.RMSNorm) and m.weight.shape == (hidden,)]
    eps = norms[-1].eps if norms else 1e-6
    head = NextTokenHead(block, hidden, n_vocab, eps, draft_vocab=0 if vocab is None else vocab.size)
    if norms:
        head.norm.weight = norms[-1].weight
    if vocab is not None:
        head.draft_vocab = vocab
    head.set_dtype(mx.float32)
    return head, (cls.__module__.rsplit(".", 1)[-1], index)


def draft_vocabulary(tokens: mx.array, size: int) -> mx.array:
    """The ``size`` most frequent token ids of the text read, sorted."""
    counts = mx.zeros((int(tokens.max().item()) + 1,), mx.int32).at[tokens.reshape(-1)].add(1)
    top = mx.argsort(-counts)[:size]
    return mx.sort(top).astype(mx.uint32)


def loss_fn(head, ends, tokens, hidden, rows):
    """Feature regression of h_{i+1} plus KL from the model's next-token distribution through
    the LM head (on ``rows``, flat indices; None: every row); also the top-1 agreement."""
    emb = ends.embed(tokens[:, 1:]).astype(hidden.dtype)
    _, normed = head(emb, hidden[:, :-1])
    target = hidden[:, 1:]
    reg = nn.losses.smooth_l1_loss(normed, target, reduction="mean")
    d = hidden.shape[-1]
    normed, target = normed.reshape(-1, d), target.reshape(-1, d)
    if rows is not None:
        normed, target = normed[rows], target[rows]
    student = ends.logits(normed)
    teacher = mx.stop_gradient(ends.logits(target))
    kl = nn.losses.kl_div_loss(nn.log_softmax(student, axis=-1), nn.log_softmax(teacher, axis=-1),
                               reduction="mean")
    top1 = (mx.argmax(student, -1) == mx.argmax(teacher, -1)).mean()
    return reg + KL_WEIGHT * kl, (reg, kl, top1)


class Progress:
    """One status line: redrawn in place on a terminal, a new line every ``every`` seconds
    in a log file."""

    def __init__(self, stream=None, every: float = 10.0):
        # sys.stderr as it is now, not as it was at import (a test's capture, since closed)
        self.stream, self.every, self.last = stream or sys.stderr, every, 0.0

    def __call__(self, text: str, final: bool = False):
        now = time.monotonic()
        if self.stream.isatty():
            self.stream.write(f"\r{text}\033[K" + ("\n" if final else ""))
        elif final or now - self.last >= self.every:
            self.stream.write(text + "\n")
            self.last = now
        else:
            return
        self.stream.flush()


class Checkpoint:
    """DIR/checkpoint: the teacher's hidden states, the float head, the optimizer and a
    state.json (phase, windows read, steps, seconds spent, and the flags that shape what is
    kept: a resumed run must give the same)."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoint"
        self.state_file = self.dir / "state.json"

    def state(self) -> dict:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {"windows": 0, "teacher_done": False, "step": 0, "teacher_seconds": 0.0,
                "train_seconds": 0.0}

    def save_teacher(self, tokens: list, hidden: list, state):
        """Append the windows read since the last save as a part file of their own."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if tokens:
            part = len(list(self.dir.glob("teacher-*.safetensors")))
            mx.save_safetensors(str(self.dir / f"teacher-{part:04d}.safetensors"),
                                {"tokens": mx.concatenate(tokens), "hidden": mx.concatenate(hidden)})
        self._write(state)

    def teacher(self):
        parts = [mx.load(str(p)) for p in sorted(self.dir.glob("teacher-*.safetensors"))]
        if not parts:
            return None, None
        return (mx.concatenate([p["tokens"] for p in parts]),
                mx.concatenate([p["hidden"] for p in parts]))

    def save_training(self, head, optimizer, state):
        self.dir.mkdir(parents=True, exist_ok=True)
        head.save_weights(str(self.dir / "head.safetensors"))
        mx.save_safetensors(str(self.dir / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        self._write(state)

    def restore_training(self, head, optimizer):
        if (self.dir / "head.safetensors").is_file():  # (else the optimizer starts on its first update)
            head.load_weights(str(self.dir / "head.safetensors"))
            optimizer.state = tree_unflatten(list(mx.load(str(self.dir / "optimizer.safetensors")).items()))

    def _write(self, state):
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)


def read_text(model, tokenizer, files, args, state, ckpt, budget, show):
    """The teacher phase: the model over token windows, its final hidden states kept
    (resumed where the checkpoint stopped). Returns (tokens (N, T), hidden (N, T, D))."""
    if not state["teacher_done"]:
        _read(model, tokenizer, files, args, state, ckpt, budget, show)
    tokens, hidden = ckpt.teacher()
    if tokens is None:
        raise UserError(f"the text has fewer than {args.batch} windows of {args.seq_len} tokens; "
                        "give more text (--text) or a smaller --seq-len / --batch")
    return tokens, hidden


def _read(model, tokenizer, files, args, state, ckpt, budget, show):
    start, saved = time.monotonic() - state["teacher_seconds"], time.monotonic()
    source = itertools.islice(windows(tokenizer, files, args.seq_len), state["windows"], None)
    batch, tokens, hidden = [], [], []
    for ids in source:
        batch.append(ids)
        if len(batch) < args.batch:
            continue
        with capture.capturing() as rows:
            model(mx.array(batch))
        tokens.append(mx.array(batch, mx.int32))
        hidden.append(rows[0].astype(mx.float32))
        mx.eval(hidden[-1])
        batch, state["windows"] = [], state["windows"] + args.batch
        state["teacher_seconds"] = spent = time.monotonic() - start
        n = state["windows"] * args.seq_len
        show(f"reading text: {n} tokens, {n / spent:.0f} tok/s, {spent:.0f}/{budget:.0f} s")
        if time.monotonic() - saved > CHECKPOINT_SECONDS:
            ckpt.save_teacher(tokens, hidden, state)
            tokens, hidden, saved = [], [], time.monotonic()
        if spent >= budget or (args.teacher_tokens and n >= args.teacher_tokens):
            break
    state["teacher_done"] = True
    ckpt.save_teacher(tokens, hidden, state)
    show(f"read {state['windows'] * args.seq_len} tokens in {state['teacher_seconds']:.0f} s", final=True)


def learning_rate(args, step: int, fraction: float) -> float:
    """Linear warm-up over 20 steps, then cosine to a tenth over the budget (``fraction``: the
    share of it spent, in steps where ``--steps`` bounds it, else in seconds)."""
    warm = min(1.0, (step + 1) / 20)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


def train(head, ends, tokens, hidden, args, state, ckpt, *, budget, show):
    """Epochs over the kept windows in a seeded order per epoch until the steps or the
    seconds run out; returns the last step's (loss, feature loss, KL, top-1 agreement).
    With the full vocabulary the LM head scores KL_ROWS rows a step, else every row."""
    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.0)
    ckpt.restore_training(head, optimizer)
    step_fn = nn.value_and_grad(head, lambda t, h, r: loss_fn(head, ends, t, h, r))
    n, per_row = tokens.shape[0], tokens.shape[1] - 1
    per_epoch = max(n // args.batch, 1)
    start, saved = time.monotonic() - state["train_seconds"], time.monotonic()
    spent = lambda: time.monotonic() - start  # noqa: E731
    metrics = (math.nan,) * 4
    while spent() < budget and not (args.steps and state["step"] >= args.steps):
        step = state["step"]
        epoch, i = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(epoch).shuffle(order)
        pick = mx.array(order[i * args.batch:(i + 1) * args.batch])
        rows = None if "draft_vocab" in head else mx.array(
            random.Random(step).sample(range(pick.size * per_row), min(KL_ROWS, pick.size * per_row)))
        fraction = step / args.steps if args.steps else spent() / budget
        optimizer.learning_rate = learning_rate(args, step, fraction)
        (loss, aux), grads = step_fn(tokens[pick], hidden[pick], rows)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(head, grads)
        mx.eval(head.parameters(), optimizer.state, loss, aux)
        metrics = (loss.item(), *(a.item() for a in aux))
        state["step"], state["train_seconds"] = step + 1, spent()
        show(f"training: step {step + 1} epoch {epoch + 1} loss {metrics[0]:.4f} "
             f"(features {metrics[1]:.4f}, KL {metrics[2]:.3f}) top-1 {metrics[3]:.3f}, "
             f"{state['train_seconds']:.0f}/{budget:.0f} s")
        if time.monotonic() - saved > CHECKPOINT_SECONDS:
            ckpt.save_training(head, optimizer, state)
            saved = time.monotonic()
    ckpt.save_training(head, optimizer, state)
    show(f"trained {state['step']} steps in {state['train_seconds']:.0f} s", final=True)
    return metrics


def agreement(model, head, ends, vocab, windows_: list) -> float | None:
    """Teacher-forced top-1 agreement of ``head`` with the model on token windows it never
    trained on: how often its first draft would be the model's greedy token (what ``auto``
    starts from). None without such text."""
    hits = total = 0
    for ids in windows_:
        with capture.capturing() as rows:
            target = mx.argmax(model(mx.array([ids]))[0, 1:], axis=-1)  # the model's token after x_{i+1}
        hidden = rows[0]
        _, normed = head(ends.embed(mx.array([ids[1:]])).astype(hidden.dtype), hidden[:, :-1])
        pred = mx.argmax(ends.logits(normed[0]), axis=-1)
        if vocab is not None:
            pred = vocab[pred]
        hits += (pred == target).sum().item()
        total += target.size
    return hits / total if total else None


def _check_out(out: Path):
    """The directory to write: a new or empty one, or a run's to resume; made now, so that a
    place that cannot be written fails before the model loads and the text is read."""
    if out.is_dir() and any(out.iterdir()) and not (out / "checkpoint").is_dir():
        raise UserError(f"--out '{out}' exists, is not empty and holds no train_head checkpoint; "
                        "refusing to overwrite")
    make_out_folder(out)


# The flags whose values shape the checkpoint (hidden states' width, the text and its windows,
# the head's vocabulary)
RESUMED_FLAGS = ("model", "text", "seq_len", "draft_vocab")


def _check_resume(state: dict, args, out: Path) -> None:
    """A checkpoint resumes only under the flags it was made with (state.json records them
    from its first write): other ones failed deep in the run with a ValueError on shapes, or
    (another --text) trained on windows of two texts."""
    given = {name: getattr(args, name) for name in RESUMED_FLAGS}
    if given["model"] is not None and (path := Path(given["model"]).expanduser()).exists():
        given["model"] = str(path.resolve())  # (the same model named from another folder)
    if given["text"] is not None:  # (the same files named from another folder)
        given["text"] = " ".join(str(Path(t).expanduser().resolve()) for t in given["text"])
    # what a checkpoint from before did not record is taken as this run's
    made = state["arguments"] = {**given, **state.get("arguments", {})}
    if differ := [name for name in RESUMED_FLAGS if made[name] != given[name]]:
        show = lambda v: "its default" if v is None else v  # noqa: E731
        flags = ", ".join(f"--{n.replace('_', '-')} {show(made[n])} (this run: {show(given[n])})"
                          for n in differ)
        raise UserError(f"--out '{out}' holds a checkpoint made with {flags}: resume with the "
                        "same flags, or write to another --out")


def train_head(args) -> Path:
    """The command's body: load, read the text, train, write the head directory."""
    check_before_load(args)  # --model, before --out is made
    out = Path(args.out).expanduser()
    _check_out(out)
    ckpt = Checkpoint(out)
    state = ckpt.state()
    _check_resume(state, args, out)
    files = user_corpus(args.text) if args.text else default_corpus()
    model_path = args.model or default_model_path()
    model, tokenizer, config = load(model_path, return_config=True)
    if not mx.metal.is_available():
        dequantize_model(model)  # dense float32 matmuls: the CPU's fast path
    ends = TeacherEnds(model)
    capture.install(model)
    budget = args.minutes * 60
    show = Progress()
    tokens, hidden = read_text(model, tokenizer, files, args, state, ckpt, budget * TEACHER_SHARE, show)
    n_vocab = ends.weight.shape[0]
    size = args.draft_vocab if args.draft_vocab is not None else (
        DRAFT_VOCAB if n_vocab > 2 * DRAFT_VOCAB else 0)
    vocab = draft_vocabulary(tokens, size) if 0 < size < n_vocab else None
    head, layer = new_head(model, config, ends, vocab)
    if vocab is not None:
        ends.restrict(vocab)
    metrics = train(head, ends, tokens, hidden, args, state, ckpt,
                    budget=budget - state["teacher_seconds"], show=show)
    if q := config.get("quantization"):
        quantize(head, q["group_size"], q["bits"])
    held = [] if args.text else list(itertools.islice(
        windows(tokenizer, default_corpus(held_back=True), args.seq_len), 4))
    cfg = store.head_config(head, *layer, config, {
        "kind": "trained", "model": str(model_path), "text": args.text or "default",
        "tokens": int(tokens.size), "steps": state["step"], "minutes": args.minutes,
        "loss": metrics[0], "top1": metrics[3],
        "held_back_agreement": agreement(model, head, ends, vocab, held)})
    store.save(out, head, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {out} (peak memory {peak:.2f} GB; teacher {state['teacher_seconds']:.0f} s, "
          f"training {state['train_seconds']:.0f} s)", file=sys.stderr)
    return out


def main(argv=None):
    parser = ArgumentParser(
        prog="mlx_qspec.train_head",
        description="Train a one-block draft head for a model by self-distillation.")
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="directory to write (--draft-head loads it)")
    parser.add_argument("--text", nargs="+", default=None,
                        help="text files or folders to learn on (default: Python stdlib and licence texts)")
    parser.add_argument("--minutes", type=_positive, default=DEFAULT_MINUTES,
                        help="time budget in minutes, across resumed runs (default: %(default)s)")
    parser.add_argument("--steps", type=integer(1), default=None, help="stop after this many steps")
    parser.add_argument("--teacher-tokens", type=integer(1), default=None,
                        help="stop reading text after this many tokens")
    parser.add_argument("--seq-len", type=integer(1), default=256, help="tokens per window")
    parser.add_argument("--batch", type=integer(1), default=8, help="windows per step")
    parser.add_argument("--lr", type=_positive, default=1e-3, help="peak learning rate")
    parser.add_argument("--draft-vocab", type=integer(0), default=None,
                        help="draft from the N most frequent tokens of the text only (0: the whole "
                        f"vocabulary; default {DRAFT_VOCAB} for vocabularies over {2 * DRAFT_VOCAB})")
    run_cli(parser, argv, lambda args, _: train_head(args))


def _positive(text: str) -> float:
    """An argparse type: a finite number above 0 (cli.integer checks the integer flags)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value
