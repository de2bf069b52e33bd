// nested_attention — attention of a few query rows (L ≤ 16: a decode step, a draft step or a
// verify block) over the hierarchical KV cache of kv_cache.py: Tq positions as 4-bit planes,
// then Tb recent positions in float (k_buf, v_buf). A quantized key or value is
//   verify (PLANES 2): min + s·(16U + Lo − 8)/16   — the ~8-bit view (Lo = residual + 8);
//   draft  (PLANES 1): min + s·U                   — the upper plane only.
// Key planes (B, Hkv, D, Tq/8) are grouped per channel over KB positions, value planes
// (B, Hkv, Tq, D/8) per position over VG channels. The draft variant is built without the
// lower planes as inputs (header defines PLANES), so it cannot read them. Every input is read
// in place through its strides: the cache's slices of its storage need no copy.
//
// Launch: grid (S * NSG*32, B*Hkv, 1), threadgroup (NSG*32, 1, 1), S = ceil(T / TC). The
// threadgroup (c, bh) takes positions [c*TC, (c+1)*TC) of kv head bh for all R*L query rows
// of its R query heads (row j = r*L + i: head bh*R + r, position i); SIMD group g holds rows
// g*MAXR .. g*MAXR + MAXR-1 (lane k: channels k, k+32, ... of q and of the output). Per tile of
// 32 positions: all threads dequantize the keys into threadgroup memory as float, each SIMD
// group scores its rows (lane = position), updates the online softmax; then the values
// likewise (lane = channel). Reads per KV byte: each plane byte and buffer value once per kv
// head for all R*L rows; a scale and min once per lane that dequantizes a word of its group
// (same address: one transaction on a GPU). Writes per row and chunk: the unnormalized output,
// max and sum in float32, which nested_attention_combine merges. NSG = max(8, R*L / MAXR)
// (≤ 32): at least 256 threads share the tile loads. TC (512) is fixed, so chunk boundaries
// are positions, not fractions of T; splitting T keeps a long context's S*B*Hkv threadgroups
// filling the GPU, for 4*R*L*D partial bytes per chunk (vs ≥ TC*D KV bytes).
//
// Exactness: sizes (Tq, Tb, R, L, Hkv, KB, VG, causal) are runtime values and MAXR is fixed,
// so a decode step and a verify block run the same compiled kernel, and a row's arithmetic
// (its positions, tile and chunk boundaries, every sum's order) depends on T and its own last
// visible position only. Masked positions add exact zeros, so row i of a causal L-row call
// equals bit for bit the L = 1 call over the cache cut after position T − L + i (same planes).

// --- body ---
    constexpr int DW = D / 32;   // head channels per lane
    constexpr int KS = 33;       // key tile [D][KS]: channel stride 32 + 1 (no bank conflicts)
    constexpr int VS = D + 1;    // value tile [32][VS]: position stride
    threadgroup float tile[KS * D];   // keys, then values (32 * VS <= KS * D)

    // a quantized value is min + s·CODE: U, or (16U + Lo − 8)/16 (exact in float)
