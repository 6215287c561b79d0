"""Staged evaluation through the CLI: trials report after each early stage of the
reconstruction prompts, the median pruner stops hopeless ones there, and a trial that ran every
stage is COMPLETE (never relabelled PRUNED). Real model slice, SQLite, in-process Ray."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from conftest import load, run_cli, study_config, write_config


@pytest.mark.parametrize("pruner", ["median", "percentile"])
def test_a_staged_study_stops_trials_early_and_completes_the_rest(tmp_path, capsys, ray_session, pruner):
    cfg = study_config(tmp_path, trials=10, calibration={"samples": 8, "batch_size": 2}, reconstruction_samples=8,
                       search={"pruner": pruner, "stages": [2, 4], "pruner_warmup": 3})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) + len(pruned) == 10 and pruned, "nothing was stopped early"
    for t in complete:  # every stage ran; the pruner was asked after 2 and 4 prompts, never after the last
        assert t.user_attrs["prompts"] == 8 and set(t.intermediate_values) == {2, 4}
    for t in pruned:  # stopped after an early stage, and says which
        stopped_after = max(t.intermediate_values)
        assert stopped_after in (2, 4) and t.user_attrs["prompts"] == stopped_after
        assert "objectives" not in t.user_attrs  # no final values were made up
    run = sum(t.user_attrs["prompts"] for t in complete + pruned)
    assert run < 10 * 8
    assert f"stopped early: {run} of 80 reconstruction prompts run" in out


def test_without_a_pruner_trials_run_every_prompt_in_one_pass(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=4, search={"pruner": "none", "pruner_warmup": 0})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    trials = load(cfg).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(not t.intermediate_values and t.user_attrs["prompts"] == 4 for t in trials)
    assert "stopped early" not in out
