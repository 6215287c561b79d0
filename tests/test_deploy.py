"""What users deploy and judge (issue 14), through the CLI: the compressed-tensors sparse formats
(`prune`/`export --apply --format compressed-tensors`), the llm-compressor recipe that keeps the
exported masks, lm-eval tasks in `prune` reports and as a study objective (a local next-sentence
task written here from the shipped news corpus, so it runs offline), and the 2:4 speed check's CPU path."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import load, run_cli, study_config, write_config

FAST = ["--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--eval", "none", "--mode", "one_shot",
        "--quiet"]
TASK = "ps_next_sentence"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice lm-eval task from the Lee news corpus: which of four sentences follows the
    first (the true next sentence, or the second sentence of three other documents)."""
    from prunesearch.data.corpora import load_corpus

    # short sentences (their first 10 words) keep the 128 scored continuations cheap on two CPU cores
    docs = [[" ".join(s.split()[:10]) for s in d.split(". ") if len(s.split()) >= 6] for d in load_corpus("lee")["text"]]
    docs = [d for d in docs if len(d) >= 2][:40]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("lm-eval-tasks")
    with open(path / "items.jsonl", "w") as f:
        for i, doc in enumerate(docs[:32]):
            others = rng.sample([d[1] for j, d in enumerate(docs) if j != i], 3)
            label = i % 4
            choices = others[:label] + [doc[1]] + others[label:]
            f.write(json.dumps({"context": doc[0], "choices": [" " + c for c in choices], "label": label}) + "\n")
    (path / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {path / 'items.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _legacy_check(directory: Path, reference: dict[str, torch.Tensor], tmp: Path) -> None:
    """compressed-tensors' own sparse decompressors (0.14, the last release that has them) read our
    files to the same tensors, when a copy of it is given (PRUNESEARCH_CT_LEGACY: a --no-deps
    --target install); the installed 0.15+ no longer has them."""
    legacy = os.environ.get("PRUNESEARCH_CT_LEGACY")
    if not legacy:
        return
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.items()}, tmp / "reference.safetensors")
    code = textwrap.dedent(f"""
        import torch
        from compressed_tensors.compressors import ModelCompressor
        from safetensors.torch import load_file
        mc = ModelCompressor.from_pretrained({str(directory)!r})
        dense = dict(mc.sparsity_compressor.decompress({str(directory)!r}))
        ref = load_file({str(tmp / "reference.safetensors")!r})
        assert set(dense) == set(ref), set(dense) ^ set(ref)
        assert all(torch.equal(dense[k], ref[k]) for k in ref)
        print("legacy ok", type(mc.sparsity_compressor).__name__)
        """)
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": legacy}, capture_output=True, text=True)
    assert run.returncode == 0 and "legacy ok" in run.stdout, run.stderr[-2000:]


