"""The MSL emulator's own semantics: barriers, SIMD-group ops, partial threadgroups, bounds
checks, byte counts, MLX's generated signature — and Metal kernels written by others
(mlx-lm's) run through it against MLX reference ops."""

import importlib
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from tools.msl_emulator import KernelError, metal_kernel


def run(src, inputs, out_shapes, out_dtypes, grid, tg, names=None, template=None, header="",
        init_value=None, **kw):
    names = names or [f"in{i}" for i in range(len(inputs))]
    k = metal_kernel(name="t", input_names=names, output_names=[f"out{i}" for i in range(len(out_shapes))],
                     source=src, header=header, **kw)
    outs = k(inputs=inputs, template=template, grid=grid, threadgroup=tg, output_shapes=out_shapes,
             output_dtypes=out_dtypes, init_value=init_value)
    return outs, k


def test_barrier_orders_threadgroup_memory():
    # each thread writes its slot, then reads the mirror slot: wrong without a faithful barrier
    src = """
        threadgroup float buf[256];
        uint t = thread_index_in_threadgroup;
        buf[t] = in0[thread_position_in_grid.x];
        metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
        out0[thread_position_in_grid.x] = buf[threads_per_threadgroup.x - 1 - t];
        // a tree sum over the threadgroup: log2(256) barrier phases
        for (uint s = 128; s > 0; s >>= 1) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (t < s) buf[t] += buf[t + s];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (t == 0) out1[threadgroup_position_in_grid.x] = buf[0];
    """
    x = mx.arange(512, dtype=mx.float32)
    (rev, sums), _ = run(src, [x], [(512,), (2,)], [mx.float32, mx.float32], (512, 1, 1), (256, 1, 1))
    xn = np.arange(512, dtype=np.float32)
    np.testing.assert_array_equal(np.array(rev), np.concatenate([xn[:256][::-1], xn[256:][::-1]]))
    np.testing.assert_array_equal(np.array(sums), [xn[:256].sum(), xn[256:].sum()])


