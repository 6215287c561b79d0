"""A budget-exact evolutionary search over per-unit sparsity levels (EvoPress's design).

One parent, the best point so far (generation 0 scores the configured baselines, every prompt).
Each generation mutates it into ``search.offspring`` children (1-3 level swaps each, within a
class of equal-sized units: LevelSpace, so every child is on the budget exactly), scores them
all on the first evaluation stage's prompts, keeps the best ``search.survivors[k]`` for the next
stage's prompts, and so on; the best child after every prompt replaces the parent only if it is
better (elitism). Every evaluation is one trial: screening stages end PRUNED with their value at
the step of their prompt count, the last stage COMPLETE, each tagged with its generation, stage
and individual.

Nothing is pickled. Children come from a generator seeded by (seed, generation), so the study
database alone rebuilds the run: ``resume`` replays the generations, takes every evaluation it
finds recorded (same generation, stage and point) and evaluates only the missing ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import numpy as np
import optuna
from optuna.trial import TrialState

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.search import attrs
from prunesearch.search.dispatch import Retries
from prunesearch.search.nsga3 import FixedParamsSampler
from prunesearch.spaces.levels import LevelSpace

log = logging.getLogger(__name__)
FAILED = math.inf  # the value of a point whose evaluation failed twice by its own error
MAX_MOVES = 3


def mutate(x: list[int], space: LevelSpace, rng: np.random.Generator) -> list[int]:
    """1-3 moves, each one unit of a class one level up and another of it one level down."""
    y = list(x)
    classes = [c for c in space.classes() if len(c) > 1]
    if not classes:
        raise UserError("the levels space has no two units of equal size to move a level between")
    weights = np.array([len(c) for c in classes], dtype=float)
    for _ in range(int(rng.integers(1, MAX_MOVES + 1))):
        members = classes[int(rng.choice(len(classes), p=weights / weights.sum()))]
        up = [i for i in members if y[i] < space.top]
        down = [i for i in members if y[i] > 0]
        if not up or not down:
            continue
        i = up[int(rng.integers(len(up)))]
        down = [j for j in down if j != i]
        if not down:
            continue
        j = down[int(rng.integers(len(down)))]
        y[i], y[j] = y[i] + 1, y[j] - 1
    return y


def offspring(parent: list[int], space: LevelSpace, rng: np.random.Generator, n: int) -> list[list[int]]:
    """``n`` distinct children of ``parent``, none equal to it (fewer when the grid has no more)."""
    seen, kids = {tuple(parent)}, []
    for _ in range(50 * n):
        if len(kids) == n:
            break
        y = mutate(parent, space, rng)
        if tuple(y) not in seen:
            seen.add(tuple(y))
            kids.append(y)
    return kids


def recorded(study: optuna.Study) -> dict[tuple[int, int, tuple[int, ...]], float]:
    """(generation, stage, point) -> value, for every evaluation the database holds."""
    out: dict[tuple[int, int, tuple[int, ...]], float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        a = t.user_attrs
        if attrs.STAGE not in a or attrs.VECTOR not in a:  # VECTOR written last: a driver killed while writing left none
            continue
        key = (a[attrs.GENERATION], a[attrs.STAGE], tuple(a[attrs.VECTOR]))
        if t.state == TrialState.COMPLETE:
            out[key] = t.values[0]
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            out[key] = t.intermediate_values[max(t.intermediate_values)]
        elif t.state == TrialState.FAIL and a.get(attrs.LAST_ATTEMPT) and attrs.ERROR in a:
            out.setdefault(key, FAILED)
    return out


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class Generations:
    """Runs one stage's evaluations on the pool, replaying what the database already holds."""

    def __init__(self, study: optuna.Study, cfg: StudyConfig, space: LevelSpace, dispatcher, t0: float, ctrl_c, bar):
        self.study, self.cfg, self.space, self.dispatcher = study, cfg, space, dispatcher
        self.t0, self.ctrl_c, self.bar = t0, ctrl_c, bar
        self.record = recorded(study)
        self.stages = cfg.stage_prompts()

    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def score(self, generation: int, stage: int, points: dict[int, list[int]], names: dict | None = None) -> dict[int, float]:
        """Values of ``points`` (individual -> point) at ``stage`` (its prompts); raises _Stop at
        the trial target, the timeout or Ctrl-C."""
        values = {i: self.record.get((generation, stage, tuple(x))) for i, x in points.items()}
        missing = [i for i, v in values.items() if v is None]
        if missing:
            self._run(generation, stage, points, missing, values, names or {})
        return values

    def _run(self, generation, stage, points, missing, values, names) -> None:
        sampler: FixedParamsSampler = self.study.sampler
        pool, s = self.dispatcher.pool, self.cfg.search
        queue, retries = deque(missing), Retries(pool.count)
        prompts = self.stages[stage]
        stop = None
        while queue or self.dispatcher.in_flight:
            if self.ctrl_c.is_set():
                self.dispatcher.abandon()
                log.warning("interrupted: finished evaluations are saved; `prunesearch resume` replays and continues")
                raise _Stop("interrupt")
            if stop is None and s.timeout_s and time.perf_counter() - self.t0 > s.timeout_s:
                stop = "timeout"
            if stop is None and self.finished() + len(self.dispatcher.in_flight) >= s.trials:
                stop = "trials"
            while stop is None and queue and pool.idle:
                i = queue.popleft()
                x = points[i]
                sampler.next = self.space.params_of(x)
                trial = self.study.ask()
                cand = self.space.suggest(trial)
                cand.prompts = prompts if stage < len(self.stages) - 1 else None
                for key, value in ((attrs.GENERATION, generation), (attrs.STAGE, stage), (attrs.INDIVIDUAL, i),
                                   (attrs.VECTOR, [int(v) for v in x])):
                    trial.set_user_attr(key, value)
                if retries.last_try(i):
                    trial.set_user_attr(attrs.LAST_ATTEMPT, True)
                if tuple(x) in names:
                    trial.set_user_attr(attrs.BASELINE, names[tuple(x)])
                self.dispatcher.submit(trial, cand.to_dict(), tag=i)
                self.bar.set_postfix(generation=generation, stage=f"{stage + 1}/{len(self.stages)}")
            if stop is not None and not self.dispatcher.in_flight:
                raise _Stop(stop)
            for o in self.dispatcher.wait(timeout=1.0):
                i = o.tag
                if o.state in ("complete", "pruned"):
                    values[i] = o.values[0]
                    self.record[(generation, stage, tuple(points[i]))] = values[i]
                    retries.succeeded()
                    self.bar.update(1)
                elif o.state in ("lost", "stale"):
                    queue.appendleft(i)  # not the point's fault: run it again
                elif retries.failed(i):
                    queue.appendleft(i)
                else:
                    values[i] = FAILED


