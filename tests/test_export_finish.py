"""`prunesearch export --finish sparsegpt`, as a user drives it: a study searches with Wanda's masks,
the export prunes at the found per-block (attention/MLP) ratios with SparseGPT's OBS update,
sequential, keeps the trial's KV bits, and the saved model has exactly the trial's counts of zeros.
Real model slice (SmolLM2, 2 blocks), real SQLite, real Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import load, run_cli, study_config, write_config
from prunesearch.pruning.masks import NM, layer_counts

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # LLaMA's prunable linears, in model order


@pytest.fixture(scope="module")
def wanda_study(kv_study, ray_session):
    """Wanda masks, separate attention/MLP ratios and searched KV bits (two objectives: best = the knee):
    conftest's kv_study, which test_search reads too."""
    return kv_study


def _saved_zeros(model_dir: Path, blocks: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Linear name -> (zeros counted in the saved safetensors, the weight)."""
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for b in range(blocks):
        for lin in LINEARS:
            W = tensors[f"model.layers.{b}.{lin}.weight"]
            out[f"{b}.{lin}"] = (int((W == 0).sum()), W)
    return out


def _expected_counts(pairs: list[list[float]], shapes: list[tuple[int, int]], nm: NM | None = None) -> list[int]:
    """The trial's per-linear counts: its attention ratio for q/k/v/o, its MLP ratio for the rest."""
    ratios = [pair[0] if i < 4 else pair[1] for pair in pairs for i in range(len(LINEARS))]
    return layer_counts(ratios, shapes, nm)


def test_finish_sparsegpt_prunes_the_trials_ratios_with_obs_updates(wanda_study, tmp_path, capsys):
    cfg = wanda_study
    exported, model_dir = tmp_path / "best.yaml", tmp_path / "finished"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported),
                              "--finish", "sparsegpt", "--apply", str(model_dir), "--quiet"], capsys)
    assert code == 0, err
    knee = load(cfg).trials[int(out.split("trial ")[1].split()[0])]
    assert knee.user_attrs["metric"] == "wanda"

    # the config: SparseGPT, sequential, the trial's own ratios (attention/MLP pairs) and KV bits
    text = exported.read_text()
    data = yaml.safe_load(text)
    assert data["pruning"]["metric"] == "sparsegpt" and data["pruning"]["mode"] == "sequential"
    pairs = data["pruning"]["allocation"]["params"]["sparsities"]
    assert [x for pair in pairs for x in pair] == knee.user_attrs["ratios"]
    assert data["kv_cache"]["bits"] == [knee.params["kv00"], knee.params["kv01"]]
    assert data["pruning"]["sparsity"] == cfg["pruning"]["sparsity"]
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("finish: sparsegpt, sequential" in line for line in header)
    assert any("measured with wanda" in line for line in header)  # the trial's values are not this model's
    recipe = yaml.safe_load((tmp_path / "best.recipe.yaml").read_text())
    assert list(recipe["sparsity_stage"]["sparsity_modifiers"]) == ["ConstantPruningModifier"]  # keeps the finished masks
    if min(data["kv_cache"]["bits"]) < 16:  # per-layer KV bits: said to be prunesearch-only, not turned into one FP8 scheme
        assert "prunesearch-only" in " ".join(out.split()) and "quantization_stage" not in recipe
    assert "finish: sparsegpt, sequential" in out

    # the saved model: every linear has exactly the trial's count of zeros (counted, not asked)
    saved = _saved_zeros(model_dir, 2)
    shapes = [tuple(w.shape) for _, w in saved.values()]
    assert [z for z, _ in saved.values()] == _expected_counts(pairs, shapes)
    total = sum(w.numel() for _, w in saved.values())
    zeros = sum(z for z, _ in saved.values())
    assert zeros == round(cfg["pruning"]["sparsity"] * total)  # the budget, to the weight
    report = yaml.safe_load((model_dir / "prune_report.json").read_text())
    assert report["metric"] == "sparsegpt" and report["mode"] == "sequential"
    assert report["pruned_weights"] == zeros and report["achieved_sparsity"] == pytest.approx(zeros / total)

    # what the user reads: the perplexity row, the counted sparsity, the counted per-unit ratios
    assert re.search(r"perplexity \(lee, 4 x 64 tokens\)\s+\S+\s+[\d,.]+", out), out
    assert re.search(rf"sparsity\W+0\W+{zeros / total:.4f}", out), out
    counted = out.split("per-block sparsity (attention/MLP), counted in the pruned weights: ")[1].split()[:2]
    for b, units in enumerate(counted):
        attn, mlp = (float(x) for x in units.split("/"))
        assert attn == pytest.approx(pairs[b][0], abs=1e-4) and mlp == pytest.approx(pairs[b][1], abs=1e-4)

    # SparseGPT's update changed the kept weights: not the dense model with Wanda's zeros
    plain = tmp_path / "plain.yaml"
    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(plain)], capsys)
    assert code == 0, err
    again = yaml.safe_load(plain.read_text())
    assert again["pruning"]["metric"] == "wanda" and again["pruning"]["mode"] == "one_shot"  # the default is unchanged
    assert "finish" not in plain.read_text()


