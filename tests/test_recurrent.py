"""Recurrent state rewinds exactly: after a block whose drafts were rejected, every hybrid
family's state equals, bit for bit, the one plain decoding builds over the same tokens; the
operations under it compute a T-token block as T one-token steps (on Metal too, emulated)."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gated_delta, mamba
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

from helpers.hybrid_models import MORE, build
from helpers.serving import Served
from mlx_qspec import hooks, reads, recurrent
from mlx_qspec.caches import position
from mlx_qspec.decoder import SpecStats, prefill
from mlx_qspec.drafts.auto import NOT_REWINDABLE
from mlx_qspec.drafts.grammar import parse_precision
from mlx_qspec.errors import UserError
from mlx_qspec.kv_cache import make_cache, make_rewindable
from mlx_qspec.precision import reading
from mlx_qspec.recurrent import RecurrentCache, ShiftedConv1d
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

FAMILIES = ["qwen3_5", "qwen3_next", "lfm2", "mamba2", "nemotron_h", *MORE]
PROMPT = [5, 77, 140, 3, 250, 19, 64, 8, 31, 99]
BLOCK = [12, 200, 7, 45, 90]  # y and four drafts, the verify's rows
KEPT = 2  # y and one accepted draft: the rest rejected
REPEATS = [5, 77, 140, 3, 250, 19, 64, 8, 5, 77, 140, 3]


def _flat(cache):
    """Every array a cache list holds, layer by layer (recurrent slots, live KV)."""
    out = []
    for c in cache:
        for x in getattr(c, "caches", [c]):
            if isinstance(x, ArraysCache):
                out += list(x.cache)
            else:
                out += [a[..., : x.offset, :] for a in (x.keys, x.values)]
    return out


def _plain(model, tokens, prompt=PROMPT, step=4):
    """Plain decoding's cache: mlx-lm's, the prompt but its last token prefilled in chunks of
    ``step``, then ``tokens`` one at a time."""
    cache = make_prompt_cache(model)
    prefill(model, mx.array(prompt[:-1]), cache, step=step)
    for t in tokens:
        model(mx.array([[t]]), cache=cache)
    mx.eval(_flat(cache))
    return cache


@pytest.mark.parametrize("name", FAMILIES)
def test_state_after_a_rejected_block_is_plain_decodings(name):
    model = hooks.install(build(name))
    cache = make_rewindable(make_prompt_cache(model), model)
    assert any(isinstance(c, RecurrentCache) or hasattr(c, "caches") for c in cache)
    prefill(model, mx.array(PROMPT[:-1]), cache, step=4)
    with reading(parse_precision("a4")):  # a draft's one-token forwards, rewound whole
        for t in BLOCK[:3]:
            model(mx.array([[t]]), cache=cache)
    for c in cache:
        c.trim(3)
    model(mx.array([BLOCK]), cache=cache)  # the verify
    for c in cache:
        c.trim(len(BLOCK) - KEPT)
    want = _plain(model, BLOCK[:KEPT])
    got = _flat(cache)
    assert len(got) == len(_flat(want)) and all(
        (a is None and b is None) or mx.array_equal(a, b) for a, b in zip(got, _flat(want)))
    # and it decodes on as plain decoding does
    assert mx.array_equal(model(mx.array([[BLOCK[KEPT]]]), cache=cache),
                          model(mx.array([[BLOCK[KEPT]]]), cache=want))


def test_a_consumer_that_stops_inside_a_block_leaves_plain_decodings_state():
    """The decoder commits a block as it settles, before it hands out the block's tokens; a
    consumer that takes fewer (an EOS, a stop string) has the rest taken back: the recurrent
    state then equals plain decoding's over exactly the tokens it took but the last."""
    model = hooks.install(build("qwen3_5"))
    stopped = 0
    for take in range(1, 7):
        cache = make_cache(model, "fp")
        gen = speculative_generate_step(mx.array(REPEATS), model, draft="a8-g32", num_draft_tokens=4,
                                        max_tokens=12, prompt_cache=cache, prefill_step_size=5)
        out = [next(gen) for _ in range(take)]
        gen.close()
        stopped += out[-1][2]  # a drafted token: others of its block were left
        tokens = REPEATS + [t for t, _, _ in out[:-1]]
        assert position(cache) == len(tokens)
        want = _plain(model, tokens[len(REPEATS) - 1:], REPEATS, step=5)
        assert all(mx.array_equal(a, b) for a, b in zip(_flat(cache), _flat(want)))
    assert stopped


