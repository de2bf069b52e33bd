"""Trained self-drafts (issue 23): the model's hidden state captured in its own forward, the
head level's KV cache and chaining against a reference computed without a cache, head
directories and their errors, train_head, and the MTP layers checkpoints ship kept at load
(DeepSeek-V3 with its experts and MLA weights in Hugging Face layout, Qwen3-Next with its
offset norms, MiMo through convert, a GGUF's nextn tensors)."""

import io
import json
import sys

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3, llama, mimo, qwen3_next
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from helpers import build_tiny_model, byte_symbols, gguf_writer, model_error, refused, write_gguf_file
from helpers.sampling import assert_fits, joint, sample_first_tokens
from mlx_qspec import cost, load, reads
from mlx_qspec.convert import convert
from mlx_qspec.decoder import SpecStats
from mlx_qspec.drafts.auto import AutoPolicy
from mlx_qspec.drafts.cascade import Cascade
from mlx_qspec.errors import ModelError, UserError
from mlx_qspec.heads import capture, mtp, store
from mlx_qspec.heads.block import NextTokenHead, build_layer, quantize
from mlx_qspec.heads.level import HeadDraft, head_level, mtp_level
from mlx_qspec.hooks import install as prepare
from mlx_qspec.sampling import make_sampler
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + byte_symbols()
HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2


