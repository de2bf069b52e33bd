"""The cost model behind ``--draft auto``: τ, the choice, acceptance, calibration, caching."""

import json

import mlx.core as mx
import pytest
from helpers import build_tiny_model
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_qspec import cost, precision
from mlx_qspec.cost import AcceptanceEstimate, CostTable, choose, expected_tokens
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.drafts.ngram import Ngram
from mlx_qspec.quant.linear import install
from mlx_qspec.drafts.auto import AutoPolicy, auto_priors
from mlx_qspec.hooks import install


def test_expected_tokens():
    assert expected_tokens(0.0, 0) == 1 and expected_tokens(0.5, 0) == 1 and expected_tokens(1.0, 0) == 1
    assert expected_tokens(0.0, 4) == 1
    assert expected_tokens(0.5, 4) == pytest.approx(1.9375)  # 1 + .5 + .25 + .125 + .0625
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.91, 4) == pytest.approx(4.18, abs=0.01)  # SPEC.md §6


def test_verify_cost_interpolates_and_extrapolates():
    t = CostTable({1: 1.0, 5: 2.0, 9: 4.0}, {})
    assert t.verify_cost(1) == 1.0 and t.verify_cost(3) == 1.5 and t.verify_cost(7) == 3.0
    assert t.verify_cost(13) == 6.0  # past the last point: the last segment's slope
    assert CostTable({1: 2.0}, {}).verify_cost(9) == 18.0  # one point: ∝ rows, no draft pays


def test_flat_verify_and_cheap_draft_speculates():
    # The Mac regime: a verify of a few rows costs one step, a draft reads half the bytes.
    table = CostTable({1: 1.0, 5: 1.0, 9: 1.05}, {"a8": 0.5})
    c = choose(table, {"a8": 0.9})
    assert c.draft == "a8" and c.gamma > 1 and c.speedup > 1
    assert c.reason == f"modeled_speedup_{c.speedup:.2f}" and " " not in c.reason


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_verify_cost_proportional_to_rows_is_plain(alpha):
    # The CPU regime: k rows cost k steps, so no draft pays, however free or accepted.
    table = CostTable({1: 1.0, 5: 5.0, 9: 9.0}, {"a8": 0.01})
    c = choose(table, {"a8": alpha})
    assert (c.draft, c.gamma, c.speedup) == (None, 0, 1.0)
    assert c.reason == "verify_cost_grows_with_rows(x9.0_at_9_rows)"


def test_draft_as_costly_as_verify_is_plain():
    table = CostTable({1: 1.0, 5: 1.0, 9: 1.0}, {"a8": 1.0})
    assert cost.speedup(table, "a8", 0.9, 4) == pytest.approx(4.0951 / 5)  # τ over 4 + 1 steps
    c = choose(table, {"a8": 0.9})
    assert c.draft is None and c.reason == "draft_too_costly(a8_x1.00,verify_x1.0_at_9_rows)"


def test_low_acceptance_is_plain():
    c = choose(CostTable({1: 1.0, 9: 1.0}, {"a4": 0.5}), {"a4": 0.05})
    assert c.draft is None and c.reason == "acceptance_too_low(a4_0.05)"
    # The reason names the draft closest to paying, not the best-accepted one: here the
    # free lookup, whose acceptance falls short, rather than a costly a8.
    table = CostTable({1: 1.0, 2: 1.6, 9: 8.0}, {"ngram": 0.0, "a8": 1.0})
    c = choose(table, {"ngram": 0.4, "a8": 0.97})
    assert c.draft is None and c.reason == "acceptance_too_low(ngram_0.40)"


def test_margin_and_candidates():
    table = CostTable({1: 1.0, 5: 1.0, 9: 1.0}, {"a8": 0.5, "a4": 0.3})
    best = cost.speedup(table, "a8", 0.9, 2)
    assert choose(table, {"a8": 0.9}, gammas=(2,), margin=best - 1 + 0.01).draft is None
    assert choose(table, {"a8": 0.9}, gammas=(2,), margin=best - 1 - 0.01).draft == "a8"
    assert choose(table, {"w-upper": 0.9}).reason == "no_draft_candidates"  # not in the table
    assert choose(table, {"a8": 0.9}).draft == "a8"  # a4 has no acceptance: not considered


