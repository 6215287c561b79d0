"""NSGA-III over OptiShear's space, as a user drives it: launch, kill mid-generation, resume to the
same Pareto set as an uninterrupted run, export the found metric and re-apply it to the same
masks. Real model slice (SmolLM2, 2 blocks), real SQLite, real Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import frozen_after, launch_quietly, load, run_cli, study_config, write_config
from prunesearch.errors import UserError
from prunesearch.models import load_model, prunable_linears
from prunesearch.pruning.masks import NM, prune_mask, score_ranks, count_pruned
from prunesearch.pruning.meta_metric import RIA_LIKE_POINT, WANDA_POINT, meta_spec
from prunesearch.spaces import ModelLayout, make_space

POP, TRIALS = 6, 16  # generations of 6, 6 and a truncated 4: killed at 8 (mid-generation 1), 8 left to spare


def nsga3_config(tmp_path, name: str, trials: int = TRIALS, seed: int = 3) -> dict:
    cfg = study_config(tmp_path)
    cfg.update(study=name, objectives=["frobenius", "sparsity_deviation"],
               space={"name": "optishear", "min_sparsity": 0.3, "max_sparsity": 0.9, "split_attn_mlp": True},
               search={"sampler": "nsga3", "population": POP, "trials": trials, "seed": seed, "heartbeat_s": 1, "grace_s": 3})
    return cfg


def record(study: optuna.Study) -> dict:
    """(generation, individual) -> (parameters, values) of every complete trial."""
    return {(t.user_attrs["generation"], t.user_attrs["individual"]): (t.params, t.values)
            for t in study.get_trials(states=(TrialState.COMPLETE,))}


def pareto(study: optuna.Study) -> set:
    return {(tuple(sorted(t.params.items())), tuple(t.values)) for t in study.best_trials}


# ---------------------------------------------------------------- masks by selection


@pytest.mark.parametrize("group,nm", [("row", None), ("layer", None), ("row", NM(2, 4))])
def test_selection_masks_equal_stable_rank_masks_even_with_ties(group, nm):
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (16, 64)).float()  # many ties straddle every cut
    scores[3] = 1.0  # a row of one value
    for s in (0.0, 0.1, 0.5, 0.73, 1.0 if nm is None else 0.5):
        k = count_pruned(s, tuple(scores.shape), group, nm)
        assert torch.equal(prune_mask(scores, s, group, nm), score_ranks(scores, group, nm) < k), s


# ---------------------------------------------------------------- the space


def test_optishear_space_codes_points_as_integer_vectors():
    layout = ModelLayout(3, (10, 10, 10), (20, 20, 20))
    space = make_space("optishear", layout, 0.5, step=0.05, kv_bits=[16, 8])
    assert [g.name for g in space.genes][:5] == ["coef_w", "op_w", "coef_x", "op_x", "s00"]
    assert space.bounds() == [6, 6, 6, 6, 2, 2, 2, 1, 1, 1]
    x = [0, 6, 3, 1, 0, 1, 2, 1, 0, 1]
    params = space.params_of(x)
    assert space.vector_of(params) == x
    cand = space.candidate(params)
    assert cand.ratios == pytest.approx([0.45, 0.5, 0.55]) and cand.kv_bits == [8, 16, 8]
    assert cand.metric == "meta:coef_w=one,op_w=softmax,coef_x=rowcol,op_x=sqrt"

    wanda = space.candidate(space.encode({"name": "wanda"}, None, None))
    ria = space.candidate(space.encode({"name": "ria"}, None, None))
    assert wanda.metric == meta_spec(*WANDA_POINT) and ria.metric == meta_spec(*RIA_LIKE_POINT)
    assert wanda.ratios == ria.ratios == [0.5, 0.5, 0.5]
    owl = space.encode({"name": "owl"}, None, lambda alloc: [0.41, 0.52, 0.57])
    assert [owl[f"s{i:02d}"] for i in range(3)] == [-1, 0, 1]  # OWL rounded to S - d, S, S + d


def test_optishear_space_refuses_what_it_cannot_express():
    layout = ModelLayout(2, (10, 10), (20, 20))
    with pytest.raises(UserError, match="N:M"):
        make_space("optishear", layout, 0.5, nm_m=4)
    with pytest.raises(UserError, match="cannot start from 'magnitude'"):
        make_space("optishear", layout, 0.5).encode({"name": "magnitude"}, None, None)


@pytest.mark.parametrize("patch,message", [
    ({"space": {"name": "blockwise"}}, "set space.name to optishear"),
    ({"search": {"sampler": "nsga3", "population": 3, "ref_partitions": 3}}, "smaller than the 4 reference directions"),
])
def test_bad_nsga3_configs_are_one_line_errors(tmp_path, capsys, ray_session, patch, message):
    cfg = nsga3_config(tmp_path, "bad")
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value}
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


# ---------------------------------------------------------------- end to end


def _launch_and_kill(cfg: dict, path, finished: int) -> None:
    """`prunesearch launch` in its own session, SIGKILLed (with its Ray) once ``finished`` trials are in,
    while the study is held still (so the kill lands mid-study however loaded the machine)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "prunesearch", "launch", str(path), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with frozen_after(cfg, proc, finished, states=("COMPLETE",)):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def full(tmp_path_factory, ray_session) -> dict:
    """An uninterrupted study (shared: the killed one must resume to it; one of its trials is exported)."""
    tmp = tmp_path_factory.mktemp("nsga3")
    cfg = nsga3_config(tmp, "full")
    launch_quietly(write_config(tmp, cfg, "full.yaml"))
    return cfg


