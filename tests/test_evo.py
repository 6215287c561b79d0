"""The budget-exact evolutionary sampler (search.sampler evo over the levels space): level
swaps keep the budget exact, children are screened on few prompts and only the best reach
every prompt, the parent never gets worse, and a resumed study replays to the same run.
Real model slice, SQLite, in-process Ray, driven through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.trial import TrialState

from conftest import load, run_cli, study_config, write_config
from prunesearch.search.evo import mutate, offspring
from prunesearch.spaces import LevelSpace, ModelLayout

# blocks of two shapes, as a model with a wider last block would have
LAYOUT = ModelLayout(4, (100, 100, 100, 300), (200, 200, 200, 600), (100, 200) * 3 + (300, 600), (0, 0, 1, 1, 2, 2, 3, 3))


@pytest.mark.parametrize("granularity", ["block", "half", "linear"])
def test_level_swaps_keep_the_budget_exact(granularity):
    space = LevelSpace(LAYOUT, 0.6, granularity=granularity, step=0.05, min_sparsity=0.3, max_sparsity=0.9)
    sizes = space.unit_sizes()
    pruned = lambda x: sum(n * r for n, r in zip(sizes, space.candidate(x).ratios))  # noqa: E731
    parent = [space.zero] * len(sizes)
    rng = np.random.default_rng(0)
    for _ in range(200):
        kids = offspring(parent, space, rng, 4)
        assert kids and all(pruned(k) == pytest.approx(0.6 * sum(sizes), rel=1e-12) for k in kids)
        assert all(k != parent and max(k) <= space.top and min(k) >= 0 for k in kids)
        parent = kids[0]
    assert parent != [space.zero] * len(sizes)  # it went somewhere


def test_a_baseline_starts_on_the_grid_and_on_the_budget():
    space = LevelSpace(LAYOUT, 0.6, granularity="half", step=0.05, min_sparsity=0.3, max_sparsity=0.9)
    x = space.vector_of(space.encode({"name": "owl"}, None, lambda alloc: [0.52, 0.62, 0.66, 0.6]))  # on the budget
    ratios = space.candidate(x).ratios
    assert sum(n * r for n, r in zip(space.unit_sizes(), ratios)) == pytest.approx(0.6 * LAYOUT.total, rel=1e-12)
    # each class (the three small attention halves; the three small MLP halves) keeps its pruned weights
    assert ratios == pytest.approx([0.55, 0.55, 0.6, 0.6, 0.65, 0.65, 0.6, 0.6])


def evo_config(tmp_path, trials, **search):
    return study_config(tmp_path, trials=trials, calibration={"samples": 8, "batch_size": 2}, reconstruction_samples=8,
                        objectives=["kl"], space={"name": "levels", "params": {"granularity": "half", "step": 0.05}},
                        search={"sampler": "evo", "offspring": 6, "survivors": [3, 1], **search})


def runs(study):
    """What an evolution did: (generation, stage, point, value) of every evaluation."""
    out = []
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        value = t.value if t.state == TrialState.COMPLETE else t.intermediate_values[max(t.intermediate_values)]
        out.append((t.user_attrs["generation"], t.user_attrs["stage"], tuple(t.user_attrs["x"]), round(value, 9)))
    return sorted(out)


def test_evo_screens_children_keeps_the_best_and_resumes_to_the_same_run(tmp_path, capsys, ray_session):
    cfg = evo_config(tmp_path, 18)
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 18
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["uniform", "owl"]
    for t in trials:  # every child on the budget; a screening stage ran its prompts only
        assert t.user_attrs["achieved_sparsity"] == pytest.approx(0.6, abs=1e-6)
        stage, prompts = t.user_attrs["stage"], t.user_attrs["prompts"]
        assert prompts == [2, 4, 8][stage] and (t.state == TrialState.COMPLETE) == (stage == 2)
    by_gen: dict[int, dict[int, list]] = {}
    for g, stage, x, value in runs(study):
        by_gen.setdefault(g, {}).setdefault(stage, []).append((value, x))
    for g, stages in by_gen.items():
        if g == 0 or 2 not in stages:
            continue
        assert len(stages[0]) == 6 and len(stages[1]) == 3 and len(stages[2]) == 1
        assert set(x for _, x in stages[1]) == set(x for _, x in sorted(stages[0])[:3])  # the best 3 on 2 prompts
        assert stages[2][0][1] == min(stages[1])[1]  # the best on 4 prompts reached all 8
    # elitism: every generation's children are 1-3 level swaps from the best point scored on every prompt so far
    for g in sorted(by_gen)[1:]:
        parent = min((v, x) for h in by_gen if h < g for v, x in by_gen[h].get(2, []))[1]
        for _, x in by_gen[g][0]:
            assert 0 < sum(abs(a - b) for a, b in zip(x, parent)) <= 6

    # a study stopped part-way (here: at 7 evaluations, inside generation 1) and resumed replays to the same run
    half = evo_config(tmp_path, 7, **{"seed": 0})
    half["study"], half["storage"] = "half", f"sqlite:///{tmp_path / 'half.db'}"
    assert run_cli(["launch", str(write_config(tmp_path, half, "half.yaml")), "--quiet"], capsys)[0] == 0
    code, out, err = run_cli(["resume", "--study", "half", "--storage", half["storage"], "--trials", "18", "--quiet"], capsys)
    assert code == 0, err
    assert runs(load(half)) == runs(study)


def test_evo_at_2_4_mixes_n_of_4_per_block_on_the_budget(tmp_path, capsys, ray_session):
    """Under N:M structure a level is a unit's N of every M (0 = dense): at 2:4's budget a study
    mixes dense, 1:4, 2:4 and 3:4 blocks, every trial pruning exactly half the weights, and its
    best exports to a model whose groups of 4 each lose the block's N."""
    cfg = evo_config(tmp_path, 12)
    cfg["pruning"] = {"metric": "wanda", "sparsity": 0.5, "structure": "2:4"}
    cfg["space"] = {"name": "levels", "params": {"granularity": "block"}}
    cfg["search"]["survivors"] = [2, 1]
    cfg["model"]["max_layers"] = 3
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    seen = set()
    for t in trials:
        assert t.user_attrs["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
        assert all(r * 4 == pytest.approx(round(r * 4)) for r in t.user_attrs["ratios"])
        seen |= {round(r * 4) for r in t.user_attrs["ratios"]}
    assert seen > {2}  # blocks other than 2:4 were tried
    best = study.best_trial
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "best.yaml"),
                              "--apply", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    from prunesearch.models import load_model, prunable_linears

    for lin in prunable_linears(load_model(str(out_dir), device="cpu").model):
        n = round(best.user_attrs["ratios"][lin.block] * 4)
        zeros = (lin.weight.reshape(lin.weight.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros >= n).all() and (zeros == n).float().mean() > 0.99  # a 4-bit model has a few zeros of its own


def test_evo_by_linear_exports_one_ratio_per_named_linear(tmp_path, capsys, ray_session):
    """granularity linear: a unit per prunable linear (7 per LLaMA block); the export writes each
    block's ratios by the linears' names, and `prune --config` prunes each linear its own count."""
    cfg = evo_config(tmp_path, 8)
    cfg["space"] = {"name": "levels", "params": {"granularity": "linear", "step": 0.05}}
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    best = study.best_trial
    ratios = best.user_attrs["ratios"]
    assert len(ratios) == 14  # 7 linears x 2 blocks
    exported = tmp_path / "best.yaml"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported),
                              "--apply", str(tmp_path / "pruned"), "--quiet"], capsys)
    assert code == 0, err
    import yaml

    blocks = yaml.safe_load(exported.read_text())["pruning"]["allocation"]["params"]["sparsities"]
    assert [sorted(b) for b in blocks] == [sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])] * 2
    assert [r for b in blocks for r in b.values()] == pytest.approx(ratios)  # in the model's order
    report = yaml.safe_load((tmp_path / "pruned" / "prune_report.json").read_text())
    for layer, r in zip(report["layers"], ratios):
        assert abs(layer["pruned"] - r * layer["numel"]) <= 1  # each linear its own count
    assert report["reconstruction"]["pruned"]["kl"] == pytest.approx(best.value, rel=1e-4)  # the trial, reproduced
