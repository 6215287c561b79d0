"""A pool of evaluator actors on Ray: in-process on a laptop, the same code on a cluster."""

from __future__ import annotations

import logging
import os

from prunesearch.config import StudyConfig, WorkersConfig
from prunesearch.errors import UserError

log = logging.getLogger(__name__)


def start_ray(workers: WorkersConfig) -> bool:
    """Start Ray in-process (or join ``workers.address``); returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if workers.address:
            ray.init(address=workers.address, **kwargs)
        else:
            need = workers.count * workers.num_cpus
            ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1), num_gpus=None, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at {workers.address}: {exc}") from None
    return True


class EvaluatorPool:
    """``count`` actors, each with its model loaded; ``idle`` ones take the next trial."""

    def __init__(self, cfg: StudyConfig, storage_url: str, study_name: str):
        import ray

        from prunesearch.workers.actor import EvaluatorActor

        w = cfg.workers
        remote = ray.remote(max_restarts=2, max_task_retries=2)(EvaluatorActor)
        options = {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus}
        threads = w.threads or max(1, int(w.num_cpus))
        cfg_dict = cfg.model_dump(mode="json")
        self.actors = [remote.options(**options).remote(cfg_dict, storage_url, study_name, threads) for _ in range(w.count)]
        try:
            self.info = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, UserError):
                raise cause from None
            raise
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise
        self.idle = list(self.actors)

    @property
    def layout(self) -> dict:
        return self.info[0]["layout"]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self.idle = [], []
