"""Trials in flight on the evaluator pool, and what keeps the database honest about them.

Every running trial has a heartbeat in the database while its driver lives. A driver that
dies (SIGKILL, a lost node) stops beating; after the grace period any other driver, or the
next ``resume``, fails those trials exactly once (Optuna's ``fail_stale_trials`` changes the
state in one guarded update) and re-runs their parameters. So a crash loses only running
work, no trial is counted twice, and several drivers can share a study (on PostgreSQL).

Each finished evaluation ends as one outcome: complete (with values), pruned, failed (the
candidate's own error), lost (the actor or its node died: the pool replaces the actor and
the driver re-runs the trial), or stale (a driver starved of CPU for the grace period had its
own running trial failed by a stale check: the result is dropped, the retry queued then runs).
"""

from __future__ import annotations

import contextlib
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

log = logging.getLogger(__name__)
RETRY_ATTR = "retry_of"
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
        study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number}, skip_if_exists=False)


def fail_stale(study: optuna.Study, grace_s: float, on_stale: Callable | None, mine: set[int]) -> int:
    """Fail the trials of dead drivers: stale heartbeats (Optuna's check), and trials that never got
    a heartbeat at all (a driver killed between creating a trial and its first beat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # calls on_stale for each trial it failed
    storage = study._storage
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id not in mine]
    old = [t for t in running if t.datetime_start and (time.time() - t.datetime_start.timestamp()) > grace_s]
    if not old:
        return 0
    engine = getattr(storage, "_backend", storage).engine  # Optuna wraps RDBStorage in a cache
    with engine.connect() as conn:  # Optuna's schema: trial_heartbeats(trial_id, heartbeat)
        beating = {row[0] for row in conn.execute(
            sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
                sqlalchemy.bindparam("ids", expanding=True)), {"ids": [t._trial_id for t in old]})}
    n = 0
    for t in old:
        if t._trial_id in beating:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                n += 1
                if on_stale is not None:
                    on_stale(study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another driver failed it first
    return n


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
        trial.set_user_attr("driver", DRIVER)
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
                    trial.set_user_attr("interrupted", True)
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

        from prunesearch.workers.pool import is_worker_lost

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

    def _record(self, trial: optuna.Trial, result: dict | None, error: Exception | None, dead: bool, tag) -> Outcome:
        study = self.study
        if error is not None:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.log(logging.WARNING if dead else logging.ERROR, "trial %d %s: %s", trial.number,
                    "lost its worker" if dead else "failed", first)
            trial.set_user_attr("worker_lost" if dead else "error", str(error)[:2000] if not dead else True)
            study.tell(trial, state=TrialState.FAIL)
            return Outcome(trial, tag, "lost" if dead else "failed")
        trial.set_user_attr("worker", result.get("worker"))
        trial.set_user_attr("ratios", result["ratios"])
        trial.set_user_attr("achieved_sparsity", result["achieved"])
        for name in ("removed_blocks", "kept_sparsity"):  # a searched block removal (space.remove_layers)
            if name in result:
                trial.set_user_attr(name, result[name])
        if result["pruned"]:
            study.tell(trial, state=TrialState.PRUNED)
            return Outcome(trial, tag, "pruned")
        trial.set_user_attr("metric", result["metric"])
        trial.set_user_attr("objectives", result["named"])
        trial.set_user_attr("timings", result["timings"])
        study.tell(trial, result["values"])
        return Outcome(trial, tag, "complete", result["values"])
