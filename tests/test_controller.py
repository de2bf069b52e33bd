"""``--draft auto``'s measured controller on simulated machines: the seconds are chosen here
(an injected clock), so each test knows which arm is really faster."""

import json
import random

import pytest

from mlx_qspec.controller import (EXPLORE_ALLOWANCE, EXPLORE_SHARE, LEAVE_AFTER, Action, Controller,
                                   Costs, Store, context_bucket, expected_tokens)


class Machine:
    """Known costs in seconds: a plain chunk of n steps costs ``chunk + n·step``, a block of
    k drafts ``block + k·(row + draft[d])``, each ±``noise``; drafts are accepted i.i.d. with
    ``acceptance[d]``; an arm's first use costs ``warm_up``× (kernels building)."""

    def __init__(self, step, block, row, draft, acceptance, chunk=0.0, noise=0.05, seed=0,
                 warm_up=5.0):
        self.step, self.block, self.row, self.draft = step, block, row, draft
        self.acceptance, self.chunk, self.noise, self.warm_up = acceptance, chunk, noise, warm_up
        self.rng = random.Random(seed)
        self.used = set()

    def run(self, action: Action):
        arm = action.draft or "plain"
        slow = self.warm_up if arm not in self.used else 1.0
        self.used.add(arm)
        jitter = 1 + self.noise * (2 * self.rng.random() - 1)
        if action.draft is None:
            return 0, 0, action.steps, (self.chunk + action.steps * self.step) * jitter * slow
        k = action.gamma
        accepted = 0
        while accepted < k and self.rng.random() < self.acceptance[action.draft]:
            accepted += 1
        seconds = self.block + k * (self.row + self.draft[action.draft])
        return k, accepted, accepted + 1, seconds * jitter * slow


def drive(controller, machine, tokens):
    """Run ``tokens`` tokens; the actions, in order, with what each emitted and took."""
    log, n = [], 0
    while n < tokens:
        action = controller.next()
        drafted, accepted, emitted, seconds = machine.run(action)
        controller.report(action, drafted, accepted, emitted, seconds)
        log.append((action, emitted, seconds))
        n += emitted
    return log


def rate(log):
    return sum(e for _, e, _ in log) / sum(t for _, _, t in log)


DRAFTS = {"kv-upper": 0.94, "ngram": 0.44}


def mac(**over):
    """A Mac at 100 tok/s: a verify of a few rows costs about one step."""
    return Machine(**{**dict(step=0.010, block=0.011, row=0.0005, draft={"kv-upper": 0.004, "ngram": 0.0},
                             acceptance=DRAFTS, chunk=0.002), **over})


def cpu(**over):
    """This machine's CPU backend on the test model: each verify row costs ~¾ of a step, and
    nothing is compiled on first use."""
    return Machine(**{**dict(step=0.185, block=0.19, row=0.14, draft={"kv-upper": 0.2, "ngram": 0.0},
                             acceptance=DRAFTS, chunk=0.02, warm_up=1.2), **over})


def roofline_prior():
    """What the roofline says of the Mac above: flat verify, a cheap kv-upper."""
    return Costs.from_table({1: 0.008, 5: 0.0082, 9: 0.0085}, {"kv-upper": 0.003, "ngram": 0.0},
                            "modeled(M2_Max)")


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 4) == pytest.approx(1.9375)
    assert expected_tokens(0.91, 4) == pytest.approx(4.18, abs=0.01)  # SPEC.md §6
    assert expected_tokens(0.5, 2.5) == pytest.approx((1 - 0.5**3.5) / 0.5)  # a lookup's mean fill


def test_costs_from_a_table():
    costs = Costs.from_table({1: 1.0, 5: 3.0, 9: 5.0, 17: 100.0}, {"a8": 0.5}, "modeled(M1)")
    assert (costs.step, costs.block, costs.row) == (1.0, 1.0, 0.5)  # rows past 9 ignored
    assert costs.draft == {"a8": 0.5} and costs.weight == 1.0 and costs.source == "modeled(M1)"
    assert Costs.from_table({1: 1.0, 9: 1.0}, {}, "measured").weight == 4.0


