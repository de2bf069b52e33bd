// w4a_int_matmul — the W4A4 / W4A8 draft matmul: int activation codes × MLX affine 4-bit
// weights, exactly in integers (SPEC.md §2). With codes a_mk (int8, from act_quant), their
// scales s_x (one per AG values; AG = 0: per token), their sums A per SUB = min(AG, WG)
// values, and W in mlx-lm's layout (w (N, K/8) uint32, low nibble first; scales s, biases
// b (N, K/WG)):  y_mn = Σ_blocks s_x · (s_gn · Σ_{k∈block} a_mk q_nk + b_gn · A_m,block).
// The inner sums are int32 dot products, exact; each block ends in one float epilogue.
// A4 and A8 differ only in the codes' range; both are one byte per code here.
//
// Apple GPUs before M5 have no integer matrix units, and batch-1 is bound by bytes read,
// so the layout is the W4A16 verify kernel's: every weight byte, scale and bias is read
// once for all M ≤ 16 rows, with integer multiply-adds on the unpacked nibbles.
//
// Launch: grid (ceil(N / (RN*NSG)) * NSG*32, 1, 1), threadgroup (NSG*32, 1, 1). Each SIMD
// group owns RN output features; lane l takes weight groups l, l + 32, ..., holds the
// group's RN × WG/8 words (uint4 loads, contiguous across lanes), scales and biases in
// registers, and for each row m reads the group's WG codes (char4 loads), forms the int32
// dot per SUB block, and adds the block's float epilogue. simd_sum reduces the M*RN
// accumulators at the end. Per output: K/2 weight bytes + K/WG scales and biases once.

// --- body ---
    constexpr int NG = K / WG;
    constexpr int WPG = WG / 8;
    constexpr int AGE = AG == 0 ? K : AG;
    constexpr int SUB = AGE < WG ? AGE : WG;
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
            auto cr = (const device char4*)(codes + size_t(m) * K + g * WG);
            for (int sb = 0; sb < WG / SUB; sb++) {
                int dot[RN];
                for (int r = 0; r < RN; r++) {
                    dot[r] = 0;
                }
                for (int j = sb * (SUB / 8); j < (sb + 1) * (SUB / 8); j++) {
                    char4 c0 = cr[2 * j], c1 = cr[2 * j + 1];
                    int cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
                    for (int r = 0; r < RN; r++) {
                        uint word = wq[r][j];
                        for (int i = 0; i < 8; i++) {
                            dot[r] += cv[i] * int((word >> (4 * i)) & 0xfu);
                        }
                    }
                }
                uint k0 = g * WG + sb * SUB;
                float a = float(sums[size_t(m) * (K / SUB) + k0 / SUB]);
                float sx = static_cast<float>(ascales[size_t(m) * (K / AGE) + k0 / AGE]);
                for (int r = 0; r < RN; r++) {
                    acc[m][r] += sx * (sc[r] * float(dot[r]) + bi[r] * a);
                }
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
