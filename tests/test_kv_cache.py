"""The nested (QuantSpec) KV cache: plane algebra, attention, rewind, flush timing, memory,
and mlx-lm's own generation loop running on it."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import build_tiny_model
from mlx_lm.generate import generate_step
from mlx_lm.models import base, llama
from mlx_lm.models.cache import QuantizedKVCache

from mlx_qspec import hooks, kernels, precision, reads
from mlx_qspec.drafts.grammar import parse_precision
from mlx_qspec.decoder import SpecStats
from mlx_qspec.kv_cache import NestedKVCache, make_cache
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

BS, VG = 32, 32


def attend(*args, **kw):
    return getattr(kernels, "nested_attention", kernels.nested_attention_reference)(*args, **kw)


def kv(T, D=64, H=2, seed=0):
    """Keys and values (1, H, T, D) with one constant key channel and one constant value row
    (max == min: s = 0)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, H, T, D)).astype(np.float32) * np.linspace(0.5, 4, D)
    v = rng.standard_normal((1, H, T, D)).astype(np.float32)
    k[..., 3] = 1.25
    v[:, :, min(5, T - 1)] = -0.5
    return mx.array(k), mx.array(v)


def feed(cache, k, v, sizes):
    i = 0
    for n in sizes:
        out = cache.update_and_fetch(k[:, :, i : i + n], v[:, :, i : i + n])
        i += n
    return out


def codes(packed):
    """numpy: MLX 4-bit packing (..., N/8) → codes (..., N)."""
    p = np.array(packed)[..., None] >> (4 * np.arange(8, dtype=np.uint32))
    return (p & 15).reshape(*p.shape[:-2], -1)


def dequant(view, group, keys, upper=False):
    """numpy, from the formulas: a view's quantized part as (..., Tq, D) floats."""
    u, lo, s, m = (np.array(a) if a.dtype != mx.uint32 else codes(a).astype(np.float32)
                   for a in view[:4])
    s, m = (np.repeat(a, group, axis=-1) for a in (s, m))
    x = m + s * u + (0 if upper else s / 16 * (lo - 8))
    return x.swapaxes(-1, -2) if keys else x


def full(view, group, keys, upper=False):
    return mx.concatenate([mx.array(dequant(view, group, keys, upper)), view[4]], axis=2)


def test_planes_are_4bit_rtn_plus_signed_residual():
    k, v = kv(150)
    c = NestedKVCache(BS, VG)
    kview, vview = feed(c, k, v, [70, 1, 79])
    assert (c.offset, c.nq) == (150, 3)
    Tq = c.nq * BS
    for view, x, keys, group in ((kview, k, True, BS), (vview, v, False, VG)):
        x = np.array(x)
        assert np.array_equal(np.array(view[4]), x[:, :, Tq:])  # the buffer is the raw tail
        xq = x[:, :, :Tq].swapaxes(-1, -2) if keys else x[:, :, :Tq]
        u, lo = codes(view[0]), codes(view[1])
        assert u.max() <= 15 and lo.max() <= 15 and u.shape == lo.shape == xq.shape
        # the draft view is the plain 4-bit RTN quantization, computed here independently
        g = xq.reshape(*xq.shape[:-1], -1, group)
        mn, mx_ = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        s = (mx_ - mn) / np.float32(15)
        ru = np.clip(np.round((g - mn) / np.where(s > 0, s, 1)), 0, 15)
        assert np.array_equal(u, ru.reshape(u.shape))
        draft = dequant(view, group, keys, upper=True)
        rtn = (mn + s * ru).reshape(xq.shape)
        np.testing.assert_allclose(draft, rtn.swapaxes(-1, -2) if keys else rtn, rtol=0, atol=1e-6)
        # the verify view: min + sU + (s/16)L, within s/32 of x, except where the residual
        # rounds to +8 and is clipped to 7 (then within s/16)
        verify = dequant(view, group, keys)
        verify = verify.swapaxes(-1, -2) if keys else verify
        r = (g - mn - s * ru) / np.where(s > 0, s / 16, 1)
        clipped = (np.round(r) > 7).reshape(xq.shape)
        s_el = np.repeat(s[..., 0], group, axis=-1).reshape(xq.shape)
        err = np.abs(verify - xq)
        assert not np.isnan(verify).any()
        assert (err[~clipped] <= s_el[~clipped] / 32 + 1e-6).all()
        assert (err <= s_el / 16 + 1e-6).all() and clipped.mean() < 0.06
    # a constant key channel and a constant value row (s = 0) come back exactly
    assert (dequant(kview, BS, True)[..., 3] == 1.25).all()
    assert (dequant(vview, VG, False)[:, :, 5] == -0.5).all()


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("L,mask", [(1, None), (5, "causal"), (5, "array")])
def test_attention_matches_sdpa_on_the_dequantized_view(upper, L, mask):
    k, v = kv(140)
    c = NestedKVCache(BS, VG)
    feed(c, k, v, [140 - L])
    if mask == "array":
        mask = c.make_mask(L, return_array=True)
    else:
        assert c.make_mask(L) == mask
    kview, vview = c.update_and_fetch(k[:, :, -L:], v[:, :, -L:])
    assert kview[0] is not None and kview[4].shape[2] >= L  # planes and buffer both used
    q = mx.array(np.random.default_rng(1).standard_normal((1, 4, L, 64)).astype(np.float32))
    out = attend(q, kview, vview, scale=0.125, mask=mask, upper=upper, key_block=BS, value_group=VG)
    ref = mx.fast.scaled_dot_product_attention(
        q, full(kview, BS, True, upper), full(vview, VG, False, upper), scale=0.125, mask=mask)
    atol = 1e-5 * float(mx.abs(ref).max())
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=atol)


