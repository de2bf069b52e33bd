"""Drafts that read no weights or fewer blocks: the n-gram lookup (``ngram``), layer skip
(``skip-…``) and cascades of levels (``ngram>skip-2>…``) (greedy output equals plain
decoding: test_exactness.py); a draft model; sampling keeps the verify's distribution with a point-mass
draft; a skip draft reads only the blocks it runs (counted); calibration picks blocks by
measured agreement and is cached."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from helpers import build_tiny_model
from helpers.sampling import chi2_pvalue, joint, sample_first_tokens
from mlx_qspec import hooks, reads
from mlx_qspec.decoder import SpecStats
from mlx_qspec.drafts import layer_skip
from mlx_qspec.drafts.cascade import build
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.drafts.ngram import Ngram
from mlx_qspec.precision import FULL_PRECISION, Precision, reading
from mlx_qspec.sampling import make_sampler
from mlx_qspec.speculative import speculative_generate_step

BLOCK = 32
# A prompt that repeats itself in part, so the lookup finds matches, and long enough that
# the nested cache's planes hold tokens before generation starts.
PROMPT = [(7 * i + 3) % 256 for i in range(40)] * 2 + [5, 9, 11]
MAX_TOKENS = 37  # ends inside a block for every γ > 1


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(num_hidden_layers=4)


def plain(model, kv_mode="fp"):
    hooks.install(model)
    cache = make_cache(model, kv_mode, BLOCK, BLOCK)
    return [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                                        prompt_cache=cache)]


def spec(model, draft, gamma, kv_mode="fp", **kw):
    stats = SpecStats()
    cache = make_cache(model, kv_mode, BLOCK, BLOCK)
    out = [t for t, _, _ in speculative_generate_step(
        mx.array(PROMPT), model, draft=draft, num_draft_tokens=gamma, max_tokens=MAX_TOKENS,
        prompt_cache=cache, stats=stats, **kw)]
    return out, stats, cache


def test_lookup_prefers_the_longest_match_votes_and_extends_periodic_text():
    ng = Ngram(min_n=1, max_n=3, window=64)
    # The suffix 5 2 3 has no earlier match, 2 3 has two, followed by 4 and by 7: a tie
    # goes to what followed first (in a rewrite, the source in the prompt).
    assert ng.propose([1, 2, 3, 4, 9, 1, 2, 3, 7, 8, 5, 2, 3], 2) == [4, 9]
    # 2 3 is followed by 7 twice, by 4 once: the vote says 7, from its latest occurrence.
    assert ng.propose([1, 2, 3, 4, 2, 3, 7, 1, 2, 3, 7, 8, 5, 2, 3], 2) == [7, 8]
    # 9 1 2 3 is longer than max_n; 1 2 3 decides (→ 4 9 1), not the 1-token match of 3.
    assert ng.propose([1, 2, 3, 4, 9, 1, 5, 3, 7, 8, 5, 1, 2, 3], 3) == [4, 9, 1]
    assert ng.propose([9, 4, 1, 3, 6, 1, 2, 3], 1) == [6]  # 1-token suffix, when nothing longer
    # Periodic context: the continuation runs into the end and is looked up again.
    assert ng.propose([4, 5, 6, 4, 5, 6], 7) == [4, 5, 6, 4, 5, 6, 4]
    assert ng.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert Ngram(min_n=2).propose([1, 2, 3, 1, 9, 9, 1], 2) == []  # only 1-token matches
    far = [1, 2] + [9] * 70 + [1]  # the only earlier 1 lies 72 tokens back
    assert ng.propose(far, 2) == [] and Ngram(window=80).propose(far, 2) == [2, 9]


def test_a_stream_closed_mid_block_leaves_every_block_at_the_emitted_length(model):
    """As at EOS: the consumer stops inside a block; the skipped blocks' caches agree."""
    cache = make_cache(model, "fp", BLOCK, BLOCK)
    gen = speculative_generate_step(mx.array(PROMPT), model, draft="ngram>skip-2",
                                    num_draft_tokens=8, max_tokens=100, prompt_cache=cache)
    got = [next(gen)[0] for _ in range(6)]
    gen.close()
    assert got == plain(model)[:6]
    assert {c.offset for c in cache} == {len(PROMPT) + 6 - 1}


def test_copying_output_is_drafted_whole_by_the_lookup():
    """Output the prompt already contains is drafted whole: every n-gram draft is accepted,
    τ = γ + 1. Without attention and MLP outputs the model's next token is a function of
    the current one; the prompt is its own path from token 3, then 3 again."""
    m = build_tiny_model(seed=1, residual_gain=0.0)
    path = [3]
    for _ in range(59):
        path.append(int(mx.argmax(m(mx.array(path[-1:])[None])[0, -1])))
    assert len(set(path)) == len(path)  # no cycle: only the lookup can know what comes
    prompt = path + [3]
    gamma, stats = 8, SpecStats()
    out = [t for t, _, _ in speculative_generate_step(
        mx.array(prompt), m, draft="ngram", num_draft_tokens=gamma, max_tokens=45, stats=stats)]
    assert out == [t for t, _ in generate_step(mx.array(prompt), m, max_tokens=45)]
    assert stats.acceptance == 1.0 and stats.tokens_per_verify == gamma + 1


