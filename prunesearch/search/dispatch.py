"""Trials in flight on the evaluator pool, and what keeps the database honest about them.

Every running trial has a heartbeat in the database while its driver lives. A driver that
dies (SIGKILL, a lost node) stops beating; after the grace period any other driver, or the
next ``resume``, fails those trials exactly once (one conditional UPDATE RUNNING -> FAIL that
only one process wins, on SQLite as on PostgreSQL) and re-runs their parameters. So a crash
loses only running work, no trial is counted or re-run twice, and several drivers can share a
study (on PostgreSQL; on one SQLite file they work but serialise their writes).

Each finished evaluation ends as one outcome: complete (with values), pruned, failed (the
candidate's own error), lost (the actor or its node died: the pool replaces the actor and
the driver re-runs the trial), or stale (a driver starved of CPU for the grace period had its
own running trial failed by a stale check: the result is dropped, the retry queued then runs).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import sqlalchemy
from optuna.trial import TrialState

from prunesearch.errors import UserError
from prunesearch.search import attrs
from prunesearch.search.pool import is_worker_lost
from prunesearch.workers.result import TrialResult

log = logging.getLogger(__name__)
DRIVER = f"{socket.gethostname()}:{os.getpid()}"
# this driver beats for its ask/tell trials itself, which Optuna (expecting optimize()) warns about
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)


@dataclass
class Outcome:
    trial: optuna.Trial
    tag: Any  # what the caller attached (e.g. an NSGA-III individual's index)
    state: str  # complete | pruned | failed | lost | stale (failed by a stale check while it ran) | interrupted
    values: list[float] | None = None
    dead_worker: bool = False  # a stale trial whose actor also died: the pool must replace it


class _Taken(Exception):
    """The trial was finished by someone else while this driver ran it."""


class Heartbeats:
    """A thread that records a heartbeat for every trial this driver is running."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval_s: float):
        self.storage, self.interval = storage, interval_s
        self.trial_ids: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="prunesearch-heartbeats", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # at once: a trial never runs without one
        with self._lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a database hiccup: the next beat may pass
                    log.warning("heartbeat for trial id %d failed: %s", trial_id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def requeue(study: optuna.Study, trial) -> None:
    """Run a lost trial's parameters again, as a new trial that names the one it replaces."""
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={attrs.RETRY_OF: trial.number}, skip_if_exists=False)


def fail_stale(study: optuna.Study, grace_s: float, on_stale: Callable | None, mine: set[int]) -> int:
    """Fail the trials of dead drivers and hand each to ``on_stale`` (e.g. ``requeue``), exactly once
    across processes; return how many this call failed.

    Stale: a RUNNING trial of this study whose last heartbeat is older than ``grace_s`` (both times
    read from the database clock, as Optuna does), or one with no heartbeat at all that started
    more than ``grace_s`` ago (its driver was killed between creating it and its first beat) and is
    not one of ``mine``. Optuna's ``fail_stale_trials`` is not used: it reads the state and writes
    FAIL in two steps under SELECT ... FOR UPDATE, which locks nothing on SQLite, so two drivers
    that both saw the trial both "won" and both re-queued it. Here the change is one conditional
    UPDATE (see ``_fail_if_running``) that only one process can win, on SQLite and PostgreSQL."""
    from optuna.storages._rdb import models

    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    query = (sqlalchemy.select(trials.c.trial_id, trials.c.datetime_start, beats.c.heartbeat)
             .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id))
             .where(trials.c.study_id == study._study_id, trials.c.state == TrialState.RUNNING))
    with backend.engine.connect() as conn:
        rows = conn.execute(query).all()
        db_now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar() if rows else None
    grace = datetime.timedelta(seconds=grace_s)
    stale = []
    for trial_id, started, beat in rows:
        if beat is not None:  # database clock against database clock (PostgreSQL: the server's zone)
            if db_now.replace(tzinfo=None) - beat > grace:
                stale.append(trial_id)
        elif trial_id not in mine and started is not None and \
                time.time() - started.replace(tzinfo=datetime.timezone.utc).timestamp() > grace_s:  # stored as UTC
            stale.append(trial_id)
    n = 0
    for trial_id in sorted(stale):
        if not _fail_if_running(backend.engine, trial_id):
            continue  # another driver failed it first (or its own driver finished it meanwhile)
        n += 1
        if on_stale is not None:
            on_stale(study, copy.deepcopy(storage.get_trial(trial_id)))
    return n


def _fail_if_running(engine: sqlalchemy.Engine, trial_id: int) -> bool:
    """RUNNING -> FAIL, won by exactly one caller (see ``transition``)."""
    return transition(engine, trial_id, TrialState.RUNNING, TrialState.FAIL)


def transition(engine: sqlalchemy.Engine, trial_id: int, old: TrialState, new: TrialState) -> bool:
    """``old`` -> ``new`` as a compare-and-set: True for the one caller whose UPDATE changed the row.

    PostgreSQL row-locks it and re-checks the WHERE after a concurrent update; SQLite evaluates
    the WHERE under its database write lock (the UPDATE is the first statement of its transaction,
    so the busy handler waits for the lock and then reads the latest state). The cached storage
    always re-reads unfinished trials, so the study sees the new state at its next read."""
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    values = {"state": new}
    if new.is_finished():
        values["datetime_complete"] = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # naive UTC
    with engine.begin() as conn:
        result = conn.execute(trials.update().where(trials.c.trial_id == trial_id, trials.c.state == old).values(**values))
        return result.rowcount == 1