#define NIB(w, e) int(((w) >> (4 * (e))) & 0xfu)
#if PLANES == 2
#define CODE(u, lo, e) (float(16 * NIB(u, e) + NIB(lo, e) - 8) * 0.0625f)
#else
#define CODE(u, lo, e) float(NIB(u, e))
#endif

    const uint tid = thread_index_in_threadgroup;
    const uint nt = threads_per_threadgroup.x;
    const int sg = simdgroup_index_in_threadgroup;
    const int lane = thread_index_in_simdgroup;
    const int c = threadgroup_position_in_grid.x;
    const int bh = threadgroup_position_in_grid.y;
    const int Tq = sizes[0], Tb = sizes[1], R = sizes[2], L = sizes[3], HKV = sizes[4];
    const int KB = sizes[5], VG = sizes[6], T = Tq + Tb, RL = R * L;
    const bool causal = sizes[7];
    const int64_t b = bh / HKV, h = bh % HKV;

    // per row slot (the slot and channel loops unroll, so these stay in registers): this
    // lane's channels of the scaled query and of the output, the running max and sum, the
    // tile's probability and rescale, the last position the row sees
    float qv[MAXR][DW], o[MAXR][DW], m[MAXR], l[MAXR], p[MAXR], alpha[MAXR];
    int last[MAXR];
    #pragma clang loop unroll(full)
    for (int rr = 0; rr < MAXR; rr++) {
        int j = sg * MAXR + rr, r = j / L, i = j % L;
        last[rr] = j >= RL ? -1 : causal ? T - L + i : T - 1;   // -1: an idle slot
        m[rr] = -FLT_MAX;
        l[rr] = 0.0f;
        p[rr] = alpha[rr] = 0.0f;
        #pragma clang loop unroll(full)
        for (int k = 0; k < DW; k++) {
            int64_t at = b * q_strides[0] + (h * R + r) * q_strides[1] + i * q_strides[2]
                       + (32 * k + lane) * q_strides[3];
            qv[rr][k] = j < RL ? float(q[at]) * scale : 0.0f;
            o[rr][k] = 0.0f;
        }
    }

    const int t_end = min(T, (c + 1) * TC);
    for (int t0 = c * TC; t0 < t_end; t0 += 32) {
        threadgroup_barrier(mem_flags::mem_threadgroup);   // the last tile's values are used
        if (t0 < Tq) {   // Tq is a multiple of KB: a quantized tile is whole, in one key block
            for (uint x = tid; x < 4 * D; x += nt) {   // word w of channel d: positions 8w..8w+7
                int64_t d = x / 4, w = x % 4;
                int64_t g = b * k_scales_strides[0] + h * k_scales_strides[1]
                          + d * k_scales_strides[2] + (t0 / KB) * k_scales_strides[3];
                int64_t gm = b * k_mins_strides[0] + h * k_mins_strides[1]
                           + d * k_mins_strides[2] + (t0 / KB) * k_mins_strides[3];
                float s = float(k_scales[g]), mn = float(k_mins[gm]);
                uint u = k_upper[b * k_upper_strides[0] + h * k_upper_strides[1]
                                 + d * k_upper_strides[2] + (t0 / 8 + w) * k_upper_strides[3]];
#if PLANES == 2
                uint lo = k_lower[b * k_lower_strides[0] + h * k_lower_strides[1]
                                  + d * k_lower_strides[2] + (t0 / 8 + w) * k_lower_strides[3]];
#endif
                for (int e = 0; e < 8; e++) {
                    tile[d * KS + 8 * w + e] = mn + s * CODE(u, lo, e);
                }
            }
        } else {   // lanes along channels; positions past T are zeros
            for (uint x = tid; x < 32 * D; x += nt) {
                int t = x / D, d = x % D, pos = t0 + t;
                int64_t at = b * k_buf_strides[0] + h * k_buf_strides[1]
                           + int64_t(pos - Tq) * k_buf_strides[2] + d * k_buf_strides[3];
                tile[d * KS + t] = pos < T ? float(k_buf[at]) : 0.0f;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        #pragma clang loop unroll(full)
        for (int rr = 0; rr < MAXR; rr++) {
            if (t0 > last[rr]) {
                continue;   // uniform in the SIMD group: nothing of this tile is visible
            }
            float s = 0.0f;   // Σ_d q_d k_d in channel order, q_d from lane d % 32
            #pragma clang loop unroll(full)
            for (int k = 0; k < DW; k++) {
                for (int e = 0; e < 32; e++) {
                    s += simd_broadcast(qv[rr][k], e) * tile[(32 * k + e) * KS + lane];
                }
            }
            bool seen = t0 + lane <= last[rr];
            float mnew = max(m[rr], simd_max(seen ? s : -FLT_MAX));
            alpha[rr] = exp(m[rr] - mnew);
            p[rr] = seen ? exp(s - mnew) : 0.0f;
            l[rr] = l[rr] * alpha[rr] + simd_sum(p[rr]);
            m[rr] = mnew;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);   // the keys are used

        if (t0 < Tq) {
            constexpr int WR = D / 8;   // plane words per position
            for (uint x = tid; x < 32 * WR; x += nt) {
                int64_t t = x / WR, w = x % WR, pos = t0 + t;
                int64_t g = b * v_scales_strides[0] + h * v_scales_strides[1]
                          + pos * v_scales_strides[2] + (8 * w / VG) * v_scales_strides[3];
                int64_t gm = b * v_mins_strides[0] + h * v_mins_strides[1]
                           + pos * v_mins_strides[2] + (8 * w / VG) * v_mins_strides[3];
                float s = float(v_scales[g]), mn = float(v_mins[gm]);
                uint u = v_upper[b * v_upper_strides[0] + h * v_upper_strides[1]
                                 + pos * v_upper_strides[2] + w * v_upper_strides[3]];
#if PLANES == 2
                uint lo = v_lower[b * v_lower_strides[0] + h * v_lower_strides[1]
                                  + pos * v_lower_strides[2] + w * v_lower_strides[3]];
#endif
                for (int e = 0; e < 8; e++) {
                    tile[t * VS + 8 * w + e] = mn + s * CODE(u, lo, e);
                }
            }
        } else {
            for (uint x = tid; x < 32 * D; x += nt) {
                int t = x / D, d = x % D, pos = t0 + t;
                int64_t at = b * v_buf_strides[0] + h * v_buf_strides[1]
                           + int64_t(pos - Tq) * v_buf_strides[2] + d * v_buf_strides[3];
                tile[t * VS + d] = pos < T ? float(v_buf[at]) : 0.0f;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        #pragma clang loop unroll(full)
        for (int rr = 0; rr < MAXR; rr++) {
            if (t0 > last[rr]) {
                continue;
            }
            #pragma clang loop unroll(full)
            for (int k = 0; k < DW; k++) {
                o[rr][k] *= alpha[rr];
            }
            for (int t = 0; t < 32; t++) {
                float pt = simd_broadcast(p[rr], t);
                #pragma clang loop unroll(full)
                for (int k = 0; k < DW; k++) {
                    o[rr][k] += pt * tile[t * VS + 32 * k + lane];
                }
            }
        }
    }

    #pragma clang loop unroll(full)
    for (int rr = 0; rr < MAXR; rr++) {
        int j = sg * MAXR + rr;
        if (j >= RL) {
            break;
        }
        int64_t row = (int64_t(bh) * threadgroups_per_grid.x + c) * RL + j;
        #pragma clang loop unroll(full)
        for (int k = 0; k < DW; k++) {
            o_part[row * D + 32 * k + lane] = o[rr][k];
        }
        if (lane == 0) {
            ml_part[2 * row] = m[rr];
            ml_part[2 * row + 1] = l[rr];
        }
    }