def test_a_skip_draft_reads_only_the_blocks_it_runs(model):
    hooks.install(model)
    layer = model.model.layers[2]
    block_bytes = sum(v.nbytes for k, v in tree_flatten(layer.parameters()) if "norm" not in k)
    counted = {}
    for p in (FULL_PRECISION, Precision(skip=(2,))):
        cache = make_cache(model, "fp", BLOCK, BLOCK)
        model(mx.array(PROMPT)[None], cache=cache)
        counted[p] = reads.ReadCounter()
        with reading(p), reads.counting(counted[p]):
            mx.eval(model(mx.array([[5]]), cache=cache))
        grew = [c.offset - len(PROMPT) for c in cache]
        assert grew == ([1, 1, 0, 1] if p.skip else [1] * 4)
    full, draft = (counted[p] for p in counted)
    assert full.bytes(reads.WEIGHTS) - draft.bytes(reads.WEIGHTS) == block_bytes
    assert draft.bytes(reads.KV) == pytest.approx(full.bytes(reads.KV) * 3 / 4)


def test_calibration_picks_blocks_by_measured_agreement_and_is_cached(model, tmp_path, monkeypatch):
    tokens = mx.array([PROMPT[:64], PROMPT[16:80]])
    found = layer_skip.calibrate(model, tokens, fraction=0.5)
    assert len(found.skip) == 2 and 0 not in found.skip
    best_single = max(found.single, key=found.single.get)
    assert best_single in found.skip  # the greedy search starts with the best single block
    ref = mx.argmax(model(tokens)[:, :-1], axis=-1)
    with reading(Precision(skip=found.skip)):
        again = (mx.argmax(model(tokens)[:, :-1], axis=-1) == ref).astype(mx.float32).mean().item()
    assert found.agreement == pytest.approx(again)

    class Tok:
        def encode(self, text):
            return [ord(c) % 256 for c in text]

    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    first = layer_skip.calibrate_cached(model, Tok(), 0.5)
    monkeypatch.setattr(layer_skip, "calibrate", lambda *a, **k: pytest.fail("not cached"))
    assert layer_skip.calibrate_cached(model, Tok(), 0.5) == first
    resolved = layer_skip.resolve(model, Tok(), Precision(skip_fraction=0.5))
    assert resolved == Precision(skip=first.skip)


@pytest.mark.parametrize("draft", ["ngram", "ngram>a4"])
def test_speculative_sampling_with_a_point_mass_draft_keeps_the_distribution(draft):
    """Chi-square of the first three tokens against the verify's exact joint distribution,
    with n-gram proposals (q = 1 on the proposal) accepted with probability p."""
    m = build_tiny_model()
    # The prompt starts with what the model writes after it (31 → 204 23 23, found by
    # iterating greedy decoding), so the lookup proposes tokens of probability ~1/3.
    prompt = [31, 204, 23, 23, 200, 5, 77, 140, 3, 9, 31]
    sampler, steps, n = make_sampler(temp=1.0, top_k=4), 3, 600 if draft == "ngram" else 400
    p_joint = joint(m, prompt, sampler, steps)
    counts, stats = sample_first_tokens(m, prompt, sampler, steps, n, seed=7, draft=draft,
                                        gamma=3, cached_tokens=prompt[:-1])
    assert stats.drafted > 0 and 0.05 < stats.acceptance < 0.95  # both paths ran
    assert chi2_pvalue(counts, p_joint, n) > 1e-3


@pytest.mark.parametrize("draft, msg", [
    ("a8>ngram", "first level"),
    ("ngram>>a8", "empty level"),
    ("ngram>ngram", "first level"),
    ("a8>a8", "repeats"),
    ("skip-4", "blocks 0..3"),
    ("skip-1,2,3", "blocks 0..3"),
    ("skip-1>skip-1,2", "skips blocks that"),
    ("skip-0.5", "calibrated"),
    ("skip-0", "block 0"),
])
def test_bad_cascades_fail_before_any_compute(model, draft, msg):
    with pytest.raises(ValueError, match=msg):
        speculative_generate_step(mx.array(PROMPT), model, draft=draft)


def test_an_uncalibrated_share_names_the_function_that_calibrates_it(model):
    """The message named mlx_qspec.layer_skip.resolve, a module that is not there any more."""
    with pytest.raises(ValueError, match="resolve it with mlx_qspec.drafts.layer_skip.resolve"):
        build(model, "skip-0.5")


