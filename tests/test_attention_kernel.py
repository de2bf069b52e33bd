"""nested_attention.metal (+ its combine pass) through the MSL emulator: against
nested_attention_reference for the draft and verify views, causal blocks, GQA, Tq = 0 and
several chunks; rows bit for bit what one-row calls give; the KV bytes each variant reads;
the dispatcher's choice of path; bad shapes."""

import mlx.core as mx
import pytest

from mlx_qspec import kernels
from mlx_qspec.kv_cache import NestedKVCache, nest
from helpers import close
from tools.msl_emulator import recording


def nested_cache(B, Hkv, D, Tq, Tb, key_block, value_group, seed, dtype=mx.float32):
    """(keys, values) as NestedKVCache returns them: Tq positions quantized, Tb in float."""
    k = mx.random.normal((B, Hkv, Tq + Tb, D), key=mx.random.key(seed))
    k = k * mx.where(mx.arange(D) % 9 == 0, 4.0, 1.0)  # keys have outlier channels
    v = mx.random.normal((B, Hkv, Tq + Tb, D), key=mx.random.key(seed + 1))
    k, v = k.astype(dtype), v.astype(dtype)
    if Tq:
        kq = nest(k[:, :, :Tq].swapaxes(-1, -2), key_block)  # per channel over key_block tokens
        vq = nest(v[:, :, :Tq], value_group)
    else:
        kq = vq = (None,) * 4
    return (*kq, k[:, :, Tq:]), (*vq, v[:, :, Tq:])


def queries(B, Hq, L, D, seed, dtype=mx.float32):
    return (2 * mx.random.normal((B, Hq, L, D), key=mx.random.key(seed))).astype(dtype)


def attend(fn, q, keys, values, upper, key_block, value_group, mask="auto"):
    if mask == "auto":
        mask = "causal" if q.shape[2] > 1 else None
    return fn(q, keys, values, scale=q.shape[-1] ** -0.5, mask=mask, upper=upper,
              key_block=key_block, value_group=value_group)


def with_buffer(cache, n):
    """The same cache with only the first n buffered positions (the planes unchanged)."""
    return tuple((*part[:4], part[4][:, :, :n]) for part in cache)


CASES = [  # B, R, Hkv, L, D, Tq, Tb, key_block, value_group
    (1, 1, 1, 1, 64, 0, 7, 32, 32),        # decode with nothing quantized yet: one partial tile
    (1, 3, 2, 5, 64, 128, 40, 64, 64),     # GQA draft step
    (2, 3, 1, 16, 64, 256, 50, 128, 32),   # verify block of 16, batch 2
    (1, 1, 2, 16, 64, 64, 16, 32, 64),     # the buffer is exactly the block
    (1, 2, 1, 4, 64, 128, 0, 64, 32),      # everything quantized (Tb = 0)
    (1, 1, 1, 5, 64, 576, 90, 64, 64),     # 666 positions: two chunks, the boundary in the planes
    (1, 3, 1, 1, 128, 128, 3, 64, 128),    # head dim 128
    (1, 2, 1, 3, 32, 64, 10, 32, 32),      # head dim 32
]


@pytest.mark.parametrize("upper", [True, False], ids=["draft", "verify"])
@pytest.mark.parametrize("B,R,Hkv,L,D,Tq,Tb,kb,vg", CASES)
def test_matches_reference(emulated, upper, B, R, Hkv, L, D, Tq, Tb, kb, vg):
    keys, values = nested_cache(B, Hkv, D, Tq, Tb, kb, vg, seed=Tq + Tb + D)
    q = queries(B, R * Hkv, L, D, seed=L + R)
    y = attend(kernels.metal_nested_attention, q, keys, values, upper, kb, vg)
    assert y.dtype == q.dtype
    close(y, attend(kernels.nested_attention_reference, q, keys, values, upper, kb, vg))


@pytest.mark.parametrize("dtype,upper,rtol", [
    (mx.float16, True, 2.0**-10), (mx.float16, False, 2.0**-10), (mx.bfloat16, False, 2.0**-7)])