def evolve(study: optuna.Study, cfg: StudyConfig, space: LevelSpace, dispatcher, seeds, t0: float, ctrl_c, bar) -> str:
    """Run (or replay, then continue) generations until ``cfg.search.trials`` evaluations."""
    s, run = cfg.search, Generations(study, cfg, space, dispatcher, t0, ctrl_c, bar)
    last = len(run.stages) - 1
    keep = [*s.survivors, 1]  # after each stage
    try:
        points = dict(enumerate(v for _, v in seeds))
        values = run.score(0, last, points, {tuple(v): name for name, v in seeds})
        best = min(values, key=lambda i: (values[i], i))
        parent, parent_value = points[best], values[best]
        generation = 1
        while True:
            kids = offspring(parent, space, np.random.default_rng([s.seed, generation]), s.offspring)
            if not kids:
                return "converged"
            alive = list(range(len(kids)))
            for stage in range(last + 1):
                if stage < last and len(alive) <= keep[stage]:
                    continue  # nobody would be dropped: the next stage's prompts decide
                scored = run.score(generation, stage, {i: kids[i] for i in alive})
                alive = sorted(alive, key=lambda i: (scored[i], i))[: keep[stage]]
            if scored[alive[0]] < parent_value:
                parent, parent_value = kids[alive[0]], scored[alive[0]]
            generation += 1
    except _Stop as stop:
        return stop.reason
