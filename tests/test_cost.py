"""What ``--draft auto`` starts from (``cost.prior``): acceptance priors, a Mac's modeled
costs, a stored measurement, and the policy that serves the measured controller's decisions
(the controller itself: tests/test_controller.py)."""

import mlx.core as mx
import pytest
from helpers import build_tiny_model
from mlx_lm.models.cache import make_prompt_cache

from mlx_qspec import controller, cost, roofline
from mlx_qspec.caches import kv_mode
from mlx_qspec.drafts import auto as auto_module
from mlx_qspec.drafts.auto import AutoPolicy, auto_priors
from mlx_qspec.drafts.ngram import Ngram
from mlx_qspec.hooks import install
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.policy import BlockResult


def test_priors():
    assert cost.prior_acceptance("a8") == 0.91
    assert cost.prior_acceptance("kv-upper+a8") == pytest.approx(0.91 * 0.94)
    assert cost.prior_acceptance("a4-g32+w-upper+kv-upper") == pytest.approx(0.6 * 0.83 * 0.94)
    with pytest.raises(ValueError, match="a8-g64"):
        cost.prior_acceptance("a8-g64")


@pytest.fixture(autouse=True)
def own_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))


def _prefilled(n=24):
    """A tiny installed model, and its cache after ``n`` positions."""
    model = install(build_tiny_model())
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, n), mx.uint32), cache=cache))
    return model, cache


@pytest.mark.parametrize("device, chip", [("Apple M1", "M1"), ("Apple M4 Max", "M4_Max")])
def test_a_mac_models_its_costs_without_timing(mac, monkeypatch, tmp_path, device, chip):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": device})
    model, cache = _prefilled()
    costs = cost.prior(model, cache, ["ngram", "a8-g32", "kv-upper"])  # kv-upper: no nested cache
    assert costs.source == f"modeled({chip})" and sorted(costs.draft) == ["a8-g32", "ngram"]
    assert all(c.offset == 24 for c in cache)  # the bytes were counted on untimed forwards
    assert costs.weight == controller.PRIOR_WEIGHT["modeled"]
    assert costs.draft["ngram"] == 0.0  # the lookup runs no forward
    assert costs.draft["a8-g32"] == pytest.approx(costs.step)  # reads a plain step's bytes
    assert costs.step > roofline.CALIBRATION[chip.replace("_", " ")].fixed  # the fixed cost, and bytes
    assert 0 < costs.row < costs.step  # each verify row costs, but far less than a step
    assert not (tmp_path / "measured.json").exists()  # nothing measured yet: nothing stored


def test_elsewhere_there_is_no_prior():
    """MLX's CPU backend (or a chip the roofline does not know): no prior; the controller
    times plain decoding first and explores the drafts."""
    assert cost.prior(*_prefilled(), ["ngram", "a8-g32"]) is None


def test_a_stored_measurement_wins_over_the_model(mac, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M1"})
    model, cache = _prefilled()
    modeled = cost.prior(model, cache, ["ngram", "a8-g32"])
    measured = controller.Costs(step=2 * modeled.step, block=1.0, row=0.5, draft={"ngram": 0.1},
                                acceptance={"ngram": 0.1}, source="measured", weight=4.0)
    controller.default_store().save(cost.store_key(model, kv_mode(cache)), 24, measured)
    costs = cost.prior(model, cache, ["ngram", "a8-g32"])
    assert costs.source == "measured" and (costs.step, costs.block, costs.row) == (measured.step, 1.0, 0.5)
    assert costs.draft["ngram"] == 0.1  # measured here
    assert costs.draft["a8-g32"] == pytest.approx(2 * modeled.draft["a8-g32"])  # the model's, scaled
    assert costs.acceptance == {}  # the last prompt's acceptance is not this one's


def test_auto_on_a_modeled_mac_starts_from_the_model_and_times_what_it_runs(mac, monkeypatch):
    """The flat modeled verify makes the free n-gram lookup the first choice; the policy
    hands the decoder built drafts, reports every block to the controller, and stores
    what it measured."""
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M2 Max"})
    monkeypatch.setattr(auto_module, "WARM", set())  # as in a fresh process
    model = install(build_tiny_model(head_bits=8))
    cache = make_cache(model, "nested")
    mx.eval(model(mx.zeros((1, 24), mx.uint32), cache=cache))
    assert {"w-upper", "kv-upper", "w-upper+kv-upper", "a8-g32"} <= set(auto_priors(model, "nested"))
    auto = AutoPolicy(model, cache, Ngram())
    assert auto.name == "ngram" and auto.reads_context
    assert auto.reason.startswith("modeled_speedup") and auto.reason.endswith(";costs=modeled(M2_Max)")
    plan = auto.plan()  # the prior's choice first: its warm-up block is short
    assert plan.draft.name == "ngram" and plan.gamma == 1
    auto.report(BlockResult(1, 1, 2, 0.02))
    for _ in range(2):  # two timed blocks
        plan = auto.plan()
        assert plan.draft.name == "ngram"
        auto.report(BlockResult(plan.gamma, 0, 1, 0.01))  # nothing accepted: slower than modeled
    plan = auto.plan()  # then plain decoding is timed, to compare under the same conditions
    assert plan.draft is None and plan.steps > 0
    auto.report(BlockResult(0, 0, 1, 0.001))  # the server's loop: one step at a time
    assert auto.plan().steps == plan.steps - 1  # the same plain run goes on
    auto.report(BlockResult(0, 0, plan.steps - 1, 0.003))
    auto.close()
    stored = controller.default_store().load(cost.store_key(model, kv_mode(cache)), 24)
    assert stored.source == "measured" and "ngram" in stored.draft
