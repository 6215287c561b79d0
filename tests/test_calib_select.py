"""Calibration selection by data pruning: k-means, difficulty scores, hard/easy/random picks on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from prunesearch.data.select import (MODES, _update, default_clusters, difficulty, embed_sequences, kmeans,
                                     select_calibration, select_indices)
from prunesearch.errors import UserError
from prunesearch.models.forward import final_hidden
from prunesearch.models.loading import load_model

CENTRES = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0], [0.0, 20.0, 0.0, 0.0], [0.0, 0.0, 20.0, 20.0]])


def blobs(per: int = 25, spread: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs around CENTRES, shuffled: (points, true blob labels)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CENTRES)).repeat_interleave(per)
    X = CENTRES[labels] + spread * torch.randn(len(labels), CENTRES.shape[1], generator=gen)
    order = torch.randperm(len(labels), generator=gen)
    return X[order], labels[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings split the points identically (equal up to renaming the labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def tiny_llama(tiny_dirs):
    return load_model(tiny_dirs["llama"], device="cpu").model


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_blobs(seed):
    X, labels = blobs(seed=seed)
    C, assign = kmeans(X, len(CENTRES), seed=seed)
    assert C.shape == CENTRES.shape and assign.shape == labels.shape
    assert same_partition(assign, labels)
    for j in range(len(CENTRES)):  # each centroid is the mean of its cluster, close to a true centre
        assert torch.allclose(C[j], X[assign == j].mean(0), atol=1e-5)
        assert torch.cdist(C[j : j + 1], CENTRES).min() < 0.5


def test_kmeans_is_deterministic_for_a_seed():
    X = torch.randn(60, 5, generator=torch.Generator().manual_seed(7))  # no structure: the seed matters
    C1, a1 = kmeans(X, 6, seed=3)
    C2, a2 = kmeans(X, 6, seed=3)
    assert torch.equal(C1, C2) and torch.equal(a1, a2)
    others = [kmeans(X, 6, seed=s)[0] for s in range(4, 8)]
    assert any(not torch.equal(C1, C) for C in others)


def test_kmeans_handles_duplicates_and_bad_k():
    X = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    C, assign = kmeans(X, 4, seed=0)  # more clusters than distinct points
    assert torch.isfinite(C).all() and assign.min() >= 0 and assign.max() < 4
    assert torch.equal(C[assign], X)  # every point sits on its centroid
    with pytest.raises(ValueError):
        kmeans(X, 6)
    with pytest.raises(ValueError):
        kmeans(X, 0)


def test_empty_cluster_is_reseeded_at_the_farthest_point():
    X = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assign = torch.tensor([0, 0, 0, 0])  # cluster 1 empty
    best = (X.squeeze(1) - 3.25).square()  # squared distances to the old centroid: 10 is farthest
    C = _update(X, assign, best, 2)
    assert C[0].item() == pytest.approx(3.25) and C[1].item() == 10.0


# ---------------------------------------------------------------- difficulty and selection


def test_difficulty_ranks_outliers_above_blob_centres():
    X, _ = blobs(per=100)  # large blobs: a few outliers barely move the centroids
    centres_pts = CENTRES.clone()
    outliers = torch.tensor([[10.0, 10.0, 10.0, 10.0], [-8.0, 0.0, 9.0, 0.0], [10.0, 10.0, 0.0, 0.0]])
    scores = difficulty(torch.cat([X, centres_pts, outliers]), len(CENTRES), seed=0)
    assert scores.shape == (len(X) + len(CENTRES) + len(outliers),)
    assert (scores >= 0).all()
    at_centres, far = scores[len(X) : len(X) + len(CENTRES)], scores[-len(outliers) :]
    assert at_centres.max() < 0.5 and far.min() > 5.0


def test_select_indices_modes():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.9, 4.0, 0.2])
    assert select_indices(scores, 3, "hard").tolist() == [1, 3, 5]
    assert select_indices(scores, 3, "easy").tolist() == [0, 2, 6]
    r = select_indices(None, 4, "random", seed=5, pool=7)
    assert r.tolist() == sorted(set(r.tolist())) and len(r) == 4 and 0 <= r.min() and r.max() < 7
    assert torch.equal(r, select_indices(None, 4, "random", seed=5, pool=7))
    assert torch.equal(r, select_indices(scores, 4, "random", seed=5))  # scores are ignored for random
    draws = {tuple(select_indices(None, 10, "random", seed=s, pool=100).tolist()) for s in range(5)}
    assert len(draws) == 5
    assert select_indices(scores, 7, "hard").tolist() == list(range(7))


def test_default_clusters():
    assert default_clusters(3) == 2 and default_clusters(24) == 5 and default_clusters(100) == 10
    assert default_clusters(4) == 2 and all(2 <= default_clusters(p) < p for p in range(3, 200))


# ---------------------------------------------------------------- on a real (tiny) model


def test_embed_sequences(tiny_llama, lee_ids):
    E = embed_sequences(tiny_llama, lee_ids, batch_size=8)
    assert E.shape == (lee_ids.shape[0], 64) and E.dtype == torch.float32 and E.device.type == "cpu"
    assert torch.allclose(E, embed_sequences(tiny_llama, lee_ids, batch_size=5), atol=1e-5)
    assert torch.allclose(E[3], final_hidden(tiny_llama, lee_ids[3:4])[0].mean(0), atol=1e-5)
    assert torch.cdist(E, E).triu(1)[torch.ones(24, 24).triu(1).bool()].min() > 0  # distinct texts, distinct embeddings


def test_select_calibration_hard_easy(tiny_llama, lee_ids):
    hard, h_info = select_calibration(tiny_llama, lee_ids, 8, "hard", seed=0)
    easy, e_info = select_calibration(tiny_llama, lee_ids, 8, "easy", seed=0)
    for chosen, info in ((hard, h_info), (easy, e_info)):
        assert chosen.shape == (8, lee_ids.shape[1])
        assert info["pool"] == 24 and info["n_clusters"] == 5 and info["seconds"] >= 0
        assert info["indices"] == sorted(set(info["indices"])) and len(info["distances"]) == 8
        assert torch.equal(chosen, lee_ids[info["indices"]])
        assert all(any(torch.equal(row, p) for p in lee_ids) for row in chosen)
    assert set(h_info["indices"]).isdisjoint(e_info["indices"])  # 8 + 8 <= 24: hardest and easiest never overlap
    assert min(h_info["distances"]) >= max(e_info["distances"])
    assert sum(h_info["distances"]) / 8 > sum(e_info["distances"]) / 8
    scores = difficulty(embed_sequences(tiny_llama, lee_ids), 5, seed=0)  # the distances are the real scores
    assert torch.allclose(torch.tensor(h_info["distances"]), scores[h_info["indices"]], atol=1e-5)
    _, again_info = select_calibration(tiny_llama, lee_ids, 8, "hard", seed=0, batch_size=3)
    assert again_info["indices"] == h_info["indices"]
    _, k3 = select_calibration(tiny_llama, lee_ids, 8, "hard", n_clusters=3)
    assert k3["n_clusters"] == 3


def test_select_calibration_random_needs_no_model(lee_ids):
    chosen, info = select_calibration(None, lee_ids, 6, "random", seed=1)
    assert chosen.shape == (6, lee_ids.shape[1]) and torch.equal(chosen, lee_ids[info["indices"]])
    assert info["distances"] is None and info["n_clusters"] is None and info["mode"] == "random"
    assert info["indices"] == select_calibration(None, lee_ids, 6, "random", seed=1)[1]["indices"]
    assert info["indices"] != select_calibration(None, lee_ids, 6, "random", seed=2)[1]["indices"]
    tiny_pool, _ = select_calibration(None, lee_ids[:2], 2, "random")  # too small for k-means, fine for random
    assert torch.equal(tiny_pool, lee_ids[:2])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("call, message", [
    (lambda ids: select_calibration(None, ids, 4, "hardest"), "choose one of hard, easy, random"),
    (lambda ids: select_calibration(None, ids, 0, "random"), "at least 1 sequence"),
    (lambda ids: select_calibration(None, ids, 25, "random"), "from a pool of 24"),
    (lambda ids: select_calibration(None, ids[:2], 1, "hard"), "needs at least 3 sequences"),
    (lambda ids: select_calibration(None, ids[:2], 1, "easy"), "needs at least 3 sequences"),
    (lambda ids: select_calibration(None, ids, 4, "hard", n_clusters=24), "n_clusters must be between"),
    (lambda ids: select_indices(torch.ones(3), 2, "middle"), "unknown calibration selection mode"),
])
def test_user_errors(lee_ids, call, message):
    with pytest.raises(UserError, match=message) as exc:
        call(lee_ids)
    assert "\n" not in str(exc.value)


def test_modes_constant():
    assert MODES == ("hard", "easy", "random")


def test_prune_cli_selects_hard_calibration_sequences(tmp_path, capsys, tiny_dirs):
    import json

    from conftest import run_cli

    code, out, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "wanda", "--sparsity", "0.5",
                              "--calibration", "lee", "--calibration-samples", "6", "--seq-len", "32",
                              "--calibration-select", "hard", "--eval", "none", "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    sel = json.loads((tmp_path / "p" / "prune_report.json").read_text())["calibration"]["selection"]
    assert sel["mode"] == "hard" and sel["pool"] == 24 and len(sel["indices"]) == 6
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--calibration-select", "hardest", "--quiet"], capsys)
    assert code == 2 and "--calibration-select 'hardest'" in err and "Traceback" not in err
