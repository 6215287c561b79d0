"""A pool of evaluator actors on Ray: in-process on a laptop, the same code on a cluster.

Actors place themselves by the resources the config asks for (CPUs, GPUs, memory). The first
actor computes (or loads from its disk cache) the calibration statistics and the dense
reference; the others receive them through Ray's object store instead of recomputing them, so a
node without the shared cache path starts as fast as one with it.

Ray does not restart actors here: an actor that dies (its process killed, its node gone) fails
its running task at once, the driver re-runs that trial elsewhere, and the pool starts a
replacement that Ray places wherever resources are free, possibly on a node that joins later.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from prunesearch.config import StudyConfig, WorkersConfig
from prunesearch.errors import UserError
from prunesearch.search.actor import EvaluatorActor

log = logging.getLogger(__name__)


def start_ray(workers: WorkersConfig) -> bool:
    """Start Ray in-process (or join ``workers.address``); returns True if this call started it.

    In-process always means a Ray of our own (``address="local"``): a stale
    /tmp/ray/ray_current_cluster or a RAY_ADDRESS left in the environment must not send a plain
    launch to a dead cluster. Joining one is what ``workers.address`` is for, and a cluster that
    does not answer within ``workers.connect_timeout_s`` is a one-line error, not a hang."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's notice that token authentication is on (its secure default) is not for our users
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        _init(workers, kwargs)
    finally:
        if main_thread and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)  # ray.init puts its own (sys.exit) in place of ours
    return True


def _init(workers: WorkersConfig, kwargs: dict) -> None:
    import ray

    if workers.address:
        address = cluster_address(workers.address)
        wait_for_cluster(address, workers.connect_timeout_s)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[0]}") from None
    else:
        count = 1 if workers.count == "auto" else workers.count
        need = count * workers.num_cpus
        ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1), num_gpus=None, **kwargs)


def cluster_address(address: str) -> str:
    """HOST:PORT of the cluster to join: as given, or for ``auto`` RAY_ADDRESS or the address
    file that `ray start --head` wrote on this machine."""
    if address.startswith("ray://"):
        return address  # Ray Client
    if address != "auto":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UserError(f"Ray address '{address}' is not HOST:PORT (or auto)")
        return address
    found = os.environ.get("RAY_ADDRESS", "").strip()
    if not found:
        from ray._private.utils import read_ray_address  # the file `ray start --head` writes

        try:
            found = read_ray_address() or ""
        except OSError:
            found = ""
    if not found:
        raise UserError("--address auto found no Ray cluster on this machine (no RAY_ADDRESS, no `ray start --head` "
                        "address file): start one, give HOST:PORT, or leave --address out for in-process Ray")
    return cluster_address(found)


def wait_for_cluster(address: str, timeout_s: float) -> None:
    """Wait until something listens at ``address`` (a Ray head's GCS port), at most ``timeout_s``."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"no Ray cluster answers at {address} (waited {timeout_s:.0f}s: {exc.strerror or exc}): "
                                f"is the head running? (workers.connect_timeout_s sets the wait)") from None
            time.sleep(0.5)


def actor_count(w: WorkersConfig) -> int:
    """``count``, or for auto: one actor per GPU when actors take GPUs, else as many as the CPUs fit."""
    if w.count != "auto":
        return w.count
    import ray

    res = ray.cluster_resources()
    if w.num_gpus > 0:
        n = int(res.get("GPU", 0) // w.num_gpus)
        if n == 0:
            raise UserError("workers.count auto with num_gpus > 0, but the Ray cluster has no GPU")
        return n
    return max(1, int(res.get("CPU", 1) // w.num_cpus))


def _user_error_of(exc: Exception) -> UserError | None:
    """The user's mistake behind a Ray error, if that is what it was. An actor whose __init__
    raised comes back as ActorDiedError holding only the creation task's text, so the message is
    taken from there."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else (exc.__cause__ or exc)
    if isinstance(cause, UserError):
        return cause
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    if getattr(exc, "actor_init_failed", False) and marker in str(exc):
        message = str(exc).rsplit(marker, 1)[1].strip()
        if "Traceback (most recent call last)" not in message:  # else a bug raised while handling one
            return UserError(message)
    return None


class EvaluatorPool:
    """``count`` actors, each with its model loaded; ``idle`` ones take the next trial."""

    def __init__(self, cfg: StudyConfig, storage_url: str, study_name: str):
        import ray

        w = cfg.workers
        self._remote = ray.remote(max_restarts=0, max_task_retries=0)(EvaluatorActor)
        self._options = {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus}
        if w.memory_gb:
            self._options["memory"] = int(w.memory_gb * 2**30)
        self._args = (cfg.model_dump(mode="json"), storage_url, study_name, w.threads or max(1, int(w.num_cpus)))
        self.count = actor_count(w)
        self.replaced, self.max_replacements = 0, 3 * self.count
        first = self._remote.options(**self._options).remote(*self._args)
        self.info = [self._ready(first)]
        self.dense = first.dense_side.remote()  # an ObjectRef: the others get the values, not a recomputation
        self.actors = [first]
        self.starting: dict = {}  # ready() ObjectRef -> actor not yet ready
        for _ in range(self.count - 1):
            self._start()
        for ref, actor in list(self.starting.items()):
            self.info.append(self._ready(actor, ref))
            self.actors.append(actor)
        self.starting.clear()
        self.idle = list(self.actors)
        self._waiting_since: float | None = None

    def _start(self) -> None:
        actor = self._remote.options(**self._options).remote(*self._args, dense=self.dense)
        self.starting[actor.ready.remote()] = actor

    def _ready(self, actor, ref=None) -> dict:
        import ray

        try:
            return ray.get(ref if ref is not None else actor.ready.remote())
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            err = _user_error_of(exc)
            if err is not None:
                raise err from None
            raise

    @property
    def layout(self) -> dict:
        return self.info[0]["layout"]

    def lost(self, actor) -> None:
        """An actor died (its process or its node): drop it and start a replacement."""
        import ray

        if actor in self.actors:
            self.actors.remove(actor)
        if actor in self.idle:
            self.idle.remove(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        self.replaced += 1
        if self.replaced > self.max_replacements:
            raise UserError(f"{self.replaced} evaluator actors died (more than 3 per configured actor): stopping; "
                            "the finished trials are saved (check the workers' memory and the Ray cluster)")
        log.warning("an evaluator actor died; starting a replacement (%d so far)", self.replaced)
        self._start()

    def poll(self) -> None:
        """Move replacements that became ready into the pool; report when none can be placed."""
        import ray

        if not self.starting:
            self._waiting_since = None
            return
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in ready:
            actor = self.starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                err = _user_error_of(exc)
                if err is not None:
                    raise err from None
                self.lost(actor)
                continue
            self.actors.append(actor)
            self.idle.append(actor)
        if self.starting and not self.actors:
            self._waiting_since = self._waiting_since or time.monotonic()
            if time.monotonic() - self._waiting_since > 60:
                log.warning("no evaluator is alive and %d wait for Ray resources (num_cpus %s, num_gpus %s)",
                            len(self.starting), self._options["num_cpus"], self._options["num_gpus"])
                self._waiting_since = time.monotonic()

    def shutdown(self) -> None:
        import ray

        for a in [*self.actors, *self.starting.values()]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors, self.idle, self.starting = [], [], {}


def is_worker_lost(exc: Exception) -> bool:
    """The actor or its node died: not the candidate's fault, so its trial is run again."""
    import ray

    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                            ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.ObjectLostError)) and not isinstance(exc, ray.exceptions.RayTaskError)

