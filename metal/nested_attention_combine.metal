// nested_attention_combine — the second pass of nested_attention (flash-decoding): merges the
// per-chunk online-softmax partials of every query row. With M = max_c m_c over the S chunks,
//   out[row][d] = Σ_c e^(m_c − M) o_c[d] / Σ_c e^(m_c − M) l_c,
// summed in chunk order; a chunk a row sees nothing of (m = −FLT_MAX, l = 0, o = 0) adds exact
// zeros. Partials o_part (B*Hkv, S, R*L, D), ml_part (B*Hkv, S, R*L, 2) float32; S and R*L
// come from ml_part's shape, so rows of any L run the same compiled kernel.
//
// Launch: grid (D, B*Hq*L, 1), threadgroup (D, 256/D, 1): thread (d, row) writes out[row][d],
// rows in (B, Hq, L) order, which is the partials' (bh, r*L + i) order. Per output: S floats
// of o_part and S (m, l) pairs (the same pairs for the row's D threads: one transaction).

// --- body ---
    const int d = thread_position_in_grid.x;
    const int row = thread_position_in_grid.y;
    const int S = ml_part_shape[1], RL = ml_part_shape[2];
    const int64_t first = int64_t(row / RL) * S * RL + row % RL;   // chunk 0's partial row

    float M = -FLT_MAX;
    for (int c = 0; c < S; c++) {
        M = max(M, ml_part[2 * (first + int64_t(c) * RL)]);
    }
    float num = 0.0f, den = 0.0f;
    for (int c = 0; c < S; c++) {
        int64_t r = first + int64_t(c) * RL;
        float w = exp(ml_part[2 * r] - M);
        num += w * o_part[r * D + d];
        den += w * ml_part[2 * r + 1];
    }
    out[int64_t(row) * D + d] = static_cast<T>(num / den);