def test_bad_lookup_settings_name_the_setting():
    with pytest.raises(ValueError, match="min .3. is larger than ngram max .2."):
        Ngram(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        Ngram(window=0)


def test_cascade_names_are_canonical(model):
    assert build(model, "NGRAM > a8+skip-2 > verify").name == "ngram>skip-2+a8"


@pytest.mark.parametrize("verify_cost, expect", [
    ({1: 1.0, 9: 1.1}, "ngram"),  # a Mac: the verify is flat, every model draft reads ~all bytes
    ({1: 1.0, 9: 9.0}, "none"),  # MLX-CPU: rows cost compute, nothing pays
])
def test_auto_weighs_the_free_lookup_and_stays_exact(model, monkeypatch, verify_cost, expect):
    """The prior (seconds of the order of this tiny model's) decides auto's first block;
    what it then measures here decides the rest (whatever it runs, the output is exact)."""
    from mlx_qspec import controller, cost
    from mlx_qspec.drafts.auto import AutoPolicy

    def prior(m, cache, names, step_bytes=None):
        verify = {r: t * 0.004 for r, t in verify_cost.items()}
        return controller.Costs.from_table(verify, {n: 0.0 if n == "ngram" else 0.0038
                                                    for n in names}, "measured")
    plans, plan = [], AutoPolicy.plan
    monkeypatch.setattr(cost, "prior", prior)
    monkeypatch.setattr(AutoPolicy, "plan", lambda self: plans.append(plan(self)) or plans[-1])
    out, st, _ = spec(model, "auto", 8)
    assert out == plain(model)
    first = plans[0].draft
    assert (first.name if first is not None else "none") == expect  # the prior's choice


def test_auto_weighs_the_skip_sets_calibrated_for_the_model(model, tmp_path, monkeypatch):
    from mlx_qspec.drafts.auto import auto_priors

    monkeypatch.setenv("MLX_QSPEC_CACHE", str(tmp_path))
    assert not any(n.startswith("skip-") for n in auto_priors(model, "nested"))
    found = layer_skip.calibrate_cached(model, type("T", (), {"encode": lambda s, t: [1] * 200})(), 0.25)
    priors = auto_priors(model, "nested")
    name = Precision(skip=found.skip).name
    assert priors[name] == found.agreement and name + "+kv-upper" in priors and "ngram" in priors


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_a_draft_model_identical_to_the_model_is_always_accepted(model, gamma):
    """mlx-lm's --draft-model as the first level: its own cache, caught up each block."""
    twin = build_tiny_model(num_hidden_layers=4)
    out, st, _ = spec(model, "none", gamma, draft_model=twin)
    assert out == plain(model) and st.draft == "draft-model"
    assert st.acceptance == 1.0


@pytest.mark.parametrize("draft", ["none", "a8-g32", "skip-2>a8"])
def test_a_different_draft_model_below_self_drafts_stays_exact(model, draft):
    other = build_tiny_model(num_hidden_layers=4, residual_gain=3.5)  # agrees about half the time
    out, st, _ = spec(model, draft, 4, draft_model=other)
    assert out == plain(model) and st.draft.startswith("draft-model")
    assert 0 < st.acceptance < 1


def test_speculative_sampling_with_a_draft_model_keeps_the_distribution():
    m, other = build_tiny_model(), build_tiny_model(residual_gain=3.0)
    prompt = [5, 77, 140, 3, 250, 19, 64, 8]
    sampler, steps, n = make_sampler(temp=1.0, top_k=4), 3, 400
    p_joint = joint(m, prompt, sampler, steps)
    counts, stats = sample_first_tokens(m, prompt, sampler, steps, n, seed=11, draft="none",
                                        gamma=2, draft_model=other, cached_tokens=prompt[:-1])
    assert 0.05 < stats.acceptance < 0.95
    assert chi2_pvalue(counts, p_joint, n) > 1e-3


def test_a_draft_model_must_share_the_vocabulary(model):
    with pytest.raises(ValueError, match="vocabulary .300 tokens. is not the model's .256."):
        speculative_generate_step(mx.array(PROMPT), model, draft="none",
                                  draft_model=build_tiny_model(vocab_size=300))


def test_a_cascade_scores_with_logits_processors_as_plain_decoding(model):
    """Each level scores its rows in the block's context so far (history, drafted tokens,
    proposals): output equals plain decoding with the same repetition penalty."""
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=16)
    hooks.install(model)
    ref = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                                       logits_processors=procs)]
    out, st, _ = spec(model, "ngram>skip-2>a8", 6, logits_processors=procs)
    assert out == ref and ref != plain(model)  # the penalty changed the text
    assert sum(n for n, _ in st.level_counts.values()) > 0
