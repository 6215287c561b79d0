"""Installing prunesearch beside a torch the user already has keeps that torch (issue 14, item 4):
the package asks for ``torch>=2.4``, and the CPU pin lives in the Makefile."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _venv_with_torch(tmp_path: Path, version: str) -> Path:
    """A fresh venv that sees everything installed here, except that its torch is ``version``
    (metadata only: pip decides from it, nothing is imported)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    dist = site / f"torch-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    # after the venv's own site-packages on sys.path: its torch is found first
    (site / "zz_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _would_install(venv: Path, tmp_path: Path) -> list[str]:
    report = tmp_path / "report.json"
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                          "--quiet", "--report", str(report), str(REPO)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]


def test_pip_install_keeps_a_cuda_torch_the_user_already_has(tmp_path):
    venv = _venv_with_torch(tmp_path, "2.6.0+cu124")
    assert _would_install(venv, tmp_path) == ["prunesearch"]  # nothing else: torch 2.6.0+cu124 stays


def test_the_package_runs_on_any_python_from_3_11():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    torch = [d for d in project["dependencies"] if d.startswith("torch")]
    assert torch == ["torch>=2.4"]
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()  # the CPU pin, where the set-up installs it