def write_tiny_gguf(path, seed=0, nextn=False):
    """A two-block llama GGUF (Q4_0 linears, Q8_0 tied embedding, byte tokenizer); with
    ``nextn``, a third block carrying llama.cpp's MTP tensors (blk.2.nextn.*)."""
    rng = np.random.default_rng(seed)
    blocks = 3 if nextn else 2
    w = gguf_writer(path, "llama", [
        ("context_length", 256), ("embedding_length", HIDDEN), ("block_count", blocks),
        ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS),
        ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 10000.0), ("tokenizer_model", "gpt2"),
        ("tokenizer_pre", "default"), ("token_list", TOKENS), ("token_types", [3] * 3 + [1] * 256),
        ("eos_token_id", 2), ("add_bos_token", False)])
    if nextn:
        w.add_uint32("llama.nextn_predict_layers", 1)
    hd = HIDDEN // HEADS

    def quant(name, shape, std, qtype=Q.Q4_0):
        w.add_tensor(name, gguf.quants.quantize(rng.normal(0, std, shape).astype(np.float32), qtype),
                     raw_dtype=qtype)

    quant("token_embd.weight", (len(TOKENS), HIDDEN), 1.0, Q.Q8_0)
    for i in range(blocks):
        for name, shape in (("attn_q", (HEADS * hd, HIDDEN)), ("attn_k", (KV_HEADS * hd, HIDDEN)),
                            ("attn_v", (KV_HEADS * hd, HIDDEN)), ("attn_output", (HIDDEN, HEADS * hd)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            quant(f"blk.{i}.{name}.weight", shape, 0.3)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", rng.uniform(0.6, 1.4, HIDDEN).astype(np.float32))
    if nextn:
        quant("blk.2.nextn.eh_proj.weight", (HIDDEN, 2 * HIDDEN), 0.2)
        for name in ("enorm", "hnorm", "shared_head_norm"):
            w.add_tensor(f"blk.2.nextn.{name}.weight", rng.uniform(0.6, 1.4, HIDDEN).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.uniform(0.6, 1.4, HIDDEN).astype(np.float32))
    write_gguf_file(w)
    return path


@pytest.fixture(scope="module", name="model")
def gguf_model(tmp_path_factory):
    """The tiny GGUF's model, prepared (QSpec layers) and hidden-state capturing."""
    return prepare(load(write_tiny_gguf(tmp_path_factory.mktemp("heads") / "tiny.gguf"))[0])


def random_head(model, seed=0, bigram=False):
    """A quantized head of ``model``'s architecture with random weights (no training). A
    ``bigram`` head's block passes its input through and its projection keeps the embedding:
    it drafts the LM head's best match for the next token alone — what the tiny model (its LM
    head a permutation of its embedding) predicts where the context does not sway it. So
    blocks are accepted and rejected."""
    mx.random.seed(seed)
    d = model.args.hidden_size
    block = build_layer(llama.TransformerBlock, vars(model.args), 1)
    head = NextTokenHead(block, d, model.args.vocab_size, 1e-5)
    if bigram:
        block.self_attn.o_proj.weight = mx.zeros_like(block.self_attn.o_proj.weight)
        block.mlp.down_proj.weight = mx.zeros_like(block.mlp.down_proj.weight)
        head.fc.weight = mx.concatenate([mx.eye(d), mx.zeros((d, d))], axis=1)
    quantize(head, 32, 4)
    mx.eval(head.parameters())
    return head


def hidden_states(model, tokens):
    """The model's final hidden state at every position of ``tokens`` (one forward)."""
    capture.install(model)
    with capture.capturing() as rows:
        model(mx.array(tokens)[None])
    return rows[0][0]


# ------------------------------------------------------------------ capture


@pytest.mark.parametrize("kind", ["tied-qspec", "untied-float", "untied-quantized", "untied-qspec"])
def test_captured_hidden_state_is_the_lm_head_input(model, kind):
    """The LM head applied to what the capture recorded gives the model's own logits, bit for
    bit; nothing is recorded outside a capture; the model's output is unchanged by the hook."""
    if kind != "tied-qspec":
        model = build_tiny_model()
        if kind == "untied-float":
            model = llama.Model(model.args)
        if kind == "untied-qspec":
            prepare(model)
    tokens = mx.array([[5, 9, 200, 17, 33]])
    before = model(tokens)
    capture.install(model)  # the hook alone (hooks.install puts QSpec layers in first)
    ends = capture.ModelEnds(model)
    after_install = model(tokens)  # outside a capture: nothing recorded, nothing different
    with capture.capturing() as rows:
        logits = model(tokens)
    assert len(rows) == 1 and rows[0].shape == (1, 5, HIDDEN if kind == "tied-qspec" else 128)
    assert mx.array_equal(ends.logits(rows[0]), logits).item()
    assert mx.array_equal(before, after_install).item() and mx.array_equal(before, logits).item()
    prepare(model)  # installing QSpec layers again keeps the hook
    with capture.capturing() as rows:
        model(tokens)
    assert len(rows) == 1
    capture.uninstall(model)
    with capture.capturing() as rows:
        model(tokens)
    assert rows == [] and not hasattr(type(capture.find_head(model)[0]), "_head_base")
    prepare(model)


# ------------------------------------------------------------------ the level


def reference_drafts(head, ends, context, hidden, k):
    """Greedy chained drafts computed without a KV cache: the whole row sequence (the model's
    rows, then each chained row) through the head at once, row by row."""
    m = len(context) - 1  # entries: (x_j, h_{j-1}), a zero state before the first
    emb = ends.embed(mx.array(context[:m + 1])[None])
    states = mx.concatenate([mx.zeros((1, 1, hidden.shape[-1])), hidden[None, :m]], axis=1)
    drafts, logits = [], []
    for _ in range(k):
        back, normed = head(emb, states)
        logits.append(ends.logits(normed[:, -1]))
        drafts.append(mx.argmax(logits[-1], axis=-1).item())
        emb = mx.concatenate([emb, ends.embed(mx.array([[drafts[-1]]]))], axis=1)
        states = mx.concatenate([states, back[:, -1:]], axis=1)
    return drafts, logits


def test_level_catch_up_and_chain_equal_a_cacheless_reference(model):
    """The level's first draft (its cache caught up from the model's hidden states in one
    forward) and its chained drafts (its own output fed back) equal a computation without a
    KV cache, and its reads — its own layers, the LM head, its KV — are counted."""
    head = random_head(model)
    context = [5, 70, 71, 72, 9, 100, 101, 40, 41, 42, 43]
    hidden = hidden_states(model, context[:-1])
    level = HeadDraft(model, head, "head")
    counter = reads.ReadCounter()
    drafted, qs = level.propose(context, hidden, 4, counter=counter)
    ref, ref_logits = reference_drafts(head, level.ends, context, hidden, 4)
    assert drafted == ref
    for q, lg in zip(qs, ref_logits):
        np.testing.assert_allclose(np.array(q), np.array(lg - mx.logsumexp(lg, -1, keepdims=True)), atol=1e-4)
    assert counter.forwards == 4
    head_bytes = sum(v.nbytes for _, v in tree_flatten(head.parameters()) if v.dtype == mx.uint32)
    assert counter.bytes("weights") > 4 * (head_bytes + level.ends.head["upper"].nbytes)
    assert counter.bytes("kv") > 0
    assert level.cache.offset == len(context) + 3


def test_head_cache_after_blocks_equals_built_from_scratch(model):
    """Blocks accept some drafts and reject the rest; the model's hidden states of each
    block's accepted rows are handed over as the decoder hands them. The head's cache then
    equals one built from scratch over the final context, and so does its next draft."""
    head = random_head(model, seed=1)
    seq = [5, 70, 71, 72, 9, 100, 101, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]
    hidden = hidden_states(model, seq)
    level = HeadDraft(model, head, "head")
    p, seen, outcomes = 6, 0, []
    while p + 5 < len(seq):
        drafted, _ = level.propose(seq[:p + 1], hidden[seen:p], 4)
        n = 0
        while n < len(drafted) and drafted[n] == seq[p + 1 + n]:
            n += 1
        outcomes.append((len(drafted), n))
        seen, p = p, p + n + 1  # the context goes on as the sequence says: drafts beyond n rejected
    assert any(n < k for k, n in outcomes)
    fresh = HeadDraft(model, head, "head")
    expect, _ = fresh.propose(seq[:p + 1], hidden[:p], 2)
    got, _ = level.propose(seq[:p + 1], hidden[seen:p], 2)
    assert got == expect
    for a, b in zip(level.cache.state[:2], fresh.cache.state[:2]):
        n = level.cache.offset
        assert n == fresh.cache.offset
        np.testing.assert_allclose(np.array(a[..., :n, :]), np.array(b[..., :n, :]), rtol=1e-4, atol=1e-5)


def test_level_with_only_the_last_hidden_state(model):
    """Handed only the last row (the minimum contract 2 promises), the level still drafts:
    positions it never saw get a zero hidden state, chained entries are kept."""
    level = HeadDraft(model, random_head(model), "head")
    seq = [5, 70, 71, 72, 9, 100, 101, 40, 41, 42]
    hidden = hidden_states(model, seq)
    first, _ = level.propose(seq[:6], hidden[4:5], 3)
    assert len(first) == 3 and level.exact[:6] == [True, False, False, False, False, True]
    second, _ = level.propose(seq[:9], hidden[7:8], 3)
    assert len(second) == 3 and level.cache.offset == 9 + 2


# ------------------------------------------------------------------ head directories


def test_head_directory_round_trip_and_bad_heads(model, tmp_path):
    """A saved head loads back with the same weights and drafts the same; a head for another
    model (hidden size, vocabulary) or a broken directory is one line naming it."""
    ends = capture.ModelEnds(model)
    head = random_head(model, seed=2)
    cfg = store.head_config(head, "llama", 1, {**vars(model.args)}, {"kind": "test"})
    store.save(tmp_path / "h", head, cfg)
    loaded, _ = store.load(tmp_path / "h", model, ends)
    for (k, a), (_, b) in zip(sorted(tree_flatten(head.parameters())), sorted(tree_flatten(loaded.parameters()))):
        assert mx.array_equal(a, b).item(), k
    seq = [5, 70, 71, 72, 9, 100]
    hidden = hidden_states(model, seq[:-1])
    assert (HeadDraft(model, head, "head").propose(seq, hidden, 3)[0]
            == HeadDraft(model, loaded, "head").propose(seq, hidden, 3)[0])

    def broken(name, unlink=None, **changes):  # a saved head, one file gone or its config changed
        d = tmp_path / name
        store.save(d, head, cfg)
        if unlink:
            (d / unlink).unlink()
        else:
            (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return d

    cases = {
        "hidden states of size 32": broken("hidden", hidden_size=32),
        "vocabulary has 1000 tokens": broken("vocab", vocab_size=1000),
        "no model.safetensors": broken("weights", unlink="model.safetensors"),
        "no config.json": broken("config", unlink="config.json"),
        "not an mlx_qspec head": broken("format", format="other"),
        "do not fit its config": broken("shape", block_config={**cfg["block_config"], "intermediate_size": 96}),
        "is not a directory": tmp_path / "absent",
    }
    for words, d in cases.items():
        message = model_error(store.load, d, model, ends)
        assert words in message and str(d) in message


# ------------------------------------------------------------------ train_head


def test_train_head_progress_writes_to_stderr_as_it_is_when_made(monkeypatch):
    """Not to the stream that was sys.stderr when the module was imported (in a test suite,
    another test's capture, closed since: a ValueError mid-run)."""
    from mlx_qspec.commands.train_head import Progress

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    Progress()("reading text", final=True)
    assert err.getvalue() == "reading text\n"


def test_train_head_writes_a_head_that_loads_and_resumes(tmp_path, capsys, monkeypatch):
    """A few steps on a tiny model: the directory loads as a head of the model (quantized like
    it, a draft vocabulary of the text's most frequent tokens), drafts only from that
    vocabulary, and a second run with more steps resumes from the checkpoint."""
    from mlx_qspec.train_head import main

    src = write_tiny_gguf(tmp_path / "m.gguf")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["--model", str(src), "--out", str(tmp_path / "head"), "--text", str(text),
            "--seq-len", "32", "--batch", "2", "--teacher-tokens", "256", "--draft-vocab", "40"]
    main(argv + ["--steps", "2"])
    state = json.loads((tmp_path / "head" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["teacher_done"]
    main(argv + ["--steps", "3"])
    state = json.loads((tmp_path / "head" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    other = tmp_path / "other.txt"
    other.write_text("another text " * 60)
    with monkeypatch.context() as m:  # other shapes or text: refused in one line, before loading
        from mlx_qspec.commands import train_head

        m.setattr(train_head, "load", lambda *a, **k: pytest.fail("the model was loaded"))
        for extra, words in (  # (the last flag counts)
                (["--seq-len", "16", "--draft-vocab", "0"],
                 "--seq-len 32 (this run: 16), --draft-vocab 40 (this run: 0)"),
                (["--text", str(other)], f"--text {text.resolve()} (this run: {other.resolve()})")):
            assert words in refused(capsys, main, *argv, *extra)
    model, tokenizer = load(src)
    prepare(model)
    head, cfg = store.load(tmp_path / "head", model, capture.ModelEnds(model))
    assert cfg["quantization"] == {"group_size": 32, "bits": 4} and cfg["draft_vocab"] == 40
    assert isinstance(head.fc, nn.QuantizedLinear)
    vocab = set(head["draft_vocab"].tolist())
    assert set(tokenizer.encode("the quick brown fox")) <= vocab
    seq = tokenizer.encode("the quick brown fox jumps")
    drafted, _ = HeadDraft(model, head, "head").propose(seq, hidden_states(model, seq[:-1]), 4)
    assert len(drafted) == 4 and set(drafted) <= vocab
    plain, _ = _generate(model, seq, max_tokens=16)  # and it drafts exactly, from its directory
    out, stats = _generate(model, seq, draft="head", draft_head=str(tmp_path / "head"),
                           num_draft_tokens=3, max_tokens=16)
    assert out == plain and stats.drafted


# ------------------------------------------------------------------ MTP layers


def write_checkpoint(folder, config, weights):
    """A directory load() reads: the weights, the config and a word-level tokenizer of the
    vocabulary's size ("t0" ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def _norm():
    return mx.random.uniform(0.6, 1.4, (HIDDEN,))


DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=HIDDEN, intermediate_size=128,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=32,
                q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
                rms_norm_eps=1e-6, num_nextn_predict_layers=1)


def hf_experts(layer):
    """A layer's parameters as a Hugging Face checkpoint stores them: experts one by one."""
    for k, v in tree_flatten(layer.parameters()):
        if ".switch_mlp." in k:
            yield from ((k.replace("switch_mlp", f"experts.{e}"), v[e]) for e in range(v.shape[0]))
        else:
            yield k, v


def deepseek_checkpoint(folder, seed, own_ends=True):
    """``(model, MTP layer, MTP extras, loaded)``: a tiny DeepSeek-V3 written in Hugging Face
    layout with its MTP module at layer L (experts one by one, the MLA key/value
    up-projection as one kv_b_proj; ``own_ends``: its own LM head and embedding), loaded."""
    mx.random.seed(seed)
    args = deepseek_v3.ModelArgs.from_dict(DEEPSEEK)
    model = deepseek_v3.Model(args)
    layer = deepseek_v3.DeepseekV3DecoderLayer(args, 2)
    extras = {"enorm.weight": _norm(), "hnorm.weight": _norm(), "shared_head.norm.weight": _norm(),
              "eh_proj.weight": mx.random.normal((HIDDEN, 2 * HIDDEN)) * 0.1}
    if own_ends:
        extras.update({"shared_head.head.weight": mx.random.normal((96, HIDDEN)) * 0.3,
                       "embed_tokens.weight": mx.random.normal((96, HIDDEN))})
    attn = layer.self_attn
    block = {k: v for k, v in hf_experts(layer) if not k.endswith(("embed_q.weight", "unembed_out.weight"))}
    kv_b = mx.concatenate([attn.embed_q.weight.swapaxes(-1, -2), attn.unembed_out.weight], axis=1)
    block["self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    weights = dict(tree_flatten(model.parameters()))
    weights.update({f"model.layers.2.{k}": v for k, v in {**block, **extras}.items()})
    return model, layer, extras, load(str(write_checkpoint(folder, DEEPSEEK, weights)))[0]


def test_deepseek_mtp_kept_with_its_own_head_and_matches_reference(tmp_path):
    """A DeepSeek-V3 checkpoint in Hugging Face layout with its MTP module at layer L: load
    keeps it (experts stacked and the MLA projection split by the architecture's own
    sanitize), the model itself loads as mlx-lm builds it, and the MTP level's drafts and
    distributions equal DeepSeek's formula on the original tensors: the head
    shared_head.head(shared_head.norm(block(eh_proj([enorm(e); hnorm(h)])))), the block's
    raw output fed back."""
    model, layer, extras, loaded = deepseek_checkpoint(tmp_path / "ds", 3)
    for k, v in tree_flatten(model.parameters()):
        assert mx.array_equal(v, dict(tree_flatten(loaded.parameters()))[k]).item(), k
    head, cfg = mtp.attached(loaded)
    assert cfg["feed_back"] == "raw" and cfg["own_lm_head"] and cfg["own_embedding"]
    for k, v in tree_flatten(layer.parameters()):
        assert mx.array_equal(v, dict(tree_flatten(head.block.parameters()))[k]).item(), k
    prepare(loaded)
    context = [3, 17, 40, 41, 42, 60, 7, 8, 9]
    hidden = hidden_states(loaded, context[:-1])
    level = HeadDraft(loaded, head, "mtp")
    drafted, qs = level.propose(context, hidden, 3)

    def ref_step(tokens, states):  # DeepSeek's MTP module on the original tensors, no cache
        rms = mx.fast.rms_norm
        e = rms(extras["embed_tokens.weight"][mx.array(tokens)][None], extras["enorm.weight"], 1e-6)
        x = mx.concatenate([e, rms(states[None], extras["hnorm.weight"], 1e-6)], -1) @ extras["eh_proj.weight"].T
        y = layer(x, create_attention_mask(x, None, return_array=True), None)
        return y, rms(y, extras["shared_head.norm.weight"], 1e-6) @ extras["shared_head.head.weight"].T

    tokens, states = context, mx.concatenate([mx.zeros((1, HIDDEN)), hidden])
    for d, q in zip(drafted, qs):
        y, logits = ref_step(tokens, states)
        lp = logits[0, -1] - mx.logsumexp(logits[0, -1])
        assert d == mx.argmax(lp).item()
        np.testing.assert_allclose(np.array(q[0]), np.array(lp), atol=2e-4)
        tokens, states = tokens + [d], mx.concatenate([states, y[0, -1:]])


QWEN3_NEXT = dict(model_type="qwen3_next", vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=4,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
                  num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=64,
                  mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6,
                  rope_theta=10000.0, partial_rotary_factor=0.5, max_position_embeddings=256,
                  full_attention_interval=4, tie_word_embeddings=False, num_nextn_predict_layers=1)


def test_qwen3_next_mtp_kept_with_offset_norms():
    """Qwen3-Next's ``mtp.*`` in Hugging Face layout (experts one by one, Gemma-style norms
    stored as w - 1): the block is a full-attention MoE layer with stacked experts and every
    norm, the MTP's own included, offset back by 1, as mlx-lm treats the model's norms."""
    mx.random.seed(4)
    args = qwen3_next.ModelArgs.from_dict(QWEN3_NEXT)
    model = qwen3_next.Model(args)
    layer = qwen3_next.Qwen3NextDecoderLayer(args, 3)
    offset = ("layernorm.weight", "q_norm.weight", "k_norm.weight")
    raw = {f"mtp.layers.0.{k}": v - 1.0 if k.endswith(offset) else v for k, v in hf_experts(layer)}
    norms = {n: _norm() for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    raw.update({f"mtp.{n}.weight": w - 1.0 for n, w in norms.items()})
    raw["mtp.fc.weight"] = mx.random.normal((HIDDEN, 2 * HIDDEN)) * 0.1
    weights = {**dict(tree_flatten(model.parameters())), **raw}
    found = {}
    classes = mtp.keeping(lambda config: (qwen3_next.Model, qwen3_next.ModelArgs), found)
    model_class, _ = classes(QWEN3_NEXT)
    shell = model_class(args)
    left = shell.sanitize(dict(weights))
    assert not any(k.startswith("mtp.") for k in left)
    head, cfg = found["mtp"]
    assert cfg["layer_index"] == 3 and cfg["feed_back"] == "normed" and not cfg["own_lm_head"]
    for k, v in tree_flatten(layer.parameters()):
        assert mx.allclose(v, dict(tree_flatten(head.block.parameters()))[k]).item(), k
    for ours, theirs in (("embed_norm", "pre_fc_norm_embedding"), ("hidden_norm", "pre_fc_norm_hidden"),
                         ("norm", "norm")):
        assert mx.allclose(head[ours].weight, norms[theirs]).item()


MIMO = dict(model_type="mimo", vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=2,
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=False, num_nextn_predict_layers=1,
            torch_dtype="float32")


def test_mimo_mtp_round_trips_through_convert(tmp_path):
    """A MiMo checkpoint (its MTP under model.mtp_layers.0, hidden state first) converts with
    -q: stock mlx-lm's files hold the model, DIR/mtp the MTP head quantized like it; loading
    the directory gives the MTP head back, drafting as the loaded-from-source one does."""
    mx.random.seed(5)
    args = mimo.ModelArgs.from_dict(MIMO)
    model = mimo.Model(args)
    layer = mimo.TransformerBlock(args)
    weights = dict(tree_flatten(model.parameters()))
    weights.update({f"model.mtp_layers.0.{k}": v for k, v in tree_flatten(layer.parameters())})
    weights.update({f"model.mtp_layers.0.{n}.weight": _norm()
                    for n in ("token_layernorm", "hidden_layernorm", "final_layernorm")})
    weights["model.mtp_layers.0.input_proj.weight"] = mx.random.normal((HIDDEN, 2 * HIDDEN)) * 0.1
    src = write_checkpoint(tmp_path / "mimo", MIMO, weights)
    source_model, _ = load(str(src))
    head_src, cfg = mtp.attached(source_model)
    assert cfg["hidden_first"] and cfg["quantization"] is None
    out = convert(str(src), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32)
    assert (out / "mtp" / "config.json").is_file()
    stock, _ = mlx_lm_load(str(out))  # stock mlx-lm loads the directory, MTP aside
    assert not any("mtp" in k for k, _ in tree_flatten(stock.parameters()))
    converted, _ = load(str(out))
    head, cfg = mtp.attached(converted)
    assert cfg["quantization"] == {"group_size": 32, "bits": 4}
    assert isinstance(head.fc, nn.QuantizedLinear) and isinstance(head.block.mlp.up_proj, nn.QuantizedLinear)
    quantize(head_src, 32, 4)  # as convert -q --q-bits 4 --q-group-size 32 quantizes it
    for k, v in tree_flatten(head_src.parameters()):
        assert mx.array_equal(v, dict(tree_flatten(head.parameters()))[k]).item(), k
    prepare(converted)
    context = [3, 17, 40, 41, 42, 60, 7]
    drafted, _ = HeadDraft(converted, head, "mtp").propose(
        context, hidden_states(converted, context[:-1]), 3)
    assert len(drafted) == 3


def test_gguf_nextn_tensors_load_as_mtp(tmp_path):
    """A GGUF whose last block carries llama.cpp's nextn tensors: the model has the blocks
    before it, the MTP head that block (quantized as stored), and it drafts; a GGUF without
    them, and a model without MTP weights, have none."""
    model, _ = load(write_tiny_gguf(tmp_path / "n.gguf", nextn=True))
    assert len(model.layers) == 2
    head, cfg = mtp.attached(model)
    assert cfg["feed_back"] == "raw" and not cfg["own_lm_head"]
    assert isinstance(head.fc, nn.QuantizedLinear) and isinstance(head.block.self_attn.q_proj, nn.QuantizedLinear)
    prepare(model)
    context = [5, 70, 71, 72, 9, 100]
    drafted, _ = HeadDraft(model, head, "mtp").propose(
        context, hidden_states(model, context[:-1]), 3)
    assert len(drafted) == 3
    out = convert(str(tmp_path / "n.gguf"), str(tmp_path / "mlx"))  # kept through convert too
    again, _ = load(str(out))
    kept, _ = mtp.attached(again)
    for k, v in tree_flatten(head.parameters()):
        assert mx.array_equal(v, dict(tree_flatten(kept.parameters()))[k]).item(), k
    plain, _ = load(write_tiny_gguf(tmp_path / "p.gguf"))
    assert mtp.attached(plain) is None
    stored, _ = load(tmp_path / "n.gguf", dtype=None)  # the stored dtypes, the MTP head's too
    assert mtp.attached(stored)[0].norm.weight.dtype == stored.model.norm.weight.dtype == mx.float32


def test_loading_leaves_the_mtp_head_to_the_level_that_reads_it(tmp_path, monkeypatch):
    """A load evaluates the model, not its MTP head (a whole MoE layer on DeepSeek-V3, read
    only with --draft mtp): the mtp level evaluates the head when it is built."""
    evaluated, eval_ = set(), mx.eval

    def recording(*trees):
        evaluated.update(id(a) for t in trees for _, a in tree_flatten(t))
        return eval_(*trees)

    monkeypatch.setattr(mx, "eval", recording)
    model, _ = load(write_tiny_gguf(tmp_path / "n.gguf", nextn=True))
    head, _ = mtp.attached(model)
    ids = lambda m: {id(a) for _, a in tree_flatten(m.parameters())}  # noqa: E731
    assert ids(model) <= evaluated and not ids(head) & evaluated
    mtp_level(model)
    assert ids(head) <= evaluated


def test_levels_refuse_in_one_line(model, tmp_path):
    """``mtp`` on a model without MTP layers and ``head`` without --draft-head say what to do."""
    with pytest.raises(UserError) as info:
        mtp_level(model)
    assert "\n" not in str(info.value) and "mlx_qspec.convert" in str(info.value) and "train_head" in str(info.value)
    with pytest.raises(UserError) as info:
        head_level(model, None)
    assert "--draft-head" in str(info.value) and "train_head" in str(info.value)
    with pytest.raises(ModelError, match="no config.json"):
        head_level(model, tmp_path)


def test_given_tokens_run_through_the_chain(model):
    """Tokens after the pending one (a lower level's proposals) are chained as if drafted:
    the drafts after them equal the level's own drafts after drafting those tokens itself."""
    head = random_head(model, seed=6)
    context = [5, 70, 71, 72, 9, 100, 101, 40]
    hidden = hidden_states(model, context[:-1])
    own, _ = HeadDraft(model, head, "head").propose(context, hidden, 4)
    given, _ = HeadDraft(model, head, "head").propose(context + own[:2], hidden, 2, cached=len(context) - 1)
    assert given == own[2:]
    none, _ = HeadDraft(model, head, "head").propose(context, None, 2)
    assert len(none) == 2


def test_step_reads_are_a_fraction_of_a_plain_step(model):
    """One draft step reads the head's block and the LM head (its draft rows where it has a
    draft vocabulary), far less than the model's forward."""
    level = HeadDraft(model, random_head(model), "head")
    plain = reads.ReadCounter()
    with reads.counting(plain):
        model(mx.array([[5, 6]]))
    step = level.step_reads()
    assert step.forwards == 1 and 0 < step.bytes() < 0.75 * plain.bytes()


# ------------------------------------------------------------------ decoding with a head


@pytest.fixture(scope="module")
def bigram():
    model = prepare(build_tiny_model(residual_gain=1.0))  # the context sways some tokens
    return model, HeadDraft(model, random_head(model, bigram=True), "head")


def _generate(model, prompt, **kw):
    if kw.get("draft") is None:
        return [t for t, _, _ in plain_generate_step(mx.array(prompt), model, **kw)], None
    stats = SpecStats()
    out = [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, stats=stats, **kw)]
    return out, stats


def test_head_drafts_exactly_with_accepted_and_rejected_blocks(bigram):
    """Greedy speculative decoding with a head equals plain decoding token for token at
    γ 1, 4 and 8, with blocks accepted and rejected; so does ngram>head (the lookup's
    proposals extended by the head)."""
    model, level = bigram
    prompt = [5, 77, 140, 3, 250, 19, 64, 8]
    plain, _ = _generate(model, prompt, max_tokens=40)
    for gamma in (1, 4, 8):
        out, stats = _generate(model, prompt, draft="head", draft_head=level,
                               num_draft_tokens=gamma, max_tokens=40)
        assert out == plain, gamma
        assert 0.3 < stats.acceptance < 1, (gamma, stats.acceptance)
    out, stats = _generate(model, prompt, draft="ngram>head", draft_head=level,
                           num_draft_tokens=4, max_tokens=40)
    assert out == plain and stats.drafted


def test_head_cache_after_decoding_equals_built_from_scratch(bigram):
    """After a generation the head's cache holds, for every position before the last block,
    the entry built from the model's own hidden state there (the decoder handed over every
    accepted row, the prefill's too), as one built from scratch over the context."""
    model, level = bigram
    mine = level.fresh()
    prompt = [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    out, _ = _generate(model, prompt, draft=Cascade((mine,)), num_draft_tokens=4, max_tokens=30)
    context = prompt + out
    exact = mine.exact.index(False) if False in mine.exact else len(mine.exact)
    assert exact >= len(context) - 1 - 6
    fresh = level.fresh()
    fresh.propose(context[:exact + 1], hidden_states(model, context[:exact]), 1)
    for a, b in zip(mine.cache.state[:2], fresh.cache.state[:2]):
        np.testing.assert_allclose(np.array(a[..., :exact, :]), np.array(b[..., :exact, :]),
                                   rtol=1e-4, atol=1e-4)


def test_head_sampling_keeps_the_model_distribution(bigram):
    """At temperature > 0 the first tokens follow the model's exact joint distribution
    (chi-square), and not the head's (the test has power)."""
    model, level = bigram
    prompt, steps, n = [5, 77, 140, 3, 250, 19, 64, 8], 2, 300
    sampler = make_sampler(temp=1.0, top_k=4)
    exact = joint(model, prompt, sampler, steps)
    counts, stats = sample_first_tokens(model, prompt, sampler, steps, n, seed=7, draft="head",
                                        gamma=2, draft_head=level)
    assert_fits(counts, n, exact, {k: 1.0 / len(exact) for k in exact}, stats,
                acceptance=(0.05, 0.95))


def test_mtp_drafts_exactly(tmp_path):
    """The tiny DeepSeek-V3 with its MTP module (MLA attention, MoE) drafts with ``mtp`` and
    gives plain decoding's tokens at γ 1, 4 and 8."""
    loaded = deepseek_checkpoint(tmp_path / "ds", 8, own_ends=False)[3]
    prompt = [3, 17, 40, 41, 42, 60, 7, 8, 9]
    plain, _ = _generate(loaded, prompt, max_tokens=24)
    for gamma in (1, 4, 8):
        out, stats = _generate(loaded, prompt, draft="mtp", num_draft_tokens=gamma, max_tokens=24)
        assert out == plain and stats.drafted, gamma


def test_cli_draft_head_mistakes_are_one_line(tmp_path, capsys):
    """--draft head without --draft-head, a directory that is no head, a head of another
    model: exit 2, one line each, before generating."""
    from mlx_qspec.generate import main

    gguf_path = write_tiny_gguf(tmp_path / "t.gguf")
    other = tmp_path / "other"
    small = build_tiny_model()  # hidden 128: not the GGUF model's 64
    head = random_head(small)
    store.save(other, head, store.head_config(head, "llama", 1, vars(small.args), {"kind": "test"}))
    for extra, words in ((["--draft", "head"], "--draft-head"),
                         (["--draft", "head", "--draft-head", str(tmp_path)], "no config.json"),
                         (["--draft", "head", "--draft-head", str(other)], "hidden states of size 128")):
        assert words in refused(capsys, main, "--model", str(gguf_path), "--prompt", "hi", "--max-tokens", "3",
                                *extra)


def test_auto_weighs_a_head_by_its_agreement_and_bytes(bigram, monkeypatch):
    """``auto`` weighs the head as an arm of its controller: at its measured agreement, and
    on a Mac at the roofline's cost of the bytes one head step reads (a fraction of a plain
    step's); the cache unmoved."""
    model, level = bigram
    level = level.fresh()
    level.agreement = 0.42
    cache = make_prompt_cache(model)
    model(mx.array([[5, 6, 7]]), cache=cache)
    seen = {}
    monkeypatch.setattr(cost, "prior", lambda m, c, priors, step_bytes=None: seen.update(
        priors=dict(priors), step_bytes=step_bytes))
    AutoPolicy(model, cache, draft_head=level)
    assert seen["priors"]["head"] == 0.42 and "ngram" in seen["priors"]
    modeled = cost.modeled(model, cache, ["head"], "M2 Max", seen["step_bytes"])
    assert 0 < modeled.draft["head"] < modeled.step
    assert cache[0].offset == 3


def test_head_reading_the_upper_plane(bigram):
    """``head+w-upper`` reads 8-bit layers (the model's 8-bit LM head here) as their upper
    plane: exact, fewer bytes per draft step; refused on a model without 8-bit layers, and
    any other precision on a head level is refused in one line."""
    model8 = prepare(build_tiny_model(residual_gain=1.0, head_bits=8))
    level = HeadDraft(model8, random_head(model8, bigram=True), "head")
    prompt = [5, 77, 140, 3, 250, 19, 64, 8]
    plain, _ = _generate(model8, prompt, max_tokens=24)
    full, s_full = _generate(model8, prompt, draft="head", draft_head=level, max_tokens=24)
    upper, s_upper = _generate(model8, prompt, draft="head+w-upper", draft_head=level, max_tokens=24)
    assert full == plain == upper and s_upper.draft == "head+w-upper"
    per = lambda s: s.draft_reads.bytes() / s.draft_reads.forwards  # noqa: E731
    assert per(s_upper) < per(s_full)  # the 8-bit LM head: half its code bytes
    model, level4 = bigram
    with pytest.raises(UserError, match="no 8-bit layers"):
        _generate(model, prompt, draft="head+w-upper", draft_head=level4, max_tokens=4)
    with pytest.raises(UserError, match="head\\+w-upper"):
        _generate(model, prompt, draft="head+a8", draft_head=level4, max_tokens=4)