@pytest.mark.parametrize("finish,message", [
    ("wanda", "wanda only scores weights"),
    ("obs", "--finish obs: unknown; it takes none or sparsegpt"),
    ("sparsegpt:damp=abc", "--finish sparsegpt:damp=abc"),
    ("sparsegpt:colour=1", "has no parameter colour"),
])
def test_a_bad_finish_is_one_line_and_writes_nothing(wanda_study, tmp_path, capsys, finish, message):
    code, out, err = run_cli(["export", "--study", "t", "--storage", wanda_study["storage"], "--out",
                              str(tmp_path / "best.yaml"), "--finish", finish, "--apply", str(tmp_path / "m")], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_finish_on_an_nm_study_with_a_removed_block_keeps_n_of_m(tmp_path, capsys, ray_session, smol_dir):
    """N:M: every block keeps its own N of every 4 under SparseGPT's per-row, per-group masks; the
    trial's removed block stays removed (pinned), and SparseGPT runs on the blocks that remain."""
    cfg = study_config(tmp_path, trials=2, model={"max_layers": 3},
                       pruning={"structure": "2:4", "sparsity": 0.5, "remove_layers": 1})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    best = load(cfg).best_trial
    removed = best.user_attrs["removed_blocks"]
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "best.yaml"),
                              "--finish", "sparsegpt", "--apply", str(tmp_path / "m"), "--quiet"], capsys)
    assert code == 0, err
    data = yaml.safe_load((tmp_path / "best.yaml").read_text())["pruning"]
    assert (data["structure"], data["metric"], data["mode"]) == ("2:4", "sparsegpt", "sequential")
    assert data["allocation"]["params"]["sparsities"] == best.user_attrs["ratios"]
    assert data["remove_layers"] == 1 and data["remove_blocks"] == removed
    report = yaml.safe_load((tmp_path / "m" / "prune_report.json").read_text())
    assert report["removed_layers"]["blocks"] == removed and report["model"]["layers"] == 2
    dense = _saved_zeros(Path(smol_dir), 3)
    kept = [b for b in range(3) if b not in removed]
    pruned = 0
    for name, (zeros, W) in _saved_zeros(tmp_path / "m", 2).items():
        block, lin = name.split(".", 1)
        n = round(best.user_attrs["ratios"][int(block)] * 4)  # the block's N of every 4
        groups = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
        was_zero = (dense[f"{kept[int(block)]}.{lin}"][1].reshape(W.shape[0], -1, 4) == 0).sum(-1)
        # N pruned in every group of 4; more zeros only where the dense model already had them (the
        # first columns get no OBS update: a group of 4 with 3 dense zeros keeps its third)
        assert (groups >= n).all() and (groups <= n + was_zero).all(), name
        pruned += n * groups.numel()
    assert report["pruned_weights"] == pruned
    assert "perplexity (lee" in out


def test_finish_on_a_sparsegpt_study_is_a_no_op_with_a_note(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=2, pruning={"metric": "sparsegpt", "sparsity": 0.5})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "f.yaml"),
                              "--finish", "sparsegpt"], capsys)
    assert code == 0, err
    assert "already prunes with sparsegpt: --finish sparsegpt changes nothing" in out
    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "plain.yaml")], capsys)
    assert code == 0, err
    finished, plain = (yaml.safe_load((tmp_path / f).read_text()) for f in ("f.yaml", "plain.yaml"))
    assert finished == plain  # the trial's own one-shot solve
    assert finished["pruning"]["metric"] == "sparsegpt" and finished["pruning"]["mode"] == "one_shot"
    # the same solver with other parameters would be another solve: said, not silently done
    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "d.yaml"),
                            "--finish", "sparsegpt:damp=0.05"], capsys)
    assert code == 2 and "already prunes with the solver sparsegpt" in err and not (tmp_path / "d.yaml").exists()


@pytest.mark.parametrize("count", [4, 40])
def test_sparsegpt_adds_exactly_count_zeros_with_a_dead_input(count):
    """An input that was always zero: its weights go first, but only as many as the count takes;
    the rest keep their values (they cost nothing on the calibration data), so the layer's zeros
    are the budget's count, as `export --finish` promises, not count + the dead column."""
    from prunesearch.pruning.sparsegpt import sparsegpt_prune

    torch.manual_seed(0)
    X = torch.randn(64, 16)
    X[:, 3] = 0.0
    W = torch.randn(8, 16)
    dense = W.clone()
    mask = sparsegpt_prune(W, X.T @ X, None, count=count, blocksize=8)
    assert int(mask.sum()) == count and int((W == 0).sum()) == count
    dead_pruned = int(mask[:, 3].sum())
    assert dead_pruned == min(8, count * 64 // 128)  # first in their column block (its share of the count)
    assert torch.equal(W[:, 3][~mask[:, 3]], dense[:, 3][~mask[:, 3]])  # the rest untouched: no update reaches them
