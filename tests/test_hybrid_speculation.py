"""Speculation on the models Mac users run now (issue 24): hybrids with recurrent state, a
mixture of experts, mxfp4 experts. Greedy speculation equals plain decoding token for token
for every draft that applies, with drafts accepted and rejected; sampling keeps the verify's
distribution on a hybrid; ``auto`` runs on each of them."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from helpers import build_tiny_model
from helpers.hybrid_models import build, save
from helpers.sampling import assert_fits, joint, sample_first_tokens
from mlx_qspec import controller, cost, reads
from mlx_qspec.caches import kv_mode
from mlx_qspec.decoder import SpecStats
from mlx_qspec.drafts.cascade import DraftModel
from mlx_qspec.drafts.grammar import parse_precision
from mlx_qspec.generate import main
from mlx_qspec.hooks import install
from mlx_qspec.kv_cache import make_cache
from mlx_qspec.quant.linear import QSpecSwitchLinear
from mlx_qspec.recurrent import RecurrentCache
from mlx_qspec.sampling import make_sampler
from mlx_qspec.speculative import plain_generate_step, speculative_generate_step

PROMPT = [5, 77, 140, 3, 250, 19, 64, 8, 5, 77, 140, 3]  # repeats: the lookup proposes
MAX_TOKENS = 12
EXPERTS = {"gpt_oss": "mxfp4"}
MODELS = ["qwen3_5", "lfm2", "mamba2", "nemotron_h", "qwen3_moe", "gpt_oss"]
HYBRIDS = MODELS[:4]
DRAFTS = ["ngram", "a4", "kv-upper", "a8-g32", "ngram>a8-g32", "skip-1", "draft-model"]
GAMMAS = (1, 4, 8)


def gammas(name: str, draft: str) -> tuple:
    """γ ∈ {1, 4, 8} for the lookup and A4 (most rewinds) on the main hybrid; elsewhere one γ
    per draft, turning over the models so that each draft meets each γ on some model and
    each model each γ (suite time)."""
    if name == "qwen3_5" and draft in ("ngram", "a4"):
        return GAMMAS
    return (GAMMAS[(MODELS.index(name) + DRAFTS.index(draft)) % 3],)


def applies(model, name: str, draft: str) -> bool:
    if draft == "kv-upper":  # needs attention layers, none of them sliding windows
        return name not in ("mamba2", "gpt_oss")
    return draft != "skip-1" or len(model.layers) >= 4


@pytest.fixture(scope="module")
def draft_model():
    return build_tiny_model()  # llama, the same 256-token vocabulary


@pytest.mark.parametrize("name", MODELS)
def test_greedy_speculation_equals_plain_decoding(name, draft_model):
    _check_greedy(name, install(build(name, experts_mode=EXPERTS.get(name, "affine"))), draft_model)


def test_drafts_that_read_no_expert_bits_on_mxfp4_experts(draft_model):
    """The lookup, a draft model and kv-upper on a mixture whose experts are mxfp4 (no
    activation draft: the experts are not affine)."""
    model = install(build("qwen3_moe", experts_mode="mxfp4"))
    assert {m.mode for _, m in model.named_modules() if isinstance(m, QSpecSwitchLinear)} == {"mxfp4"}
    _check_greedy("qwen3_moe", model, draft_model, drafts=("ngram", "kv-upper", "draft-model"))


def _check_greedy(name, model, draft_model, drafts=DRAFTS):
    kv_modes = ("fp", "nested") if applies(model, name, "kv-upper") else ("fp",)
    want = {kv: [t for t, _, _ in plain_generate_step(  # fp: on mlx-lm's own caches
        mx.array(PROMPT), model, max_tokens=MAX_TOKENS, prefill_step_size=5,
        prompt_cache=make_prompt_cache(model) if kv == "fp" else make_cache(model, kv))]
        for kv in kv_modes}
    accepted = rejected = 0
    for draft in (d for d in drafts if applies(model, name, d)):
        for gamma in gammas(name, draft):
            kv = "nested" if draft == "kv-upper" else "fp"
            cache, stats = make_cache(model, kv), SpecStats()
            kw = dict(draft="none", draft_model=draft_model) if draft == "draft-model" else dict(draft=draft)
            out = speculative_generate_step(mx.array(PROMPT), model, num_draft_tokens=gamma,
                                            max_tokens=MAX_TOKENS, prompt_cache=cache, stats=stats,
                                            prefill_step_size=5, **kw)
            assert [t for t, _, _ in out] == want[kv], (draft, gamma)
            assert stats.emitted == MAX_TOKENS == stats.accepted + stats.verify_passes
            accepted += stats.accepted
            rejected += stats.drafted - stats.accepted
            recurrent = any(isinstance(c, RecurrentCache) or hasattr(c, "caches") for c in cache)
            assert recurrent == (name in HYBRIDS)
    assert accepted > 0 and rejected > 0  # the accept, correction and rewind paths all ran


def test_sampling_on_a_hybrid_keeps_the_verify_distribution():
    """Chi-square of the first two tokens on qwen3_5 against the verify's exact joint
    distribution; the same samples are far from the draft's own (the test has power). Each
    run starts from a copy of one prefilled cache (a recurrent state rewinds only within the
    blocks since its last commit)."""
    model = install(build("qwen3_5"))
    prompt, steps, n = PROMPT[:8], 2, 120
    sampler = make_sampler(temp=1.0, top_k=4)
    p_joint = joint(model, prompt, sampler, steps)
    q_joint = joint(model, prompt, sampler, steps, parse_precision("a4"))
    counts, stats = sample_first_tokens(model, prompt, sampler, steps, n, seed=1234, copies=True)
    assert_fits(counts, n, p_joint, q_joint, stats)


@pytest.mark.parametrize("name", MODELS)
def test_auto_runs_on_each_model(name, tmp_path, capsys):
    """The CLI's default draft on each model: it exits 0 (a user error would be exit 2) and
    says what it chose and why."""
    path = save(name, tmp_path / name, EXPERTS.get(name, "affine"))
    main(["--model", str(path), "--prompt", "hello hello hello", "--max-tokens", "6",
                   "--draft", "auto", "--verbose", "--ignore-chat-template"])
    err = capsys.readouterr().err
    assert "Speculation: SpecStats(" in err or "auto_reason" in err, err


def test_a_verifys_recurrent_replay_is_counted_in_its_reads():
    """Each verify forward reads and writes every gated-delta layer's state once; after a
    rejection the rewind replays it from the block's start: read and written again, counted
    with the verify's reads (not as a forward) and left out of plain decoding's bytes."""
    model = install(build("qwen3_5"))
    cache = make_cache(model, "fp")
    stats = SpecStats()
    list(speculative_generate_step(mx.array(PROMPT), model, draft="a4", num_draft_tokens=4,
                                   max_tokens=MAX_TOKENS, prompt_cache=cache, stats=stats))
    layers = [c for c in cache if isinstance(c, RecurrentCache)]
    per_pass = 2 * sum(c[1].nbytes for c in layers)  # read and written, float32 as stored
    v = stats.verify_reads
    replays = v.ints[reads.STATE] / per_pass - v.forwards
    assert stats.drafted > stats.accepted and replays == int(replays) and replays >= 1
    assert v.beyond_step[0] >= replays * per_pass  # not plain decoding's
    assert v.step_bytes() < v.bytes()


def test_a_hybrid_draft_model_commits_what_it_shares_with_the_context():
    """A draft model with recurrent state is rewound each block to what it shares with the
    context, which is then settled: its rewind point follows the context, and the output is
    plain decoding's."""
    model = install(build("qwen3_moe"))
    draft = DraftModel(install(build("qwen3_5")))
    want = [t for t, _, _ in plain_generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS)]
    stats = SpecStats()
    out = speculative_generate_step(mx.array(PROMPT), model, draft="none", draft_model=draft,
                                    num_draft_tokens=3, max_tokens=MAX_TOKENS, stats=stats)
    assert [t for t, _, _ in out] == want and stats.drafted > 0
    held = [c for c in draft.cache if isinstance(c, RecurrentCache)]
    assert held and max(c.rewindable for c in held) <= 3 + 1 < len(PROMPT)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_moe"])
def test_auto_drafting_on_hybrid_and_moe_models_is_plain_decoding(name):
    """``auto`` started from a stored measurement in which the lookup pays (as a run before
    on this machine leaves it) drafts, and gives plain decoding's tokens."""
    model = install(build(name))
    cache = make_cache(model, "fp")
    measured = controller.Costs(step=1.0, block=1.0, row=0.05, draft={"ngram": 0.0},
                                acceptance={"ngram": 0.9}, source="measured",
                                weight=controller.PRIOR_WEIGHT["measured"])
    controller.default_store().save(cost.store_key(model, kv_mode(cache)), len(PROMPT), measured)
    want = [t for t, _, _ in plain_generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                                                 prompt_cache=make_prompt_cache(model))]
    stats = SpecStats()
    out = speculative_generate_step(mx.array(PROMPT), model, draft="auto", max_tokens=MAX_TOKENS,
                                    prompt_cache=cache, stats=stats)
    assert [t for t, _, _ in out] == want
    assert stats.drafted > 0 and stats.auto_reason
