"""Mixture-of-experts models pruned for real (issue 18): tiny Mixtral and Qwen2-MoE with random
weights built from a config, driven through the CLI as a user runs them.

transformers 5 stores a block's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``); each expert's slice is its own layer, its statistics gathered from
the tokens the router sends it. Checked: the routers and ``shared_expert_gate`` stay untouched,
every expert is at the asked sparsity, the budget is exact over the prunable set the report
names, the saved model reloads with the same class and zeros; a study launches, exports and
re-applies; streamed blocks give the in-memory values; a block parameter nobody claims is a
one-line error.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY, in_memory_and_streamed, load, run_cli, study_config, write_config

H, LAYERS, EXPERTS = 64, 2, 4
SMALL = ["--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--eval", "lee",
         "--eval-samples", "2", "--eval-seq-len", "32", "--quiet"]


def build_moe(family: str, top_k: int = 2) -> nn.Module:
    """A tiny random MoE model of ``family`` (mixtral, qwen2_moe, qwen3_moe), built from a config."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=TINY["vocab_size"], hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, max_position_embeddings=512)
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=EXPERTS, **common))
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=48, num_experts=EXPERTS,
                                                  shared_expert_intermediate_size=64, **common))
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=48, num_experts=EXPERTS,
                                                  head_dim=16, **common))
    raise ValueError(family)


def starve_experts(model: nn.Module) -> nn.Module:
    """Router rows (v, -v, 0, 0): with top-1 routing experts 2 and 3 never win a token."""
    for layer in model.model.layers:
        w = layer.mlp.gate.weight.data
        w[1] = -w[0]
        w[2:] = 0
    return model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    out = {}
    for family in ("mixtral", "qwen2_moe", "mixtral_starved"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        model = build_moe(family) if family != "mixtral_starved" else starve_experts(build_moe("mixtral", top_k=1))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = str(path)
    return out


def _dense_params(model: nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if pattern in n}


# ---------------------------------------------------------------- what is prunable

@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_every_expert_is_a_layer_and_routers_are_left_out(family):
    from prunesearch.models.families import audit_blocks

    model = build_moe(family)
    linears, audit = audit_blocks(model)
    names = {l.name for l in linears}
    for e in range(EXPERTS):
        assert {f"model.layers.0.mlp.experts.gate_up_proj.{e}", f"model.layers.1.mlp.experts.down_proj.{e}"} <= names
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    experts = model.model.layers[0].mlp.experts
    lin = next(l for l in linears if l.name == "model.layers.0.mlp.experts.gate_up_proj.2")
    assert lin.weight.data_ptr() == experts.gate_up_proj[2].data_ptr() and lin.weight.shape == experts.gate_up_proj.shape[1:]
    # the prunable set plus routers and vectors is every parameter of the blocks
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    assert audit.prunable + audit.routers + audit.vectors == block_params == sum(l.numel for l in linears) + audit.routers + audit.vectors
    assert "experts: 4 per MoE block" in audit.describe() and "routers/gates" in audit.describe()


def test_an_unknown_block_parameter_is_a_one_line_error_naming_it(tiny_dirs, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    model.model.layers[1].mlp.register_parameter("lora_A", nn.Parameter(torch.zeros(8, TINY["hidden"])))
    from prunesearch.errors import UserError
    from prunesearch.models.families import prunable_linears

    with pytest.raises(UserError, match=r"model.layers.1.mlp.lora_A \(8, 64\) is neither"):
        prunable_linears(model)


# ---------------------------------------------------------------- routed statistics

def test_an_experts_statistics_come_from_the_tokens_routed_to_it():
    from prunesearch.models.families import prunable_linears
    from prunesearch.pruning.stats import StatsCollector

    model = build_moe("mixtral")
    moe = model.model.layers[0].mlp
    experts = [l for l in prunable_linears(model) if l.block == 0 and l.expert is not None]
    x = torch.randn(3, 5, H)
    with torch.no_grad(), StatsCollector(experts, want_xtx=True) as collector:
        moe(x)
        _, _, index = moe.gate(x.reshape(-1, H))
    flat = x.reshape(-1, H)
    for e in range(EXPERTS):
        mine = flat[(index == e).any(-1)]
        up = collector.stats[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        assert up.n_tokens == mine.shape[0] and up.n_seqs == 3  # every sequence counted, routed or not
        assert torch.allclose(up.xtx, mine.T @ mine, atol=1e-4)
        gate, u = (mine @ moe.experts.gate_up_proj[e].T).chunk(2, -1)
        h = nn.functional.silu(gate) * u
        down = collector.stats[f"model.layers.0.mlp.experts.down_proj.{e}"]
        assert down.n_tokens == mine.shape[0] and torch.allclose(down.xtx, h.T @ h, atol=1e-4)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_counted():
    """Top-1 routing with router rows (v, -v, 0, 0): experts 2 and 3 never win a token."""
    from prunesearch.models.families import prunable_linears
    from prunesearch.pruning.engine import PruneSpec, prune_model

    model = starve_experts(build_moe("mixtral", top_k=1))
    expert = model.model.layers[0].mlp.experts.down_proj[3]
    magnitude_mask = torch.zeros_like(expert, dtype=torch.bool)
    k = expert.shape[1] // 2
    magnitude_mask.scatter_(1, expert.abs().argsort(dim=1, stable=True)[:, :k], True)
    result = prune_model(model, torch.randint(0, 1000, (4, 16)), PruneSpec(metric="wanda", sparsity=0.5, batch_size=2))
    assert len(result.unrouted) == 2 * LAYERS * 2  # 2 experts x 2 parameters x 2 blocks
    assert all(".experts." in n and n.rsplit(".", 1)[1] in {"2", "3"} for n in result.unrouted)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[3] == 0, magnitude_mask)
    assert result.pruned_weights == round(0.5 * sum(l.numel for l in prunable_linears(model)))


# ---------------------------------------------------------------- through the CLI

def _check_pruned(dense_dir: str, out, sparsity: float) -> dict:
    """The saved model: same class, routers and gates untouched, every expert and layer at its
    report's sparsity, the budget exact; returns the report."""
    from transformers import AutoModelForCausalLM

    from prunesearch.models.families import prunable_linears

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "prune_report.json").read_text())
    assert type(pruned) is type(dense)
    for name, p in _dense_params(dense, "gate.weight").items():  # mlp.gate and shared_expert_gate
        assert torch.equal(dict(pruned.named_parameters())[name], p), name
    layers = {l.name: l for l in prunable_linears(pruned)}
    for rec in report["layers"]:
        w = layers[rec["name"]].weight
        assert (w == 0).sum().item() == rec["pruned"], rec["name"]  # random weights: no zeros of their own
        assert rec["pruned"] / rec["numel"] == pytest.approx(rec["target"], abs=1.0 / w.shape[1])
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    assert len(experts) == LAYERS * 2 * EXPERTS
    total = sum(l.numel for l in layers.values())
    assert report["prunable_weights"] == total and report["pruned_weights"] == round(sparsity * total)
    zeros = sum(int((l.weight == 0).sum()) for l in layers.values())
    assert zeros == report["pruned_weights"]
    assert "experts: 4 per MoE block" in report["prunable_set"] and report["unrouted_experts"]["count"] == 0
    return report


