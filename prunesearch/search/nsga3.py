"""NSGA-III (pymoo, ask/tell) over a discrete space, one Optuna trial per evaluated individual.

The algorithm's state is never pickled. With a fixed seed it is a pure function of the
objective values told so far, so the study database alone can rebuild it: ``resume`` sets up
the same NSGA3, and generation by generation asks (getting the same individuals again), takes
the values of the individuals the database holds, evaluates only the missing ones, and tells.
A study killed mid-generation thus ends with the same Pareto set as one never interrupted.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import TrialState
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.evaluator import Evaluator as PymooEvaluator
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.problems.static import StaticProblem
from pymoo.util.ref_dirs import get_reference_directions

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.search import attrs
from prunesearch.search.dispatch import Retries
from prunesearch.spaces import VectorSpace

log = logging.getLogger(__name__)
PENALTY = 1e30  # the objective values of an individual that failed twice (minimisation space)


class FixedParamsSampler(BaseSampler):
    """Hands the next trial exactly the parameters in ``next``: pymoo chose them, Optuna records them."""

    def __init__(self) -> None:
        self.next: dict = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name not in self.next:
            raise RuntimeError(f"NSGA-III set no value for parameter '{param_name}'")
        return self.next[param_name]


class _Seeded(Sampling):
    """Known points (Wanda, RIA-like, OWL, ...) first, random integer vectors for the rest."""

    def __init__(self, seeds: np.ndarray) -> None:
        super().__init__()
        self.seeds = seeds

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        X = IntegerRandomSampling()._do(problem, n_samples, random_state=random_state)
        k = min(len(self.seeds), n_samples)
        X[:k] = self.seeds[:k]
        return X


def n_reference_directions(n_obj: int, partitions: int) -> int:
    return math.comb(partitions + n_obj - 1, n_obj - 1)


def make_algorithm(cfg: StudyConfig, bounds: list[int], seeds: list[list[int]]) -> tuple[Problem, NSGA3]:
    """Problem (integer genes in [0, bound]) and a set-up NSGA3 with Das-Dennis directions, seeded."""
    s, n_obj = cfg.search, len(cfg.objectives)
    n_dirs = n_reference_directions(n_obj, s.ref_partitions)
    if s.population < n_dirs:
        raise UserError(f"search.population {s.population} is smaller than the {n_dirs} reference directions of "
                        f"{n_obj} objectives at ref_partitions {s.ref_partitions}: raise population or lower ref_partitions")
    n_var = len(bounds)
    problem = Problem(n_var=n_var, n_obj=n_obj, xl=np.zeros(n_var), xu=np.array(bounds, dtype=float), vtype=int)
    ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=s.ref_partitions)
    algorithm = NSGA3(ref_dirs=ref_dirs, pop_size=s.population,
                      sampling=_Seeded(np.array(seeds, dtype=int).reshape(-1, n_var)),
                      crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
                      eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", 10**9), seed=s.seed, verbose=False)
    return problem, algorithm


@dataclass
class Recorded:
    x: list[int]
    F: np.ndarray  # minimisation space; PENALTY where it failed twice


def minimised(study: optuna.Study, values) -> np.ndarray:
    """Objective values as pymoo sees them: every objective minimised."""
    return np.array([v if d == StudyDirection.MINIMIZE else -v for v, d in zip(values, study.directions)], dtype=float)


def recorded(study: optuna.Study) -> dict[tuple[int, int], Recorded]:
    """What the database holds: (generation, individual) -> vector and objective values."""
    out: dict[tuple[int, int], Recorded] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        a = t.user_attrs
        if attrs.VECTOR not in a:  # written last: a driver killed while writing the others left no individual
            continue
        key = (a[attrs.GENERATION], a[attrs.INDIVIDUAL])
        if t.state == TrialState.COMPLETE:
            out[key] = Recorded(a[attrs.VECTOR], minimised(study, t.values))
        elif a.get(attrs.LAST_ATTEMPT) and attrs.ERROR in a:  # failed twice by its own error (not lost, killed or interrupted)
            out.setdefault(key, Recorded(a[attrs.VECTOR], np.full(len(study.directions), PENALTY)))
    return out


def seed_vectors(study: optuna.Study, cfg: StudyConfig, space: VectorSpace, resolve) -> list[tuple[str, list[int]]]:
    """The configured baselines as (name, gene vector), stored in the study so a resume seeds the same."""
    if attrs.SEEDS not in study.user_attrs:
        seeds: list[tuple[str, list[int]]] = []
        for name in cfg.search.baselines:
            v = space.vector_of(space.encode({"name": name, "params": {}}, None, resolve))
            if all(v != other for _, other in seeds):  # uniform is wanda when the study metric is
                seeds.append((name, v))
        study.set_user_attr(attrs.SEEDS, seeds)
        study.set_user_attr(attrs.BASELINES_ENQUEUED, list(cfg.search.baselines))
    return [(name, list(v)) for name, v in study.user_attrs[attrs.SEEDS]]


def evolve(study: optuna.Study, cfg: StudyConfig, space: VectorSpace, dispatcher, seeds, t0: float, ctrl_c, bar) -> str:
    """Run (or replay, then continue) the generations until ``cfg.search.trials`` evaluations."""
    problem, algorithm = make_algorithm(cfg, space.bounds(), [v for _, v in seeds])
    seed_names = {tuple(v): name for name, v in seeds}
    record = recorded(study)
    total, done, generation = cfg.search.trials, 0, 0
    while done < total:
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:
            return "converged"  # mating found no new individual
        pop = pop[: total - done]
        X = np.rint(pop.get("X")).astype(int)
        F = np.empty((len(pop), len(cfg.objectives)))
        missing = []
        for i, x in enumerate(X):
            r = record.get((generation, i))
            if r is None:
                missing.append(i)
                continue
            if list(x) != list(r.x):
                raise UserError(f"study '{study.study_name}' does not replay: generation {generation} individual {i} "
                                "differs from the record (another pymoo version or seed?); start a new study")
            F[i] = r.F
        if missing:
            names = seed_names if generation == 0 else {}
            stop = _evaluate(study, cfg, space, dispatcher, generation, X, missing, F, t0, ctrl_c, bar, names)
            if stop:
                return stop
        PymooEvaluator().eval(StaticProblem(problem, F=F), pop)
        algorithm.tell(infills=pop)
        done += len(pop)
        generation += 1
    return "trials"


def _evaluate(study, cfg, space: VectorSpace, dispatcher, generation, X, missing, F, t0, ctrl_c, bar, seed_names) -> str | None:
    """Evaluate the missing individuals of one generation on the pool; fills F. Returns a stop reason."""
    sampler: FixedParamsSampler = study.sampler
    pool = dispatcher.pool
    queue, retries = deque(missing), Retries(pool.count)
    timed_out = False
    while queue or dispatcher.in_flight:
        if ctrl_c.is_set():
            dispatcher.abandon()
            log.warning("interrupted: finished individuals are saved; `prunesearch resume` completes the generation")
            return "interrupt"
        if cfg.search.timeout_s and time.perf_counter() - t0 > cfg.search.timeout_s:
            timed_out = True
        while not timed_out and queue and pool.idle:
            i = queue.popleft()
            sampler.next = space.params_of(X[i])
            trial = study.ask()
            cand = space.suggest(trial)
            for key, value in ((attrs.GENERATION, generation), (attrs.INDIVIDUAL, i), (attrs.VECTOR, [int(v) for v in X[i]])):
                trial.set_user_attr(key, value)
            if retries.last_try(i):
                trial.set_user_attr(attrs.LAST_ATTEMPT, True)
            if tuple(X[i]) in seed_names:
                trial.set_user_attr(attrs.BASELINE, seed_names[tuple(X[i])])
            dispatcher.submit(trial, cand.to_dict(), tag=i)
        if timed_out and not dispatcher.in_flight:
            break
        for o in dispatcher.wait(timeout=1.0):
            i = o.tag
            if o.state == "complete":
                F[i] = minimised(study, o.values)
                retries.succeeded()
                bar.update(1)
            elif o.state in ("lost", "stale"):
                queue.appendleft(i)  # its worker died (or its trial was failed as stale): run it again, not an attempt
            elif retries.failed(i):
                queue.appendleft(i)  # once more; a second failure scores it as the worst possible
            else:
                F[i] = PENALTY
                bar.update(1)
    return "timeout" if timed_out else None