def state_equal(a, b):
    return all((x is None and y is None) or mx.array_equal(x, y) for x, y in zip(a.state, b.state))


@pytest.mark.parametrize("t", [20, 100, 127])
def test_trim_and_reappend_equals_never_drafting(t):
    k, v = kv(t + 5)
    kd, vd = kv(5, seed=7)
    straight, drafted = NestedKVCache(BS, VG), NestedKVCache(BS, VG)
    feed(straight, k, v, [t, 5])
    feed(drafted, k, v, [t])
    assert drafted.room() >= 4  # a block of 5 stays within one flush state
    drafted.update_and_fetch(kd, vd)
    assert drafted.trim(5) == 5
    drafted.update_and_fetch(k[:, :, t:], v[:, :, t:])
    assert state_equal(straight, drafted) and drafted.offset == straight.offset == t + 5


@pytest.mark.parametrize("t", [20, 158])
def test_state_round_trip(t):
    k, v = kv(t + 3)
    c = NestedKVCache(BS, VG)
    feed(c, k, v, [t])
    d = NestedKVCache.from_state(c.state, c.meta_state)
    assert (d.offset, d.nq) == (c.offset, c.nq) and state_equal(c, d)
    for x in (c, d):
        x.update_and_fetch(k[:, :, t:], v[:, :, t:])
    assert state_equal(c, d)


def test_trim_into_the_planes_raises():
    c = NestedKVCache(BS, VG)
    feed(c, *kv(100), [100])
    with pytest.raises(ValueError, match="cannot trim 37"):
        c.trim(37)
    assert c.trim(36) == 36 and c.offset == 64 and c.update_and_fetch(*kv(1))[0][4].shape[2] == 1


def test_room_keeps_every_block_on_the_one_token_split():
    T = 300
    k, v = kv(T)
    one = NestedKVCache(BS, VG)
    seen = []  # the quantized block count position p sees in one-token decoding
    for p in range(T):
        one.update_and_fetch(k[:, :, p : p + 1], v[:, :, p : p + 1])
        seen.append(one.nq)
    blocks = NestedKVCache(BS, VG)
    feed(blocks, k, v, [40])
    assert blocks.nq == seen[39] == 0
    t, sizes = 40, []
    while t < T:
        n = min(blocks.room() + 1, 5, T - t)
        blocks.update_and_fetch(k[:, :, t : t + n], v[:, :, t : t + n])
        assert all(blocks.nq == seen[p] for p in range(t, t + n)), (t, n)
        t += n
        sizes.append(n)
    assert any(n < 5 for n in sizes[:-1]) and state_equal(one, blocks)  # room() cut some short


def test_memory_per_token_is_the_8bit_cache_plus_the_buffer():
    T, D = 300, 64
    k, v = kv(T, D)
    nested, q8 = NestedKVCache(64, 64), QuantizedKVCache(group_size=64, bits=8)
    feed(nested, k, v, [100, 1, 199])
    feed(q8, k, v, [100, 1, 199])
    q8_used = sum(a[..., : q8.offset, :].nbytes for a in (*q8.state[0], *q8.state[1]))
    assert q8_used % T == 0
    Tb = nested.offset - nested.nq * 64
    buffer = 2 * 1 * 2 * Tb * D * 4
    assert nested.nbytes == q8_used // T * nested.nq * 64 + buffer


