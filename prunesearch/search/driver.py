"""The search driver: ask/tell over a pool of Ray evaluator actors, the database as the record.

Several trials are in flight at once (one per actor); TPE sees the running ones through the
constant liar. Every finished trial is told at once, so a crash loses at most the trials that
were running: those are left RUNNING (a kill) or FAIL (Ctrl-C), and ``resume`` fails the stale
ones and re-enqueues their parameters, finishing with exactly the requested number of trials.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.search.study import create_or_check
from prunesearch.pruning.masks import parse_structure
from prunesearch.spaces import ModelLayout, make_space

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RETRY_ATTR = "retry_of"


@dataclass
class RunSummary:
    study: str
    finished: int
    complete: int
    pruned: int
    failed: int
    best_values: list[float] | None
    elapsed_s: float
    stopped_by: str


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def requeue_stale(study: optuna.Study) -> int:
    """Fail trials left RUNNING by a crash (and trials interrupted by Ctrl-C) and enqueue their
    parameters again, once each, so the study re-runs exactly what it lost."""
    retried = {t.user_attrs.get(RETRY_ATTR) for t in study.get_trials(deepcopy=False)}
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"):
            continue  # a real failure is not retried forever
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        if t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number}, skip_if_exists=False)
            n += 1
    # WAITING trials enqueued by a crashed driver stay WAITING and are simply asked next
    return n


def fail_stale(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a crash as failed (and interrupted: not the individual's fault)."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        optuna.Trial(study, t._trial_id).set_user_attr("interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def make_study_space(cfg: StudyConfig, layout: ModelLayout):
    nm = parse_structure(cfg.pruning.structure)
    return make_space(cfg.space.name, layout, cfg.pruning.sparsity, min_sparsity=cfg.space.min_sparsity,
                      max_sparsity=cfg.space.max_sparsity, nm_m=nm.m if nm else None,
                      kv_bits=cfg.kv_cache.bits_choices if cfg.space.kv_bits else None,
                      split_attn_mlp=cfg.space.split_attn_mlp, **cfg.space.params)


def enqueue_baselines(study: optuna.Study, cfg: StudyConfig, space, resolve) -> list[str]:
    names = []
    for name in cfg.search.baselines:
        params = space.encode({"name": name, "params": {}}, None, resolve)
        study.enqueue_trial(params, user_attrs={"baseline": name})
        names.append(name)
    study.set_user_attr("baselines_enqueued", names)
    return names


def _best(study: optuna.Study) -> list[float] | None:
    try:
        if len(study.directions) == 1:
            return [study.best_value]
        return None
    except ValueError:
        return None


def run_study(cfg: StudyConfig, *, progress: bool = True) -> RunSummary:
    """Launch or continue ``cfg``'s study until it holds ``cfg.search.trials`` finished trials."""
    import ray

    from prunesearch.workers.pool import EvaluatorPool, start_ray

    t0 = time.perf_counter()
    name = cfg.study or cfg.default_study_name()
    study, created = create_or_check(cfg, name, cfg.storage)
    evolutionary = cfg.search.sampler == "nsga3"
    if evolutionary:
        fail_stale(study)  # the replay re-evaluates what they held
    else:
        requeued = requeue_stale(study)
        if requeued:
            log.warning("re-enqueued %d trial(s) lost by an earlier crash or interrupt", requeued)
    started_ray = start_ray(cfg.workers)
    pool = None
    stopped_by = "trials"
    try:
        pool = EvaluatorPool(cfg, cfg.storage, name)
        layout = ModelLayout.from_dict(pool.layout)
        space = make_study_space(cfg, layout)
        if "model_info" not in study.user_attrs:
            study.set_user_attr("model_info", {k: pool.info[0][k] for k in ("block_class", "linear_names", "layout")})
        resolve = lambda alloc: ray.get(pool.actors[0].resolve.remote(alloc))  # noqa: E731
        if evolutionary:
            from prunesearch.search.nsga3 import evolve, seed_vectors

            seeds = seed_vectors(study, cfg, space, resolve)
            with _progress(study, cfg, progress) as (ctrl_c, bar):
                stopped_by = evolve(study, cfg, space, pool, seeds, t0, ctrl_c, bar)
        else:
            if "baselines_enqueued" not in study.user_attrs:
                enqueue_baselines(study, cfg, space, resolve)
            stopped_by = _optimize(study, cfg, space, pool, t0, progress)
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    trials = study.get_trials(deepcopy=False)
    return RunSummary(name, count_finished(study), sum(t.state == TrialState.COMPLETE for t in trials),
                      sum(t.state == TrialState.PRUNED for t in trials), sum(t.state == TrialState.FAIL for t in trials),
                      _best(study), time.perf_counter() - t0, stopped_by)


