// nested_matmul — matmul with 8-bit weights stored as two 4-bit planes (SPEC.md "The
// algebra that makes nesting free"). An MLX 8-bit code c = 16u + l, value s·c + b, is kept
// as an upper plane u and a lower plane l, each in MLX's 4-bit packing (N, K/8) uint32,
// with the 8-bit scales s and biases b (N, K/WG). Per weight
//   verify (PLANES 2): s·(16u + l) + b   — the 8-bit value, both planes;
//   draft  (PLANES 1): 16s·u + (b + 7.5s) — upper plane only, the missing lower plane at
//                      its mid-point: half the weight bytes.
// The draft variant is built without the `lower` input (header defines PLANES), so it cannot
// touch the lower plane.
//
// A thread works as in w4a16_verify: lanes are 4 groups of 8, a group owns RN outputs, lane
// kl takes 32 K values (one uint4 per plane and output) of each 256-value chunk, whose M
// activation rows and (scale, bias) — the draft's 16s and b + 7.5s — the threadgroup stages
// in threadgroup memory. Each weight is dequantized once (verify: two bitfield extracts, one
// insert, convert, fma: 5 ops; draft: extract, convert, fma: 3), then one fma per row; the 8
// lanes of an output are summed by a 3-step xor shuffle. No row's arithmetic depends on M,
// so row m of an M-row call is bit for bit the 1-row call.
// Per output: K/2 bytes per plane read (K/2 draft, K verify) + K/WG scales and biases, once
// for all M. Reads per threadgroup: the M·K activations once, shared by its 4·RN·NSG outputs.
//
// Launch: grid (ceil(N / (4·RN·NSG)) · NSG·32, 1, 1), threadgroup (NSG·32, 1, 1).

// --- body ---
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
#if PLANES == 2
                v = float2(s, b);
#else
                v = float2(16.0f * s, fma(7.5f, s, b));
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
