// act_quant — fused activation quantization for the W4A4 / W4A8 draft.
//
// x (M, K) → symmetric int codes in [-QMAX, QMAX] (int8, one per value), one scale per
// AG values (AG = 0: per token) equal to absmax / QMAX in x's dtype, and the code sums
// per SG values that the W4A4 formula's bias term needs (SG = min(act group, weight
// group)). Optionally the values first go through a block-diagonal Walsh–Hadamard
// transform of HB values (natural order, times hscale = 1/sqrt(HB)).
//
// Launch: one threadgroup of NSG SIMD groups per token row (grid (NSG*32, M, 1)). The row
// is cut into 128-value chunks; SIMD group sg takes chunks sg, sg + NSG, ...; in a chunk
// lane l holds values 4l..4l+3, so a SIMD group's loads are 512 contiguous bytes. Groups
// of ≤ 128 values are lane-aligned, so their absmax and code sums are butterflies over the
// G/4 lanes that hold them (simd_shuffle_xor); a per-token absmax adds one threadgroup
// reduction. The Hadamard runs in those registers: strides 1, 2 inside a lane, 4..64 as
// shuffles. Reads per row: the K values once. Writes: K codes, K/AG scales, K/SG sums.
// Rounding is round-half-to-even (rint), as mx.round.

// --- body ---
    constexpr int CH = 128;
    constexpr int NCH = (K + CH - 1) / CH;
    constexpr int R = (NCH + NSG - 1) / NSG;
    constexpr int AGE = AG == 0 ? K : AG;
    uint row = threadgroup_position_in_grid.y;
    uint sg = simdgroup_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    auto xr = x + size_t(row) * K;
    threadgroup float part[NSG];  // per-SIMD-group absmax, for the per-token scale

    float v[R][4];
    for (int r = 0; r < R; r++) {
        int base = (r * NSG + sg) * CH + lane * 4;
        for (int i = 0; i < 4; i++) {
            v[r][i] = base + i < K ? static_cast<float>(xr[base + i]) : 0.0f;
        }
    }

    if (HB > 1) {
        for (int r = 0; r < R; r++) {
            for (int s = 1; s < 4 && s < HB; s <<= 1) {
                for (int i = 0; i < 4; i++) {
                    if ((i & s) == 0) {
                        float a = v[r][i], b = v[r][i + s];
                        v[r][i] = a + b;
                        v[r][i + s] = a - b;
                    }
                }
            }
            for (uint t = 1; 4 * int(t) < HB; t <<= 1) {
                for (int i = 0; i < 4; i++) {
                    float p = simd_shuffle_xor(v[r][i], t);
                    v[r][i] = (lane & t) ? p - v[r][i] : v[r][i] + p;
                }
            }
            for (int i = 0; i < 4; i++) {
                v[r][i] = static_cast<float>(static_cast<T>(v[r][i] * hscale));
            }
        }
    }

    // absmax per activation group: lane-local, then over the lanes of the group
    float amax[R];
    float tok = 0.0f;
    for (int r = 0; r < R; r++) {
        float m = 0.0f;
        for (int i = 0; i < 4; i++) {
            m = metal::max(m, metal::abs(v[r][i]));
        }
        if (AG != 0) {
            for (uint t = 1; int(t) < AG / 4; t <<= 1) {
                m = metal::max(m, simd_shuffle_xor(m, t));
            }
        }
        amax[r] = m;
        tok = metal::max(tok, m);
    }
    if (AG == 0) {
        tok = simd_max(tok);
        if (lane == 0) {
            part[sg] = tok;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        tok = 0.0f;
        for (int s = 0; s < NSG; s++) {
            tok = metal::max(tok, part[s]);
        }
        for (int r = 0; r < R; r++) {
            amax[r] = tok;
        }
    }

    for (int r = 0; r < R; r++) {
        int base = (r * NSG + sg) * CH + lane * 4;
        if (base >= K) {
            continue;
        }
        T scale = static_cast<T>(amax[r]) / static_cast<T>(QMAX);
        T safe = scale == T(0) ? T(1) : scale;
        if (base % AGE == 0) {
            scales[size_t(row) * (K / AGE) + base / AGE] = scale;
        }
        int csum = 0;
        for (int i = 0; i < 4; i++) {
            float q = metal::rint(static_cast<float>(static_cast<T>(v[r][i]) / safe));
            int c = int(metal::clamp(q, -float(QMAX), float(QMAX)));
            codes[size_t(row) * K + base + i] = static_cast<int8_t>(c);
            csum += c;
        }
        for (uint t = 1; int(t) < SG / 4; t <<= 1) {
            csum += simd_shuffle_xor(csum, t);
        }
        if (base % SG == 0) {
            sums[size_t(row) * (K / SG) + base / SG] = csum;
        }
    }
