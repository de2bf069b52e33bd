"""What the tests share beside fixtures (those are in conftest.py): tiny models built in
process, numerics, GGUF and tokenizer writing, the commands run in process or as child processes. Test
modules import these, never each other. Submodules: ``gguf_reference`` / ``gguf_raw`` /
``gguf_kquants`` (tiny GGUF files, three ways), ``sampling`` (chi-square against an exact
joint distribution), ``hybrid_models`` (tiny models of other families), ``serving`` (a chat
server started in the test process)."""

import json
import os
import signal
import subprocess
import sys

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlx_qspec.errors import ModelError

TINY = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


OUTPUTS = ("out_proj", "o_proj", "down_proj", "w2", "fc2", "dense")  # blocks' output projections


def liven(model: nn.Module, gain: float = 4.0):
    """Random weights make a model that repeats one token. Here the LM head becomes a
    permutation of the embedding (so the next token depends on the current one) and each
    block's output projections are scaled by ``gain`` (so the context matters and drafts
    that read fewer bits disagree some of the time)."""
    modules = dict(model.named_modules())
    head = next((m for p, m in modules.items() if p.split(".")[-1] == "lm_head"), None)
    embed = next(m for m in modules.values() if isinstance(m, nn.Embedding))
    if head is not None and head.weight.shape == embed.weight.shape:
        head.weight = embed.weight[mx.random.permutation(embed.weight.shape[0])]
    for path, m in modules.items():
        if path.split(".")[-1] in OUTPUTS and "weight" in m and "layers" in path:
            m.weight = m.weight * gain


def build_tiny_model(seed: int = 0, residual_gain: float = 4.0, head_bits: int = 4,
                     **overrides) -> nn.Module:
    """A 4-bit (group 32) float32 llama whose greedy output is not one repeated token
    (``liven``: its attention/MLP outputs scaled by ``residual_gain``)."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY, **overrides}))
    liven(model, residual_gain)
    if head_bits != 4:  # an 8-bit head: what ``w-upper`` reads as its upper plane
        nn.quantize(model, group_size=32, bits=head_bits,
                    class_predicate=lambda path, m: path in ("lm_head", "model.embed_tokens"))
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def quantized_weight(N: int, K: int, group_size: int, seed: int = 0, bits: int = 4,
                     dtype=mx.float32):
    """A normal (N, K) weight quantized by MLX (affine), its scales and biases as ``dtype``."""
    w = mx.random.normal((N, K), key=mx.random.key(seed))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return q, s.astype(dtype), b.astype(dtype)


def byte_symbols():
    """GPT-2's byte → printable unicode map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_byte_tokenizer(root, **config):
    """A byte-level BPE tokenizer without merges (one token per byte) saved in ``root``, its
    tokenizer_config.json a ``PreTrainedTokenizerFast`` with ``config`` (a chat template...)."""
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))


def default_sigint():
    """``preexec_fn`` for a child that a test stops with SIGINT, as Ctrl-C at a terminal: a
    shell that runs its jobs in the background (``cmd &``) has them ignore SIGINT, and Python
    started that way keeps ignoring it (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(module, *args, stdin=None):
    """A real ``python -m mlx_qspec.<module>`` process, offline (no hub downloads), text in
    and out: where only the process can show it (argv bytes, signals, pipes, exit codes)."""
    return subprocess.run([sys.executable, "-m", f"mlx_qspec.{module}", *args], input=stdin,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def run_main(capsys, main, *argv):
    """(exit code, stdout, stderr) of one in-process run of a command's ``main(argv)``."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, main, *argv) -> str:
    """The one line an in-process run of ``main(argv)`` is refused with (``assert_one_line``)."""
    code, _, err = run_main(capsys, main, *argv)
    return assert_one_line(code, err)


def summary(err) -> dict:
    """The ``key=value`` fields of the summary line ``--verbose`` ends stderr with."""
    return dict(field.split("=", 1) for field in err.strip().splitlines()[-1].split())


def assert_one_line(code, err, *words) -> str:
    """A user mistake: exit 2 and one line without a traceback, naming ``words``; the line."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def model_error(call, *args, **kwargs) -> str:
    """The message of the ModelError ``call(*args, **kwargs)`` raises, asserted to be one line."""
    with pytest.raises(ModelError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value), info.value
    return str(info.value)


def gguf_writer(path, arch, metadata):
    """A ``gguf.GGUFWriter`` of ``arch`` for ``path`` holding ``metadata``: ``(writer method
    without 'add_', value)`` pairs, added in their order."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata:
        getattr(writer, f"add_{key}")(value)
    return writer


def add_tensor(writer, name, value, qtype, data=None):
    """Add float32 ``value`` as ``qtype``: F32 as is, F16 cast, else ``data`` (raw blocks;
    gguf's quantizer where not given). Returns what gguf's reader dequantizes it to."""
    if qtype == Q.F32:
        writer.add_tensor(name, value)
        return value
    if qtype == Q.F16:
        writer.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    data = gguf.quants.quantize(value, qtype) if data is None else data
    writer.add_tensor(name, data, raw_dtype=qtype)
    return gguf.quants.dequantize(data, qtype).reshape(value.shape)


def write_gguf_file(writer):
    """Write out and close a ``gguf.GGUFWriter`` that has its metadata and tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def close(y, ref, rtol=1e-5):
    """Within rtol of the reference, relative to the output's scale (sums cancel)."""
    y, ref = np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert y.shape == ref.shape
    err = np.abs(y - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err} vs scale {np.abs(ref).max()}"
