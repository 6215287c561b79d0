"""What clusters do to a search, done to it here: a driver SIGKILLed on PostgreSQL, two drivers
sharing one PostgreSQL study, an evaluator process killed mid-study. Real PostgreSQL server on
loopback (password from the environment), real Ray, the real model slice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from conftest import (FINISHED, PG_PASSWORD, StudyDb, driver_name, frozen_after, load, run_cli, start_driver, study_config,
                      wait_for, write_config)


@pytest.fixture(scope="module")
def ray_session(postgres_url, ray_session):
    """conftest's, after the database fixture (in-process workers need its password variable)."""
    yield


def stop(proc: subprocess.Popen) -> None:
    """Stop what the test started, by its own process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def cmdline(p: psutil.Process) -> str:
    """A process's command line, or "" if it ended while we looked."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def assert_exact_and_retried(study: optuna.Study, target: int) -> None:
    assert len(study.get_trials(states=FINISHED)) == target
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    lost = [t for t in study.get_trials(states=(TrialState.FAIL,)) if not t.user_attrs.get("surplus") and t.params]
    assert all(t.number in retried for t in lost)  # every lost trial was run again


def test_postgres_study_survives_a_killed_driver(tmp_path, capsys, postgres_url, ray_session):
    cfg = study_config(tmp_path, trials=10, storage=postgres_url, study="pg-kill")  # killed at 3 (held still): 7 to spare
    proc = start_driver(write_config(tmp_path, cfg))
    try:
        with frozen_after(cfg, proc, 3):  # no trial finishes meanwhile: the kill lands mid-study
            os.killpg(proc.pid, signal.SIGKILL)  # driver and its Ray
            proc.wait(30)
    finally:
        stop(proc)
    orphaned = len(load(cfg).get_trials(states=(TrialState.RUNNING,)))  # the dead driver's, still "running" (or none,
    # if the kill fell between two trials)
    code, out, err = run_cli(["resume", "--study", "pg-kill", "--storage", postgres_url, "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    assert_exact_and_retried(study, 10)
    assert sum(t.state == TrialState.FAIL for t in study.trials) >= orphaned  # failed (then re-run) once stale

    # the password lives only in the environment: not in the study, not in any output
    code, out, err = run_cli(["status", "--storage", postgres_url], capsys)
    assert code == 0 and "pg-kill" in out and PG_PASSWORD not in out + err
    assert PG_PASSWORD not in json.dumps(study.user_attrs) + json.dumps([t.user_attrs for t in study.trials], default=str)
    inline = postgres_url.replace("postgres@", f"postgres:{PG_PASSWORD}@")
    code, out, err = run_cli(["status", "--storage", inline], capsys)
    assert code == 2 and "do not write the password in the URL" in err and PG_PASSWORD not in out + err


def test_two_drivers_share_a_postgres_study_without_duplicate_work(tmp_path, capsys, postgres_url, ray_session):
    cfg = study_config(tmp_path, trials=12, storage=postgres_url, study="pg-two")  # 2 set up, 10 for the two drivers
    path = write_config(tmp_path, cfg)
    # one driver sets the study up (schema, config, baselines); then two run it at once
    code, _, err = run_cli(["launch", str(path), "--trials", "2", "--quiet"], capsys)
    assert code == 0, err
    db = StudyDb(postgres_url, "pg-two")
    drivers = [start_driver(path), start_driver(path)]  # at once: their start-ups overlap
    try:
        # whichever driver runs a trial first is held at its next write to it (a row lock) until the
        # other has started and finished a trial of its own: both surely work, on any machine
        with db.holding_a_trial_of({driver_name(p): p for p in drivers}) as (first, held):
            second = next(p for p in drivers if driver_name(p) != first)
            wait_for(lambda: db.count(attr=("driver", driver_name(second))) >= 1, second,
                     "a finished trial of the second driver")
        for proc in drivers:
            assert proc.wait(300) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        for proc in drivers:
            stop(proc)
        db.close()
    study = load(cfg)
    assert_exact_and_retried(study, 12)
    by_driver = Counter(t.user_attrs.get("driver") for t in study.get_trials(states=FINISHED))
    assert len(by_driver) == 3, by_driver  # the set-up run and both drivers did work
    assert study.trials[held].state in FINISHED and study.trials[held].user_attrs["driver"] == first
    seconds = [t.datetime_complete for t in study.get_trials(states=FINISHED) if t.user_attrs["driver"] == driver_name(second)]
    assert study.trials[held].datetime_complete > min(seconds)  # the hold held: the second worked while the first waited
    params = [tuple(sorted(t.params.items())) for t in study.get_trials(states=FINISHED)]
    assert len(params) == len(set(params))  # and none of it twice
    assert [t.user_attrs.get("baseline") for t in study.trials].count("owl") == 1


def test_a_killed_evaluator_is_replaced_and_its_trial_rerun(tmp_path):
    cfg = study_config(tmp_path, trials=10, study="worker-kill")  # killed at 2 (held still): 8 to spare
    proc = start_driver(write_config(tmp_path, cfg))
    try:
        with frozen_after(cfg, proc, 2):  # the study cannot finish before the kill
            actors = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EvaluatorActor" in cmdline(p)]
            assert actors, "no evaluator actor process found"
            actors[0].kill()  # SIGKILL, mid-trial or between trials: its next trial is lost either way
        assert proc.wait(300) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        stop(proc)
    study = load(cfg)
    assert_exact_and_retried(study, 10)
    lost = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("worker_lost")]
    assert lost, "the killed actor's trial was not recorded as lost"
    workers = {t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(workers) >= 2  # the replacement actor (another process) finished the study


def test_a_second_driver_on_one_sqlite_file_is_told_to_use_postgresql(tmp_path, caplog):
    from prunesearch.search import storage

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from prunesearch.search.storage import claim_sqlite; "
                               f"claim_sqlite({url!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level("WARNING", logger="prunesearch.search.storage"):
            storage.claim_sqlite(url)
        assert "in use by another prunesearch driver" in caplog.text and "PostgreSQL" in caplog.text
    finally:
        holder.kill()
        holder.wait(10)


def test_a_surplus_trial_leaves_only_queued_work_behind_and_a_full_study_retires_it(tmp_path):
    """The race two drivers run at a study's end, played in order: a fresh surplus trial leaves
    nothing queued; a popped retry goes back to the queue as it was; once the target is held,
    queued retries are retired, so nothing is left waiting."""
    from prunesearch.search.attrs import RETRY_OF
    from prunesearch.search.driver import _retire_queued_retries, _surplus

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="race")
    for x in (0.1, 0.2):
        study.enqueue_trial({"x": x})
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    target = 2

    fresh = study.ask()
    assert _surplus(study, fresh, target)
    assert not study.get_trials(states=(TrialState.WAITING,))
    assert study.trials[fresh.number].user_attrs["surplus"] and not study.trials[fresh.number].params

    study.enqueue_trial({"x": 0.7}, user_attrs={RETRY_OF: 1})
    popped = study.ask()
    assert _surplus(study, popped, target)
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == {"x": 0.7} and queued.user_attrs == {RETRY_OF: 1}

    assert _retire_queued_retries(study, target + 5) == 0  # nor is it retired while the target is not held
    assert _retire_queued_retries(study, target) == 1
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    assert study.trials[queued.number].user_attrs == {RETRY_OF: 1, "surplus": True}

    # one short of a larger target, a retry queued just before another driver's fresh trial: the
    # queued one will run (ask pops the oldest first), so the fresh one is surplus, else 4 of 3
    study.enqueue_trial({"x": 0.3}, user_attrs={RETRY_OF: 0})
    fresh = optuna.Trial(study, study._storage.create_new_trial(study._study_id))
    assert _surplus(study, fresh, target + 1)
    retry = study.ask()
    assert not _surplus(study, retry, target + 1) and retry.number < fresh.number


def _open_when_told(url: str, barrier, results) -> None:
    from prunesearch.search.storage import open_storage

    try:
        barrier.wait(timeout=60)
        open_storage(url)
        results.put("ok")
    except Exception as exc:  # what a driver would have died of
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_fresh_database_at_once_all_get_it(tmp_path, capsys):
    """Optuna writes its version bookkeeping on every open; drivers (and a `status`) that open a
    new study file at the same moment must not die of each other's CREATE TABLE."""
    import multiprocessing

    from prunesearch.errors import UserError
    from prunesearch.search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(UserError, match="no study database at .*fresh.db"):
        open_storage(url, create=False)  # a reader never creates it, not even the file
    code, _, err = run_cli(["status", "--storage", url], capsys)
    assert code == 2 and "no study database" in err and "Traceback" not in err
    assert not (tmp_path / "fresh.db").exists()
    (tmp_path / "notes.db").write_text("not a database, just text\n" * 100)
    code, _, err = run_cli(["status", "--storage", f"sqlite:///{tmp_path / 'notes.db'}"], capsys)
    assert code == 2 and "file is not a database" in err and "Traceback" not in err
    # no fork of this process (it may hold Ray threads): children fork from a fork server, a fresh
    # process that imported the driver's code (and this module) once, instead of each spawned child
    # importing torch on its own; each child still opens its own engine and connections (the server
    # outlives the test: test_stale's racers fork from it too)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["prunesearch.search.storage", "prunesearch.search.dispatch", __name__])
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_open_when_told, args=(url, barrier, results), daemon=True) for _ in range(6)]
    try:
        for p in procs:
            p.start()
        assert [results.get(timeout=120) for _ in procs] == ["ok"] * 6
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
    assert open_storage(url, create=False).get_all_studies() == []


def test_a_busy_sqlite_file_is_waited_for_and_a_broken_one_is_one_line(tmp_path):
    """SQLite answers "database is locked" at once, without its busy timeout, when two fresh
    openers would deadlock switching the file to WAL (seen on CI): that is retried; any other
    error of the file is the user's, said at once in one line."""
    import sqlite3

    from prunesearch.errors import UserError
    from prunesearch.search.storage import _while_busy

    calls = []

    def busy_twice():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "opened"

    assert _while_busy(busy_twice, tmp_path / "a.db") == "opened" and len(calls) == 3
    with pytest.raises(UserError, match="a.db as a study database: database is locked"):
        _while_busy(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), tmp_path / "a.db",
                    patience_s=0.2)
    broken = []
    with pytest.raises(UserError, match="file is not a database"):
        _while_busy(lambda: broken.append(1) or (_ for _ in ()).throw(sqlite3.DatabaseError("file is not a database")),
                    tmp_path / "a.db")
    assert broken == [1]
