// nested_matmul — matmul with 8-bit weights stored as two 4-bit planes (SPEC.md "The
// algebra that makes nesting free"). An MLX 8-bit code c = 16u + l, value s·c + b, is kept
// as an upper plane u and a lower plane l, each in MLX's 4-bit packing (N, K/8) uint32,
// with the 8-bit scales s and biases b (N, K/WG). Then per group g
//   verify (PLANES 2): s·(16·Σ u x + Σ l x) + b·Σ x   — the 8-bit result, both planes;
//   draft  (PLANES 1): 16s·Σ u x + (b + 7.5 s)·Σ x   — upper plane only, the missing lower
//                      plane at its mid-point: half the weight bytes.
// The draft variant is built without the `lower` input (header defines PLANES), so it cannot
// touch the lower plane.
//
// Launch and loop as w4a16_verify: grid (ceil(N / (RN*NSG)) * NSG*32, 1, 1), threadgroup
// (NSG*32, 1, 1); each SIMD group owns RN output features, lane l takes groups l, l+32, ...
// and loads each plane's WG/2 bytes (uint4, contiguous across lanes), the scale and bias
// once into registers, then serves all M ≤ 16 rows of x; simd_sum at the end. Per output:
// K/2 bytes per plane read (K/2 draft, K verify) + K/WG scales and biases, once for all M.

// --- body ---
    constexpr int NG = K / WG;
    constexpr int WPG = WG / 8;
    uint sg = simdgroup_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    uint n0 = (threadgroup_position_in_grid.x * NSG + sg) * RN;
    if (n0 >= N) {
        return;
    }

    float acc[M][RN];
    for (int m = 0; m < M; m++) {
        for (int r = 0; r < RN; r++) {
            acc[m][r] = 0.0f;
        }
    }

    for (uint g = lane; g < NG; g += 32) {
        uint wu[RN][WPG];
#if PLANES == 2
        uint wlo[RN][WPG];
#endif
        float sc[RN], bi[RN];
        for (int r = 0; r < RN; r++) {
            uint n = n0 + r;
            bool in = n < N;
            auto ur = (const device uint4*)(upper + size_t(in ? n : 0) * (K / 8) + g * WPG);
#if PLANES == 2
            auto lr = (const device uint4*)(lower + size_t(in ? n : 0) * (K / 8) + g * WPG);
#endif
            for (int j = 0; j < WPG / 4; j++) {
                uint4 q = in ? ur[j] : uint4(0);
                wu[r][4 * j] = q.x;
                wu[r][4 * j + 1] = q.y;
                wu[r][4 * j + 2] = q.z;
                wu[r][4 * j + 3] = q.w;
#if PLANES == 2
                uint4 p = in ? lr[j] : uint4(0);
                wlo[r][4 * j] = p.x;
                wlo[r][4 * j + 1] = p.y;
                wlo[r][4 * j + 2] = p.z;
                wlo[r][4 * j + 3] = p.w;
#endif
            }
            sc[r] = in ? static_cast<float>(scales[size_t(n) * NG + g]) : 0.0f;
            bi[r] = in ? static_cast<float>(biases[size_t(n) * NG + g]) : 0.0f;
        }
        for (int m = 0; m < M; m++) {
            auto xr = (const device vec<T, 4>*)(x + size_t(m) * K + g * WG);
            float xs = 0.0f;
            float d[RN];
            for (int r = 0; r < RN; r++) {
                d[r] = 0.0f;
            }
            for (int j = 0; j < WPG; j++) {
                vec<T, 4> a = xr[2 * j], b = xr[2 * j + 1];
                float xv[8] = {float(a.x), float(a.y), float(a.z), float(a.w),
                               float(b.x), float(b.y), float(b.z), float(b.w)};
                for (int i = 0; i < 8; i++) {
                    xs += xv[i];
                }
                for (int r = 0; r < RN; r++) {
                    uint u = wu[r][j];
#if PLANES == 2
                    uint l = wlo[r][j];
                    for (int i = 0; i < 8; i++) {
                        d[r] += xv[i] * float(16u * ((u >> (4 * i)) & 0xfu) + ((l >> (4 * i)) & 0xfu));
                    }
#else
                    for (int i = 0; i < 8; i++) {
                        d[r] += xv[i] * float((u >> (4 * i)) & 0xfu);
                    }
#endif
                }
            }
            for (int r = 0; r < RN; r++) {
#if PLANES == 2
                acc[m][r] += sc[r] * d[r] + bi[r] * xs;
#else
                acc[m][r] += 16.0f * sc[r] * d[r] + (bi[r] + 7.5f * sc[r]) * xs;
#endif
            }
        }
    }

    for (int m = 0; m < M; m++) {
        for (int r = 0; r < RN; r++) {
            float t = simd_sum(acc[m][r]);
            if (lane == 0 && n0 + r < N) {
                y[size_t(m) * N + n0 + r] = static_cast<T>(t);
            }
        }
    }
