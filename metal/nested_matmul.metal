// nested_matmul — the small-M matmuls of a verify or draft block: y = x @ W^T for M ≤ 16 rows
// of x (the γ+1 tokens of a verify block), W in MLX's 4-bit packing (N, K/8) uint32, 8 codes per
// word, low nibble first, with scales and biases (N, K/WG). Built three ways (header PLANES):
//   PLANES 0 (w4a16_verify): w an MLX affine 4-bit weight in mlx-lm's own layout, s·q + b;
//   PLANES 2 (nested_matmul_verify): an 8-bit weight kept as two 4-bit planes (SPEC.md "The
//     algebra that makes nesting free"): code c = 16u + l, value s·(16u + l) + b, with the
//     8-bit scales s and biases b — the 8-bit value, both planes;
//   PLANES 1 (nested_matmul_draft): the upper plane only, 16s·u + (b + 7.5s) — the missing
//     lower plane at its mid-point: half the weight bytes. Built without the `lower` input,
//     so it cannot touch the lower plane.
//
// Batch-1 decoding on Apple GPUs is bound by bytes read, so the kernel reads every weight
// byte, scale and bias once for all M rows, and its ALU work per weight is one dequantize
// (PLANES 0 and 1: bitfield extract, convert, fma with scale and bias: 3 ops; PLANES 2: two
// extracts, one insert, convert, fma: 5) plus one fma per row — not M dequantizes — so a
// verify block stays near one decode step for as long as the chip's ALUs keep up with its
// memory (MLX's qmv repeats the whole dot product per row on M1/M2).
//
// A thread: lanes are 4 groups of 8; a group owns RN consecutive outputs, and its lane kl
// takes 32 consecutive K values (one uint4 per plane and output) of each 256-value chunk. Per
// chunk the threadgroup stages the chunk's M activation rows (as float) and its outputs'
// scales and biases (the draft's 16s and b + 7.5s) in threadgroup memory; the lane
// dequantizes its 32·RN weights once, word by word, and accumulates x·w with fma into M·RN
// accumulators. At the end a 3-step xor shuffle sums the 8 lanes of each output. Per row the
// arithmetic is the same chain whatever M is — a lane sums its values in K order, the lanes in
// a fixed butterfly — so row m of an M-row call is bit for bit the 1-row call (exactness
// across decode and verify needs it); simdgroup_matrix tiles are not used for that reason (a
// one-row call would pay 8 rows of ALU, or run another summation order than the tiles).
// Per output: K/2 bytes per plane read (K/2 for PLANES 0 and 1, K for 2) + K/WG scales and
// biases, once for all M. Reads per threadgroup: the M·K activations once, shared by its
// 4·RN·NSG outputs.
//
// Launch: grid (ceil(N / (4·RN·NSG)) · NSG·32, 1, 1), threadgroup (NSG·32, 1, 1).

// --- body ---
#if PLANES == 0
    const device uint32_t* upper = w;  // one plane: the weight as stored
#endif
    constexpr int NG = K / WG;
    constexpr int KC = 256;              // K values per chunk: 8 lanes × 32
    constexpr int OT = 4 * RN * NSG;     // outputs per threadgroup
    threadgroup float4 xs[M][KC / 4];
    threadgroup float2 sb[OT][KC / WG];  // (scale, bias) of the chunk's groups, as dequantized

    const int tid = thread_index_in_threadgroup;
    const int lane = thread_index_in_simdgroup;
    const int kl = lane % 8;
    const int t0 = threadgroup_position_in_grid.x * OT;
    const int o0 = (simdgroup_index_in_threadgroup * 4 + lane / 8) * RN;

    float acc[M][RN];
    for (int m = 0; m < M; m++) {
        for (int r = 0; r < RN; r++) {
            acc[m][r] = 0.0f;
        }
    }

    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = min(KC, K - k0);  // a multiple of 32: WG divides K
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int i = tid; i < M * kc / 4; i += NSG * 32) {
            const int m = i / (kc / 4);
            xs[m][i % (kc / 4)] = float4(((const device vec<T, 4>*)(x + m * K + k0))[i % (kc / 4)]);
        }
        for (int i = tid; i < OT * kc / WG; i += NSG * 32) {
            const int o = i / (kc / WG), g = k0 / WG + i % (kc / WG);
            float2 v = float2(0.0f);
            if (t0 + o < N) {
                const float s = scales[(t0 + o) * NG + g], b = biases[(t0 + o) * NG + g];
#if PLANES == 1
                v = float2(16.0f * s, fma(7.5f, s, b));
#else
                v = float2(s, b);
#endif
            }
            sb[o][i % (kc / WG)] = v;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (kl * 32 >= kc) {
            continue;
        }
        uint4 qu[RN];
#if PLANES == 2
        uint4 ql[RN];
#endif
        float2 s[RN];
        for (int r = 0; r < RN; r++) {
            const int n = t0 + o0 + r;
            qu[r] = n < N ? ((const device uint4*)(upper + n * (K / 8)))[k0 / 32 + kl] : uint4(0);
#if PLANES == 2
            ql[r] = n < N ? ((const device uint4*)(lower + n * (K / 8)))[k0 / 32 + kl] : uint4(0);
#endif
            s[r] = sb[o0 + r][kl * 32 / WG];
        }
        for (int j = 0; j < 4; j++) {
            float wv[RN][8];
            for (int r = 0; r < RN; r++) {
                for (int i = 0; i < 8; i++) {
#if PLANES == 2
                    const uint c = insert_bits(extract_bits(ql[r][j], 4 * i, 4),
                                               extract_bits(qu[r][j], 4 * i, 4), 4, 4);
#else
                    const uint c = extract_bits(qu[r][j], 4 * i, 4);
#endif
                    wv[r][i] = fma(float(c), s[r].x, s[r].y);
                }
            }
            for (int m = 0; m < M; m++) {
                const float4 a = xs[m][kl * 8 + 2 * j], b = xs[m][kl * 8 + 2 * j + 1];
                const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                for (int i = 0; i < 8; i++) {
                    for (int r = 0; r < RN; r++) {
                        acc[m][r] = fma(xv[i], wv[r][i], acc[m][r]);
                    }
                }
            }
        }
    }

    for (int m = 0; m < M; m++) {
        for (int r = 0; r < RN; r++) {
            float v = acc[m][r];
            v += simd_shuffle_xor(v, 4);
            v += simd_shuffle_xor(v, 2);
            v += simd_shuffle_xor(v, 1);
            if (kl == 0 && t0 + o0 + r < N) {
                y[m * N + t0 + o0 + r] = static_cast<T>(v);
            }
        }
    }
