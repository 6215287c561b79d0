"""The worker's evaluator: rank-based masks equal the engine's, the dense side is cached,
an Optuna pruner can stop a trial after an early evaluation stage, KV bits change the objectives."""

import pytest
import torch

from prunesearch.config import StudyConfig
from prunesearch.models import load_model, prunable_linears
from prunesearch.data.texts import load_texts
from prunesearch.pruning.engine import PruneSpec, prune_model
from prunesearch.spaces import Candidate
from prunesearch.workers import evaluator as evaluator_module
from prunesearch.workers.evaluator import Evaluator


def small_config(**kw) -> StudyConfig:
    data = {
        "model": {"name": "default", "max_layers": 2, "device": "cpu"},
        "calibration": {"source": "lee", "samples": 8, "seq_len": 32, "batch_size": 2},
        "pruning": {"metric": "wanda", "sparsity": 0.6},
        "reconstruction_samples": 6,
        "space": {"kv_bits": True},
        "objectives": ["frobenius", "kl", "kv_bytes"],
        "kv_cache": {"bits_choices": [16, 8, 4]},
    }
    data.update(kw)
    return StudyConfig.model_validate(data)


@pytest.fixture(scope="module")
def ev():
    return Evaluator(small_config())


def test_rank_masks_equal_the_engine_masks(ev):
    cand = Candidate(ratios=[0.45, 0.75])
    ev.apply(cand)
    fast = {l.name: l.weight.clone() for l in ev.linears}
    lm = load_model("default", device="cpu", max_layers=2)
    calib, _ = load_texts(lm.tokenizer, ev.cfg.calibration, None)
    prune_model(lm.model, calib, PruneSpec(metric="wanda", sparsity=0.6, mode="one_shot",
                                           allocation={"name": "explicit", "params": {"sparsities": [0.45, 0.75]}}))
    for lin in prunable_linears(lm.model):
        assert torch.equal(lin.weight, fast[lin.name])