def test_a_rewind_stops_at_the_last_commit():
    model = hooks.install(build("qwen3_5"))
    cache = make_rewindable(make_prompt_cache(model), model)
    model(mx.array([PROMPT]), cache=cache)
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.commit()
    model(mx.array([BLOCK]), cache=cache)
    layer = next(c for c in cache if isinstance(c, RecurrentCache))
    assert layer.offset == len(PROMPT) + len(BLOCK) and layer.rewindable == len(BLOCK)
    with pytest.raises(ValueError, match="rewinds only to its last commit, 5 positions back"):
        layer.trim(len(BLOCK) + 1)


def test_recurrent_state_is_counted_and_replays_add_to_it():
    """A one-token step of a gated-delta layer reads and writes its float32 state and its
    convolution's K − 1 rows; a rewind's replay reads and writes the state again."""
    model = hooks.install(build("qwen3_5"))
    cache = make_rewindable(make_prompt_cache(model), model)
    prefill(model, mx.array(PROMPT), cache, step=16)
    layers = [c for c in cache if isinstance(c, RecurrentCache)]
    state, conv = layers[0][1], layers[0][0]
    step = reads.ReadCounter()
    with reads.counting(step):
        mx.eval(model(mx.array([BLOCK[:1]]), cache=cache))
    assert step.ints[reads.STATE] == len(layers) * 2 * state.nbytes  # float32, read and written
    assert step.floats[reads.STATE] == len(layers) * 2 * conv.nbytes
    model(mx.array([BLOCK[1:]]), cache=cache)
    replay = reads.ReadCounter()
    with reads.counting(replay, forward=False):
        for c in cache:
            c.trim(2)
        mx.eval(_flat(cache))
    assert replay.forwards == 0
    assert replay.ints[reads.STATE] == len(layers) * 2 * state.nbytes


def test_shifted_convolution_is_row_invariant_and_mlx_s_convolution():
    mx.random.seed(3)
    conv = nn.Conv1d(24, 24, 4, groups=24, bias=True)
    ours = ShiftedConv1d(conv, slot=0)
    x = mx.random.normal((2, 3 + 7, 24))
    block = ours(x)
    steps = mx.concatenate([ours(x[:, t : t + 4]) for t in range(7)], axis=1)
    assert mx.array_equal(block, steps)
    assert mx.allclose(block, conv(x), atol=1e-5)
    back = ours.as_conv1d()
    assert mx.array_equal(back.weight, conv.weight) and mx.array_equal(back.bias, conv.bias)


def test_hooks_install_and_uninstall_the_recurrent_hooks_leaving_mlx_lm_as_it_was():
    """Two installed models of one mlx-lm module: the module's recurrence stays wrapped until
    the last is uninstalled; an uninstalled model runs mlx-lm's arithmetic meanwhile."""
    first, second = build("nemotron_h"), build("nemotron_h", seed=1)
    mixer = next(m for _, m in first.named_modules() if type(m).__name__ == "NemotronHMamba2Mixer")
    module = importlib.import_module(type(mixer).__module__)
    recurrent.uninstall(first)  # whatever earlier tests prepared of this module is gone
    original, cls = module.ssm_update, type(mixer)
    assert not hasattr(original, "original")
    x = mx.array([PROMPT])
    before = first(x)
    for model in (first, first, second):  # idempotent
        hooks.install(model)
    assert isinstance(mixer.conv1d, ShiftedConv1d) and module.ssm_update.original is original
    assert mx.allclose(first(x), before, atol=1e-4)
    hooks.uninstall(first)
    assert type(mixer) is cls and type(mixer.conv1d) is nn.Conv1d
    assert mx.array_equal(first(x), before)  # wrapped, but inert outside a prepared mixer
    assert module.ssm_update.original is original
    hooks.uninstall(second)
    assert module.ssm_update is original