class Dispatcher:
    def __init__(self, study: optuna.Study, pool, heartbeat_s: float):
        self.study, self.pool = study, pool
        self.in_flight: dict = {}  # ObjectRef -> (trial, actor, tag)
        self.beats = Heartbeats(study._storage, heartbeat_s)

    @property
    def running_ids(self) -> set[int]:
        return {trial._trial_id for trial, _, _ in self.in_flight.values()}

    def submit(self, trial: optuna.Trial, candidate: dict, tag: Any = None) -> None:
        actor = self.pool.idle.pop()
        trial.set_user_attr(attrs.DRIVER, DRIVER)
        self.beats.add(trial._trial_id)
        self.in_flight[actor.evaluate.remote(trial._trial_id, candidate)] = (trial, actor, tag)

    def wait(self, timeout: float = 1.0) -> list[Outcome]:
        """Outcomes of the evaluations that ended within ``timeout`` (each told to the study)."""
        import ray

        self.pool.poll()
        if not self.in_flight:
            time.sleep(timeout)
            return []
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        outcomes = []
        for ref in done:
            trial, actor, tag = self.in_flight.pop(ref)
            outcome = self._tell(trial, ref, tag)
            self.beats.discard(trial._trial_id)
            if outcome.state == "lost" or outcome.dead_worker:
                self.pool.lost(actor)
            else:
                self.pool.idle.append(actor)
            outcomes.append(outcome)
        return outcomes

    def abandon(self) -> list[Outcome]:
        """Stop waiting for every running evaluation; their trials are failed as interrupted (the
        pool's shutdown kills the actors that still compute them), or found failed as stale."""
        import ray

        out = []
        for ref, (trial, actor, tag) in list(self.in_flight.items()):
            try:
                ray.cancel(ref)  # force=True is refused for actor tasks
            except Exception as exc:
                log.debug("cancel of trial %d: %s", trial.number, exc)
            state = "interrupted"
            try:
                with self._unless_taken(trial):
                    trial.set_user_attr(attrs.INTERRUPTED, True)
                    self.study.tell(trial, state=TrialState.FAIL)
            except _Taken:
                state = "stale"  # whoever failed it re-queued it
            self.beats.discard(trial._trial_id)
            out.append(Outcome(trial, tag, state))
        self.in_flight.clear()
        return out

    def close(self) -> None:
        self.beats.stop()

    @contextlib.contextmanager
    def _unless_taken(self, trial: optuna.Trial):
        """Writes to a trial that another driver (or Optuna's stale check) failed while it ran,
        because its heartbeats stopped for the grace period: they are dropped, not a crash."""
        try:
            yield
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            if not self.study._storage.get_trial(trial._trial_id).state.is_finished():
                raise
            raise _Taken from None

    def _tell(self, trial: optuna.Trial, ref, tag) -> Outcome:
        import ray

        try:
            result, error = ray.get(ref), None
        except ray.exceptions.RayError as exc:
            result, error = None, exc
        dead = error is not None and is_worker_lost(error)
        try:
            with self._unless_taken(trial):
                return self._record(trial, result, error, dead, tag)
        except _Taken:
            log.warning("trial %d was failed as stale while it ran (no heartbeat for the grace period): its result "
                        "is dropped; a retry of it was queued when it was failed", trial.number)
            return Outcome(trial, tag, "stale", dead_worker=dead)

    def _record(self, trial: optuna.Trial, result: TrialResult | None, error: Exception | None, dead: bool, tag) -> Outcome:
        study = self.study
        if error is not None:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.log(logging.WARNING if dead else logging.ERROR, "trial %d %s: %s", trial.number,
                    "lost its worker" if dead else "failed", first)
            trial.set_user_attr(attrs.WORKER_LOST if dead else attrs.ERROR, str(error)[:2000] if not dead else True)
            study.tell(trial, state=TrialState.FAIL)
            return Outcome(trial, tag, "lost" if dead else "failed")
        attrs.record_result(trial, result)
        if result.pruned:
            if result.screened:  # a screening stage: its value on the prompts it ran, as Optuna records a stop
                trial.report(result.partial, result.prompts)
            study.tell(trial, state=TrialState.PRUNED)
            return Outcome(trial, tag, "pruned", [result.partial] if result.partial is not None else None)
        study.tell(trial, result.values)
        return Outcome(trial, tag, "complete", result.values)


class Retries:
    """How an evolution treats an individual whose evaluation failed by its own error: once more,
    then scored as the worst (``failed`` says which); too many failures in a row stop the study."""

    def __init__(self, workers: int):
        self.attempts: dict = {}
        self.in_a_row, self.max_in_a_row = 0, max(3, 2 * workers)

    def succeeded(self) -> None:
        self.in_a_row = 0

    def last_try(self, key) -> bool:
        return self.attempts.get(key, 0) > 0

    def failed(self, key) -> bool:
        """True: run it once more; False: it failed twice."""
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(f"{self.in_a_row} evaluations failed in a row, stopping (finished ones are saved)")
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key] < 2