def test_prune_saves_compressed_tensors_formats_that_hold_our_weights(tiny_dirs, tmp_path, capsys):
    from prunesearch.models.compressed import decompressed_state_dict, load_compressed

    dense_dir, bitmask_dir, dir24 = tmp_path / "dense", tmp_path / "bitmask", tmp_path / "two-four"
    tiny = ["--model", tiny_dirs["llama"], *FAST]  # 3 blocks, hidden 64: the format, not the model, is tested
    code, _, err = run_cli(["prune", "--sparsity", "0.6", "--out", str(dense_dir), *tiny], capsys)
    assert code == 0, err
    code, out, err = run_cli(["prune", "--sparsity", "0.6", "--out", str(bitmask_dir), "--format", "compressed-tensors",
                              *tiny], capsys)
    assert code == 0, err
    line = " ".join(out.split())
    assert "format: compressed-tensors sparse-bitmask" in line and "MB dense" in line

    ours = _weights(dense_dir)  # the plain save of the same (deterministic) pruning
    q = json.loads((bitmask_dir / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["sparsity_config"]["format"] == "sparse-bitmask"
    assert len(q["sparsity_config"]["targets"]) == 21  # 3 blocks x 7 linears
    assert q["sparsity_config"]["global_sparsity"] == pytest.approx(0.6, abs=1e-4)
    back = decompressed_state_dict(bitmask_dir)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    model = load_compressed(bitmask_dir)  # through transformers: its config, these weights
    state = model.state_dict()
    assert all(torch.equal(state[k], ours[k]) for k in ours)
    code, out, err = run_cli(["decompress", str(bitmask_dir), "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()  # plain transformers, after decompress
    assert all(torch.equal(plain[k], ours[k]) for k in ours)
    code, _, err = run_cli(["decompress", str(dense_dir), "--out", str(tmp_path / "again")], capsys)
    assert code == 2 and "not saved with --format compressed-tensors" in err
    report = json.loads((bitmask_dir / "prune_report.json").read_text())
    assert report["saved"]["bytes"] == _disk(bitmask_dir) < _disk(dense_dir) == report["saved"]["dense_bytes"]
    _legacy_check(bitmask_dir, ours, tmp_path)

    code, out, err = run_cli(["prune", "--structure", "2:4", "--out", str(dir24), "--format", "compressed-tensors",
                              *tiny], capsys)
    assert code == 0, err
    assert "compressed-tensors sparse-24-bitmask" in " ".join(out.split())
    stored = _weights(dir24)
    w = decompressed_state_dict(dir24)["model.layers.1.mlp.down_proj.weight"]  # 2:4 along each row's inputs
    assert stored["model.layers.1.mlp.down_proj.compressed"].shape == (w.shape[0], w.shape[1] // 2)
    assert ((w != 0).reshape(-1, 4).sum(-1) <= 2).all()
    report = json.loads((dir24 / "prune_report.json").read_text())
    back = decompressed_state_dict(dir24)
    for layer in report["layers"]:  # every layer's zeros as the report counted them
        assert (back[layer["name"] + ".weight"] == 0).float().mean().item() == pytest.approx(layer["achieved"], abs=1e-6)
    _legacy_check(dir24, back, tmp_path)


def test_format_and_lm_eval_mistakes_are_one_line(task_dir, tiny_dirs, tmp_path, capsys):
    for args, message in [
        (["--format", "gguf"], "--format gguf: unknown"),
        (["--lm-eval", "no_such_task", "--lm-eval-dir", str(task_dir)], f"not found in {task_dir}"),
        (["--lm-eval", TASK, "--lm-eval-dir", str(tmp_path / "nowhere")], "lm_eval.tasks_dir"),
    ]:
        code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], *FAST, *args], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
    cfg = study_config(tmp_path, objectives=["lm_eval:"])
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2 and "name the tasks" in err and len(err.strip().splitlines()) == 1


def test_a_missing_extra_is_one_line_naming_it(tiny_dirs, task_dir, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails, as when not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    for args, extra in [(["--format", "compressed-tensors"], "prunesearch[deploy]"),
                        (["--lm-eval", TASK, "--lm-eval-dir", str(task_dir)], "prunesearch[eval]")]:
        code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], *FAST, *args], capsys)
        assert code == 2 and extra in err and len(err.strip().splitlines()) == 1, err


def test_prune_reports_lm_eval_accuracy_dense_and_pruned(task_dir, tmp_path, capsys):
    code, out, err = run_cli(["prune", "--sparsity", "0.7", "--lm-eval", TASK, "--lm-eval-dir", str(task_dir),
                              "--lm-eval-limit", "12", "--max-layers", "2", *FAST], capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if f"lm_eval {TASK} accuracy" in line)
    dense, pruned = (float(x) for x in row.replace("│", " ").split()[-2:])
    assert all(0 <= acc <= 1 and abs(acc * 12 - round(acc * 12)) < 0.01 for acc in (dense, pruned))  # of 12 documents
    assert "Running loglikelihood" not in out + err  # the harness's own bars stay quiet


@pytest.fixture(scope="module")
def lm_eval_study(ray_session, task_dir, tiny_dirs, tmp_path_factory):
    """A 3-trial study that maximises the next-sentence accuracy, launched as a user does (two
    blocks of the tiny llama: the plumbing is tested, not the model)."""
    tmp = tmp_path_factory.mktemp("lm-eval-study")
    cfg = study_config(tmp, trials=3, objectives=[f"lm_eval:{TASK}"], lm_eval={"tasks_dir": str(task_dir), "limit": 12},
                       model={"name": tiny_dirs["llama"]})
    from conftest import launch_quietly

    launch_quietly(write_config(tmp, cfg))
    return cfg, tmp


def test_study_maximises_lm_eval_accuracy_and_export_reproduces_it(lm_eval_study, capsys):
    cfg, tmp = lm_eval_study
    study = load(cfg)
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and all(0.0 <= t.value <= 1.0 and (t.value * 12).is_integer() for t in complete)

    out_dir = tmp / "best-ct"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp / "best.yaml"),
                              "--apply", str(out_dir), "--format", "compressed-tensors", "--quiet"], capsys)
    assert code == 0, err
    exported = yaml.safe_load((tmp / "best.yaml").read_text())
    assert exported["lm_eval"]["tasks"] == [TASK] and exported["lm_eval"]["limit"] == 12
    report = json.loads((out_dir / "prune_report.json").read_text())
    assert report["lm_eval"]["tasks"][TASK]["pruned"] == pytest.approx(study.best_value, abs=1e-9)  # the trial's value
    assert report["saved"]["sparse_format"] == "sparse-bitmask"

    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp / "other.yaml"),
                            "--lm-eval", TASK, "--lm-eval-limit", "4"], capsys)  # other tasks or settings for the report
    assert code == 0, err
    assert yaml.safe_load((tmp / "other.yaml").read_text())["lm_eval"]["limit"] == 4
    recipe = yaml.safe_load((tmp / "best.recipe.yaml").read_text())
    modifiers = recipe["sparsity_stage"]["sparsity_modifiers"]
    assert list(modifiers) == ["ConstantPruningModifier"]
    assert len(modifiers["ConstantPruningModifier"]["targets"]) == 14
    text = " ".join(out.split())
    assert "recipe: keeps the masks" in text and "does not re-derive them" in text


