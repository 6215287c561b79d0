"""ACE's metrics (VarP, CosP, both): the statistics equal a direct computation, the limits of
VarP are Wanda and STADE, and each runs as a user runs it: `prunesearch prune` and a study."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from prunesearch.config import StudyConfig
from prunesearch.models.families import PrunableLinear
from prunesearch.pruning import metrics
from prunesearch.pruning.masks import prune_mask
from prunesearch.pruning.stats import ColumnStats, StatsCollector
from prunesearch.spaces import Candidate
from prunesearch.workers import evaluator as evaluator_module
from prunesearch.workers.evaluator import Evaluator


def hooked_layer_stats(d_in=24, d_out=10, seed=0):
    """Statistics of a real nn.Linear gathered by the forward hooks, over three batches, and the
    inputs and outputs it saw."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
        layer.bias.copy_(torch.randn(d_out, generator=g))
    lin = PrunableLinear("l", 0, "mlp", layer)
    xs = [torch.randn(2, 5, d_in, generator=g) * torch.linspace(0.1, 3, d_in) + torch.linspace(-1, 1, d_in) for _ in range(3)]
    with StatsCollector([lin], want_cos=True, want_cos2=True) as col, torch.no_grad():
        outs = [layer(x) for x in xs]
    return col.stats["l"], torch.cat(xs).reshape(-1, d_in), torch.cat(outs).reshape(-1, d_out), layer.weight.detach()


def test_cosine_statistic_and_variance_share_equal_a_direct_computation():
    st, X, A, _ = hooked_layer_stats()
    direct = torch.einsum("ti,tj->ij", A.abs() / A.square().sum(1, keepdim=True), X.abs()) / X.shape[0]
    torch.testing.assert_close(st.cos_loss, direct, rtol=1e-5, atol=1e-7)
    share = X.var(0, unbiased=False) / X.square().mean(0)
    torch.testing.assert_close(st.var_share, share, rtol=1e-5, atol=1e-7)


def test_second_order_statistic_predicts_the_true_cosine_loss():
    """cosp2's statistic is what 1 - cos really is for a small removal (cosp's first-order
    expression is not: 1 - cos has no first-order term)."""
    st, X, A, _ = hooked_layer_stats()
    X, A = X.double(), A.double()
    eps = 1e-3
    for i, j in [(0, 0), (3, 7), (9, 23)]:
        moved = A.clone()
        moved[:, i] -= eps * X[:, j]
        true = (1 - torch.nn.functional.cosine_similarity(A, moved, dim=1)).mean().item()
        assert true == pytest.approx(0.5 * eps**2 * st.cos_loss2[i, j].item(), rel=1e-2)


def test_metric_formulas_and_varp_limits():
    st, X, A, W = hooked_layer_stats()
    wanda = metrics.score("wanda", W, st)
    torch.testing.assert_close(metrics.score("varp:beta=0", W, st), wanda)
    torch.testing.assert_close(metrics.score("varp", W, st), wanda * st.var_share.pow(0.25))
    cos = wanda * W.abs() * st.cos_loss
    torch.testing.assert_close(metrics.score("cosp", W, st), cos)
    torch.testing.assert_close(metrics.score("ace:beta=0.5", W, st), cos * st.var_share.sqrt())
    torch.testing.assert_close(metrics.score("cosp2", W, st), wanda * 0.5 * W.square() * st.cos_loss2)
    # beta = 1/2 is STADE's ranking: |W| ||X|| sqrt(Var/E[X^2]) = |W| std * sqrt(n): same masks
    assert torch.equal(prune_mask(metrics.score("varp:beta=0.5", W, st), 0.5, "row"),
                       prune_mask(metrics.score("stade", W, st), 0.5, "row"))
    # CosP is not Wanda in disguise: the output-direction term reorders weights within rows
    assert not torch.equal(prune_mask(cos, 0.5, "row"), prune_mask(wanda, 0.5, "row"))


def test_cosp_without_its_statistic_is_a_clear_error():
    st = ColumnStats(4, torch.device("cpu"))
    st.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="cosine statistic"):
        metrics.score("cosp", torch.randn(2, 4), st)
    assert metrics.stats_extras("ace") == {"want_xtx": False, "want_cos": True, "want_cos2": False}
    assert metrics.stats_extras("cosp2") == {"want_xtx": False, "want_cos": False, "want_cos2": True}
    assert not any(metrics.stats_extras("varp").values())


@pytest.mark.parametrize("metric,mode,structure", [("varp", "one_shot", "unstructured"), ("cosp", "sequential", "unstructured"),
                                                   ("ace:beta=0.5", "one_shot", "2:4"), ("cosp2", "sequential", "unstructured")])
def test_prune_cli_runs_each_ace_metric(tmp_path, capsys, tiny_dirs, metric, mode, structure):
    sparsity = "0.5" if structure == "2:4" else "0.6"
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", metric, "--sparsity", sparsity, "--mode", mode,
                            "--structure", structure, "--calibration", "lee", "--calibration-samples", "4", "--seq-len", "64",
                            "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "64", "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(float(sparsity), abs=0.01)
    assert report["config"]["pruning"]["metric"] == metric


@pytest.mark.parametrize("metric", ["ace", "cosp2"])
def test_a_study_worker_scores_with_cosp_and_caches_its_statistic(monkeypatch, metric):
    cfg = StudyConfig.model_validate({
        "model": {"name": "default", "max_layers": 2, "device": "cpu"},
        "calibration": {"source": "lee", "samples": 4, "seq_len": 32, "batch_size": 2},
        "pruning": {"metric": metric, "sparsity": 0.6}, "reconstruction_samples": 4, "objectives": ["frobenius"],
    })
    ev = Evaluator(cfg)
    assert all((st.cos if metric == "ace" else st.cos2) is not None for st in ev.stats.values())
    first = ev.evaluate(Candidate(ratios=[0.5, 0.7]))
    masks = {l.name: l.weight == 0 for l in ev.linears}

    monkeypatch.setattr(evaluator_module, "collect_stats", lambda *a, **k: pytest.fail("calibration ran again"))
    again = Evaluator(cfg)  # from the dense cache, cosine statistic included
    second = again.evaluate(Candidate(ratios=[0.5, 0.7]))
    assert second.values == pytest.approx(first.values)
    assert all(torch.equal(l.weight == 0, masks[l.name]) for l in again.linears)


def test_an_allocation_scoring_with_cosp_gets_its_statistic(tmp_path, capsys, tiny_dirs):
    """OWL may score with another metric than the one that prunes: its statistics come too."""
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "wanda", "--allocation", "owl:metric=cosp",
                            "--sparsity", "0.6", "--calibration", "lee", "--calibration-samples", "4", "--seq-len", "64",
                            "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