@contextlib.contextmanager
def _deferred_ctrl_c():
    """The first Ctrl-C only sets a flag that the loop checks at a safe point (never in the middle
    of a database write); a second one interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(_signum, _frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _progress(study: optuna.Study, cfg: StudyConfig, progress: bool):
    """Deferred Ctrl-C and a progress bar over the study's finished trials."""
    target = cfg.search.trials
    bar = tqdm(total=target, initial=min(count_finished(study), target), desc=f"study {study.study_name}",
               disable=not progress, unit="trial")
    with _deferred_ctrl_c() as ctrl_c, contextlib.closing(bar):
        yield ctrl_c, bar


def _optimize(study: optuna.Study, cfg: StudyConfig, space, pool, t0: float, progress: bool) -> str:
    import ray

    target = cfg.search.trials
    in_flight: dict = {}  # ObjectRef -> (trial, actor)
    best, since_best, failures_in_a_row = _best(study), 0, 0
    max_failures = max(3, 2 * len(pool.actors))
    stop = None
    with _progress(study, cfg, progress) as (ctrl_c, bar):
        while True:
            if ctrl_c.is_set():
                stop = "interrupt"
                _abandon(study, in_flight)
                log.warning("interrupted: finished trials are saved; `prunesearch resume` re-runs the interrupted ones")
                break
            finished = count_finished(study)
            if stop is None:
                if finished >= target:
                    stop = "trials"
                elif cfg.search.timeout_s and time.perf_counter() - t0 > cfg.search.timeout_s:
                    stop = "timeout"
                elif cfg.search.patience and since_best >= cfg.search.patience:
                    stop = "patience"
            while stop is None and pool.idle and finished + len(in_flight) < target:
                trial = study.ask()
                cand = space.suggest(trial)
                actor = pool.idle.pop()
                ref = actor.evaluate.remote(trial._trial_id, cand.to_dict())
                in_flight[ref] = (trial, actor)
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                trial, actor = in_flight.pop(ref)
                pool.idle.append(actor)
                state, _ = _tell(study, trial, ref)
                bar.update(1 if state in FINISHED else 0)
                failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
                if failures_in_a_row >= max_failures:
                    error = study.trials[trial.number].user_attrs.get("error", "").strip().splitlines()
                    raise UserError(f"{failures_in_a_row} trials failed in a row, stopping; the last said: "
                                    f"{error[0] if error else 'nothing'} (finished trials are saved)")
                new_best = _best(study)
                if new_best is not None and new_best != best:
                    best, since_best = new_best, 0
                    bar.set_postfix(best=f"{best[0]:.5g}")
                else:
                    since_best += 1
    return stop or "trials"


def _abandon(study: optuna.Study, in_flight: dict) -> None:
    """Cancel running evaluations; their trials are marked failed and interrupted (resume re-runs them)."""
    import ray

    for ref, (trial, _) in list(in_flight.items()):
        ray.cancel(ref, force=True)
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
    in_flight.clear()


def _tell(study: optuna.Study, trial: optuna.Trial, ref) -> tuple[TrialState, list[float] | None]:
    import ray

    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:
        log.error("trial %d failed: %s", trial.number, str(exc).strip().splitlines()[0])
        trial.set_user_attr("error", str(exc)[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL, None
    trial.set_user_attr("ratios", result["ratios"])
    trial.set_user_attr("achieved_sparsity", result["achieved"])
    if result["pruned"]:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, None
    trial.set_user_attr("metric", result["metric"])
    trial.set_user_attr("objectives", result["named"])
    trial.set_user_attr("timings", result["timings"])
    study.tell(trial, result["values"])
    return TrialState.COMPLETE, result["values"]