def test_generate_step_runs_on_the_nested_cache():
    model = hooks.install(build_tiny_model())
    prompt = mx.array(np.random.default_rng(0).integers(0, 256, 100), mx.uint32)
    cache = make_cache(model, "nested", BS, VG)
    got = [t for t, _ in generate_step(prompt, model, prompt_cache=cache, max_tokens=24)]
    assert cache[0].nq * BS > 0 and cache[0].offset == 100 + 24

    # the same by hand: mlx-lm's prefill chunk, then one token at a time
    cache = make_cache(model, "nested", BS, VG)
    model(prompt[None, :-1], cache=cache)
    tok, want = prompt[-1:], []
    for _ in range(24):
        tok = mx.argmax(model(tok[None], cache=cache)[0, -1:], axis=-1)
        want.append(tok.item())
    assert got == want

    fp_cache = make_cache(model, "fp")
    fp = [t for t, _ in generate_step(prompt, model, prompt_cache=fp_cache, max_tokens=24)]
    print(f"nested vs fp KV: {sum(a == b for a, b in zip(got, fp))}/24 tokens equal")

    # the draft reads only the upper planes: fewer KV bytes, exactly the lower planes fewer
    counts = {}
    for name, p in (("full", precision.FULL_PRECISION), ("upper", parse_precision("kv-upper"))):
        with precision.reading(p), reads.counting(reads.ReadCounter()) as rc:
            mx.eval(model(tok[None], cache=cache))
        assert [c.trim(1) for c in cache] == [1, 1]
        counts[name] = rc.bytes(reads.KV)
    lower = sum(c.state[i].nbytes for c in cache for i in (1, 6))
    assert counts["full"] > 0 and counts["full"] - counts["upper"] == lower


def test_speculation_and_plain_decoding_without_a_cache_build_the_nested_one():
    """``kv_mode="nested"`` with no cache given: both loops build the nested cache (they
    built an fp one, which ``kv-upper`` cannot read) and decode as mlx-lm does on it."""
    model = hooks.install(build_tiny_model())
    prompt = mx.array(np.random.default_rng(1).integers(0, 256, 80), mx.uint32)
    want = [t for t, _ in generate_step(prompt, model, prompt_cache=make_cache(model, "nested"),
                                        max_tokens=20)]
    stats = SpecStats()
    got = [t for t, *_ in speculative_generate_step(prompt, model, draft="kv-upper",
                                                    kv_mode="nested", max_tokens=20, stats=stats)]
    assert got == want and stats.drafted > 0
    assert [t for t, *_ in plain_generate_step(prompt, model, kv_mode="nested",
                                                max_tokens=20)] == want


def test_kv_upper_needs_the_nested_cache():
    model = hooks.install(hooks.install(build_tiny_model()))
    assert llama.scaled_dot_product_attention.original is base.scaled_dot_product_attention
    tok = mx.array([[1, 2]])
    for mode in ("fp", "8bit"):
        with reads.counting(reads.ReadCounter()) as rc:
            model(tok, cache=make_cache(model, mode))
        assert rc.bytes(reads.KV) > 0
        with precision.reading(parse_precision("kv-upper")):
            with pytest.raises(ValueError, match="kv-mode nested"):
                model(tok, cache=make_cache(model, mode))


def test_bad_input():
    model = build_tiny_model()
    with pytest.raises(ValueError, match="fp, 8bit, nested"):
        make_cache(model, "4bit")
    with pytest.raises(ValueError, match="block_size"):
        NestedKVCache(block_size=48)
    with pytest.raises(ValueError, match="value_group_size"):
        NestedKVCache(value_group_size=16)
    with pytest.raises(ValueError, match="pass value_group_size=32"):
        NestedKVCache(32, 64).update_and_fetch(*kv(4, D=96))
    assert make_cache(model, "nested")[0].value_group_size == 32  # head dim 32 < default 64


def test_generate_reads_a_prompt_cache_file_named_from_home(tiny_gguf, tmp_path, monkeypatch,
                                                            capsys):
    """--prompt-cache-file ~/c.safetensors (quoted, or as --flag=~/…: no shell expands it):
    cache_prompt wrote $HOME/c.safetensors, and generate said it did not exist."""
    from mlx_qspec.cache_prompt import main as cache_prompt_main
    from mlx_qspec.generate import main as generate_main

    monkeypatch.setenv("HOME", str(tmp_path))
    file = "~/c.safetensors"
    cache_prompt_main(["--model", tiny_gguf, "--prompt", "hi", "--prompt-cache-file", file])
    capsys.readouterr()
    generate_main(["--prompt-cache-file", file, "--prompt", "there", "--max-tokens", "3"])
    assert capsys.readouterr().out.strip()
