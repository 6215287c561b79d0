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


def test_prune_cli_runs_sparsegpt_sequentially(tmp_path, capsys, tiny_dirs):
    code, out, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "sparsegpt", "--sparsity", "0.5",
                              "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "64",
                              "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "sparsegpt", "--mode", "one_shot",
                            "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "32", "--quiet"], capsys)
    assert code == 2 and "use mode sequential" in err and "Traceback" not in err
