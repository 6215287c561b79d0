"""Every user mistake is one line on stderr and exit code 2, before any slow work, with nothing
written where it does not belong: each test drives the CLI as the user did (issue 19).

"Before any slow work" is checked directly: the model loader, Ray and the evaluator pool are
replaced by tripwires, so a check that only fires after them fails the test."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import load, run_cli, study_config, write_config

REPO = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def no_slow_work(monkeypatch):
    """Loading weights, starting Ray or evaluators fails the test: the error must come first."""
    import prunesearch.models.loading as loading
    import prunesearch.prune_job as prune_job
    import prunesearch.search.driver as driver  # patched where they are used: it imports them by name

    def tripwire(*_a, **_k):
        raise AssertionError("slow work started before the mistake was reported")

    for module, name in ((loading, "load_model"), (prune_job, "load_model"), (driver, "start_ray"),
                         (driver, "EvaluatorPool")):
        monkeypatch.setattr(module, name, tripwire)


def app_db(tmp_path: Path) -> Path:
    """Another application's SQLite file."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    return path


# ----------------------------------------------------------------------------- 1, 17: Ray

def _launch_proc(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prunesearch", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_stale_ray_state_does_not_break_launch_and_sigterm_leaves_it_resumable(tmp_path):
    """A dead cluster's address file and RAY_ADDRESS: a plain launch still starts its own Ray,
    prints only our lines, stops promptly on SIGTERM with nothing left running, and resumes."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.9:6399")  # left by a killed `ray start --head`
        cfg = study_config(tmp_path, trials=200)
        path = write_config(tmp_path, cfg)
        env = {**os.environ, "TMPDIR": str(ray_tmp), "RAY_ADDRESS": "127.0.0.9:6399", "PYTHONPATH": str(REPO)}
        env.pop("RAY_AUTH_MODE", None)  # Ray's default (token auth on), whose notice users must not see
        proc = _launch_proc(["launch", str(path)], env, tmp_path)
        deadline = time.time() + 300
        finished = 0
        while time.time() < deadline and proc.poll() is None and finished < 2:
            time.sleep(0.5)
            if (tmp_path / "studies.db").exists():
                try:
                    finished = sum(t.state.is_finished() for t in load(cfg).get_trials(deepcopy=False))
                except Exception:
                    finished = 0  # the schema is being created
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        _out, err = proc.communicate(timeout=120)
        assert time.time() - t0 < 60, "SIGTERM did not stop the launch promptly"  # ~2 s on a quiet machine
        assert proc.returncode == 130, err
        assert "Token authentication" not in err and "[I " not in err and "Traceback" not in err, err
        assert "Ray started in-process" in err and "checked config" in err and "evaluator ready" in err, err
        study = load(cfg)
        assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))  # nothing orphaned
        interrupted = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("interrupted")]
        queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        # what resume needs (tested end to end in test_search): each interrupted trial queued again
        # (SIGTERM may also land between two trials, with none in flight)
        assert {t.number for t in interrupted} <= {t.user_attrs.get("retry_of") for t in queued}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_unreachable_cluster_is_one_line_after_a_bounded_wait_and_creates_nothing(tmp_path, capsys, monkeypatch):
    import ray

    import prunesearch.search.driver as driver

    # a launch joins a Ray already running in this process: this test runs before the module's (ray_session)
    assert not ray.is_initialized(), "run this test before any test that uses ray_session"

    monkeypatch.setattr(driver, "EvaluatorPool", lambda *a, **k: pytest.fail("no evaluator may start"))
    cfg = study_config(tmp_path, workers={"count": 1, "num_cpus": 1, "connect_timeout_s": 2})
    t0 = time.time()
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--address", "127.0.0.9:6399"], capsys)
    one_line_error(code, err.splitlines()[-1] if code == 2 else err, "no Ray cluster answers at 127.0.0.9:6399", "waited 2s")
    assert time.time() - t0 < 60
    assert not (tmp_path / "studies.db").exists()  # the study was not created


# ----------------------------------------------------------------------------- 2, 15: other applications' files

@pytest.mark.parametrize("command", [
    ["launch", "CONFIG", "--storage", "URL"],
    ["status", "--storage", "URL"],
    ["status", "--storage", "URL", "--study", "t"],
    ["resume", "--storage", "URL", "--study", "t"],
    ["export", "--storage", "URL", "--study", "t", "--out", "OUT/best.yaml"],
    ["report", "--storage", "URL", "--study", "t", "--out", "OUT/plots"],
])
def test_another_applications_sqlite_file_is_refused_untouched(command, tmp_path, capsys, no_slow_work):
    db = app_db(tmp_path)
    before = sha(db)
    cfg_path = write_config(tmp_path, study_config(tmp_path))
    args = [str(cfg_path) if a == "CONFIG" else f"sqlite:///{db}" if a == "URL" else a.replace("OUT", str(tmp_path / "o"))
            for a in command]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err.splitlines()[-1] if code == 2 else err, "is not a study database", "customers")
    assert sha(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "study.yaml"]  # no lock, WAL or output files


@pytest.fixture(scope="module")
def finished_study(default_study, ray_session):
    """A real finished study of 6 trials, conftest's default_study (shared with test_search, only read)."""
    cfg, _ = default_study
    return Path(cfg["storage"].removeprefix("sqlite:///")).parent, cfg


def test_read_only_commands_never_change_a_byte_of_the_study_database(finished_study, tmp_path, capsys):
    root, cfg = finished_study
    db = root / "studies.db"
    before = sha(db)
    for args in (["status"], ["status", "--study", "t"], ["export", "--study", "t", "--out", str(tmp_path / "best.yaml")],
                 ["report", "--study", "t", "--out", str(tmp_path / "plots")]):
        code, _, err = run_cli([*args, "--storage", cfg["storage"]], capsys)
        assert code == 0, err
        assert sha(db) == before, args


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_a_read_only_study_file_is_refused_before_any_work(read_only, finished_study):
    """As a user who cannot write there: root writes anything, so the command runs without the
    capability that lets it ignore file permissions (setpriv), like any other user."""
    root, cfg = finished_study
    folder = Path(tempfile.mkdtemp(prefix="ro", dir="/tmp"))
    try:
        with sqlite3.connect(root / "studies.db") as src, sqlite3.connect(folder / "studies.db") as dst:
            src.backup(dst)  # a consistent copy (the driver's WAL included)
        (folder / "studies.db").chmod(0o444 if read_only == "file" else 0o644)
        folder.chmod(0o755 if read_only == "file" else 0o555)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]
        proc = subprocess.run([*drop, sys.executable, "-m", "prunesearch", "resume", "--study", "t", "--storage",
                               f"sqlite:///{folder / 'studies.db'}", "--trials", "8"],
                              env=env, capture_output=True, text=True, timeout=120)
        one_line_error(proc.returncode, proc.stderr, "read-only")
        assert sorted(p.name for p in folder.iterdir()) == ["studies.db"]  # no lock, WAL or shm files left
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- 3, 10: failed and empty studies