def test_missing_barrier_is_visible():
    """Without the barrier, a reader runs before the writer: the emulator must not hide it."""
    src = """
        threadgroup float buf[64];
        uint t = thread_index_in_threadgroup;
        if (t == 0) buf[63] = -1.0f;
        buf[t] = float(t);
        out0[t] = buf[63 - t];
    """
    (out,), _ = run(src, [mx.zeros((1,))], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    assert np.array(out)[0] != 63.0  # thread 0 read slot 63 before thread 63 wrote it


def test_threadgroup_memory_starts_uninitialised_in_every_group():
    """Group 0 writes all 32 slots, group 1 only 16: its other 16 must not show group 0's."""
    src = """
        threadgroup float buf[32];
        uint t = thread_index_in_threadgroup;
        if (threadgroup_position_in_grid.x == 0 || t < 16) buf[t] = 1.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[thread_position_in_grid.x] = buf[t];
    """
    (out,), _ = run(src, [mx.zeros((1,))], [(64,)], [mx.float32], (64, 1, 1), (32, 1, 1))
    o = np.array(out)
    assert (o[:48] == 1.0).all() and np.isnan(o[48:]).all()


def test_simd_ops_match_numpy_with_partial_simdgroup():
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        int v = in0[i];
        out0[i * 12 + 0] = simd_sum(v);
        out0[i * 12 + 1] = metal::simd_max(v);
        out0[i * 12 + 2] = simd_min(v);
        out0[i * 12 + 3] = simd_prefix_inclusive_sum(v);
        out0[i * 12 + 4] = simd_prefix_exclusive_sum(v);
        out0[i * 12 + 5] = simd_shuffle(v, (lane * 7) % 32);
        out0[i * 12 + 6] = simd_shuffle_xor(v, 5u);
        out0[i * 12 + 7] = simd_shuffle_down(v, 3u);
        out0[i * 12 + 8] = simd_shuffle_up(v, 2u);
        out0[i * 12 + 9] = simd_broadcast(v, 9);
        out0[i * 12 + 10] = int(simd_sum(float4(float(v), 1.0f, 2.0f, 3.0f)).y);
        out0[i * 12 + 11] = lane < 8 ? simd_sum(1) : -5;   // only the active lanes count
    """
    n = 96
    x = np.random.default_rng(0).integers(-50, 50, n).astype(np.int32)
    (out,), _ = run(src, [mx.array(x)], [(n * 12,)], [mx.int32], (n, 1, 1), (96, 1, 1))
    got = np.array(out).reshape(n, 12)
    for s in range(3):
        v = x[32 * s: 32 * s + 32]
        g = got[32 * s: 32 * s + 32]
        lane = np.arange(32)
        # columns 0-6 and 9-11 as the kernel writes them; 7 and 8 leave some lanes undefined
        want = [v.sum(), v.max(), v.min(), np.cumsum(v), np.cumsum(v) - v, v[(lane * 7) % 32],
                v[lane ^ 5], v[9], 32, np.where(lane < 8, 8, -5)]
        np.testing.assert_array_equal(g[:, [0, 1, 2, 3, 4, 5, 6, 9, 10, 11]],
                                      np.stack(np.broadcast_arrays(*want), axis=1))
        np.testing.assert_array_equal(g[:29, 7], v[3:])
        np.testing.assert_array_equal(g[2:, 8], v[:30])
    # a partial SIMD group (threadgroup of 40 → lanes 0..7 of the second group) sums 8 lanes
    (out,), _ = run("out0[thread_position_in_grid.x] = simd_sum(1);", [mx.zeros((1,))], [(40,)],
                    [mx.int32], (40, 1, 1), (40, 1, 1))
    np.testing.assert_array_equal(np.array(out), [32] * 32 + [8] * 8)


def test_partial_threadgroups_and_position_attributes():
    src = """
        uint3 p = thread_position_in_grid;
        uint idx = (p.y * threads_per_grid.x + p.x) * 6;
        out0[idx + 0] = threads_per_threadgroup.x;
        out0[idx + 1] = threads_per_threadgroup.y;
        out0[idx + 2] = threadgroup_position_in_grid.x * dispatch_threads_per_threadgroup.x
                        + thread_position_in_threadgroup.x;
        out0[idx + 3] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
        out0[idx + 4] = thread_index_in_threadgroup;
        out0[idx + 5] = simdgroup_index_in_threadgroup * 100 + thread_index_in_simdgroup;
    """
    gx, gy, tx, ty = 10, 3, 4, 2
    (out,), _ = run(src, [mx.zeros((1,))], [(gx * gy * 6,)], [mx.uint32], (gx, gy, 1), (tx, ty, 1))
    o = np.array(out).reshape(gy, gx, 6)
    for y in range(gy):
        for x in range(gx):
            wx = min(tx, gx - x // tx * tx)  # the last column of threadgroups is 2 wide
            wy = min(ty, gy - y // ty * ty)  # the last row is 1 high
            lin = (y % ty) * wx + x % tx
            assert tuple(o[y, x]) == (wx, wy, x, 3 * 10 + 2, lin, (lin // 32) * 100 + lin % 32)


def test_out_of_bounds_read_fails_naming_buffer_and_index():
    with pytest.raises(KernelError, match=r"'weights'.*element 64\b.*64 elements"):
        run("uint i = thread_position_in_grid.x; out0[i] = weights[i + 1];", [mx.ones((64,))],
            [(64,)], [mx.float32], (64, 1, 1), (32, 1, 1), names=["weights"])


def test_out_of_bounds_write_and_vector_cast_fail():
    with pytest.raises(KernelError, match=r"'out0'.*element 10\b"):
        run("out0[thread_position_in_grid.x] = 1.0f;", [mx.zeros((1,))], [(10,)], [mx.float32],
            (11, 1, 1), (32, 1, 1))
    # a uint4 view of a 10-word buffer: the third vector runs past its end
    with pytest.raises(KernelError, match=r"'in0'.*element 8\b"):
        run("auto v = (const device uint4*)in0; out0[0] = v[thread_position_in_grid.x].w;",
            [mx.zeros((10,), mx.uint32)], [(1,)], [mx.uint32], (3, 1, 1), (3, 1, 1))


def test_address_spaces_do_not_convert():
    """MLX binds arrays under 8 elements as `constant`; casting one to `device` fails in Metal,
    so it must fail here too."""
    src = "auto p = (const device float*)(a); out0[0] = p[0];"
    with pytest.raises(KernelError, match="does not compile"):
        run(src, [mx.ones((3,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1), names=["a"])
    (out,), _ = run(src, [mx.ones((8,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1), names=["a"])
    assert out.item() == 1.0


def test_byte_counts_per_buffer():
    src = """
        uint i = thread_position_in_grid.x;
        auto v = (const device float4*)(a + 4 * i);
        float4 q = v[0];
        out0[i] = q.x + q.y + q.z + q.w + a[4 * i] + b[0];
    """
    a = mx.ones((256,))
    (out,), k = run(src, [a, mx.ones((3,))], [(64,)], [mx.float32], (64, 1, 1), (32, 1, 1),
                    names=["a", "b"])
    assert k.last_loads["a"] == 64 * 16 + 64 * 4  # one float4 and one float per thread
    assert k.last_loads["b"] == 64 * 4
    assert k.last_loads["out0"] == 0
    np.testing.assert_array_equal(np.array(out), 6.0)


def test_generated_signature_scalars_shapes_strides_templates():
    """Source is MLX's own text: scalars by constant reference, shapes/strides/ndim only
    when mentioned, typename/int/bool template parameters, half and bfloat16 I/O."""
    src = """
        uint i = thread_position_in_grid.x;
        uint r = i / x_shape[1], c = i % x_shape[1];
        float v = float(x[r * x_strides[0] + c * x_strides[1]]);
        out0[i] = static_cast<T>(FLIP ? -v * s + N : v * s + N + x_ndim);
        out1[i] = static_cast<bfloat16_t>(metal::precise::rsqrt(metal::abs(v) + 1.0f));
    """
    x = mx.random.normal((5, 7)).astype(mx.float16).T  # not row contiguous
    (o0, o1), k = run(src, [x, 2.0], [(7, 5), (7, 5)], [mx.float16, mx.bfloat16], (35, 1, 1),
                      (16, 1, 1), names=["x", "s"], ensure_row_contiguous=False,
                      template=[("T", mx.float16), ("N", 3), ("FLIP", True)])
    assert "const constant float& s" in k.last_source and "x_strides" in k.last_source
    xf = x.astype(mx.float32)
    assert mx.allclose(o0.astype(mx.float32), (-xf * 2 + 3).astype(mx.float16).astype(mx.float32))
    assert mx.allclose(o1.astype(mx.float32), mx.rsqrt(mx.abs(xf) + 1), rtol=1e-2)


def test_header_helpers_vectors_atomics():
    header = """
    template <typename T, int W>
    inline T wsum(const device T* p) { T s = 0; for (int i = 0; i < W; i++) s += p[i]; return s; }
    """
    src = """
        uint i = thread_position_in_grid.x;
        float4 q = float4(float2(x[4*i], x[4*i+1]), x[4*i+2], x[4*i+3]);
        float3 t = q.xyz * 2.0f;
        uint bits = as_type<uint>(q.w);
        float3 p = float3(((const device packed_float3*)x)[i]);  // 12-byte stride
        t += p - float3(x[3*i], x[3*i+1], x[3*i+2]);
        float r = wsum<float, 4>(x + 4 * i) + t.z + metal::dot(q, float4(1.0f)) + float(bits == as_type<uint>(x[4*i+3]));
        atomic_store_explicit(&out0[i], r, memory_order_relaxed);
        atomic_fetch_add_explicit(&hist[uint(x[4*i]) % 4], 1, memory_order_relaxed);
    """
    x = mx.arange(32, dtype=mx.float32)
    k = metal_kernel(name="hv", input_names=["x"], output_names=["out0", "hist"], source=src,
                     header=header, atomic_outputs=True)
    out, hist = k(inputs=[x], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,), (4,)],
                  output_dtypes=[mx.float32, mx.int32], init_value=0)
    xn = np.arange(32, dtype=np.float32).reshape(8, 4)
    np.testing.assert_allclose(np.array(out), 2 * xn.sum(1) + 2 * xn[:, 2] + 1)
    np.testing.assert_array_equal(np.array(hist), np.bincount(xn[:, 0].astype(int) % 4, minlength=4))


def test_mlx_docs_example_with_preamble_helpers():
    """MLX's own documented kernel: elem_to_loc and Limits come from the preamble MLX adds."""
    src = """
        uint elem = thread_position_in_grid.x;
        T tmp = inp[elem_to_loc(elem, inp_shape, inp_strides, inp_ndim)];
        out[elem] = metal::exp(tmp) + (Limits<T>::max > T(1) ? T(0) : T(1));
    """
    k = metal_kernel(name="myexp_strided", input_names=["inp"], output_names=["out"], source=src,
                     ensure_row_contiguous=False)
    a = mx.random.normal((4, 16)).astype(mx.float16).T
    (b,) = k(inputs=[a], template=[("T", mx.float16)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[a.shape], output_dtypes=[a.dtype])
    assert mx.allclose(b, mx.exp(a), rtol=1e-3)


def test_every_position_attribute_mlx_adds():
    src = """
        uint i = thread_position_in_grid.x;
        uint v[11] = {dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
                      quadgroup_index_in_threadgroup, quadgroups_per_threadgroup,
                      simdgroups_per_threadgroup, thread_execution_width, thread_index_in_quadgroup,
                      threads_per_simdgroup, grid_size.x + grid_origin.x, threads_per_grid.x,
                      simd_shuffle_and_fill_down(i, 1000u, 4u)};
        for (int j = 0; j < 11; j++) out0[i * 11 + j] = v[j];
    """
    (out,), _ = run(src, [mx.zeros((1,))], [(72 * 11,)], [mx.uint32], (72, 1, 1), (64, 1, 1))
    o = np.array(out).reshape(72, 11)
    t = np.arange(72)
    tg = np.where(t < 64, 64, 8)   # the second threadgroup is partial: 8 threads
    lin = t % 64
    want = [16, 2, lin // 4, tg // 4, (tg + 31) // 32, 32, lin % 4, 32, 72, 72]  # as listed in v
    np.testing.assert_array_equal(o[:, :10], np.stack(np.broadcast_arrays(*want), axis=1))
    lane = lin % 32
    width = np.where(t < 64, 32, 8)
    defined = (lane + 4 < width) | (lane + 4 >= 32)  # reading a lane that does not exist is undefined
    np.testing.assert_array_equal(o[defined, 10], np.where(lane + 4 < 32, t + 4, 1000)[defined])


def test_simdgroup_matrix_gemm():
    """8x8 simdgroup matrices: a 16x16 tile GEMM over threadgroup memory (4 SIMD groups),
    plus a transposed device load, a diagonal constructor and simdgroup_multiply."""
    src = """
        threadgroup float As[16 * 24];
        threadgroup float Bs[24 * 16];
        uint t = thread_index_in_threadgroup;
        for (uint i = t; i < 16 * 24; i += 128) { As[i] = a[i]; Bs[i] = b[i]; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        uint sg = simdgroup_index_in_threadgroup;
        uint tr = sg / 2, tc = sg % 2;
        simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int k = 0; k < 24; k += 8) {
            simdgroup_float8x8 ma, mb;
            simdgroup_load(ma, As, 24, ulong2(k, tr * 8));
            simdgroup_load(mb, Bs, 16, ulong2(tc * 8, k));
            simdgroup_multiply_accumulate(acc, ma, mb, acc);
        }
        simdgroup_store(acc, out0, 16, ulong2(tc * 8, tr * 8));
        simdgroup_float8x8 two(2.0f), bt;
        simdgroup_load(bt, b, 16, ulong2(0, 0), true);
        simdgroup_multiply(bt, two, bt);
        if (sg == 0) simdgroup_store(bt, out1, 8);
    """
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(16, 24)).astype(np.float32), rng.normal(size=(24, 16)).astype(np.float32)
    (o, o2), k = run(src, [mx.array(A), mx.array(B)], [(16, 16), (8, 8)], [mx.float32] * 2,
                     (128, 1, 1), (128, 1, 1), names=["a", "b"])
    np.testing.assert_allclose(np.array(o), A @ B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(o2), 2 * B[:8, :8].T, rtol=1e-6)
    assert k.last_loads["b"] == B.nbytes + 4 * 64 * 4  # staged once, plus each group's 8x8 load


# ------------------------------------------------------------------ other people's kernels
@pytest.fixture
def mlx_lm_kernels(monkeypatch):
    """mlx_lm.kernels imported with the emulator standing in for mx.fast.metal_kernel."""
    saved = {k: v for k, v in sys.modules.items() if k.startswith("mlx_lm.kernels")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    mod = importlib.import_module("mlx_lm.kernels")
    yield mod
    for k in [k for k in sys.modules if k.startswith("mlx_lm.kernels")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_mlx_lm_qk_norm(mlx_lm_kernels):
    mx.random.seed(1)
    HQ, HK, D = 4, 2, 64
    qkvg = mx.random.normal((2, 3, 2 * (HQ + HK) * D))
    q, k = mlx_lm_kernels.qk_norm(qkvg, n_heads=HQ, n_kv_heads=HK, head_dim=D, eps=1e-6, query_scale=0.125)
    x = qkvg.reshape(2, 3, 2 * (HQ + HK), D)
    assert mx.allclose(q, mx.fast.rms_norm(x[:, :, :HQ], None, 1e-6) * 0.125, atol=1e-6)
    assert mx.allclose(k, mx.fast.rms_norm(x[:, :, HQ:HQ + HK], None, 1e-6), atol=1e-6)


def test_mlx_lm_rms_norm_sigmoid_gate(mlx_lm_kernels):
    mx.random.seed(2)
    B, H, L, D = 2, 3, 5, 48
    x, g = mx.random.normal((B, H, L, D)), mx.random.normal((B, L, H * D))
    y = mlx_lm_kernels.rms_norm_sigmoid_gate(x, g, eps=1e-5)
    ref = mx.fast.rms_norm(x, None, 1e-5).transpose(0, 2, 1, 3).reshape(B, L, H * D) * mx.sigmoid(g)
    assert mx.allclose(y, ref, atol=1e-6)


def test_mlx_lm_norm_add_norm_uses_threadgroup_barriers(mlx_lm_kernels):
    mx.random.seed(3)
    D = 1024  # 128 threads per row: block sums cross SIMD groups through threadgroup memory
    branch, stream = mx.random.normal((3, D)), mx.random.normal((3, D))
    alpha, beta, post_w = mx.random.normal((D,)), mx.random.normal((D,)), mx.random.normal((D,))
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = mx.random.normal((D,))
    new_stream, normed = mlx_lm_kernels.norm_add_norm(
        branch, stream, alpha=alpha, beta=beta, post_weight=post_w, post_eps=1e-6, next_norm=norm)
    s = alpha * stream + beta * mx.fast.rms_norm(branch * post_w, None, 1e-6)
    assert mx.allclose(new_stream, s, atol=1e-5)
    assert mx.allclose(normed, mx.fast.rms_norm(s, norm.weight, 1e-5), atol=1e-5)


def test_mlx_lm_expert_routing(mlx_lm_kernels):
    """simd_max / simd_min top-k over experts, with a partial threadgroup (5 tokens · 32 < 256)."""
    mx.random.seed(4)
    logits, bias = mx.random.normal((5, 40)), mx.random.normal((40,)) * 0.1
    inds, w = mlx_lm_kernels.expert_routing(logits, bias, top_k=4, multiplier=1.0, score_eps=1e-20,
                                            route_scale=2.5)
    score = mx.sigmoid(logits)
    ref_inds = mx.argsort(-(score + bias), axis=-1)[:, :4]
    sw = mx.take_along_axis(score, ref_inds, -1)
    assert mx.array_equal(inds.astype(mx.int32), ref_inds.astype(mx.int32)).item()
    assert mx.allclose(w, sw / (sw.sum(-1, keepdims=True) + 1e-20) * 2.5, atol=1e-6)