def test_llmcompressor_oneshot_keeps_the_exported_masks(lm_eval_study, tmp_path, capsys):
    """llm-compressor 0.14 pins transformers<=5.17, datasets<=5.0.1 and compressed-tensors==0.19.0,
    so it is not installed beside this stack; LLMCOMPRESSOR_SITE (a `pip install --no-deps --target`
    copy) runs it anyway: its oneshot with our recipe on the exported model changes no mask."""
    site = os.environ.get("LLMCOMPRESSOR_SITE", "")
    probe = subprocess.run([sys.executable, "-c", "import llmcompressor"], env={**os.environ, "PYTHONPATH": site},
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("llm-compressor is not importable (it pins transformers<=5.17): set LLMCOMPRESSOR_SITE")
    cfg, tmp = lm_eval_study
    if not (tmp / "best-ct").exists():  # run alone: export as the test above does
        code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp / "best.yaml"),
                                "--apply", str(tmp / "best-ct"), "--format", "compressed-tensors", "--quiet"], capsys)
        assert code == 0, err
    code = textwrap.dedent(f"""
        import torch
        from llmcompressor import oneshot
        from prunesearch.models.compressed import load_compressed
        import yaml
        from llmcompressor.utils.pytorch.module import build_parameterized_layers
        model = load_compressed({str(tmp / 'best-ct')!r})
        recipe = yaml.safe_load(open({str(tmp / 'best.recipe.yaml')!r}))
        targets = recipe["sparsity_stage"]["sparsity_modifiers"]["ConstantPruningModifier"]["targets"]
        assert len(build_parameterized_layers(model, targets)) == 14  # the modifier finds every pruned linear
        before = {{n: p == 0 for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2}}
        oneshot(model=model, recipe={str(tmp / 'best.recipe.yaml')!r})
        after = {{n: p == 0 for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2}}
        assert sum(int(m.sum()) for m in before.values()) > 0
        assert all(torch.equal(before[n], after[n]) for n in before)
        print("masks kept", len(before))
        """)
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": site}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "masks kept 14" in run.stdout, run.stderr[-3000:]


def test_sparse24_speed_check_says_there_is_no_speedup_on_cpu():
    run = subprocess.run([sys.executable, "bench/sparse24_speed.py", "--device", "cpu"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no speed-up on CPU" in run.stdout


def test_an_lm_eval_study_on_a_worker_that_must_stream_is_refused_at_start_up(task_dir, tmp_path, capsys):
    """With 1 GiB to plan with, the bundled model's blocks must stream (workers.offload: auto),
    and lm-eval runs the whole model: one line at start-up, before any trial."""
    cfg = study_config(tmp_path, trials=2, objectives=[f"lm_eval:{TASK}"], lm_eval={"tasks_dir": str(task_dir), "limit": 4},
                       model={"max_layers": None}, workers={"count": 1, "num_cpus": 1, "memory_gb": 1.0},
                       calibration={"samples": 4, "seq_len": 16, "batch_size": 4})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "cannot use lm_eval objectives" in errors[0], err
    assert "Traceback" not in err and not load(cfg).trials