def test_a_study_without_finished_trials_can_be_relaunched_reported_and_deleted(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, search={"trials": 3, "timeout_s": 0.001})  # stops before its first trial
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "-q"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["status", "--study", "t", "--storage", cfg["storage"]], capsys)
    assert code == 0 and "no complete trial yet" in out, out + err
    code, out, err = run_cli(["report", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "plots")], capsys)
    assert code == 0 and "nothing to plot" in out and not (tmp_path / "plots").exists(), out + err
    # the first launch found nothing: the fixed config may take the study over
    fixed = study_config(tmp_path, trials=2, pruning={"metric": "wanda", "sparsity": 0.5})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, fixed, "fixed.yaml")), "-q"], capsys)
    assert code == 0, err
    import prunesearch.search.driver as driver  # a study that holds its target: nothing starts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "start_ray", lambda *_a: pytest.fail("Ray started for a finished study"))
        code, _, err2 = run_cli(["resume", "--study", "t", "--storage", cfg["storage"], "--trials", "1"], capsys)
    assert code == 0 and "already holds 2 finished trials (target 1): nothing to run" in err2, err2
    assert "study replaced: it held no finished trial" in err
    assert "dense side from the cache" in err  # the first launch computed (or found) it: never twice
    assert load(fixed).user_attrs["config"]["pruning"]["sparsity"] == 0.5
    # now it has finished trials: another config is refused, as before
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "-q"], capsys)
    one_line_error(code, err.splitlines()[-1], "different config")
    code, _, err = run_cli(["delete", "--study", "t", "--storage", cfg["storage"]], capsys)  # no tty: must say --yes
    one_line_error(code, err, "--yes")
    code, out, err = run_cli(["delete", "--study", "t", "--storage", cfg["storage"], "--yes"], capsys)
    assert code == 0 and "deleted study t" in out, err
    code, out, _ = run_cli(["status", "--storage", cfg["storage"]], capsys)
    assert code == 0 and "no studies" in out


# ----------------------------------------------------------------------------- 4, 5, 7, 18, 19, 20: prune's inputs

