"""SparseGPT: OBS updates beat masking alone on the layer's own reconstruction, exact sparsity
and N:M patterns, and it runs end to end through `prunesearch prune` (sequential only)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from prunesearch.pruning import metrics
from prunesearch.pruning.masks import NM, prune_mask
from prunesearch.pruning.sparsegpt import sparsegpt_prune
from prunesearch.pruning.stats import ColumnStats


def layer_and_inputs(d_out=48, d_in=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5  # correlated inputs: where OBS updates pay
    scale = torch.linspace(0.2, 3, d_in)[torch.randperm(d_in, generator=g)]  # outlier columns anywhere, as in LLMs
    X = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + mix) * scale
    st = ColumnStats(d_in, torch.device("cpu"), want_xtx=True)
    st.update(X.unsqueeze(0))
    return W, X, st


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
def test_obs_updates_beat_masking_alone(nm):
    W, X, st = layer_and_inputs()
    wanda = W.clone().masked_fill_(prune_mask(metrics.score("wanda", W, st), 0.5, "row", nm), 0)
    obs = W.clone()
    mask = sparsegpt_prune(obs, st.xtx, 0.5, nm, blocksize=64)
    err = lambda V: ((V - W) @ X.t()).norm().item()  # noqa: E731
    assert err(obs) < 0.9 * err(wanda)  # measured: 0.86 (unstructured), 0.84 (2:4)
    assert torch.equal(obs == 0, mask) and mask.float().mean().item() == pytest.approx(0.5, abs=1e-3)
    if nm is not None:
        assert (mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()  # exactly 2 of every 4


def test_prune_cli_runs_sparsegpt(tmp_path, capsys, tiny_dirs):
    code, out, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "sparsegpt", "--sparsity", "0.5",
                              "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "64",
                              "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "sparsegpt", "--bias-compensation",
                            "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--quiet"], capsys)
    assert code == 2 and "SparseGPT's own updates" in err and "Traceback" not in err


def test_a_study_worker_runs_sparsegpt_per_trial_as_prune_does(monkeypatch):
    """The slow path: each trial re-solves from the dense weights with the cached Hessian
    factors; its weights equal a one-shot `prune` with the same per-block ratios."""
    from prunesearch.config import StudyConfig
    from prunesearch.models import load_model, prunable_linears
    from prunesearch.data.texts import load_texts
    from prunesearch.pruning.engine import PruneSpec, prune_model
    from prunesearch.spaces import Candidate
    from prunesearch.workers import evaluator as evaluator_module
    from prunesearch.workers.evaluator import Evaluator

    cfg = StudyConfig.model_validate({
        "model": {"name": "default", "max_layers": 2, "device": "cpu"},
        "calibration": {"source": "lee", "samples": 4, "seq_len": 64, "batch_size": 2},
        "pruning": {"metric": "sparsegpt", "sparsity": 0.6}, "reconstruction_samples": 4, "objectives": ["frobenius"],
    })
    ev = Evaluator(cfg)
    low = ev.evaluate(Candidate(ratios=[0.6, 0.6]))
    res = ev.evaluate(Candidate(ratios=[0.5, 0.7]))  # a second trial starts from the dense weights again
    assert res.achieved == pytest.approx(0.6, abs=0.01) and res.values != low.values
    solved = {l.name: l.weight.clone() for l in ev.linears}

    lm = load_model("default", device="cpu", max_layers=2)
    calib, _ = load_texts(lm.tokenizer, cfg.calibration, None)
    prune_model(lm.model, calib, PruneSpec(metric="sparsegpt", sparsity=0.6, mode="one_shot", batch_size=2,
                                           allocation={"name": "explicit", "params": {"sparsities": [0.5, 0.7]}}))
    for lin in prunable_linears(lm.model):
        torch.testing.assert_close(lin.weight, solved[lin.name], rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(evaluator_module, "collect_stats", lambda *a, **k: pytest.fail("calibration ran again"))
    again = Evaluator(cfg)  # X^T X comes back from the dense cache
    assert again.evaluate(Candidate(ratios=[0.5, 0.7])).values == pytest.approx(res.values, rel=1e-5)


def test_layers_reading_one_input_share_one_hessian_factor():
    """q/k/v (and gate/up) see the same input, so their X^T X are equal: one factor serves them,
    and the masks are those of separate factors."""
    from prunesearch.models import load_model, prunable_linears
    from prunesearch.pruning.engine import collect_stats
    from prunesearch.pruning.fastmask import FastMasker
    from prunesearch.pruning.sparsegpt import HessianFactor, sparsegpt_prune

    lm = load_model("default", device="cpu", max_layers=1)
    linears = prunable_linears(lm.model)
    stats = collect_stats(lm.model, linears, torch.randint(0, 1000, (4, 32)), 2, xtx=True)
    masker = FastMasker(linears, stats, "sparsegpt")
    masker.apply({l.name: 0.5 for l in linears})
    by_name = {l.name.rsplit(".", 1)[-1]: masker.factors[l.name] for l in linears}
    assert by_name["q_proj"] is by_name["k_proj"] is by_name["v_proj"]
    assert by_name["gate_proj"] is by_name["up_proj"]
    assert len({id(f) for f in masker.factors.values()}) == 4  # qkv, o, gate/up, down
    for lin in linears:  # the shared factor gives exactly what a layer's own would
        W = masker.dense[lin.name].clone()
        sparsegpt_prune(W, HessianFactor(stats[lin.name].xtx), 0.5)
        torch.testing.assert_close(lin.weight, W, rtol=0, atol=0)
