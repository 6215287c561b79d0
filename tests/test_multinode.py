"""A two-node Ray cluster on this machine (head on 127.0.0.2, a worker node on 127.0.0.3): a study
runs across both, the second node is killed mid-study, and the study still ends with exactly
the requested trials, the lost one run again on the surviving node."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from test_search import study_config

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
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
    from prunesearch.search.storage import open_storage

    c, node = cluster
    data = study_config(tmp_path, trials=60, study="two-nodes")  # the node dies well before the end
    data["workers"] = {"count": 2, "num_cpus": 1, "address": c.address}
    cfg = StudyConfig.model_validate(data)

    def kill_second_node():
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                storage = open_storage(data["storage"], create=False)  # the driver creates the schema
                study = optuna.load_study(study_name="two-nodes", storage=storage)
                done = study.get_trials(deepcopy=False, states=FINISHED)
                if len(done) >= 4 and any(t.user_attrs.get("worker", "").startswith(NODE_IP) for t in done):
                    break
            except Exception:
                pass
            time.sleep(0.2)
        c.remove_node(node, allow_graceful=False)  # the node vanishes with its running trial

    killer = threading.Thread(target=kill_second_node, daemon=True)
    killer.start()
    summary = run_study(cfg, progress=False)
    killer.join(timeout=30)
    study = optuna.load_study(study_name="two-nodes", storage=data["storage"])
    assert summary.finished == len(study.get_trials(states=FINISHED)) == 60
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    nodes = {t.user_attrs["worker"].split(":")[0] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert nodes == {HEAD_IP, NODE_IP}  # the study ran across both nodes
    lost = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("worker_lost")]
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    assert all(t.number in retried for t in lost)
    after_loss = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if lost and t.number > lost[0].number]
    assert lost and all(t.user_attrs["worker"].startswith(HEAD_IP) for t in after_loss)