@pytest.mark.parametrize("family,metric", [("mixtral", "wanda"), ("qwen2_moe", "sparsegpt")])
def test_prune_prunes_every_expert_and_reloads_identically(family, metric, moe_dirs, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(["prune", "--model", moe_dirs[family], "--metric", metric, "--sparsity", "0.5",
                                 "--out", str(out), *SMALL], capsys)
    assert code == 0, err
    report = _check_pruned(moe_dirs[family], out, 0.5)
    assert all(r["achieved"] == pytest.approx(0.5, abs=0.02) for r in report["layers"])
    assert "prunable: attention + MLP (experts: 4 per MoE block" in stdout


def test_bias_compensation_on_experts_is_a_one_line_error(moe_dirs, capsys):
    code, _, err = run_cli(["prune", "--model", moe_dirs["mixtral"], "--metric", "stade", "--bias-compensation",
                            "--sparsity", "0.5", *SMALL], capsys)
    assert code == 2 and "MoE experts" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_launch_export_apply_and_reload(family, moe_dirs, tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=3, model={"name": moe_dirs[family], "max_layers": None},
                       evaluation={"samples": 2, "seq_len": 32}, pruning={"metric": "wanda", "sparsity": 0.6},
                       search={"n_startup_trials": 2, "pruner": "none"})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    applied = tmp_path / "applied"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(tmp_path / "best.yaml"),
                              "--apply", str(applied), "--quiet"], capsys)
    assert code == 0, err
    report = _check_pruned(moe_dirs[family], applied, 0.6)
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-5)
    assert load(cfg).user_attrs["unrouted_experts"]["count"] == 0


def test_a_study_counts_the_experts_no_calibration_token_reaches(moe_dirs, tmp_path, capsys, ray_session):
    cfg = study_config(tmp_path, trials=2, model={"name": moe_dirs["mixtral_starved"], "max_layers": None},
                       evaluation={"samples": 2, "seq_len": 32}, search={"n_startup_trials": 2, "pruner": "none"})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg))], capsys)
    assert code == 0, err
    said = "experts no calibration token reached (pruned by magnitude in every trial): 4"  # 2 experts x 2 blocks
    assert said in err  # with the start-up lines
    unrouted = load(cfg).user_attrs["unrouted_experts"]
    assert unrouted["count"] == 4 and all(n.rsplit(".", 1)[1] in {"2", "3"} for n in unrouted["layers"])
    code, out, err = run_cli(["status", "--study", "t", "--storage", cfg["storage"]], capsys)
    assert code == 0 and said in out


def test_streamed_blocks_give_the_in_memory_values_on_a_moe_model(moe_dirs, tmp_path, monkeypatch):
    from prunesearch.spaces import Candidate

    cfg = study_config(tmp_path, model={"name": moe_dirs["qwen2_moe"], "max_layers": None},
                       objectives=["kl", "frobenius"], search={"pruner": "none"})
    memory, streamed = in_memory_and_streamed(cfg, tmp_path, monkeypatch)
    for name, st in memory.dense_stats.items():
        assert streamed.dense_stats[name].n_tokens == st.n_tokens and torch.allclose(streamed.dense_stats[name].m2, st.m2, rtol=1e-5)
    cand = Candidate(ratios=[0.4, 0.7])
    a, b = memory.evaluate(cand), streamed.evaluate(cand)
    assert a.achieved == b.achieved and a.named["kl"] > 0
    assert all(abs(a.named[k] - b.named[k]) <= 1e-5 * max(abs(a.named[k]), 1e-12) for k in a.named), (a.named, b.named)