def test_keeps_a_draft_that_measures_faster():
    machine = mac()
    controller = Controller({"kv-upper": 0.94}, prior=roofline_prior())
    log = drive(controller, machine, 2000)
    kv = sum(e for a, e, _ in log if a.draft == "kv-upper")
    assert kv >= 0.93 * controller.emitted  # the rest: plain decoding timed now and then
    assert not [a for a, _, _ in log if a.draft is None and not a.explore]  # never left
    assert controller.reason.startswith("measured_speedup_1.")
    assert controller.reason.endswith(";costs=measured")
    # kv-upper at its best γ (4-6: τ 4.4-5.9 per 0.029-0.038 s) is ~1.53× plain here;
    # plain decoding timed now and then costs a little of it
    assert 1.35 < controller.measured_speedup < 1.6
    assert controller.gamma >= 2


def test_leaves_a_draft_that_measures_slower_within_a_bounded_number_of_blocks():
    # The roofline says kv-upper pays; on this Mac each draft step costs more than a step.
    machine = mac(draft={"kv-upper": 0.012, "ngram": 0.0}, row=0.004,
                  acceptance={"kv-upper": 0.94, "ngram": 0.1})
    controller = Controller(DRAFTS, prior=roofline_prior())
    log = drive(controller, machine, 1000)
    for draft in DRAFTS:
        ran = [i for i, (a, _, _) in enumerate(log) if a.draft == draft and not a.explore]
        assert len(ran) <= 1 + LEAVE_AFTER, draft  # a warm-up block, then LEAVE_AFTER timed
    assert controller.current is None
    assert all(a.draft is None or a.explore for a, _, _ in log[8:])  # after: only timed again
    assert controller.reason.startswith(("measured_not_faster", "verify_cost_grows_with_rows"))
    plain_only = Controller({}, prior=roofline_prior())
    baseline = rate(drive(plain_only, mac(), 1000))
    assert rate(log) >= 0.93 * baseline  # the price of finding out: 5× warm-ups, 3 blocks


def test_cold_start_times_plain_first_then_drafts_within_the_budget():
    machine = cpu()
    controller = Controller(DRAFTS)  # no prior: nothing stored, not a Mac
    assert controller.reason == "timing_plain_decoding;costs=timed"
    first = controller.next()
    assert first.draft is None and first.steps > 0
    log = drive(controller, machine, 400)
    assert controller.explored <= EXPLORE_ALLOWANCE + EXPLORE_SHARE * controller.emitted
    assert all(a.explore for a, _, _ in log if a.draft is not None)  # never chosen outright
    assert controller.current is None
    assert controller.reason.startswith("measured_not_faster(")
    assert controller.reason.endswith(";costs=measured")
    baseline = rate(drive(Controller({}), cpu(), 400))
    assert rate(log) >= 0.97 * baseline


@pytest.mark.parametrize("make", [mac, cpu])
@pytest.mark.parametrize("prior", [None, "roofline"])
def test_exploration_stays_within_its_budget(make, prior):
    controller = Controller(DRAFTS, prior=roofline_prior() if prior else None)
    log = drive(controller, make(seed=3), 3000)
    explored = sum(e for a, e, _ in log if a.explore)
    assert explored == controller.explored
    assert explored <= EXPLORE_ALLOWANCE + EXPLORE_SHARE * controller.emitted


@pytest.mark.parametrize("speed", [0.97, 1.0, 1.03])
def test_does_not_oscillate_between_arms_of_about_the_same_speed(speed):
    # kv-upper at γ=4 emits ~4.4 tokens per block; its cost is set so that its rate is
    # ``speed`` × plain's, under 10 % noise per block.
    tau = expected_tokens(0.94, 4)
    block = tau * 0.010 / speed
    machine = mac(block=block - 4 * 0.001, row=0.0, draft={"kv-upper": 0.001, "ngram": 0.0},
                  acceptance={"kv-upper": 0.94, "ngram": 0.0}, noise=0.1, seed=7)
    prior = Costs.from_table({1: 0.010, 5: block}, {"kv-upper": 0.001, "ngram": 0.0}, "measured")
    controller = Controller(DRAFTS, gammas=(4,), prior=prior)
    log = drive(controller, machine, 4000)
    chosen = [a.draft for a, _, _ in log if not a.explore]
    switches = sum(a != b for a, b in zip(chosen, chosen[1:]))
    # in ~4000 tokens: a trial now and then, rarer each time it loses (backoff to 2048 tokens)
    assert switches <= 8
    assert rate(log) >= 0.95 * min(speed, 1.0) / 0.010