def test_half_precision(emulated, dtype, upper, rtol):
    """float16 / bfloat16 in and out (as on a Mac), float inside: within their rounding of
    the float32 result on the same stored values."""
    keys, values = nested_cache(1, 2, 64, 128, 20, 64, 32, seed=3, dtype=dtype)
    q = queries(1, 6, 5, 64, seed=4, dtype=dtype)
    y = attend(kernels.metal_nested_attention, q, keys, values, upper, 64, 32)
    assert y.dtype == dtype
    def f32(part):
        return tuple(a if a is None or a.dtype == mx.uint32 else a.astype(mx.float32) for a in part)

    ref = attend(kernels.nested_attention_reference, q.astype(mx.float32), f32(keys), f32(values),
                 upper, 64, 32)
    close(y, ref, rtol=rtol)


@pytest.mark.parametrize("upper", [True, False], ids=["draft", "verify"])
def test_last_row_is_the_one_row_call(emulated, upper):
    """The last row of a causal L-row call sees what an L = 1 call sees: bit for bit equal."""
    keys, values = nested_cache(1, 1, 64, 128, 30, 64, 64, seed=5)
    for L in (2, 5, 8, 16):
        q = queries(1, 3, L, 64, seed=L)
        block = attend(kernels.metal_nested_attention, q, keys, values, upper, 64, 64)
        one = attend(kernels.metal_nested_attention, q[:, :, -1:], keys, values, upper, 64, 64)
        assert mx.array_equal(block[:, :, -1:], one).item(), L


def test_every_row_is_plain_decoding(emulated):
    """Row i of a causal 16-row verify block equals, bit for bit, the one-row call over the
    cache cut after its position — what plain decoding would have computed — also where the
    rows straddle the 512-position chunk boundary."""
    L, Tq, Tb = 16, 448, 72  # rows see positions up to 504 .. 519
    keys, values = nested_cache(1, 1, 64, Tq, Tb, 64, 64, seed=6)
    q = queries(1, 2, L, 64, seed=7)
    block = attend(kernels.metal_nested_attention, q, keys, values, False, 64, 64)
    for i in range(L):
        k1, v1 = with_buffer((keys, values), Tb - (L - 1 - i))
        one = attend(kernels.metal_nested_attention, q[:, :, i:i + 1], k1, v1, False, 64, 64)
        assert mx.array_equal(block[:, :, i:i + 1], one).item(), i


def _plane_loads(upper):
    """Bytes each plane / buffer / scale input is loaded, at L = 1 and at L = 16."""
    keys, values = nested_cache(1, 2, 64, 576, 60, 64, 32, seed=8, dtype=mx.float16)
    loads = {}
    for L in (1, 16):
        with recording() as runs:
            attend(kernels.metal_nested_attention, queries(1, 6, L, 64, seed=L, dtype=mx.float16),
                   keys, values, upper, 64, 32)
        assert [r[0] for r in runs] == [
            "nested_attention_draft" if upper else "nested_attention_verify",
            "nested_attention_combine"]
        loads[L] = runs[0][1]
    return keys, values, loads


def test_verify_reads_each_kv_byte_once_for_all_rows(emulated):
    (ku, kl, ks, km, kbuf), (vu, vl, vs, vm, vbuf), loads = _plane_loads(upper=False)
    for name, a in (("k_upper", ku), ("k_lower", kl), ("v_upper", vu), ("v_lower", vl),
                    ("k_buf", kbuf), ("v_buf", vbuf)):
        assert loads[1][name] == a.nbytes, name  # every byte once, over both chunks
    for name in ("k_upper", "k_lower", "k_scales", "k_mins", "k_buf",
                 "v_upper", "v_lower", "v_scales", "v_mins", "v_buf"):
        assert loads[16][name] == loads[1][name], name  # 48 query rows cost no extra KV read


def test_draft_reads_no_lower_plane(emulated):
    (ku, kl, *_), (vu, vl, *_), loads = _plane_loads(upper=True)
    for L in (1, 16):
        assert "k_lower" not in loads[L] and "v_lower" not in loads[L]
        assert loads[L]["k_upper"] == ku.nbytes and loads[L]["v_upper"] == vu.nbytes


