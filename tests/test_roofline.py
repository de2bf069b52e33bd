"""The calibrated roofline (``auto``'s prior on a Mac) against the public numbers it is fitted
to and a few it is not (SPEC.md §9 lists them; docs/design.md §8 tabulates the fit)."""

import pytest
from helpers import build_tiny_model

from mlx_qspec import roofline
from mlx_qspec.roofline import CALIBRATION, CHIPS, LLAMA_7B_BYTES, LLAMA_7B_TOKENS_PER_S
from mlx_qspec.hooks import install


@pytest.mark.parametrize("chip", list(LLAMA_7B_TOKENS_PER_S))
def test_decode_speed_matches_the_llama_cpp_table_it_was_fitted_to(chip):
    # Two parameters per chip (fixed cost, bandwidth share) through at most two points, so
    # the fit goes through them: the tolerance is float rounding, not a model error. What
    # can fail: the table, the bytes (GiB, not GB), the formula tokens_per_s uses.
    for quant, published in LLAMA_7B_TOKENS_PER_S[chip].items():
        assert roofline.tokens_per_s(LLAMA_7B_BYTES[quant], chip) == pytest.approx(published, rel=1e-6)
    cal = CALIBRATION[chip]
    # The fit is physical: a few ms per forward (llama.cpp's non-matmul work and launches),
    # most of the peak bandwidth (M3 Max's two points put it at 100.8 %).
    assert 0.004 < cal.fixed < 0.007 and 0.85 < cal.bandwidth_share < 1.01


def test_the_fixed_cost_is_what_makes_a_q4_model_slower_than_its_bytes():
    # Public: Q4_0 time ÷ Q8_0 time 0.56-0.58 on base chips, 0.63-0.66 on Max chips, where
    # bytes say 0.53 (SPEC.md §9). The model says the same, from the fixed cost.
    for chip, low, high in [("M1", 0.55, 0.59), ("M1 Max", 0.62, 0.67), ("M4 Max", 0.62, 0.67)]:
        q4, q8 = (1 / roofline.tokens_per_s(LLAMA_7B_BYTES[q], chip) for q in ("Q4_0", "Q8_0"))
        assert low < q4 / q8 < high, chip


def test_held_out_mlx_lm_decode_speeds():
    # Not fitted: mlx-lm users' plain decoding of a 32B 4-bit model (SPEC.md §9: M4 Max 25
    # tok/s, M3 Pro ~7), taken as 18.4 GB read per token (32.8 B parameters at 4.5 bits:
    # 4-bit codes and a float16 scale and bias per 64). Tolerance 10 %: the size is assumed
    # and "~7" is a rounded report.
    assert roofline.tokens_per_s(18.4e9, "M4 Max") == pytest.approx(25, rel=0.1)
    assert roofline.tokens_per_s(18.4e9, "M3 Pro") == pytest.approx(7, rel=0.1)


def qmv_ratio(chip, rows, K=5120, N=17408, group=128):
    def t(m):
        _, nbytes, alu = roofline.mlx_qmm(K, N, m, group, 2, CHIPS[chip].gen)
        return roofline.seconds(nbytes, alu, chip)
    return t(rows) / t(1)


def test_mlx_qmv_wide_grows_with_rows_as_measured():
    # One parameter (the share of the FP32 FMA rate) fitted to five ratios (mlx #3852, M4
    # Pro): each within 8 % (the largest miss, 7 %, at 3 rows).
    assert 0.4 < roofline.ALU_SHARE < 0.8
    for rows, published in roofline.QMV_WIDE_M4_PRO["ratio"].items():
        assert qmv_ratio("M4 Pro", rows) == pytest.approx(published, rel=0.08), rows
    # Held out (mlx #3839, M4 Pro, other shapes): 1.14-1.57× at 4 rows.
    assert 1.14 <= qmv_ratio("M4 Pro", 4) <= 1.57
    # At the full FP32 rate the same op counts stay flat to 4 rows (the uncalibrated
    # roofline's optimism): the calibration is what makes rows cost.
    bw = CALIBRATION["M4 Pro"].bandwidth_share * CHIPS["M4 Pro"].bandwidth
    uncalibrated = [max(b / bw, a / CHIPS["M4 Pro"].lane_ops)
                    for _, b, a in (roofline.mlx_qmm(5120, 17408, m, 128, 2, 16) for m in (1, 4))]
    assert uncalibrated[1] / uncalibrated[0] == pytest.approx(1.0, abs=0.02)


def test_mlx_on_m1_m2_reads_the_weights_once_per_row():
    # qmv (M1/M2) runs each row on its own: close to what llama.cpp's per-row q4_0 kernel
    # measured on an M1 Pro (1.79× at 2 rows, 3.34× at 4; SPEC.md §9), within 10 % (another
    # kernel, other shapes). qmv_wide (M3+) shares the weights: far less.
    assert qmv_ratio("M1 Pro", 2) == pytest.approx(1.79, rel=0.1)
    assert qmv_ratio("M1 Pro", 4) == pytest.approx(3.34, rel=0.1)
    assert qmv_ratio("M3 Max", 2) < 1.05


def test_one_row_forward_is_tokens_per_s():
    """``tokens_per_s`` is the model the prior uses for a one-row forward: no separate
    efficiency constant."""
    linears = roofline.linears(install(build_tiny_model()))
    kv = 12345.0
    nbytes = sum(m.nbytes + (m.K + m.N) * m.itemsize for m in linears) + kv
    for chip in CHIPS:
        assert roofline.forward_seconds(linears, kv, 1, chip) == pytest.approx(
            1 / roofline.tokens_per_s(nbytes, chip))


def test_seconds_is_bound_by_bytes_or_alu_at_the_achieved_rates():
    cal, chip = CALIBRATION["M2"], CHIPS["M2"]
    assert roofline.seconds(1e9, 0, "M2") == pytest.approx(1e9 / (cal.bandwidth_share * chip.bandwidth))
    assert roofline.seconds(0, 1e12, "M2") == pytest.approx(1e12 / (cal.alu_share * chip.lane_ops))


def test_roofline_of_the_test_model_is_flat_for_a_few_rows(smollm2):
    """A verify of up to 5 rows costs about one step on every chip (the fixed cost of a
    forward dominates a model this small); more rows cost more."""
    linears = roofline.linears(install(smollm2[0]))
    assert len(linears) == 30 * 7 + 1  # the tied embedding is the LM head
    for chip in CHIPS:
        t = [roofline.forward_seconds(linears, 0, rows, chip) for rows in range(1, 17)]
        assert t[4] / t[0] <= 1.05, chip
        assert all(a < b for a, b in zip(t, t[1:])), chip
        matmuls = [x - CALIBRATION[chip].fixed for x in t]
        assert matmuls[4] / matmuls[0] <= 1.35 and matmuls[15] / matmuls[0] >= 1.5, chip