@pytest.mark.parametrize("acceptance, low, high", [(0.95, 4, 8), (0.3, 1, 2)])
def test_gamma_follows_acceptance(acceptance, low, high):
    # Flat verify, free lookup: high acceptance asks for long blocks, low for short ones.
    machine = mac(acceptance={"kv-upper": 0.0, "ngram": acceptance}, row=0.002)
    controller = Controller({"ngram": acceptance}, prior=roofline_prior())
    drive(controller, machine, 600)
    assert low <= controller.gamma <= high


def test_restores_from_the_store(tmp_path):
    store = Store(tmp_path / "measured.json")
    key = "model|cpu|mlx=0"
    first = Controller(DRAFTS, store=store, key=key, start=100)
    log = drive(first, cpu(), 300)
    assert any(a.draft for a, _, _ in log)  # it had to time a draft to know
    # 100 → ~400 tokens: saved on leaving the 256 bucket, and at the end in the 512 one
    assert list(json.loads((tmp_path / "measured.json").read_text())) == [f"{key}|ctx=256"]
    first.close()
    saved = json.loads((tmp_path / "measured.json").read_text())
    assert sorted(saved) == [f"{key}|ctx=256", f"{key}|ctx=512"]

    prior = Store(tmp_path / "measured.json").load(key, 400)  # a new process
    assert prior.source == "measured" and prior.step == pytest.approx(0.185, rel=0.1)
    timed = {d for d, arm in first.arms.items() if arm.measured()}
    assert timed and set(prior.draft) == timed  # a draft never timed is not stored as if it were
    second = Controller(DRAFTS, prior=prior, store=store, key=key, start=100)
    assert second.reason.endswith(";costs=measured")
    log = drive(second, cpu(seed=1), 300)
    assert not any(a.draft for a, _, _ in log)  # it knows: no draft is timed again
    assert second.current is None


def test_the_store_keeps_buckets_apart_and_falls_back_to_the_nearest(tmp_path):
    store = Store(tmp_path / "m.json")
    costs = lambda step: Costs(step, step, 0.0, {}, source="measured")  # noqa: E731
    store.save("k", 300, costs(1.0))  # bucket 512
    store.save("k", 5000, costs(2.0))  # bucket 8192
    store.save("other", 300, costs(3.0))
    assert store.load("k", 400).step == 1.0 and store.load("k", 8000).step == 2.0
    assert store.load("k", 1500).step == 1.0  # 2048: 512 is nearer (log scale) than 8192
    assert store.load("k", 4000).step == 2.0
    assert store.load("missing", 300) is None
    assert [context_bucket(n) for n in (0, 24, 256, 257, 5000)] == [256, 256, 256, 512, 8192]


def test_a_store_that_cannot_be_written_warns_once_and_keeps_costs_in_memory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    store = Store(blocker / "measured.json")  # its folder is a regular file
    costs = Costs(0.5, 0.5, 0.1, {"ngram": 0.0}, source="measured")
    store.save("k", 10, costs)
    store.save("k", 10, costs)  # a second save: no second warning
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot write to the cache folder" in err[0] and "a_file" in err[0]
    assert store.load("k", 10) == costs


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"k|ctx=256": {"step": "x"}}',
                                  '{"k|ctx=256": {"step": 1, "block": 1}}'])
def test_a_corrupt_store_reads_as_empty_and_is_rewritten(tmp_path, text):
    path = tmp_path / "m.json"
    path.write_text(text)
    store = Store(path)
    assert store.load("k", 10) is None
    store.save("k", 10, Costs(1.0, 1.0, 0.0, {}, source="measured"))
    assert Store(path).load("k", 10).step == 1.0


def test_no_candidates_is_plain():
    controller = Controller({}, prior=roofline_prior())
    assert controller.next().draft is None
    assert controller.reason == "no_draft_candidates;costs=modeled(M2_Max)"
