"""Layers removed as a searched dimension: the removal order is measured once per worker and
replayed per trial; the budget is the full model's; a trial's k exports and re-applies exactly.
Real SmolLM2 slices (3-4 blocks), real SQLite, real Ray."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from conftest import load, run_cli, study_config, write_config
from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.models import load_model
from prunesearch.models.families import decoder_blocks
from prunesearch.pruning.budget import weighted_mean
from prunesearch.pruning.layer_removal import remove_blocks, replay_removal, restore_state, save_state
from prunesearch.spaces import Candidate, ModelLayout, kept_bits, make_space
from prunesearch.workers.evaluator import Evaluator


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def layer_indices(model) -> list[int]:
    return [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


# ---------------------------------------------------------------- replaying and undoing removals


def test_replay_gives_exactly_the_model_remove_blocks_gives(lee_ids):
    calib, prompt = lee_ids[:8], lee_ids[8:10, :24]
    reference = load_model("default", max_layers=4, device="cpu").model
    direct = remove_blocks(reference, calib, 2, batch_size=4)

    model = load_model("default", max_layers=4, device="cpu").model
    pristine_weights, pristine_logits, pristine_idx = weights(model), logits(model, prompt), layer_indices(model)
    state = save_state(model)
    order = remove_blocks(model, calib, 3, batch_size=4)  # the order up to the largest choice
    assert order.removed[:2] == direct.removed and order.scales[:2] == direct.scales
    restore_state(model, state)  # back to the full model, exactly
    assert_same_weights(weights(model), pristine_weights)
    assert torch.equal(logits(model, prompt), pristine_logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert model.config.num_hidden_layers == 4 and layer_indices(model) == pristine_idx

    assert replay_removal(model, order, 2) == direct.removed
    assert_same_weights(weights(model), weights(reference))
    assert torch.equal(logits(model, prompt), logits(reference, prompt))
    assert model.config.num_hidden_layers == 2 and layer_indices(model) == layer_indices(reference)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied, as remove_blocks does
    with pytest.raises(UserError, match="only 3 were measured"):
        replay_removal(model, order, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_undo_and_replay_are_exact_in_every_family(tiny_dirs, lee_ids, family):
    """Position embeddings (OPT, GPT-2), biases of the writers (GPT-2), an untied head (Qwen2)."""
    calib, prompt = lee_ids[:4], lee_ids[4:6, :16]
    reference = load_model(tiny_dirs[family], device="cpu").model
    remove_blocks(reference, calib, 1, batch_size=4)
    model = load_model(tiny_dirs[family], device="cpu").model
    pristine, state = weights(model), save_state(model)
    order = remove_blocks(model, calib, 2, batch_size=4)
    restore_state(model, state)
    assert_same_weights(weights(model), pristine)
    assert len(decoder_blocks(model)) == 3
    replay_removal(model, order, 1)
    assert_same_weights(weights(model), weights(reference))
    assert torch.equal(logits(model, prompt), logits(reference, prompt))


# ---------------------------------------------------------------- the worker


def removal_config() -> StudyConfig:
    return StudyConfig.model_validate({
        "model": {"name": "default", "max_layers": 3, "device": "cpu"},
        "calibration": {"source": "lee", "samples": 8, "seq_len": 32, "batch_size": 4},
        "pruning": {"metric": "wanda", "sparsity": 0.5},
        "reconstruction_samples": 4,
        "space": {"name": "blockwise", "min_sparsity": 0.1, "max_sparsity": 0.9, "remove_layers": [0, 1]},
        "objectives": ["frobenius", "kl"],
    })


def test_evaluator_meets_the_full_models_budget_for_every_k_and_switches_exactly():
    ev = Evaluator(removal_config())
    raw = [0.3, 0.5, 0.7]
    first = ev.evaluate(Candidate(ratios=raw, removed=0))
    masked_k0, idx_k0 = weights(ev.model), layer_indices(ev.model)
    assert first.removed_blocks == [] and first.achieved == pytest.approx(0.5, abs=0.01)
    assert first.kept_sparsity == pytest.approx(0.5)

    one = ev.evaluate(Candidate(ratios=raw, removed=1))
    gone = ev.trial_model.removal.removed[0]
    assert one.removed_blocks == [gone] and len(decoder_blocks(ev.model)) == 2
    assert one.achieved == pytest.approx(0.5, abs=0.01)  # the removed block counts as pruned
    assert one.kept_sparsity == pytest.approx((0.5 * 3 - 1) / 2)  # SmolLM2's blocks are all the same size
    sizes = [s for b, s in enumerate(ev.layout.unit_sizes(False)) if b != gone]
    assert weighted_mean(one.ratios, sizes) == pytest.approx(one.kept_sparsity)
    assert one.named["frobenius"] != first.named["frobenius"]

    back = ev.evaluate(Candidate(ratios=raw, removed=0))  # nothing of k=1 leaks into k=0
    assert back.named == first.named and back.ratios == first.ratios
    assert_same_weights(weights(ev.model), masked_k0)
    m = ev.model
    assert m.config.num_hidden_layers == 3 and layer_indices(m) == idx_k0 and set(idx_k0) == {0, 1, 2}
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.config.tie_word_embeddings
    again = ev.evaluate(Candidate(ratios=raw, removed=1))
    assert again.named == one.named and "switch_s" in again.timings

    owl = ev.evaluate(Candidate(allocation={"name": "owl", "params": {"M": 3.0, "lam": 0.1}}, removed=1))
    assert len(owl.ratios) == 2 and weighted_mean(owl.ratios, sizes) == pytest.approx(one.kept_sparsity)
    assert owl.achieved == pytest.approx(0.5, abs=0.01)
    assert ev.resolve({"name": "uniform"}) == [0.5] * 3 and ev.trial_model.k == 0  # baselines resolve on the full model


def test_kv_bits_are_chosen_per_original_block_and_removed_blocks_keep_no_cache():
    data = removal_config().model_dump()
    data.update(space={**data["space"], "kv_bits": True}, objectives=["frobenius", "kv_bytes"],
                kv_cache={**data["kv_cache"], "bits_choices": [16, 8, 4]})
    ev = Evaluator(StudyConfig.model_validate(data))
    bits = [16, 8, 4]
    full = ev.evaluate(Candidate(ratios=[0.5] * 3, removed=0, kv_bits=bits))
    one = ev.evaluate(Candidate(ratios=[0.5] * 3, removed=1, kv_bits=bits))
    gone = one.removed_blocks[0]
    assert ev.kv_settings(Candidate(ratios=[0.5] * 3, kv_bits=bits)).bits == [b for i, b in enumerate(bits) if i != gone]
    # SmolLM2's layers have the same KV width: a layer at the removed block's bits costs a third of three
    same = ev.evaluate(Candidate(ratios=[0.5] * 3, removed=0, kv_bits=[bits[gone]] * 3))
    assert one.named["kv_bytes"] == pytest.approx(full.named["kv_bytes"] - same.named["kv_bytes"] / 3)
    back = ev.evaluate(Candidate(ratios=[0.5] * 3, removed=0, kv_bits=bits))
    assert back.named == full.named


# ---------------------------------------------------------------- spaces and configs


def test_kept_bits_follow_original_indices_whatever_the_removal_order():
    assert kept_bits([16, 8, 4, 6], [2, 0]) == [8, 6]
    assert kept_bits([16, 8, 4, 6], [0, 2]) == [8, 6]
    assert kept_bits([16, 8], []) == [16, 8]


def test_spaces_search_k_and_baselines_remove_nothing():
    layout = ModelLayout(3, (100,) * 3, (300,) * 3)
    space = make_space("blockwise", layout, 0.5, min_sparsity=0.1, remove_layers=[1, 0])
    params = space.encode({"name": "uniform"}, None, lambda alloc: [0.5] * 3)
    assert params["remove_layers"] == 0
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {space.suggest(study.ask()).removed for _ in range(12)}
    assert seen == {0, 1}
    assert make_space("owl", layout, 0.5, remove_layers=[0, 1]).encode({"name": "owl"}, None, None)["remove_layers"] == 0
    assert Candidate.from_dict({"ratios": [0.5], "split": False, "allocation": None, "kv_bits": None, "metric": None,
                                "extra": {}}).removed is None  # a candidate written before the field existed
    assert StudyConfig.model_validate({"space": {"remove_layers": [2, 0, 1]}}).space.remove_layers == [0, 1, 2]
    with pytest.raises(UserError, match="cannot remove 3 of the model's 3"):
        make_space("blockwise", layout, 0.5, remove_layers=[0, 3])
    with pytest.raises(UserError, match="below space.min_sparsity 0.3"):
        make_space("blockwise", layout, 0.5, min_sparsity=0.3, remove_layers=[1])  # leaves 0.25 to the kept blocks


@pytest.mark.parametrize("patch,message", [
    ({"space": {"remove_layers": [0, -1]}}, "space.remove_layers: block counts must be >= 0"),
    ({"space": {"remove_layers": [1, 1]}}, "listed twice"),
    ({"space": {"remove_layers": [0, 1]}, "pruning": {"sparsity": 0.5, "remove_layers": 1}}, "set pruning.remove_layers to 0"),
    ({"space": {"name": "optishear", "remove_layers": [0, 1]}, "search": {"sampler": "nsga3"},
      "objectives": ["frobenius", "sparsity_deviation"]}, "not by evo / nsga3"),
    ({"space": {"remove_layers": [0, 1]}, "pruning": {"sparsity": 0.5, "structure": "2:4"}}, "needs unstructured pruning"),
])
def test_bad_removal_configs_are_one_line_errors(tmp_path, capsys, patch, message):
    cfg = study_config(tmp_path)
    for key, value in patch.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_choice_beyond_the_budget_is_refused_at_launch(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, model={"max_layers": 3}, pruning={"sparsity": 0.5},
                       space={"min_sparsity": 0.0, "remove_layers": [0, 1, 2]})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "removing 2 blocks takes away up to 66.7% of the prunable weights, more than pruning.sparsity 0.5" in err


# ---------------------------------------------------------------- a study, its export, prune --config


def test_a_study_searches_k_and_a_k1_trial_reproduces_through_prune(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=7, model={"max_layers": 3}, pruning={"sparsity": 0.5},
                       space={"min_sparsity": 0.1, "remove_layers": [0, 1]},
                       search={"pruner": "none"})  # k=1 trials are worse: the median pruner would stop them all
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    study = load(cfg)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 7
    assert [t.params["remove_layers"] for t in study.trials[:2]] == [0, 0]  # the baselines
    by_k = {k: [t for t in complete if len(t.user_attrs["removed_blocks"]) == k] for k in (0, 1)}
    assert by_k[0] and by_k[1], "both k values should appear"
    for t in complete:
        assert t.user_attrs["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)  # over the full model
        assert len(t.user_attrs["ratios"]) == 3 - t.params["remove_layers"]
    code, out, _ = run_cli(["status", "--study", "t", "--storage", cfg["storage"]], capsys)
    assert code == 0 and "k=0" in out and "k=1:" in out

    trial = by_k[1][0]
    exported = tmp_path / "k1.yaml"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported),
                              "--pick", f"trial {trial.number}"], capsys)
    assert code == 0, err
    assert "no llm-compressor recipe" in " ".join(out.split()) and not (tmp_path / "k1.recipe.yaml").exists()
    pruning = yaml.safe_load(exported.read_text())["pruning"]
    assert pruning["remove_blocks"] == trial.user_attrs["removed_blocks"]  # pinned, not measured again
    assert pruning["remove_layers"] == 1 and pruning["sparsity"] == pytest.approx(trial.user_attrs["kept_sparsity"])
    assert pruning["allocation"]["params"]["sparsities"] == pytest.approx(trial.user_attrs["ratios"])
    code, _, err = run_cli(["prune", "--config", str(exported), "--out", str(tmp_path / "pruned"), "--quiet"], capsys)
    assert code == 0, err
    report = yaml.safe_load((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["removed_layers"]["blocks"] == trial.user_attrs["removed_blocks"] and report["model"]["layers"] == 2
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(trial.value, rel=1e-4)

    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "best.yaml")], capsys)
    assert code == 0, err
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())["pruning"]
    assert best["remove_layers"] == len(study.best_trial.user_attrs["removed_blocks"])

    code, _, err = run_cli(["report", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "plots")], capsys)
    assert code == 0 and (tmp_path / "plots" / "sparsity.png").exists(), err


def test_the_sparsity_plot_puts_kept_ratios_on_their_original_blocks():
    from prunesearch.search.report import units_on_full_model

    assert units_on_full_model([0.4, 0.6, 0.5], [1], split=False) == ([0, 2, 3], [1])
    assert units_on_full_model([0.4, 0.5], [0], split=True) == ([2, 3], [0, 1])  # attention and MLP of block 0
    assert units_on_full_model([0.5, 0.5], [], split=False) == ([0, 1], [])


def test_a_removal_and_kv_bits_study_exports_the_bits_of_the_kept_layers(tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=8, model={"max_layers": 3}, pruning={"sparsity": 0.5},
                       space={"min_sparsity": 0.1, "remove_layers": [0, 1], "kv_bits": True},
                       objectives=["frobenius", "kv_bytes"], kv_cache={"bits_choices": [16, 8, 4]},
                       search={"sampler": "random"})
    code, _, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    complete = load(cfg).get_trials(states=(TrialState.COMPLETE,))
    k1 = [t for t in complete if t.params["remove_layers"] == 1]
    assert k1, "a k=1 trial should appear in 8 (6 drawn at random with a fixed seed: deterministic)"
    trial = k1[0]
    gone = trial.user_attrs["removed_blocks"][0]
    exported = tmp_path / "k1.yaml"
    code, _, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(exported),
                            "--pick", f"trial {trial.number}"], capsys)
    assert code == 0, err
    data = yaml.safe_load(exported.read_text())
    assert data["kv_cache"]["bits"] == [trial.params[f"kv{i:02d}"] for i in range(3) if i != gone]
    code, _, err = run_cli(["prune", "--config", str(exported), "--out", str(tmp_path / "m"), "--quiet"], capsys)
    assert code == 0, err
    report = yaml.safe_load((tmp_path / "m" / "prune_report.json").read_text())
    assert report["model"]["layers"] == 2
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(trial.values[0], rel=1e-4)
    assert report["kv_cache"]["bytes_per_token"] == pytest.approx(trial.values[1])
