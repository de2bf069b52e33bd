"""Self-speculation sharded over several processes, as ``mlx.launch`` runs it over several
Macs: mx.distributed's ring backend on 127.0.0.1, one process per rank
(tests/distributed_worker.py). Every rank must emit the same tokens as plain decoding, and
the collectives counted must be the ones a forward makes, once per forward."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gpt2, qwen2
from mlx_lm.utils import save_config, save_model

from mlx_qspec import distributed, load
from mlx_qspec.errors import ModelError
from mlx_qspec.generate import stream_generate

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH = Path(sys.executable).with_name("mlx.launch")
PROMPT = "The capital of France is"
LAUNCH_TIMEOUT = 240  # seconds; a run takes ~15-60 s on 2 busy cores


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1 (the ring listens on them)."""
    for base in range(41000 + os.getpid() % 2000 * 8, 60000, n):
        with contextlib.ExitStack() as sockets:  # closed once all n are bound, or one is taken
            try:
                for port in range(base, base + n):
                    sockets.enter_context(socket.socket()).bind(("127.0.0.1", port))
                return base
            except OSError:
                continue
    raise RuntimeError("no free ports")


def _run(cmd, env=None, timeout=LAUNCH_TIMEOUT):
    """Run ``cmd`` in its own process group, killed whole past ``timeout``."""
    proc = subprocess.Popen(list(map(str, cmd)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} still running after {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _launch(ranks: int, *worker_args):
    """``mlx.launch --backend ring -n ranks`` of the worker; its JSON lines by rank, stderr."""
    assert LAUNCH.is_file(), f"{LAUNCH} missing (installed with mlx)"
    cmd = [str(LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks),
           "--starting-port", str(_free_ports(ranks)), "--python", sys.executable,
           str(WORKER), *map(str, worker_args)]
    _, out, err = _run(cmd)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {line["rank"]: line for line in lines}, err


def _plain_tokens(path, max_tokens):
    model, tokenizer = load(path)
    return [r.token for r in stream_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                             max_tokens=max_tokens, draft="none")]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(smollm2_dir, tmp_path_factory):
    """A 4-bit qwen2 of 4 layers (an architecture with pipeline sharding) whose next token
    depends on the current one: unit-norm embedding rows, an LM head that permutes them
    (random rows of unequal norm make one token win everywhere). The test model's
    tokenizer, so prompts encode."""
    mx.random.seed(1)
    config = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=4,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, vocab_size=49152, tie_word_embeddings=False)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    rows = model.model.embed_tokens.weight
    rows = rows / mx.linalg.norm(rows, axis=-1, keepdims=True)
    model.model.embed_tokens.weight = rows
    model.lm_head.weight = rows[mx.random.permutation(rows.shape[0])]
    nn.quantize(model, group_size=32, bits=4)
    path = tmp_path_factory.mktemp("dist") / "tiny_qwen2"
    save_model(path, model)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / name, path / name)
    return path


def _check_counts(run, draft, per_forward):
    """Every forward (the prefill's, each verify's, and each draft's: the same sharded model
    read with fewer bits) made the collective calls the probe counted in one forward."""
    verify = per_forward * (1 + run["verify_forwards"])  # 1: the prompt's prefill
    drafts = per_forward * run["draft_forwards"]
    assert run["calls"] == ({"verify": verify, draft: drafts} if drafts else {"verify": verify})


def test_tensor_parallel_speculation_on_3_ranks_equals_plain(smollm2_dir):
    """9 query and 3 KV heads: 3 ranks, 3 heads and 1 KV head each."""
    runs, err = _launch(3, "--model", smollm2_dir, "--drafts", "a4-g32", "--gamma", 3,
                        "--max-tokens", 8, "--no-plain")
    assert sorted(runs) == [0, 1, 2], err
    plain = _plain_tokens(smollm2_dir, 8)
    for rank, run in runs.items():
        spec = run["a4-g32"]
        assert spec["tokens"] == plain, (rank, spec["tokens"], plain)
        # a row of a verify gets the bits it would get decoded alone (MLX's ring all_sum
        # does not promise that: its order of addition depends on the array's length)
        assert run["same_rows"]["gathered"]
        assert run["per_forward"] == 2 * 30  # o_proj and down_proj of 30 layers
        _check_counts(spec, "a4-g32", run["per_forward"])
    spec = runs[0]["a4-g32"]
    assert 0 < spec["accepted"] < spec["drafted"]  # rejections: every rank rewound alike
    assert spec["tokens_per_verify"] > 1
    fields = runs[0]["fields"]
    assert fields["ranks"] == 3 and fields["plain_collectives_per_token"] == 60
    per_token = sum(spec["calls"].values()) / spec["emitted"]
    assert float(fields["collectives_per_token"]) == pytest.approx(per_token, abs=0.005)


