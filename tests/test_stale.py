"""A dead driver's trial is failed, and its parameters re-queued, exactly once, however many
drivers see it go stale at the same moment: two real processes released together on one stale
trial, round after round, on SQLite (where Optuna's SELECT ... FOR UPDATE locks nothing) and on
PostgreSQL."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # ask/tell beats itself
GRACE_S, ROUNDS = 5, 10
LONG_AGO = datetime.datetime(2000, 1, 1)


def _racer(url: str, names, barrier, results, environ: dict) -> None:
    """One driver: for each study named to it, wait for the starting gun, then run its stale check."""
    import os

    os.environ.update(environ)  # the test's environment (the database password), not the fork server's
    from prunesearch.search.dispatch import fail_stale, requeue
    from prunesearch.search.storage import open_storage

    storage = open_storage(url, create=False, heartbeat=(1, GRACE_S), on_stale=requeue)
    while (name := names.get(timeout=120)) is not None:
        study = optuna.load_study(study_name=name, storage=storage)
        study.get_trials(deepcopy=False)  # warm: the race is over the stale check, not the first read
        try:
            barrier.wait(timeout=60)
            results.put(fail_stale(study, GRACE_S, requeue, set()))
        except Exception as exc:  # what a driver would have died of
            results.put(f"{type(exc).__name__}: {exc}")


def _stale_trial(url: str, name: str, beat: bool) -> tuple[optuna.Study, int]:
    """A study holding one RUNNING trial of a driver that died long ago: its last heartbeat is
    old, or (killed before its first beat) it has none and started long ago."""
    from optuna.storages._rdb import models

    from prunesearch.search.storage import open_storage

    storage = open_storage(url, heartbeat=(1, GRACE_S))
    study = optuna.create_study(study_name=name, storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if beat:
        storage.record_heartbeat(trial._trial_id)
    with storage.engine.begin() as conn:
        if beat:
            heartbeats = models.TrialHeartbeatModel.__table__
            conn.execute(heartbeats.update().where(heartbeats.c.trial_id == trial._trial_id).values(heartbeat=LONG_AGO))
        else:
            trials = models.TrialModel.__table__
            conn.execute(trials.update().where(trials.c.trial_id == trial._trial_id).values(datetime_start=LONG_AGO))
    return study, trial.number


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stale.db'}"
    return request.getfixturevalue("postgres_url")


def test_two_drivers_fail_one_stale_trial_exactly_once(url):
    from prunesearch.search.storage import open_storage

    open_storage(url)  # the schema, before the racers open it
    # real processes, each with its own engine and connections, forked from a fork server that
    # imported the driver's code once (not this process, which may hold Ray threads)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["prunesearch.search.storage", "prunesearch.search.dispatch", __name__])
    barrier, results = ctx.Barrier(3), ctx.Queue()
    queues = [ctx.Queue(), ctx.Queue()]
    racers = [ctx.Process(target=_racer, args=(url, q, barrier, results, dict(os.environ)), daemon=True) for q in queues]
    for p in racers:
        p.start()
    try:
        for i in range(ROUNDS):
            name = f"stale-{i}-{uuid.uuid4().hex[:8]}"
            study, number = _stale_trial(url, name, beat=i % 2 == 0)
            for q in queues:
                q.put(name)
            barrier.wait(timeout=120)  # both racers load the study first, then go at once
            failed = sorted((results.get(timeout=120), results.get(timeout=120)), key=str)
            trials = study.get_trials()
            assert trials[number].state == TrialState.FAIL and trials[number].datetime_complete is not None
            assert study._storage.get_trial(trials[number]._trial_id).state == TrialState.FAIL
            queued = study.get_trials(states=(TrialState.WAITING,))
            assert len(queued) == 1, f"round {i}: {len(queued)} re-queued copies of the stale trial"
            assert queued[0].user_attrs == {"retry_of": number}
            assert queued[0].system_attrs["fixed_params"] == trials[number].params
            assert len(trials) == 2
            assert failed == [0, 1], f"round {i}: each racer's count of trials it failed: {failed}"
    finally:
        for q in queues:
            q.put(None)
        for p in racers:
            p.join(10)
            if p.is_alive():
                p.terminate()


def test_a_live_trial_and_a_fresh_one_are_left_alone(tmp_path):
    """The stale check fails neither a trial whose driver still beats nor one just created whose
    first beat has not come yet; this driver's own trials without a beat are left to it."""
    from prunesearch.search.dispatch import fail_stale, requeue
    from prunesearch.search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'live.db'}"
    storage = open_storage(url, heartbeat=(1, GRACE_S))
    study = optuna.create_study(study_name="live", storage=storage)
    beating, fresh = study.ask(), study.ask()
    storage.record_heartbeat(beating._trial_id)
    _, old = _stale_trial(url, "other", beat=False)  # another study's stale trial is not this study's business
    assert fail_stale(study, GRACE_S, requeue, set()) == 0
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2

    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    with storage.engine.begin() as conn:
        conn.execute(trials.update().where(trials.c.trial_id == fresh._trial_id).values(datetime_start=LONG_AGO))
    assert fail_stale(study, GRACE_S, requeue, {fresh._trial_id}) == 0  # ours: its driver is alive
    assert fail_stale(study, GRACE_S, requeue, set()) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.FAIL]
    assert not study.get_trials(states=(TrialState.WAITING,))  # no parameters: nothing to re-run
    other = optuna.load_study(study_name="other", storage=storage)
    assert other.trials[old].state == TrialState.RUNNING
    with storage.engine.connect() as conn:
        assert conn.execute(sqlalchemy.select(trials.c.state).where(trials.c.trial_id == beating._trial_id)).scalar() \
            == TrialState.RUNNING


def test_a_queued_retry_is_retired_once_and_a_second_retirer_backs_off(tmp_path):
    """Retiring is a compare-and-set too: a retry another driver already retired (or ran) is
    left alone, with no error, instead of being failed twice (UpdateFinishedTrialError)."""
    from prunesearch.search import attrs
    from prunesearch.search.dispatch import transition
    from prunesearch.search.driver import _retire_queued_retries
    from prunesearch.search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'retire.db'}"
    study = optuna.create_study(study_name="r", storage=open_storage(url))
    study.enqueue_trial({"x": 0.5}, user_attrs={attrs.RETRY_OF: 0})
    other = optuna.load_study(study_name="r", storage=open_storage(url, create=False))  # a second driver
    (queued,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert transition(other._storage._backend.engine, queued._trial_id, TrialState.WAITING, TrialState.FAIL)
    assert not transition(other._storage._backend.engine, queued._trial_id, TrialState.WAITING, TrialState.FAIL)
    assert _retire_queued_retries(study, 0) == 0  # the first driver finds nothing left to retire, and no error
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL]
