"""The search service end to end, as a user drives it: launch, kill, resume, status, export,
re-apply, report. Real model slice (SmolLM2, 2 blocks), real SQLite, real Ray."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import FINISHED, frozen_after, load, run_cli, start_driver, study_config, write_config


def test_launch_runs_a_study_through_ray_and_sqlite(default_study, tmp_path, capsys, ray_session):
    cfg, out = default_study  # `launch --quiet` of study_config's 6 trials, and what it printed
    study = load(cfg)
    trials = study.get_trials(states=FINISHED)
    assert len(trials) == 6
    assert [t.user_attrs.get("baseline") for t in study.trials[:2]] == ["uniform", "owl"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.user_attrs["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)  # the budget holds for every candidate
        assert len(t.user_attrs["ratios"]) == 2
    assert study.user_attrs["config_hash"]
    assert "finished" in out

    code, out, _ = run_cli(["status", "--study", "t", "--storage", cfg["storage"]], capsys)
    assert code == 0 and "baseline uniform" in out and "frobenius" in out

    # export the best, re-apply it with `prune --config`, get the same objective value
    exported = tmp_path / "best.yaml"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported)], capsys)
    assert code == 0, err
    assert (tmp_path / "best.recipe.yaml").exists()
    recipe = yaml.safe_load((tmp_path / "best.recipe.yaml").read_text())
    assert len(recipe["sparsity_stage"]["sparsity_modifiers"]["ConstantPruningModifier"]["targets"]) == 14  # keeps the masks
    best = study.best_trial
    code, out, err = run_cli(["prune", "--config", str(exported), "--out", str(tmp_path / "pruned"), "--quiet"], capsys)
    assert code == 0, err
    report = yaml.safe_load((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(best.value, rel=1e-4)
    assert [b["target"] for b in report["blocks"]] == pytest.approx(best.user_attrs["ratios"])

    code, out, err = run_cli(["report", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"history.png", "sparsity.png"}

    # a changed config under the same name is refused
    changed = {**cfg, "pruning": {**cfg["pruning"], "sparsity": 0.5}}
    code, _, err = run_cli(["launch", str(write_config(tmp_path, changed, "changed.yaml")), "--quiet"], capsys)
    assert code == 2 and "different config" in err


def test_ctrl_c_stops_cleanly_and_a_killed_resume_resumes_to_exactly_the_requested_trials(tmp_path, capsys, ray_session):
    """Ctrl-C stops a driver cleanly (its running trial failed as interrupted and queued again);
    `resume` re-runs it and is SIGKILLed with its Ray mid-study; a last `resume` ends the study with
    exactly the requested trials: every interrupted or lost trial run again, nothing finished twice."""
    cfg = study_config(tmp_path, trials=12)
    proc = start_driver(write_config(tmp_path, cfg))
    try:
        with frozen_after(cfg, proc, 3) as finished:  # Ctrl-C arrives mid-study, however slow the test is
            assert finished < 11  # the one trial in flight may still finish once the driver can write again
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130, proc.stderr.read().decode()[-2000:]
    stopped = load(cfg)
    assert not stopped.get_trials(states=(TrialState.RUNNING,))  # nothing left dangling
    interrupted = [t for t in stopped.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("interrupted")]
    done = len(stopped.get_trials(states=FINISHED))
    assert 3 <= done < 12

    # `resume` picks the interrupted trial up first; killed (with its Ray) once it finished two more
    proc = start_driver(args=("resume", "--study", "t", "--storage", cfg["storage"]))
    try:
        with frozen_after(cfg, proc, done + 2):  # the study cannot finish meanwhile: the kill lands mid-study
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its in-process Ray
            proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert done + 2 <= len(load(cfg).get_trials(states=FINISHED)) < 12
    code, _, err = run_cli(["resume", "--study", "t", "--storage", cfg["storage"], "--quiet"], capsys)
    assert code == 0, err
    after = load(cfg)
    assert len(after.get_trials(states=FINISHED)) == 12
    assert not after.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # nothing finished before the stop or the kill was evaluated again
    numbers = [t.number for t in after.get_trials(states=FINISHED)]
    assert len(numbers) == len(set(numbers))
    retried = {t.user_attrs.get("retry_of") for t in after.trials}
    assert all(t.number in retried for t in interrupted)
    lost = [t for t in after.get_trials(states=(TrialState.FAIL,))]
    assert all(t.number in retried for t in lost if t.params)


@pytest.mark.parametrize("patch,message", [
    ({"pruning": {"sparsity": 0.6, "metric": "wanda", "colour": 1}}, "pruning.colour: unknown key"),
    ({"search": {"trials": "many"}}, "search.trials"),
    ({"space": {"name": "blockwise", "min_sparsity": 0.8, "max_sparsity": 0.9}}, "impossible budget"),
    ({"objectives": ["frobenius", "accuracy"]}, "unknown objective 'accuracy'"),
    ({"storage": "postgresql+psycopg://nobody@127.0.0.1:9/none"}, "cannot reach the study database"),
    ({"storage": "not a url"}, "not a database URL"),
])
def test_bad_study_configs_are_one_line_errors(tmp_path, capsys, patch, message):
    cfg = study_config(tmp_path)
    cfg.update(patch)
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]


def test_a_mistake_found_when_the_worker_starts_is_a_one_line_error(tmp_path, capsys, ray_session):
    """The worker finds it (the model path), not the config check: Ray hands back only the text
    of the actor's failed start, and the user still gets one line."""
    cfg = study_config(tmp_path, model={"name": str(tmp_path / "no-such-model")})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2 and "model path not found" in err and "Traceback" not in err, err


