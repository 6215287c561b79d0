"""Shared fixtures: the real default model (cached float32 copy), tiny random models of each
family saved as real HF directories with the real SmolLM2 tokenizer, and real token data."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

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
    import subprocess
    import tempfile
    from pathlib import Path

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
        import sqlalchemy

        admin = sqlalchemy.create_engine(sqlalchemy.URL.create("postgresql+psycopg", user, PG_PASSWORD, "127.0.0.1", port, "postgres"),
                                         isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text("CREATE DATABASE prunesearch"))
        admin.dispose()
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/prunesearch"
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "stop", "-m", "fast"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