def test_reads_the_cache_as_it_returns_it(emulated):
    """NestedKVCache's slices of its storage and mlx-lm's transposed queries go in as they are."""
    B, H, Hkv, D = 1, 4, 2, 64
    cache = NestedKVCache(block_size=32, value_group_size=64)
    for T, seed in ((150, 0), (5, 1)):
        kv = mx.random.normal((2, B, Hkv, T, D), key=mx.random.key(seed))
        keys, values = cache.update_and_fetch(kv[0], kv[1])
    q = mx.random.normal((B, 5, H, D), key=mx.random.key(2)).transpose(0, 2, 1, 3)
    for upper in (True, False):
        y = attend(kernels.metal_nested_attention, q, keys, values, upper, 32, 64)
        close(y, attend(kernels.nested_attention_reference, q, keys, values, upper, 32, 64))


def test_dispatch(emulated, monkeypatch):
    keys, values = nested_cache(1, 1, 64, 64, 20, 32, 32, seed=9)
    q = queries(1, 2, 4, 64, seed=10)
    ref = attend(kernels.nested_attention_reference, q, keys, values, False, 32, 32)
    monkeypatch.setattr(kernels, "backend", lambda: "mlx-reference")
    with recording() as runs:
        y = attend(kernels.nested_attention, q, keys, values, False, 32, 32)
    assert runs == [] and mx.array_equal(y, ref).item()
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    with recording() as runs:
        y = attend(kernels.nested_attention, q, keys, values, False, 32, 32)
    assert [r[0] for r in runs] == ["nested_attention_verify", "nested_attention_combine"]
    close(y, ref)
    # what the kernel does not take goes to the reference, never to wrong numbers
    T = 84
    array_mask = mx.arange(T)[None] <= (mx.arange(4) + T - 4)[:, None]
    q17 = queries(1, 2, 17, 64, seed=11)
    for qq, mask in ((q, array_mask), (q17, "causal")):
        with recording() as runs:
            y = attend(kernels.nested_attention, qq, keys, values, False, 32, 32, mask=mask)
        assert runs == []
        ref = attend(kernels.nested_attention_reference, qq, keys, values, False, 32, 32, mask=mask)
        assert mx.array_equal(y, ref).item()


def test_unsupported_shapes_raise_clear_errors(emulated):
    keys, values = nested_cache(1, 1, 64, 64, 20, 32, 32, seed=12)
    q = queries(1, 2, 4, 64, seed=13)

    def run(qq=q, k=keys, v=values, upper=False, kb=32, vg=32, mask="causal"):
        return attend(kernels.metal_nested_attention, qq, k, v, upper, kb, vg, mask=mask)

    k2, v2 = nested_cache(1, 2, 64, 64, 20, 32, 32, seed=1)
    for args, match in [
        (dict(qq=queries(1, 2, 17, 64, seed=1)), "1..16 query rows"),
        (dict(mask=mx.ones((4, 84), mx.bool_)), "not an array mask"),
        (dict(mask="sliding"), "not an array mask"),
        (dict(qq=queries(1, 2, 4, 96, seed=1)), "head dim"),
        (dict(qq=q.astype(mx.int32)), "float32, float16 or bfloat16"),
        (dict(vg=16), "value group"),
        (dict(kb=128), "whole key blocks"),
        (dict(qq=queries(1, 3, 4, 64, seed=1), k=k2, v=v2), "multiple"),
        (dict(qq=queries(1, 9, 16, 64, seed=1)), "at most 128 rows"),
        (dict(k=(keys[0], None, *keys[2:])), "key planes"),
        (dict(qq=queries(1, 2, 4, 64, seed=1), k=(None,) * 4 + (keys[4][:, :, :3],),
              v=(None,) * 4 + (values[4][:, :, :3],)), "causal query rows"),
    ]:
        with pytest.raises(ValueError, match=match):
            run(**args)
    run(k=(keys[0], None, *keys[2:]), v=(values[0], None, *values[2:]), upper=True)  # draft: fine
