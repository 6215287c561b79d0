"""A two-node Ray cluster on this machine (head on 127.0.0.2, a worker node on 127.0.0.3): a study
runs across both, the second node is killed mid-study, and the study still ends with exactly
the requested trials, the lost one run again on the surviving node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from conftest import FINISHED, StudyDb, study_config, wait_for
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"  # Ray rewrites 127.0.0.1, and a second node on it hangs


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": HEAD_IP, "include_dashboard": False})
    node = c.add_node(num_cpus=1, node_ip_address=NODE_IP)
    ray.init(address=c.address, _node_ip_address=HEAD_IP, log_to_driver=False)
    yield c, node
    ray.shutdown()
    c.shutdown()  # stops the processes it started, by their own handles


def test_a_study_survives_losing_a_node(tmp_path, cluster):
    from prunesearch.config import StudyConfig
    from prunesearch.search.driver import run_study

    c, node = cluster
    data = study_config(tmp_path, trials=16, study="two-nodes")  # the node dies after 4 or more (held still)
    data["workers"] = {"count": 2, "num_cpus": 1, "address": c.address}
    cfg = StudyConfig.model_validate(data)

    db, killed, ended, errors = StudyDb(data["storage"], "two-nodes"), threading.Event(), threading.Event(), []

    def ready_to_kill() -> bool:
        assert not ended.is_set(), "the study ended before the node was killed"
        return db.count() >= 4 and db.count(attr=("worker", f'"{NODE_IP}:%'), like=True) >= 1

    def node_workers(conn) -> set[int]:
        """Pids of the evaluators that ran trials on the second node (``worker`` is "address:pid")."""
        rows = conn.execute(sqlalchemy.text("SELECT value_json FROM trial_user_attributes WHERE key = 'worker' AND value_json LIKE :node"),
                            {"node": f'"{NODE_IP}:%'}).scalars()
        return {int(json.loads(v).split(":")[1]) for v in rows}

    def kill_second_node():
        try:
            wait_for(ready_to_kill, None, "4 finished trials, one of them on the second node")
            while not killed.is_set():
                assert not ended.is_set(), "the study ended before the node was killed"
                with db.frozen() as conn:  # nothing finishes meanwhile: the node dies mid-study, on any machine
                    assert db.count(conn=conn) < 16
                    # both workers before their first stage report: the node's trial is surely in flight
                    # (a node between trials would lose none: its next trial waits on the freeze)
                    if db.running_before_their_first_report(conn) == 2:
                        c.remove_node(node, allow_graceful=False)  # the node vanishes with its actor (and its trial)
                        for pid in node_workers(conn):  # a lost machine takes its processes along (a bare raylet
                            with contextlib.suppress(ProcessLookupError):  # kill leaves them serving for seconds)
                                os.kill(pid, signal.SIGKILL)
                        killed.set()
                time.sleep(0.05)
        except BaseException as exc:  # seen by the test, not lost in the thread
            errors.append(exc)

    killer = threading.Thread(target=kill_second_node, daemon=True)
    killer.start()
    try:
        summary = run_study(cfg, progress=False)
    finally:
        ended.set()
        killer.join(timeout=60)
        db.close()
    assert not errors and killed.is_set(), errors
    study = optuna.load_study(study_name="two-nodes", storage=data["storage"])
    assert summary.finished == len(study.get_trials(states=FINISHED)) == 16
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    nodes = {t.user_attrs["worker"].split(":")[0] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert nodes == {HEAD_IP, NODE_IP}  # the study ran across both nodes
    lost = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("worker_lost")]
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    assert all(t.number in retried for t in lost)
    after_loss = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if lost and t.number > lost[0].number]
    seen = [(t.number, t.state.name, t.user_attrs.get("worker"), t.user_attrs.get("worker_lost")) for t in study.trials]
    assert lost and all(t.user_attrs["worker"].startswith(HEAD_IP) for t in after_loss), seen