def test_pipeline_speculation_on_2_ranks_equals_plain(tiny_qwen2_dir):
    runs, err = _launch(2, "--model", tiny_qwen2_dir, "--pipeline", "--drafts", "a4-g32,ngram",
                        "--max-tokens", 16, "--temp", 1.0)
    assert sorted(runs) == [0, 1], err
    single = _plain_tokens(tiny_qwen2_dir, 16)
    assert len(set(single)) > 3  # the tiny model does not repeat one token
    for run in runs.values():
        assert run["none"]["tokens"] == run["a4-g32"]["tokens"] == run["ngram"]["tokens"] == single
        # a stage receives from the one before (or sends to the one after) and all gather
        # the last stage's output: 2 calls per forward on either rank of 2
        assert run["per_forward"] == 2
        for draft in ("none", "a4-g32", "ngram"):
            _check_counts(run[draft], draft, run["per_forward"])
        # a verify pays a forward's collectives once for all it accepts, and the n-gram
        # lookup drafts without a forward: fewer calls than plain decoding for the same tokens
        ngram, plain = run["ngram"], run["none"]
        assert ngram["accepted"] > 0
        assert sum(ngram["calls"].values()) < sum(plain["calls"].values())
    spec = runs[0]["a4-g32"]
    assert 0 < spec["accepted"] < spec["drafted"]  # rejections: the cache was rewound
    # sampled speculation: every rank draws the same numbers, so emits the same tokens
    assert runs[0]["sampled"] == runs[1]["sampled"] and len(set(runs[0]["sampled"])) > 3


def test_unreachable_rank_fails_with_one_line_within_the_timeout(smollm2_dir, tmp_path):
    """Rank 0 of two, its peer never started: MLX's ring would wait for it forever."""
    hostfile = tmp_path / "hosts.json"
    base = _free_ports(2)
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    start = time.monotonic()
    rc, out, err = _run([sys.executable, str(WORKER), "--model", smollm2_dir,
                         "--timeout", 3], env=env, timeout=120)
    assert rc == 2 and not out
    assert err.strip().count("\n") == 0 and "rank 0 cannot reach the other ranks" in err, err
    assert "no answer within 3 s" in err
    assert time.monotonic() - start < 60


def test_heads_the_group_does_not_divide_fail_on_rank_0_only(smollm2_dir):
    runs, err = _launch(2, "--model", smollm2_dir)
    assert not runs
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: 2 ranks do not divide the model's 9 query and 3 key/value heads "
                      "for tensor parallelism; use 3 ranks, or pass --pipeline"], err
    # every rank ends: by itself (exit 2, the same error) or stopped by mlx.launch (SIGTERM)
    # once the other has
    ended = re.findall(r"Node with rank (\d) exited with code (2|-15)", err)
    assert sorted(rank for rank, _ in ended) == ["0", "1"] and ("2" in dict(ended).values()), err


def test_models_that_cannot_shard_are_refused_before_loading(smollm2_gguf, smollm2_dir):
    config = dict(model_type="gpt2", n_ctx=64, n_embd=64, n_head=4, n_layer=2,
                  n_positions=64, layer_norm_epsilon=1e-5, vocab_size=256)
    model = gpt2.Model(gpt2.ModelArgs.from_dict(config))
    with pytest.raises(distributed.DistributedError, match="'gpt2' supports neither"):
        distributed.check_shardable(model, config, 2, pipeline=False)
    llama, _ = load(smollm2_dir, lazy=True)
    with pytest.raises(distributed.DistributedError, match="'llama' has no pipeline sharding"):
        distributed.check_shardable(llama, {"model_type": "llama"}, 2, pipeline=True)
    with pytest.raises(ModelError, match="convert it first with `python -m mlx_qspec.convert"):
        distributed.load_sharded(smollm2_gguf)