def test_kv_bits_study_is_multi_objective_and_exports_the_knee(kv_study, tmp_path, capsys, ray_session):
    cfg = kv_study  # 6 trials of per-block attention/MLP sparsity and KV bits {16, 8, 4}, launched as a user does
    study = load(cfg)
    assert len(study.directions) == 2 and len(study.get_trials(states=FINISHED)) == 6
    kv = {t.user_attrs["objectives"]["kv_bytes"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert max(kv) == 2 * 2 * 3 * 64 * 2  # baselines keep 16 bits: 2 layers x (K, V) x 3 heads x 64 x 2 bytes
    assert len(kv) > 1
    assert all(len(t.user_attrs["ratios"]) == 4 for t in study.get_trials(states=(TrialState.COMPLETE,)))  # attn/mlp split

    exported = tmp_path / "knee.yaml"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported),
                              "--pick", "knee"], capsys)
    assert code == 0, err
    data = yaml.safe_load(exported.read_text())
    knee_number = int(out.split("trial ")[1].split()[0])
    knee = study.trials[knee_number]
    assert data["kv_cache"]["bits"] == [knee.params["kv00"], knee.params["kv01"]]
    assert all(len(pair) == 2 for pair in data["pruning"]["allocation"]["params"]["sparsities"])
    code, out, err = run_cli(["prune", "--config", str(exported), "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["prune", "--config", str(exported), "--out", str(tmp_path / "m"), "--quiet"], capsys)
    report = yaml.safe_load((tmp_path / "m" / "prune_report.json").read_text())
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(knee.values[0], rel=1e-4)
    assert report["kv_cache"]["bytes_per_token"] == pytest.approx(knee.values[1])

    code, out, err = run_cli(["report", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "plots")], capsys)
    assert code == 0 and (tmp_path / "plots" / "pareto.png").exists()


def test_a_study_on_a_model_with_blocks_removed_exports_what_it_measured(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=3, model={"max_layers": 3}, pruning={"remove_layers": 1})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    best = load(cfg).best_trial
    assert len(best.user_attrs["ratios"]) == 2  # the search allocates over the 2 remaining blocks
    exported = tmp_path / "best.yaml"
    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported)], capsys)
    assert code == 0, err
    pruning = yaml.safe_load(exported.read_text())["pruning"]
    assert pruning["remove_layers"] == 1 and pruning["remove_blocks"] == best.user_attrs["removed_blocks"]  # pinned
    code, _, err = run_cli(["prune", "--config", str(exported), "--out", str(tmp_path / "pruned"), "--quiet"], capsys)
    assert code == 0, err
    report = yaml.safe_load((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["removed_layers"]["blocks"] == best.user_attrs["removed_blocks"] and report["model"]["layers"] == 2
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(best.value, rel=1e-4)


class _OnePool:
    """The pool surface a Dispatcher uses, over one real Ray actor that sleeps as told."""

    def __init__(self):
        import ray

        @ray.remote(num_cpus=0)
        class Sleeper:
            def evaluate(self, trial_id, cand):
                from prunesearch.workers.result import TrialResult

                time.sleep(cand["sleep"])
                return TrialResult([0.5], 0.5, values=[1.0], named={"frobenius": 1.0}, metric="wanda", worker="sleeper")

        self.idle = [Sleeper.remote()]
        self.lost_actors = []

    def poll(self):
        pass

    def lost(self, actor):
        self.lost_actors.append(actor)


def test_dispatcher_drops_a_trial_failed_as_stale_and_abandons_running_ones(tmp_path, ray_session):
    """A starved driver whose own trial was failed as stale meanwhile gets an outcome, not a
    crash; Ctrl-C with an evaluation in flight fails it as interrupted at once."""
    from prunesearch.search.dispatch import Dispatcher
    from prunesearch.search.storage import open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'd.db'}"), study_name="d")
    pool = _OnePool()
    dispatcher = Dispatcher(study, pool, heartbeat_s=1)
    try:
        trial = study.ask()
        dispatcher.submit(trial, {"sleep": 1.0})
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # what another driver's stale check does
        outcomes = []
        while not outcomes:
            outcomes = dispatcher.wait(timeout=5.0)
        assert [o.state for o in outcomes] == ["stale"] and pool.idle and not pool.lost_actors
        assert study.trials[trial.number].state == TrialState.FAIL and "worker" not in study.trials[trial.number].user_attrs

        running = study.ask()
        dispatcher.submit(running, {"sleep": 60.0})
        t = time.monotonic()
        assert [o.state for o in dispatcher.abandon()] == ["interrupted"]
        assert time.monotonic() - t < 10 and not dispatcher.in_flight
        assert study.trials[running.number].state == TrialState.FAIL
        assert study.trials[running.number].user_attrs["interrupted"]
    finally:
        dispatcher.close()
