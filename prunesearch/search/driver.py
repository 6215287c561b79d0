"""The search driver: ask/tell over a pool of Ray evaluator actors, the database as the record.

Several trials are in flight at once (one per actor); TPE sees the running ones through the
constant liar. Every finished trial is told at once, so a crash loses at most the trials that
were running: a dead driver's trials go stale (no heartbeat) and are failed and re-enqueued by
whichever driver sees them first; Ctrl-C fails and re-enqueues them on the spot. The target
counts the trials of every driver on the study, so a study ends with exactly the requested
number of finished trials, however many drivers and crashes it took.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.search import attrs
from prunesearch.preflight import check_study
from prunesearch.pruning.stats import unrouted_line
from prunesearch.search.dispatch import DRIVER, Dispatcher, fail_stale, requeue, transition
from prunesearch.search.pool import EvaluatorPool, start_ray
from prunesearch.search.storage import check_storage, claim_sqlite, mask_url, open_storage
from prunesearch.search.study import create_or_check, make_sampler
from prunesearch.spaces import ModelLayout, make_study_space

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
    prompts_run: int = 0  # reconstruction prompts the finished trials ran (a pruned one: up to its stage)
    prompts_full: int = 0  # what they would have run without early stopping

    def evaluation_line(self) -> str | None:
        """How much evaluation early stopping saved, counted from what the trials ran."""
        if not self.pruned or not self.prompts_full:
            return None
        return (f"{self.pruned} trial{'s' if self.pruned > 1 else ''} stopped early: {self.prompts_run:,} of "
                f"{self.prompts_full:,} reconstruction prompts run ({self.prompts_run / self.prompts_full:.0%})")


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def count_running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _finished_and_running(study: optuna.Study) -> tuple[int, int]:
    """Both counts (every driver's trials) from one read of the study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *FINISHED))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def enqueue_baselines(study: optuna.Study, cfg: StudyConfig, space, resolve) -> list[str]:
    names = []
    for name in cfg.search.baselines:
        params = space.encode({"name": name, "params": {}}, None, resolve)
        study.enqueue_trial(params, user_attrs={attrs.BASELINE: name})
        names.append(name)
    study.set_user_attr(attrs.BASELINES_ENQUEUED, names)
    return names


def _already_done(cfg: StudyConfig, name: str) -> RunSummary | None:
    """The summary of an existing study (same config) that already holds its target and has
    nothing running, read without writing; None when there is work to do (or no such study)."""
    try:
        storage = open_storage(cfg.storage, readonly=True)
        if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            return None
    except UserError:
        return None  # no database or no schema yet: the launch creates them
    study = optuna.load_study(study_name=name, storage=storage)
    if study.user_attrs.get(attrs.CONFIG_HASH) != cfg.study_hash():
        return None  # create_or_check refuses or replaces it
    finished, running = _finished_and_running(study)
    if finished < cfg.search.trials or running:
        return None
    return _summary(study, name, 0.0, "trials")


def _summary(study: optuna.Study, name: str, elapsed_s: float, stopped_by: str) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    full = study.user_attrs.get(attrs.CONFIG, {}).get("reconstruction_samples", 0)
    run = sum(t.user_attrs.get(attrs.PROMPTS, full) for t in finished)  # counted: a trial records what it ran
    return RunSummary(name, len(finished), sum(t.state == TrialState.COMPLETE for t in trials),
                      sum(t.state == TrialState.PRUNED for t in trials), sum(t.state == TrialState.FAIL for t in trials),
                      _best(study), elapsed_s, stopped_by, run, full * len(finished))


def _best(study: optuna.Study) -> list[float] | None:
    try:
        if len(study.directions) == 1:
            return [study.best_value]
        return None
    except ValueError:
        return None


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Two drivers may ask at the same moment: a trial that finds ``target`` live trials numbered
    before it (queued, running or finished: all created before it, so the count can only have
    dropped since) is not needed, and is failed as surplus before anything is suggested for it.
    So the study never ends above its target. One popped from the queue (a baseline, a retry)
    first puts its fixed parameters back for whoever needs them; a fresh one leaves nothing."""
    live = (TrialState.WAITING, TrialState.RUNNING, *FINISHED)
    ahead = sum(1 for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number)
    if ahead < target:
        return False
    fixed = study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
    if fixed:  # before failing it: a driver killed in between leaves a copy, not a lost baseline
        study.enqueue_trial(fixed, user_attrs=dict(trial.user_attrs), skip_if_exists=False)
    trial.set_user_attr(attrs.SURPLUS, True)
    study.tell(trial, state=TrialState.FAIL)
    return True


def _retire_queued_retries(study: optuna.Study, target: int) -> int:
    """A study that holds its target needs no queued retries (put back by a surplus trial while
    another driver's trials were still running): the last driver out fails them as surplus, so
    nothing is left waiting. While another driver still runs trials (it may have a larger
    target), they stay. WAITING -> FAIL is one compare-and-set, so of two drivers retiring the
    same retry at once exactly one does (on SQLite too)."""
    if count_finished(study) < target or count_running(study):
        return 0
    storage, n = study._storage, 0
    engine = getattr(storage, "_backend", storage).engine  # Optuna wraps RDBStorage in a cache
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if attrs.RETRY_OF not in t.user_attrs:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, attrs.SURPLUS, True)  # why it ends as FAIL
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another driver retired or ran it meanwhile
        n += transition(engine, t._trial_id, TrialState.WAITING, TrialState.FAIL)
    return n


def _wait_for_other_drivers(study: optuna.Study, cfg: StudyConfig) -> None:
    """An evolutionary study (NSGA-III, evo) takes one driver: wait for the trials of one that just died to go stale
    (at most the grace period); trials that keep their heartbeat belong to a live driver."""
    # SQLite stamps heartbeats to the second: a dead driver's last beat may look up to 2 s younger
    deadline = time.monotonic() + cfg.search.grace_s + 3 * cfg.search.heartbeat_s + 5
    running = count_running(study)
    if running:
        log.warning("study %s has %d running trial(s) of another driver: waiting up to %ds for them to go stale",
                    study.study_name, running, cfg.search.grace_s)
    while running:
        if time.monotonic() > deadline:
            raise UserError(f"study '{study.study_name}' is being run by another driver (its trials keep their "
                            "heartbeat): an evolutionary study (nsga3, evo) takes one driver at a time")
        time.sleep(1.0)
        fail_stale(study, cfg.search.grace_s, None, set())
        running = count_running(study)


def run_study(cfg: StudyConfig, *, progress: bool = True, say=None) -> RunSummary:
    """Launch or continue ``cfg``'s study until it holds ``cfg.search.trials`` finished trials.

    Start-up goes from cheap to slow, and nothing is written before the cheap checks passed:
    the config against the model's shapes and the text (seconds), the database (writable, a
    study database), Ray (in-process, or a cluster that answers), the study, then the
    evaluators (model load, calibration, dense reference). ``say`` gets one line per stage."""
    import ray

    say = say or (lambda line: None)
    t0 = time.perf_counter()
    checked = check_study(cfg)
    name = cfg.study or cfg.default_study_name()
    say(f"study {name} in {mask_url(cfg.storage)}: {cfg.search.trials} trials, objectives {', '.join(cfg.objectives)}")
    say(f"checked config, model and text: {checked.blocks} decoder blocks, {checked.prunable_weights / 1e6:,.1f}M "
        f"prunable weights ({checked.seconds:.1f}s)")
    say(f"prunable: {checked.prunable_set}")
    if checked.calibration:
        say(f"calibration prompts: {checked.calibration}")
        say(checked.vision)
    evolutionary = cfg.search.sampler in ("nsga3", "evo")
    # a dead driver's trials: re-run by TPE; an evolution's replay re-evaluates the missing individuals itself
    on_stale = None if evolutionary else requeue
    check_storage(cfg.storage)  # read-only: a foreign or read-only file is refused before anything is written
    done = _already_done(cfg, name)
    if done is not None:  # nothing to run: say so without starting Ray or loading the model
        say(f"study {name} already holds {done.finished} finished trials (target {cfg.search.trials}): nothing to run")
        return done
    t = time.perf_counter()
    started_ray = start_ray(cfg.workers)
    if started_ray:
        say(f"Ray {'joined at ' + cfg.workers.address if cfg.workers.address else 'started in-process'} "
            f"({time.perf_counter() - t:.1f}s)")
    pool = dispatcher = None
    stopped_by = "trials"
    try:
        storage = open_storage(cfg.storage, heartbeat=(cfg.search.heartbeat_s, cfg.search.grace_s), on_stale=on_stale)
        claim_sqlite(cfg.storage)
        study, opened = create_or_check(cfg, name, storage)
        created = opened != "continued"
        say({"created": "study created", "replaced": "study replaced: it held no finished trial, so this config takes it over",
             "continued": f"study continued ({count_finished(study)} finished trials)"}[opened])
        if not created and not evolutionary:  # joining (or resuming): a seed of its own, never another driver's
            study.sampler = make_sampler(cfg, salt=zlib.crc32(DRIVER.encode()))
        fail_stale(study, cfg.search.grace_s, on_stale, set())
        if evolutionary:
            _wait_for_other_drivers(study, cfg)
        t = time.perf_counter()
        say("starting evaluators: loading the model, calibration statistics and the dense reference ...")
        pool = EvaluatorPool(cfg, cfg.storage, name)
        say(_ready_line(pool.info, time.perf_counter() - t))
        _record_memory(study, pool.info, say)
        _record_unrouted(study, pool.info[0], say)
        dispatcher = Dispatcher(study, pool, cfg.search.heartbeat_s)
        layout = ModelLayout.from_dict(pool.layout)
        space = make_study_space(cfg, layout)
        if attrs.MODEL_INFO not in study.user_attrs:
            study.set_user_attr(attrs.MODEL_INFO, {k: pool.info[0][k] for k in ("block_class", "linear_names", "layout")})
        resolve = lambda alloc: ray.get(pool.actors[0].resolve.remote(alloc))  # noqa: E731
        with _progress(study, cfg, progress) as (ctrl_c, bar):
            if evolutionary:
                from prunesearch.search import evo, nsga3

                seeds = nsga3.seed_vectors(study, cfg, space, resolve)
                evolve = evo.evolve if cfg.search.sampler == "evo" else nsga3.evolve
                stopped_by = evolve(study, cfg, space, dispatcher, seeds, t0, ctrl_c, bar)
            else:
                # the creator enqueues them (a second driver joining must not); or a resume, if it died first
                if created or (attrs.BASELINES_ENQUEUED not in study.user_attrs and not study.get_trials(deepcopy=False)):
                    enqueue_baselines(study, cfg, space, resolve)
                stopped_by = _optimize(study, cfg, space, dispatcher, t0, ctrl_c, bar, on_stale)
    finally:
        if dispatcher is not None:
            dispatcher.close()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    return _summary(study, name, time.perf_counter() - t0, stopped_by)


def _record_memory(study: optuna.Study, info: list[dict], say) -> None:
    """Say where each distinct worker keeps the model and what it holds; record it on the study."""
    lines = sorted({i["memory_line"] for i in info if i.get("memory_line")})
    for line in lines:
        say(f"memory: {line}")
    if any(i.get("memory") for i in info):
        known = dict(study.user_attrs.get(attrs.WORKER_MEMORY) or {})
        known.update({i["worker"]: i["memory"] for i in info if i.get("memory")})
        study.set_user_attr(attrs.WORKER_MEMORY, known)


def _record_unrouted(study: optuna.Study, info: dict, say) -> None:
    """Count the MoE experts that no calibration token reached (every trial prunes them by
    magnitude, not by the study's metric): said at start-up and kept on the study."""
    unrouted = info.get("unrouted_experts")
    if unrouted is None:
        return
    if unrouted["count"]:
        say(unrouted_line(unrouted["count"], study=True))
    study.set_user_attr(attrs.UNROUTED_EXPERTS, unrouted)


def _ready_line(info: list[dict], seconds: float) -> str:
    """What the evaluators did at start-up, with times: the first one's stages, and whether its
    dense side (statistics, reference) came from the disk cache."""
    first = info[0]
    stages = first.get("stages") or {}
    parts = [f"{k} {v:.1f}s" for k, v in stages.items()]
    cached = first.get("dense_cached")
    if cached is not None:
        parts.append("dense side from the cache" if cached else "dense side computed (cached for next time)")
    return (f"{len(info)} evaluator{'s' if len(info) > 1 else ''} ready on {first.get('device', '?')} ({seconds:.1f}s"
            + (": " + ", ".join(parts) if parts else "") + ")")


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
    previous_term = signal.signal(signal.SIGTERM, handler)  # a scheduler's stop: as Ctrl-C, trials re-queued
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


@contextlib.contextmanager
def _progress(study: optuna.Study, cfg: StudyConfig, progress: bool):
    """Deferred Ctrl-C and a progress bar over the study's finished trials."""
    target = cfg.search.trials
    bar = tqdm(total=target, initial=min(count_finished(study), target), desc=f"study {study.study_name}",
               disable=not progress, unit="trial")
    with _deferred_ctrl_c() as ctrl_c, contextlib.closing(bar):
        yield ctrl_c, bar


def _optimize(study: optuna.Study, cfg: StudyConfig, space, dispatcher: Dispatcher, t0: float, ctrl_c, bar,
              on_stale) -> str:
    target = cfg.search.trials
    pool = dispatcher.pool
    best, since_best, failures_in_a_row = _best(study), 0, 0
    max_failures = max(3, 2 * pool.count)
    stop, last_stale_check = None, time.monotonic()
    while True:
        if ctrl_c.is_set():
            for o in dispatcher.abandon():
                if o.state == "interrupted":  # a stale one was re-queued by whoever failed it
                    requeue(study, o.trial)
            log.warning("interrupted: finished trials are saved; `prunesearch resume` re-runs the interrupted ones")
            return "interrupt"
        if time.monotonic() - last_stale_check > cfg.search.heartbeat_s:
            fail_stale(study, cfg.search.grace_s, on_stale, dispatcher.running_ids)
            last_stale_check = time.monotonic()
        finished, running = _finished_and_running(study)
        if stop is None:
            if finished >= target:
                stop = "trials"
            elif cfg.search.timeout_s and time.perf_counter() - t0 > cfg.search.timeout_s:
                stop = "timeout"
            elif cfg.search.patience and since_best >= cfg.search.patience:
                stop = "patience"
        while stop is None and pool.idle and finished + running < target:
            trial = study.ask()
            running += 1
            if not _surplus(study, trial, target):
                dispatcher.submit(trial, space.suggest(trial).to_dict())
        if not dispatcher.in_flight and (stop is not None or finished >= target):
            _retire_queued_retries(study, target)
            return stop or "trials"
        # nothing of ours in flight but the study is not done: other drivers' (or stale) trials run
        for o in dispatcher.wait(timeout=1.0):
            bar.update(1 if o.state in ("complete", "pruned") else 0)
            if o.state == "lost":
                requeue(study, o.trial)  # not the candidate's fault: run it again
                continue
            if o.state == "stale":
                continue  # whoever failed it as stale queued it again
            failures_in_a_row = failures_in_a_row + 1 if o.state == "failed" else 0
            if failures_in_a_row >= max_failures:
                error = study.trials[o.trial.number].user_attrs.get(attrs.ERROR, "").strip().splitlines()
                raise UserError(f"{failures_in_a_row} trials failed in a row, stopping; the last said: "
                                f"{error[0] if error else 'nothing'} (finished trials are saved)")
            new_best = _best(study)
            if new_best is not None and new_best != best:
                best, since_best = new_best, 0
                bar.set_postfix(best=f"{best[0]:.5g}")
            else:
                since_best += 1
