// w4a16_verify — the verify matmul: y = x @ W^T for M ≤ 16 rows of x (the γ+1 tokens of a
// verify block) and W an MLX affine 4-bit weight in mlx-lm's own layout: w (N, K/8) uint32,
// 8 codes per word, low nibble first; scales, biases (N, K/WG). y_mn = Σ_g s_gn Σ_{k∈g} q_nk
// x_mk + b_gn Σ_{k∈g} x_mk.
//
// Batch-1 decoding on Apple GPUs is bound by bytes read, so this kernel reads every weight
// byte, scale and bias exactly once for all M rows: a verify pass then costs about one
// decode step, not M of them (MLX's qmm grows ~linearly in M for small M).
//
// Launch: grid (ceil(N / (RN*NSG)) * NSG*32, 1, 1), threadgroup (NSG*32, 1, 1). Each SIMD
// group owns RN consecutive output features; lane l takes weight groups l, l + 32, ...
// and for each loads the group's WG/2 bytes (as uint4 vectors, contiguous across lanes),
// its scale and bias into registers once, then runs all M activation rows against them:
// per group and row, a float dot with the codes plus the bias term on Σx. At the end,
// simd_sum reduces each of the M*RN accumulators over the lanes. Per output: K/2 weight
// bytes + K/WG scales and biases, once for all M; the activations (M*K values) are read
// once per SIMD group (from cache on a real GPU).

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
        uint wq[RN][WPG];
        float sc[RN], bi[RN];
        for (int r = 0; r < RN; r++) {
            uint n = n0 + r;
            if (n < N) {
                auto wr = (const device uint4*)(w + size_t(n) * (K / 8) + g * WPG);
                for (int j = 0; j < WPG / 4; j++) {
                    uint4 q = wr[j];
                    wq[r][4 * j] = q.x;
                    wq[r][4 * j + 1] = q.y;
                    wq[r][4 * j + 2] = q.z;
                    wq[r][4 * j + 3] = q.w;
                }
                sc[r] = static_cast<float>(scales[size_t(n) * NG + g]);
                bi[r] = static_cast<float>(biases[size_t(n) * NG + g]);
            } else {
                for (int j = 0; j < WPG; j++) {
                    wq[r][j] = 0;
                }
                sc[r] = 0.0f;
                bi[r] = 0.0f;
            }
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
                    uint word = wq[r][j];
                    for (int i = 0; i < 8; i++) {
                        d[r] += xv[i] * float((word >> (4 * i)) & 0xfu);
                    }
                }
            }
            for (int r = 0; r < RN; r++) {
                acc[m][r] += sc[r] * d[r] + bi[r] * xs;
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