PRUNE = ["prune", "--max-layers", "2", "--calibration", "lee", "--calibration-samples", "4", "--seq-len", "32",
         "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "32", "--quiet"]


@pytest.mark.parametrize("args,needles", [
    (["--allocation", "owl:M=abc"], ["owl", "M='abc'", "needs a number"]),
    (["--allocation", "owl:lam=3"], ["lam=3", "less than or equal to 0.5"]),
    (["--allocation", "mrp:step=0"], ["step=0", "greater than 0"]),
    (["--allocation", "owl:nope=1"], ["has no parameter nope"]),
    (["--metric", "ria:a=x"], ["ria", "a='x'"]),
    (["--metric", "meta:op_w=cube"], ["op_w='cube'", "identity"]),
    (["--structure", "64:128"], ["does not fit", "576 input columns"]),  # 576 = SmolLM2's hidden size
    (["--structure", "3:2"], ["bad structure '3:2'", "0 < N < M"]),
    (["--calibration", "./no-such-file.txt"], ["not found", "no-such-file.txt"]),
    (["--calibration-samples", "5000"], ["5000 requested"]),
    (["--seq-len", "100000"], ["sequences of 100000 tokens"]),
    (["--eval-samples", "5000"], ["evaluation text", "5000 requested"]),
    (["--remove-layers", "2"], ["remove_layers is 2", "2 decoder blocks"]),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], ["cuda"]),
    (["--model", "no-such-org/model"], ["no-such-org/model", "cannot be reached"]),
])
def test_prune_mistakes_are_found_before_the_model_loads(args, needles, capsys, no_slow_work, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli([*PRUNE, *args], capsys)
    one_line_error(code, err, *needles)
    assert "Retrying" not in err and out == ""


def test_damaged_model_files_are_one_line(tmp_path, capsys, no_slow_work, smol_dir):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.gguf"
    from prunesearch.models.loading import default_gguf_path

    truncated.write_bytes(default_gguf_path().read_bytes()[:50_000])  # a download cut short
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(Path(smol_dir) / "config.json", no_weights)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(Path(smol_dir) / "config.json", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for model, needle in ((garbage, "not a GGUF model file"), (truncated, "damaged GGUF file"),
                          (no_weights, "holds no weights"), (corrupt, "corrupt or truncated")):
        code, _, err = run_cli([*PRUNE, "--model", str(model)], capsys)
        one_line_error(code, err, str(model), needle)


def test_output_paths_are_checked_before_any_work(finished_study, tmp_path, capsys, no_slow_work):
    root, cfg = finished_study
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, not a folder")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    storage = ["--storage", cfg["storage"], "--study", "t"]
    for args, needle in (
        (["export", *storage, "--out", str(blocker / "best.yaml")], "is a file"),
        (["export", *storage, "--out", str(tmp_path / "best.yaml"), "--apply", str(blocker)], "a file of that name exists"),
        (["export", *storage, "--out", str(tmp_path / "b2.yaml"), "--apply", str(full)], "already exists"),
        (["report", *storage, "--out", str(blocker / "plots")], "is a file"),
        (["report", *storage, "--out", str(full)], "already exists"),
        ([*PRUNE, "--out", str(full)], "already exists"),
        ([*PRUNE, "--out", str(blocker)], "a file of that name exists"),
    ):
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, needle)
    assert (full / "keep.txt").read_text() == "user data" and blocker.read_text() == "a file, not a folder"
    assert not (tmp_path / "best.yaml").exists() and not (tmp_path / "b2.yaml").exists()


# ----------------------------------------------------------------------------- 6, 7: configs and flags

@pytest.mark.parametrize("content,args,needles", [
    ("", [], ["is empty", "configs/default.yaml"]),
    ("model:\n  name: [1\n", [], ["not valid YAML", "line 3"]),
    (None, ["--trials", "0"], ["--trials 0", "greater than or equal to 1"]),
    (None, ["--workers", "0"], ["--workers '0'", "a number of evaluator actors >= 1, or auto"]),
    (None, ["--workers", "many"], ["--workers 'many'"]),
    (None, ["--storage", "studies.db"], ["--storage 'studies.db'", "sqlite:///studies.db"]),
    ("pruning: {metric: wanda, sparsity: 0.5, allocation: owl, mode: one_shot}\n", [],
     ["pruning config", "prunesearch prune --config"]),
])
def test_launch_config_mistakes_are_blamed_where_they_are(content, args, needles, tmp_path, capsys, no_slow_work):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(study_config(tmp_path)) if content is None else content)
    code, _, err = run_cli(["launch", str(path), *args], capsys)
    one_line_error(code, err, *needles)
    if args:
        assert str(path) not in err  # the flag, not the file, was wrong
    assert not (tmp_path / "studies.db").exists()


def test_directory_as_config_and_study_config_to_prune(tmp_path, capsys, no_slow_work):
    code, _, err = run_cli(["launch", str(tmp_path)], capsys)
    one_line_error(code, err, "is a directory, not a config file")
    code, _, err = run_cli(["prune", "--config", str(write_config(tmp_path, study_config(tmp_path)))], capsys)
    one_line_error(code, err, "study config", "prunesearch launch")


def test_a_study_config_mistake_found_from_the_model_creates_no_study(tmp_path, capsys, no_slow_work):
    """Checked against the model's shapes and the text before the database is touched."""
    for override, needle in (({"pruning": {"metric": "wanda", "sparsity": 0.5, "structure": "64:128"}}, "does not fit"),
                             ({"calibration": {"source": "lee", "samples": 8, "seq_len": 100000}}, "100000 tokens"),
                             ({"space": {"name": "blockwise", "remove_layers": [0, 2]}}, "2 decoder blocks")):
        code, _, err = run_cli(["launch", str(write_config(tmp_path, study_config(tmp_path, **override)))], capsys)
        assert code == 2 and needle in err.splitlines()[-1], err
        assert not (tmp_path / "studies.db").exists()


def test_help_shows_whole_option_names_at_80_columns():
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "prunesearch", "prune", "--help"], env=env, capture_output=True,
                         text=True, timeout=120).stdout
    for name in ("--calibration-samples", "--calibration-select", "--bias-compensation", "--eval-seq-len"):
        assert name in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
