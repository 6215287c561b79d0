"""docker/: both images lint clean (hadolint), the compose file satisfies the compose spec
(check-jsonschema's vendored schema: no Docker daemon here), the RayJob manifest and the
cluster config hold together, and no password is written in any of them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_lint_clean(dockerfile):
    run = subprocess.run([tool("hadolint"), "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    text = (DOCKER / dockerfile).read_text()
    assert "torch==2.13.0" in text and re.search(r"^USER \d+$", text, re.M)  # pinned torch, not root


def test_compose_file_follows_the_compose_spec():
    path = DOCKER / "compose.yaml"
    run = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    compose = yaml.safe_load(path.read_text())
    assert {"postgres", "ray-head", "worker", "driver"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "ports" not in service, f"{name} publishes a port to the host"
    assert compose["secrets"]["db_password"] == {"file": "./db_password.txt"}


def test_rayjob_manifest_runs_a_study_with_the_password_from_a_secret():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("prunesearch launch configs/cluster.yaml --address auto")
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert "secretKeyRef" in env["PRUNESEARCH_DB_PASSWORD"]["valueFrom"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_cluster_config_validates_and_holds_no_password():
    from prunesearch.config import StudyConfig, load_config

    cfg = load_config(StudyConfig, ROOT / "configs" / "cluster.yaml")
    assert cfg.storage.startswith("postgresql+psycopg://") and cfg.workers.count == "auto"
    from sqlalchemy.engine import make_url

    assert make_url(cfg.storage).password is None
    for path in [*DOCKER.iterdir(), ROOT / "configs" / "cluster.yaml"]:
        assert not re.search(r"postgresql\+psycopg://[^@/\s]+:[^@/\s]+@", path.read_text()), path
