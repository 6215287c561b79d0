"""The evaluator as a Ray actor.

Each actor holds one model. Ray does not restart an actor that dies (the pool starts a
replacement and the driver re-runs its trial: search/pool.py). The actor reports intermediate
values straight into the study database after each evaluation stage, so an Optuna pruner can
stop a hopeless trial after a few prompts without a round trip through the driver.
"""

from __future__ import annotations

import logging
import os

import optuna

from prunesearch.models.families import decoder_blocks
from prunesearch.search.storage import open_storage
from prunesearch.search.study import make_pruner, prunes, stage_reporter
from prunesearch.spaces import linear_units
from prunesearch.workers.evaluator import Evaluator
from prunesearch.workers.result import TrialResult

log = logging.getLogger(__name__)


class EvaluatorActor:
    def __init__(self, cfg: dict, storage_url: str, study_name: str, threads: int | None = None, dense: dict | None = None):
        self.evaluator = Evaluator(cfg, threads=threads, dense=dense)
        self.storage_url, self.study_name = storage_url, study_name
        self._study = None

    def ready(self) -> dict:
        ev = self.evaluator
        return {"pid": os.getpid(), "worker": self.worker, "startup_s": ev.startup_s, "device": str(ev.device), "layout": ev.layout.to_dict(),
                "stages": ev.stages, "dense_cached": ev.dense_cached, "memory": ev.memory, "memory_line": ev.memory_line(),
                "unrouted_experts": ev.unrouted_experts(),
                "block_class": type(decoder_blocks(ev.model)[0]).__name__, "linear_names": [u[0].unit for u in linear_units(ev.linears)]}  # a fused expert tensor: one

    def dense_side(self) -> dict:
        """Calibration statistics and dense reference, for the other actors (via the object store)."""
        return self.evaluator.dense_payload()

    def resolve(self, allocation: dict) -> list[float]:
        return self.evaluator.resolve(allocation)

    def _open_study(self):
        """The study, for intermediate values; None (with a warning) where the database cannot be reached."""
        if self._study is None:
            try:
                self._study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url, create=False),
                                                pruner=make_pruner(self.evaluator.cfg))
            except Exception as exc:  # e.g. no database password on this node: evaluate, just never stop early
                log.warning("cannot open the study database from this worker (%s): trials run without early stopping", exc)
                self._study = False
        return self._study or None

    def evaluate(self, trial_id: int | None, candidate: dict) -> TrialResult:
        on_stage = None
        if trial_id is not None and prunes(self.evaluator.cfg) and self._open_study() is not None:
            on_stage = stage_reporter(optuna.Trial(self._open_study(), trial_id))
        result = self.evaluator.evaluate(candidate, on_stage)
        result.worker = self.worker
        return result

    @property
    def worker(self) -> str:
        """node address:pid, recorded with every trial (where did it run?)"""
        import ray

        return f"{ray.util.get_node_ip_address()}:{os.getpid()}"