def test_a_model_whose_state_cannot_be_rewound_is_refused_and_auto_decodes_plainly():
    mx.random.seed(0)
    model = mamba.Model(mamba.ModelArgs.from_dict(dict(
        model_type="mamba", vocab_size=256, hidden_size=64, intermediate_size=128, state_size=8,
        num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=8,
        tie_word_embeddings=True)))
    why = recurrent.unsupported(model)
    assert why and "(mamba)" in why and "\n" not in why
    with pytest.raises(UserError, match="cannot speculate: this model \\(mamba\\)"):
        speculative_generate_step(mx.array(PROMPT), model, draft="ngram")
    stats = SpecStats()
    out = [t for t, _, _ in speculative_generate_step(mx.array(PROMPT), model, draft="auto",
                                                      max_tokens=6, stats=stats)]
    assert out == [t for t, _, _ in plain_generate_step(mx.array(PROMPT), model, max_tokens=6)]
    assert stats.draft == "none" and stats.auto_reason == NOT_REWINDABLE
    with pytest.raises(UserError, match="cannot draft with the draft model: this model \\(mamba\\)"):
        speculative_generate_step(mx.array(PROMPT), build("qwen3_5"), draft="none", draft_model=model)
    assert recurrent.unsupported(build("qwen3_moe")) is None  # no recurrent layers
    # A chat or a server keeps a conversation's position in the cache list: refused at start,
    # in one line, where nothing counts positions; a hybrid with attention layers runs.
    with pytest.raises(UserError, match="mlx_qspec.server cannot run it: this model \\(mamba\\)"):
        Served(loaded=(model, None))
    recurrent.check_conversational(build("qwen3_5"), "mlx_qspec.chat")


def test_a_filled_mlx_lm_state_takes_its_offset_from_the_attention_layers():
    model = hooks.install(build("lfm2"))
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    make_rewindable(cache, model)
    assert all(c.offset == len(PROMPT) for c in cache)
    pure = hooks.install(build("mamba2"))
    filled = make_prompt_cache(pure)
    filled[0][0] = mx.zeros((1, 3, 8))
    with pytest.raises(UserError, match="does not record how many tokens"):
        make_rewindable(filled, pure)


@pytest.fixture
def metal_gated_delta(monkeypatch, mac):
    """mlx-lm's gated-delta Metal kernels, built through the MSL emulator."""
    monkeypatch.setattr(gated_delta, "_gated_delta_kernel", gated_delta._make_gated_delta_kernel())
    monkeypatch.setattr(gated_delta, "_gated_delta_kernel_packed",
                        gated_delta._make_gated_delta_packed_kernel())
    return gated_delta.gated_delta_kernel


@pytest.mark.parametrize("dk", [32, 128])  # the generic kernel, the packed one
def test_mlx_lm_gated_delta_kernel_runs_a_block_as_one_token_steps(metal_gated_delta, dk):
    """On Metal a verify runs the gated-delta recurrence as one T-token kernel launch and
    plain decoding as T one-token launches: the outputs and the state agree bit for bit
    (the state is carried in float32 between positions exactly as it is stored)."""
    mx.random.seed(5)
    B, T, Hk, Hv, Dv = 1, 5, 1, 2, 16
    q, k = (mx.random.normal((B, T, Hk, dk)) / dk for _ in range(2))
    v = mx.random.normal((B, T, Hv, Dv))
    g = mx.random.uniform(0.5, 1.0, (B, T, Hv))
    beta = mx.random.uniform(0, 1, (B, T, Hv))
    state = mx.random.normal((B, Hv, Dv, dk))
    y, block = metal_gated_delta(q, k, v, g, beta, state)
    ys, s = [], state
    for t in range(T):
        yt, s = metal_gated_delta(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1],
                                  g[:, t : t + 1], beta[:, t : t + 1], s)
        ys.append(yt)
    assert mx.array_equal(y, mx.concatenate(ys, axis=1)) and mx.array_equal(block, s)
    ref_y, ref_s = gated_delta.gated_delta_ops(q, k, v, g, beta, state)
    assert mx.allclose(y, ref_y, atol=1e-4) and mx.allclose(block, ref_s, atol=1e-4)