def test_the_dense_side_is_computed_once_and_reused(ev, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("calibration ran again")

    monkeypatch.setattr(evaluator_module, "collect_stats", no_calibration)
    again = Evaluator(small_config())
    torch.testing.assert_close(again.ref.hidden, ev.ref.hidden)
    for name, st in ev.stats.items():
        torch.testing.assert_close(again.stats[name].wanda_norm, st.wanda_norm)


def test_a_pruner_can_stop_a_trial_after_an_early_stage_never_after_the_last(ev):
    """6 prompts run in stages 2, 4, 6: the pruner is asked after 2 and 4 only, so a trial that ran
    them all is complete whatever the pruner would say; a stopped one records the prompts it ran."""
    assert ev.cfg.stage_prompts() == [2, 4, 6]
    seen = []
    res = ev.evaluate(Candidate(ratios=[0.6, 0.6]), on_stage=lambda n, value: seen.append((n, value)) or n == 4)
    assert res.pruned and res.prompts == 4 and [n for n, _ in seen] == [2, 4] and res.values is None
    always = []
    full = ev.evaluate(Candidate(ratios=[0.6, 0.6]), on_stage=lambda n, value: always.append(n) or True)
    assert always == [2] and full.pruned  # True after the first stage stops it there
    full = ev.evaluate(Candidate(ratios=[0.6, 0.6]), on_stage=lambda n, value: False)
    assert not full.pruned and full.prompts == 6 and full.named["frobenius"] > 0


def test_a_stage_value_is_the_error_on_its_prompts(ev):
    """The running Frobenius value after 2 prompts is the error on those 2 prompts, scaled to the
    whole set (so stages compare across candidates); the staged pass ends at the unstaged value."""
    from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error

    ev.apply(Candidate(ratios=[0.5, 0.7]))
    staged = {}
    final = reconstruction_error(ev.model, ev.ref, stages=[2, 4], on_stage=lambda n, run: staged.update({n: run}) and False)
    whole = reconstruction_error(ev.model, ev.ref)
    assert final == pytest.approx(whole, rel=1e-9)
    first_two = DenseReference(ev.ref.ids[:2], ev.ref.hidden[:2], ev.ref.gram, ev.ref.batch_size)
    first_two.prepare_kl(ev.model, "expected")  # the same KL arithmetic as the worker's reference (exact to 2e-7 apart)
    two = reconstruction_error(ev.model, first_two)
    assert staged[2]["frobenius"] == pytest.approx(two["frobenius"] * (6 / 2) ** 0.5, rel=1e-9)
    assert staged[2]["kl"] == pytest.approx(two["kl"], rel=1e-9) and staged[2]["kl"] != pytest.approx(whole["kl"])


def test_kv_bits_change_the_error_and_the_bytes(ev):
    dense_kv = ev.evaluate(Candidate(ratios=[0.6, 0.6], kv_bits=[16, 16])).named
    low_kv = ev.evaluate(Candidate(ratios=[0.6, 0.6], kv_bits=[4, 8])).named
    assert low_kv["kv_bytes"] < dense_kv["kv_bytes"] == 2 * 2 * 3 * 64 * 2
    assert low_kv["frobenius"] != dense_kv["frobenius"] and low_kv["kl"] > 0


def test_owl_candidates_are_resolved_on_the_worker(ev):
    res = ev.evaluate(Candidate(allocation={"name": "owl", "params": {"M": 3.0, "lam": 0.1}}))
    assert len(res.ratios) == 2 and sum(res.ratios) / 2 == pytest.approx(0.6)
    assert res.achieved == pytest.approx(0.6, abs=0.01)


def test_the_dense_cache_follows_the_text_not_just_its_name(tmp_path):
    """Same config, same file name, new text in the file: the cached dense side must not be reused."""
    import time

    text = tmp_path / "calib.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    text.write_text("\n\n".join(" ".join(words[i % 10:] + words[: i % 10]) * 3 for i in range(200)))
    cfg = small_config(calibration={"source": str(text), "samples": 4, "seq_len": 32, "batch_size": 2},
                       reconstruction_samples=4)
    first = Evaluator(cfg)
    time.sleep(0.01)
    text.write_text("\n\n".join(f"Report {i}: the river rose {i} inches overnight and the town slept." for i in range(400)))
    second = Evaluator(cfg)
    assert not torch.equal(second.ref.ids, first.ref.ids)
    assert not torch.allclose(second.ref.hidden, first.ref.hidden)


# ---------------------------------------------------------------- the budget to the weight
def test_a_study_candidate_prunes_round_s_n_weights_exactly(ev):
    """Blockwise ratios on the budget and an OWL candidate: the trial's masks remove round(S x N)
    weights, no fewer (per-row flooring lost up to d_out weights per layer before)."""
    n = ev.layout.total
    for cand in (Candidate(ratios=[0.45, 0.75]), Candidate(allocation={"name": "owl", "params": {"M": 3.0, "lam": 0.1}})):
        res = ev.evaluate(cand)
        zeros = sum(int((l.weight == 0).sum()) for l in ev.linears)
        assert round(res.achieved * n) == zeros == round(0.6 * n)
        assert res.achieved == round(0.6 * n) / n


# ---------------------------------------------------------------- export --apply reuses the workers' dense side
def test_an_exported_trial_reuses_the_workers_cached_dense_side(tmp_path, monkeypatch):
    """What `export --apply` runs: the study's config with the trial's ratios, one-shot. Its
    statistics and reference are the ones the worker cached, read back instead of recomputed, and
    the re-applied model has the trial's objective value."""
    import optuna

    from prunesearch import prune_job
    from prunesearch.config import PruneConfig
    from prunesearch.search.export import prune_config
    from prunesearch.workers import dense_cache

    monkeypatch.setattr(dense_cache, "cache_dir", lambda *parts: tmp_path.joinpath(*parts))
    (tmp_path / "dense").mkdir()
    cfg = small_config()
    worker = Evaluator(cfg)
    assert not worker.dense_cached and len(list((tmp_path / "dense").glob("*.pt"))) == 1
    value = worker.evaluate(Candidate(ratios=[0.45, 0.75])).named
    trial = optuna.trial.create_trial(value=value["frobenius"], user_attrs={"ratios": [0.45, 0.75]})
    data = prune_config(cfg, trial) | {"evaluation": None}
    assert data["pruning"]["mode"] == "one_shot"

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran again")

    monkeypatch.setattr(prune_job, "collect_stats", no_calibration)
    monkeypatch.setattr(prune_job.DenseReference, "compute", no_calibration)
    report = prune_job.run_prune(PruneConfig.model_validate(data), None, progress=False)
    assert report["cache"] == {"dense_perplexity": None, "dense_reference": True, "calibration_statistics": True}
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(value["frobenius"], rel=1e-6)
    assert report["reconstruction"]["pruned"]["kl"] == pytest.approx(value["kl"], rel=1e-6)
    assert report["pruned_weights"] == round(0.6 * worker.layout.total)


def test_the_weights_fingerprint_tells_an_overwritten_model_apart(tiny_dirs):
    from prunesearch.workers.dense_cache import model_fingerprint

    a, b = (load_model(tiny_dirs["llama"], device="cpu").model for _ in range(2))
    assert model_fingerprint(a) == model_fingerprint(b)
    prune_model(b, None, PruneSpec(metric="magnitude", sparsity=0.5, mode="one_shot"))
    assert model_fingerprint(a) != model_fingerprint(b)