def test_priors():
    assert cost.prior_acceptance("a8") == 0.91
    assert cost.prior_acceptance("kv-upper+a8") == pytest.approx(0.91 * 0.94)
    assert cost.prior_acceptance("a4-g32+w-upper+kv-upper") == pytest.approx(0.6 * 0.83 * 0.94)
    with pytest.raises(ValueError, match="a8-g64"):
        cost.prior_acceptance("a8-g64")


def test_acceptance_estimate_moves_towards_observed():
    est = AcceptanceEstimate(0.9, window=10)
    est.update(0, 0)
    assert est.value == 0.9
    est.update(4, 2)
    assert 0.5 < est.value < 0.9
    one_block = AcceptanceEstimate(0.9, window=10)
    one_block.update(8, 4)
    four_blocks = AcceptanceEstimate(0.9, window=10)
    for _ in range(4):
        four_blocks.update(2, 1)
    assert one_block.value == pytest.approx(four_blocks.value)  # k drafts weigh as k observations
    for _ in range(50):
        est.update(4, 4)
    assert est.value == pytest.approx(1.0, abs=1e-3)


def _prefilled(model, n=24):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, n), mx.uint32), cache=cache))
    return cache


def _installed(**overrides):
    model = build_tiny_model(**overrides)
    install(model)
    return model


def test_calibrate_tiny_model():
    model = _installed()
    cache = _prefilled(model)
    table = cost.calibrate(model, cache, ["a8", "a9"], rows=(1, 3, 5), repeats=2)
    assert sorted(table.verify) == [1, 3, 5] and list(table.draft) == ["a8"]  # a9: not a draft
    assert all(t > 0 for t in [*table.verify.values(), *table.draft.values()])
    assert cache[0].offset == 24 and all(c.offset == 24 for c in cache)


def test_calibrate_skips_a_failing_draft_and_rewinds_the_cache():
    model = build_tiny_model()
    cache = _prefilled(model, 8)

    def fails_on_kv_upper(inputs, cache):
        if precision.current().kv == precision.UPPER:
            model(inputs, cache=cache[:1])  # only the first layer appends, then it fails
            raise ValueError("this cache has no upper plane")
        return model(inputs, cache=cache)

    table = cost.calibrate(fails_on_kv_upper, cache, ["kv-upper", "a8"], rows=(1, 2), repeats=1)
    assert list(table.draft) == ["a8"]
    assert [c.offset for c in cache] == [8, 8]


def test_calibrate_stays_within_the_cache_room():
    class Roomy(KVCache):  # as the nested KV cache: blocks past room() + 1 cannot be rewound
        def room(self):
            return 3

    model = build_tiny_model()
    cache = [Roomy() for _ in model.layers]
    mx.eval(model(mx.zeros((1, 8), mx.uint32), cache=cache))
    table = cost.calibrate(model, cache, [], rows=(1, 5, 9), repeats=1)
    assert sorted(table.verify) == [1, 4] and all(c.offset == 8 for c in cache)


def test_cpu_verify_cost_grows_with_rows():
    # On the tiny model per-call overheads are a large part of a forward (measured ratio
    # 3-4, 1-2 ms a forward on a shared CPU: a thin margin); with hidden 512 it is ~7.
    model = _installed(hidden_size=512, intermediate_size=1024, num_attention_heads=8, vocab_size=1024)
    cache = _prefilled(model)
    table = cost.calibrate(model, cache, [], rows=(1, 9))
    assert table.verify_cost(9) / table.verify_cost(1) > 2
    assert choose(CostTable(table.verify, {"a8": table.verify[1] / 2}), {"a8": 0.9}).draft is None


def test_calibrate_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    calls = []

    def fake(model, cache, candidates, rows, repeats):
        calls.append(list(candidates))
        return CostTable({n: n / 1000 for n in rows}, {c: 0.0005 for c in candidates if c != "w-upper"})

    monkeypatch.setattr(cost, "calibrate", fake)
    model = build_tiny_model()
    cache = _prefilled(model)
    first = cost.calibrate_cached(model, cache, ["a8", "w-upper"])
    again = cost.calibrate_cached(model, cache, ["w-upper"])  # w-upper was tried: no re-measure
    assert again == first and len(calls) == 1 and first.verify == {1: 0.001, 5: 0.005, 9: 0.009}
    assert first.source == "timed"  # MLX-CPU: never modeled
    cost.calibrate_cached(model, cache, ["a8-g32"])  # never tried: measured
    assert len(calls) == 2

    store = json.loads((tmp_path / "costs.json").read_text())
    assert len(store) == 1 and "ctx=256" in next(iter(store)) and "layers=2" in next(iter(store))
    (tmp_path / "costs.json").write_text("{not json")
    assert cost.calibrate_cached(model, cache, ["a8"]) == first
    assert len(calls) == 3 and json.loads((tmp_path / "costs.json").read_text())


