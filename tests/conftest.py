"""Shared fixtures: the real default model (cached float32 copy), tiny random models of each
family saved as real HF directories with the real SmolLM2 tokenizer, and real token data; a
throw-away PostgreSQL server; and what the study tests share: a small study config, the study as
a reader sees it, a driver started as a user would, the study database read and held still
(StudyDb, wait_for, frozen_after), and one in-process Ray per module, or per run of modules in a
row that use it (ray_session)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import optuna
import pytest
import sqlalchemy
import torch
import yaml
from optuna.trial import TrialState

from prunesearch.models.loading import default_model_dir

TINY = dict(vocab_size=49152, hidden=64, ffn=128, layers=3, heads=4)


def build_tiny(family: str) -> torch.nn.Module:
    """A small random model of one family, built from a config (no download)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    h, f, n, a, v = TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["vocab_size"]
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=n,
                                            num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=512,
                                            tie_word_embeddings=True))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=n,
                                            num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=512))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=v, hidden_size=h, ffn_dim=f, num_hidden_layers=n, num_attention_heads=a,
                                        word_embed_proj_dim=h, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=h, n_layer=n, n_head=a, n_positions=512, bos_token_id=1,
                                          eos_token_id=2))
    raise ValueError(family)


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The bundled SmolLM2 as a float32 HF directory (dequantized once, cached across runs)."""
    return str(default_model_dir())


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    """family -> a saved tiny model directory, loadable through the real local-directory path."""
    out = {}
    for family in ("llama", "qwen2", "opt", "gpt2"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = str(path)
    return out


@pytest.fixture(scope="session")
def lee_ids(tokenizer) -> torch.Tensor:
    """Real English text: 24 sequences of 64 tokens from the Lee news corpus."""
    from prunesearch.data import token_sequences

    return token_sequences(tokenizer, "lee", n_samples=24, seq_len=64, seed=0)


def launch_quietly(path: Path) -> None:
    """`prunesearch launch PATH --quiet` in-process, for a fixture (no capsys there: its output is not checked)."""
    from prunesearch.cli import main

    old, sys.argv = sys.argv, ["prunesearch", "launch", str(path), "--quiet"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), f"launch exited {exc.code}"
    finally:
        sys.argv = old


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``prunesearch ARGS`` in-process, as the console script does; return (exit code, stdout, stderr)."""
    from prunesearch.cli import main

    old = sys.argv
    sys.argv = ["prunesearch", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- a throw-away PostgreSQL server

PG_PASSWORD = "ps-test-secret-7f3a"  # password auth, so the tests cover the env path; never in a URL


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback (Debian's binaries; `make test` installs them where
    missing), password-protected, with a throw-away data directory; stopped by its own pg_ctl.
    Yields a URL without the password: PRUNESEARCH_DB_PASSWORD carries it, as on a cluster."""
    import pwd
    import shutil
    import tempfile

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.fail("PostgreSQL server binaries not found: `make test` installs Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="prunesearch-pg-"))  # pytest's own tmp is private to root: postgres needs a way in
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PG_PASSWORD)
    user = "postgres"
    pw = pwd.getpwnam(user)
    os.chown(root, pw.pw_uid, pw.pw_gid)
    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    as_pg = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, initdb, "-D", str(data), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}"],
                   check=True, capture_output=True)
    port = _free_port()
    subprocess.run([*as_pg, pg_ctl, "-w", "-D", str(data), "-l", str(root / "log"), "start",
                    "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {root}"], check=True, capture_output=True)
    os.environ["PRUNESEARCH_DB_PASSWORD"] = PG_PASSWORD
    try:
        admin = sqlalchemy.create_engine(sqlalchemy.URL.create("postgresql+psycopg", user, PG_PASSWORD, "127.0.0.1", port, "postgres"),
                                         isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text("CREATE DATABASE prunesearch"))
        admin.dispose()
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/prunesearch"
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "stop", "-m", "fast"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- studies as a user drives them

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_config(tmp_path: Path, trials: int = 6, **overrides) -> dict:
    cfg = {
        "model": {"name": "default", "max_layers": 2, "device": "cpu"},
        "calibration": {"source": "lee", "samples": 8, "seq_len": 32, "batch_size": 4},
        "evaluation": {"source": "lee", "samples": 4, "seq_len": 64},
        "pruning": {"metric": "wanda", "sparsity": 0.6},
        "reconstruction_samples": 4,
        "space": {"name": "blockwise", "min_sparsity": 0.3, "max_sparsity": 0.9},
        "objectives": ["frobenius"],
        "search": {"trials": trials, "seed": 0, "n_startup_trials": 3, "heartbeat_s": 1, "grace_s": 3},
        "storage": f"sqlite:///{tmp_path / 'studies.db'}",
        "study": "t",
        "workers": {"count": 1, "num_cpus": 1},
    }
    for key, value in overrides.items():
        cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    return cfg


def evaluator(cfg: dict, offload: str, cache: Path | None = None, monkeypatch=None):
    """A study's evaluator with ``workers.offload`` = ``offload``; with ``cache``, its own cache
    folder: it computes its dense side itself."""
    from prunesearch.workers.evaluator import Evaluator

    if cache is not None:
        monkeypatch.setenv("PRUNESEARCH_CACHE", str(cache))
    return Evaluator({**cfg, "workers": {**cfg["workers"], "offload": offload}})


def in_memory_and_streamed(cfg: dict, tmp_path: Path, monkeypatch):
    """Two evaluators of one study, the model held in memory and its blocks streamed, each
    computing its own dense side (separate cache folders)."""
    memory, streamed = (evaluator(cfg, o, tmp_path / o, monkeypatch) for o in ("none", "blocks"))
    assert streamed.plan.streamed and not memory.plan.streamed
    return memory, streamed


def write_config(tmp_path: Path, cfg: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def load(cfg: dict) -> optuna.Study:
    """The study as a reader sees it: never creating the schema a starting driver is creating."""
    from prunesearch.search.storage import open_storage

    return optuna.load_study(study_name=cfg["study"], storage=open_storage(cfg["storage"], create=False))


_next_test: list = [None]  # the test that runs after the one being torn down
_our_ray: list = [False]  # whether the in-process Ray running now is ray_session's


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    _next_test[0] = nextitem  # before the fixtures the next test does not share are torn down
    yield


def _start_ray() -> None:
    """ray_session's Ray, started unless it runs already."""
    import ray

    if not (_our_ray[0] and ray.is_initialized()):
        os.environ.setdefault("PRUNESEARCH_DB_PASSWORD", PG_PASSWORD)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        _our_ray[0] = True


@pytest.fixture(scope="module")
def ray_session():
    """One in-process Ray for the module: the driver joins it instead of starting its own. Always a
    new local one (address="local"): a stale /tmp/ray/ray_current_cluster cannot send it elsewhere.
    When the next module's first test uses ray_session too, the same Ray carries on into it (modules
    in a row share one); otherwise it stops with the module, so no other test finds it running.
    Its workers keep the environment Ray started with: the PostgreSQL password (postgres_url's)
    goes in first, so that a PostgreSQL study runs on a Ray started for an earlier module."""
    import ray

    _start_ray()
    yield
    nxt = _next_test[0]
    if nxt is None or "ray_session" not in nxt.fixturenames:
        ray.shutdown()
        _our_ray[0] = False


@pytest.fixture(scope="session")
def default_study(tmp_path_factory) -> tuple[dict, str]:
    """A finished study of the default test config (study_config: 6 trials), launched as a user
    does, and what the launch printed. Shared and only read: test_search checks it, the read-only
    commands of test_user_errors read it. Its users take ray_session, whose Ray it joins (or starts,
    for ray_session to carry on or stop)."""
    _start_ray()
    tmp = tmp_path_factory.mktemp("default-study")
    cfg = study_config(tmp)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        launch_quietly(write_config(tmp, cfg))
    return cfg, printed.getvalue()


@pytest.fixture(scope="session")
def kv_study(tmp_path_factory) -> dict:
    """A finished study of separate attention/MLP ratios and searched KV bits (6 trials; objectives
    frobenius and kv_bytes: best = the knee). Shared and only read, by test_search and
    test_export_finish; its users take ray_session (as default_study)."""
    _start_ray()
    tmp = tmp_path_factory.mktemp("kv-study")
    cfg = study_config(tmp, trials=6, space={"kv_bits": True, "split_attn_mlp": True},
                       objectives=["frobenius", "kv_bytes"], kv_cache={"bits_choices": [16, 8, 4]})
    launch_quietly(write_config(tmp, cfg))
    return cfg


def start_driver(path: Path | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """`prunesearch launch PATH` (or `prunesearch ARGS`, e.g. a resume) in its own session (so a
    test can kill it with its Ray)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = ["launch", str(path)] if path is not None else list(args)
    return subprocess.Popen([sys.executable, "-m", "prunesearch", *command, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def driver_name(proc: subprocess.Popen) -> str:
    """The ``driver`` attribute a started driver writes on its trials (prunesearch.search.dispatch.DRIVER)."""
    return f"{socket.gethostname()}:{proc.pid}"


class StudyDb:
    """A study's database read directly (cheap enough to poll often, never creating anything), and
    held still on demand. Tests wait on what the database shows, never on the clock."""

    def __init__(self, url: str, study: str):
        from sqlalchemy.engine import make_url

        from prunesearch.search.storage import _with_password

        parsed = _with_password(make_url(url))
        self.study, self.sqlite = study, parsed.get_backend_name() == "sqlite"
        self.engine = sqlalchemy.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool,
                                               connect_args={"timeout": 60} if self.sqlite else {})

    def count(self, states=("COMPLETE", "PRUNED"), attr: tuple[str, object] | None = None, like: bool = False,
              conn=None) -> int:
        """Trials of the study in ``states`` (with user attribute ``attr`` = (key, value), or
        (key, SQL LIKE pattern of its JSON text)); 0 while the schema or study does not exist yet."""
        sql = "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id"
        params: dict = {"study": self.study}
        if attr is not None:
            sql += (" JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = :key AND a.value_json "
                    + ("LIKE :value" if like else "= :value"))
            params.update(key=attr[0], value=attr[1] if like else json.dumps(attr[1]))
        sql += f" WHERE s.study_name = :study AND t.state IN ({', '.join(repr(s) for s in states)})"
        if conn is None and self.sqlite and not Path(self.engine.url.database).is_file():
            return 0  # not created yet (and a reader must not create it)
        try:
            with contextlib.nullcontext(conn) if conn is not None else self.engine.connect() as c:
                return c.execute(sqlalchemy.text(sql), params).scalar()
        except sqlalchemy.exc.DBAPIError:
            if conn is not None:
                raise
            return 0  # a driver is creating the schema

    def running_before_their_first_report(self, conn) -> int:
        """RUNNING trials with no intermediate value yet: inside ``frozen`` each one is surely still
        being evaluated, as its worker stops at that report (a database write) until the freeze ends."""
        sql = ("SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
               "WHERE s.study_name = :study AND t.state = 'RUNNING' AND NOT EXISTS "
               "(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)")
        return conn.execute(sqlalchemy.text(sql), {"study": self.study}).scalar()

    @contextlib.contextmanager
    def frozen(self):
        """No process writes a trial while inside (SQLite: the database's write lock; PostgreSQL:
        an EXCLUSIVE lock on trials, which reads pass); writers wait, up to their busy timeout
        (60 s), then carry on. Yields the connection, for exact counts."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if self.sqlite else "BEGIN")
            try:
                if not self.sqlite:
                    conn.exec_driver_sql("LOCK TABLE trials IN EXCLUSIVE MODE")
                yield conn
            finally:
                conn.exec_driver_sql("ROLLBACK")

    @contextlib.contextmanager
    def holding_a_trial_of(self, drivers: dict[str, subprocess.Popen], timeout: float = 240):
        """PostgreSQL: row-lock the RUNNING trial of whichever of ``drivers`` (name -> process) runs
        one first, so that driver stops at its next write to it (telling its result), while other
        drivers go on. Yields (that driver's name, its trial number). Only a trial that has its first
        heartbeat: later beats update that row and pass the lock, so the held trial stays alive for
        the other drivers' stale checks (its first beat, an insert, would wait for the lock, and a
        trial without one looks dead after the grace period: another driver failing it would wait
        for the lock too)."""
        assert not self.sqlite, "SQLite has no row locks"
        running = ("SELECT a.value_json, t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
                   "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'driver' "
                   "JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                   "WHERE s.study_name = :study AND t.state = 'RUNNING'")
        find = sqlalchemy.text(running + " ORDER BY t.number")
        lock = sqlalchemy.text(running + " AND a.value_json = :driver FOR UPDATE OF t")  # re-checked after a concurrent update
        names = {json.dumps(d): d for d in drivers}
        deadline = time.monotonic() + timeout
        with self.engine.connect() as conn:
            while True:
                conn.exec_driver_sql("BEGIN")
                try:
                    first = [v for v, _ in conn.execute(find, {"study": self.study}) if v in names][:1]
                    held = conn.execute(lock, {"study": self.study, "driver": first[0]}).all() if first else []
                except sqlalchemy.exc.DBAPIError:  # no schema yet
                    held = []
                if held:
                    break
                conn.exec_driver_sql("ROLLBACK")
                for name, proc in drivers.items():
                    _alive_until(proc, deadline, f"a running trial of driver {name}")
                time.sleep(0.1)
            try:
                yield names[held[0][0]], held[0][1]
            finally:
                conn.exec_driver_sql("ROLLBACK")

    def close(self) -> None:
        self.engine.dispose()


def _alive_until(proc: subprocess.Popen | None, deadline: float, what: str) -> None:
    """A hang guard for waits on the database: the driver must live, and minutes are enough."""
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"the driver exited ({proc.returncode}) before {what}: "
                             + proc.stderr.read().decode()[-2000:])
    if time.monotonic() > deadline:
        raise AssertionError(f"no {what} after minutes of waiting")


def wait_for(condition, proc: subprocess.Popen | None, what: str, timeout: float = 240) -> None:
    """Poll ``condition`` (a database read) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        _alive_until(proc, deadline, what)
        time.sleep(0.1)


@contextlib.contextmanager
def frozen_after(cfg: dict, proc: subprocess.Popen | None, n: int, states=("COMPLETE", "PRUNED")):
    """Wait until the study holds ``n`` trials in ``states``, then hold it still: inside, no trial
    is created or finished, so whatever the test does there (a kill, Ctrl-C) lands mid-study,
    however loaded the machine. Yields the exact count."""
    db = StudyDb(cfg["storage"], cfg["study"])
    try:
        wait_for(lambda: db.count(states) >= n, proc, f"{n} finished trials")
        with db.frozen() as conn:
            count = db.count(states, conn=conn)
            assert n <= count < cfg["search"]["trials"], count  # the trials to spare dwarf one poll's progress
            yield count
    finally:
        db.close()