def test_killed_nsga3_study_resumes_to_the_same_pareto_set(full, tmp_path, capsys, ray_session):
    uninterrupted = load(full)
    assert len(record(uninterrupted)) == TRIALS
    assert sorted({g for g, _ in record(uninterrupted)}) == [0, 1, 2]
    seeds = [t.user_attrs.get("baseline") for t in uninterrupted.trials[:3]]
    assert seeds == ["wanda", "ria", "owl"]

    killed = nsga3_config(tmp_path, "killed")
    _launch_and_kill(killed, write_config(tmp_path, killed, "killed.yaml"), POP + 2)  # mid-generation 1
    before = record(load(killed))
    assert POP + 2 <= len(before) < TRIALS
    code, out, err = run_cli(["resume", "--study", "killed", "--storage", killed["storage"], "--quiet"], capsys)
    assert code == 0, err
    resumed = load(killed)
    assert not resumed.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    after = record(resumed)
    assert len(after) == TRIALS  # no individual evaluated twice, none missing
    assert all(after[k] == v for k, v in before.items())
    assert after == record(uninterrupted)
    assert pareto(resumed) == pareto(uninterrupted)

    # status names the generations and metrics; report draws the Pareto front
    code, out, _ = run_cli(["status", "--study", "full", "--storage", full["storage"]], capsys)
    assert code == 0 and "baseline wanda" in out and "g2" in out
    code, _, err = run_cli(["report", "--study", "full", "--storage", full["storage"], "--out", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    assert (tmp_path / "plots" / "pareto.png").exists()


def test_exported_meta_metric_reapplies_to_the_same_masks(full, tmp_path, capsys, ray_session):
    from prunesearch.search.export import pick_trial, trial_candidate
    from prunesearch.search.study import load_study_config
    from prunesearch.workers.evaluator import Evaluator

    cfg = full
    # pick one whose metric is not Wanda's, so the export has to carry it
    study = load(cfg)
    trial = next(t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs["metric"] != meta_spec(*WANDA_POINT))
    code, out, err = run_cli(["export", "--study", "full", "--storage", cfg["storage"], "--pick", f"trial {trial.number}",
                              "--out", str(tmp_path / "found.yaml"), "--apply", str(tmp_path / "pruned"), "--quiet"], capsys)
    assert code == 0, err
    assert trial.user_attrs["metric"] in (tmp_path / "found.yaml").read_text()

    study_cfg, st = load_study_config("full", cfg["storage"])
    ev = Evaluator(study_cfg)
    ev.apply(trial_candidate(study_cfg, st.trials[trial.number]))
    saved = {l.name: l.weight for l in prunable_linears(load_model(str(tmp_path / "pruned"), device="cpu").model)}
    for lin in ev.linears:
        assert torch.equal(lin.weight == 0, saved[lin.name] == 0), lin.name

    # `best` with a budget objective: the best error among trials on budget
    best = pick_trial(st, "best")
    assert abs(best.user_attrs["achieved_sparsity"] - 0.6) <= 0.002
    with pytest.raises(UserError, match="within 1e-09"):
        pick_trial(st, "within 1e-9")


def test_a_trial_whose_driver_died_while_labelling_it_is_not_an_individual():
    """A driver SIGKILLed between writing a trial's generation and its individual and vector
    leaves a trial (failed as stale on resume) that was never evaluated: the replay skips it and
    re-runs that individual, as for any missing one (a resume died of KeyError 'individual')."""
    from prunesearch.search import attrs, evo, nsga3

    study = optuna.create_study(directions=["minimize", "minimize"])
    half = study.ask()
    half.set_user_attr(attrs.GENERATION, 0)
    study.tell(half, state=TrialState.FAIL)
    whole = study.ask()
    for key, value in ((attrs.GENERATION, 0), (attrs.INDIVIDUAL, 1), (attrs.VECTOR, [1, 2])):
        whole.set_user_attr(key, value)
    study.tell(whole, [0.5, 0.25])
    assert list(nsga3.recorded(study)) == [(0, 1)]
    staged = optuna.create_study()
    half = staged.ask()
    for key, value in ((attrs.GENERATION, 0), (attrs.STAGE, 0)):
        half.set_user_attr(key, value)
    staged.tell(half, state=TrialState.FAIL)
    assert evo.recorded(staged) == {}