def test_context_bucket():
    assert [cost.context_bucket(n) for n in (0, 24, 256, 257, 5000)] == [256, 256, 256, 512, 8192]


def _as_mac(monkeypatch, device_name):
    """This CPU seen as a Mac with ``device_name`` (with the ``mac`` fixture's kernels);
    timing it would fail the test."""
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": device_name})

    def timed(*args, **kwargs):
        raise AssertionError("timed")

    monkeypatch.setattr(cost, "calibrate", timed)


@pytest.mark.parametrize("device, chip", [("Apple M1", "M1"), ("Apple M4 Max", "M4_Max")])
def test_a_mac_models_its_costs_without_timing(mac, monkeypatch, tmp_path, device, chip):
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    _as_mac(monkeypatch, device)
    model = install(build_tiny_model())
    cache = _prefilled(model)
    table = cost.calibrate_cached(model, cache, ["a8-g32", "kv-upper"])  # kv-upper: no nested cache
    assert table.source == f"modeled({chip})" and list(table.draft) == ["a8-g32"]
    assert sorted(table.verify) == list(range(1, 18)) and all(c.offset == 24 for c in cache)
    v = [table.verify[r] for r in range(1, 18)]
    assert all(a < b for a, b in zip(v, v[1:]))
    assert v[16] == pytest.approx(v[15] + v[0])  # 17 rows: a forward of 16 and one of 1
    assert table.draft["a8-g32"] == v[0]  # reads the same bytes as a plain step
    assert not (tmp_path / "costs.json").exists()  # cheap to model again: not stored


def test_a_chip_the_roofline_does_not_know_is_timed(mac, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M9 Ultra"})
    monkeypatch.setattr(cost, "calibrate", lambda model, cache, names, rows, repeats: CostTable({1: 1.0}, {}))
    model = install(build_tiny_model())
    assert cost.calibrate_cached(model, _prefilled(model), []).source == "timed"


def test_a_stored_timing_wins_over_the_model(mac, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    model = install(build_tiny_model())
    cache = _prefilled(model)
    timed = CostTable({1: 1.0, 5: 5.0, 9: 9.0}, {"a8-g32": 0.5})
    modeled = cost.modeled
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M1"})
    monkeypatch.setattr(cost, "modeled", lambda *args: None)  # as if the roofline did not know it
    monkeypatch.setattr(cost, "calibrate", lambda *args: timed)
    assert cost.calibrate_cached(model, cache, ["a8-g32"]) == timed
    monkeypatch.setattr(cost, "modeled", modeled)
    _as_mac(monkeypatch, "Apple M1")
    assert cost.modeled(model, cache, ["a8-g32"], "M1") is not None
    assert cost.calibrate_cached(model, cache, ["a8-g32"]) == timed


def test_auto_on_a_modeled_mac(mac, monkeypatch, tmp_path):
    """The flat modeled verify makes the free n-gram lookup pay; a draft that reads as many
    bytes as a step (a8-g32 on a 4-bit model) does not, so without the lookup it is plain."""
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    _as_mac(monkeypatch, "Apple M2 Max")
    model = install(build_tiny_model(head_bits=8))
    cache = make_cache(model, "nested")
    mx.eval(model(mx.zeros((1, 24), mx.uint32), cache=cache))
    auto = AutoPolicy(model, cache, Ngram())
    assert auto.name == auto.draft.name == "ngram"
    assert auto.reason.startswith("modeled_speedup") and auto.reason.endswith(";costs=modeled(M2_Max)")
    priors = {n: a for n, a in auto_priors(model, "nested").items() if n != "ngram"}
    assert {"w-upper", "kv-upper", "w-upper+kv-upper", "a8-g32"} <= set(priors)
    table = cost.calibrate_cached(model, cache, list(priors))
    # w-upper reads the 8-bit head's upper plane only, kv-upper reads all of a short context
    # (still in the float buffer): neither saves enough to pay
    assert table.draft["w-upper"] < table.verify[1] == table.draft["kv-upper"]
    c = choose(table, priors)
    assert c.draft is None and c.reason.startswith("draft_too_costly")
