"""Metrics, statistics, masks and budgets, checked against their formulas (docs/methods.md)."""

import pytest
import torch

from prunesearch.errors import UserError
from prunesearch.pruning import metrics
from prunesearch.pruning.budget import project_to_budget, round_to_grid, weighted_mean
from prunesearch.pruning.masks import NM, parse_structure, prune_mask
from prunesearch.pruning.stats import ColumnStats
from prunesearch.registry import parse_spec


def stats_of(x: torch.Tensor, chunks: int = 3) -> ColumnStats:
    st = ColumnStats(x.shape[-1], x.device)
    for part in x.chunk(chunks):
        st.update(part)
    return st


def test_streaming_stats_match_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(6, 50, 16) * 3 + torch.linspace(-2, 2, 16)
    st = stats_of(x)
    flat = x.reshape(-1, 16).double()
    assert st.n_tokens == 300 and st.n_seqs == 6
    torch.testing.assert_close(st.mean, flat.mean(0))
    torch.testing.assert_close(st.var, flat.var(0).float())
    torch.testing.assert_close(st.sumsq, flat.square().sum(0))
    # Wanda's scaler_row: mean over samples of sum over tokens of X_j^2
    torch.testing.assert_close(st.wanda_norm, (flat.square().sum(0) / 6).sqrt().float())


def test_metric_formulas():
    torch.manual_seed(1)
    W = torch.randn(8, 16)
    x = torch.randn(4, 10, 16) + 1
    st = stats_of(x)
    torch.testing.assert_close(metrics.score("magnitude", W, None), W.abs())
    torch.testing.assert_close(metrics.score("wanda", W, st), W.abs() * st.wanda_norm)
    stade = metrics.score("stade", W, st)
    # ranks like W^2 Var(X): identical order within every row
    assert torch.equal(stade.argsort(1), (W.square() * st.var).argsort(1))
    A = W.abs()
    ria = (A / A.sum(0) + A / A.sum(1, keepdim=True)) * st.wanda_norm.pow(0.5)
    torch.testing.assert_close(metrics.score("ria", W, st), ria)
    torch.testing.assert_close(metrics.score("ria:a=1", W, st), (A / A.sum(0) + A / A.sum(1, keepdim=True)) * st.wanda_norm)


def test_ria_is_safe_on_all_zero_rows_and_columns():
    W = torch.zeros(4, 6)
    W[1, 2] = 1.0
    st = stats_of(torch.ones(2, 3, 6))
    assert torch.isfinite(metrics.score("ria", W, st)).all()


def test_unknown_metric_and_parameter_are_user_errors():
    with pytest.raises(UserError, match="unknown metric 'foo'.*magnitude"):
        metrics.score("foo", torch.ones(2, 2), None)
    with pytest.raises(UserError, match="has no parameter b"):
        metrics.score("ria:b=2", torch.ones(2, 2), None)
    assert parse_spec("owl:M=7,lam=0.1,metric=wanda") == ("owl", {"M": 7, "lam": 0.1, "metric": "wanda"})


def test_row_mask_prunes_floor_s_din_per_row_and_breaks_ties_by_column():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = prune_mask(scores, 0.5, "row")  # floor(2.5) = 2 per row
    assert mask.sum(1).tolist() == [2, 2]
    assert mask[0].tolist() == [False, True, True, False, False]  # ties: lower column first
    assert mask[1].tolist() == [False, False, False, True, True]


def test_layer_mask_compares_the_whole_layer():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.1]])
    mask = prune_mask(scores, 0.5, "layer")
    assert mask.sum() == 3
    assert mask.tolist() == [[True, False], [False, False], [True, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_prunes_n_of_every_m(n, m):
    torch.manual_seed(2)
    scores = torch.rand(6, 32)
    mask = prune_mask(scores, n / m, nm=NM(n, m))
    blocks = mask.reshape(6, 32 // m, m)
    assert (blocks.sum(-1) == n).all()
    # the pruned ones are the lowest of their block
    s = scores.reshape(6, 32 // m, m)
    assert (s.masked_fill(~blocks, -1).amax(-1) <= s.masked_fill(blocks, 2).amin(-1)).all()


def test_nm_that_does_not_fit_is_a_clear_error():
    with pytest.raises(UserError, match="does not fit a layer with 30 input columns"):
        prune_mask(torch.rand(2, 30), 0.5, nm=NM(2, 4))
    with pytest.raises(UserError, match="0 < N < M"):
        parse_structure("4:4")
    with pytest.raises(UserError, match="N:M such as 2:4"):
        parse_structure("two:four")
    assert parse_structure("unstructured") is None


def test_project_to_budget_is_exact_under_clamping():
    ratios = [0.2, 0.9, 0.95, 0.5, 0.99]
    sizes = [10, 20, 10, 30, 5]
    out = project_to_budget(ratios, sizes, 0.7, lo=0.0, hi=0.9)
    assert weighted_mean(out, sizes) == pytest.approx(0.7, abs=1e-9)
    assert all(0.0 <= r <= 0.9 for r in out)
    # a constant shift (then clamping) keeps the order of the ratios
    assert out[0] < out[3] < out[1] <= out[2] <= out[4]
    with pytest.raises(UserError):
        project_to_budget([0.5], [1], 0.97, hi=0.95)


def test_round_to_grid_keeps_the_total():
    out = round_to_grid([0.45, 0.55, 0.62, 0.38], [1, 1, 1, 1], 0.5, 8)
    assert all(abs(r * 8 - round(r * 8)) < 1e-9 for r in out)
    assert sum(out) / 4 == pytest.approx(0.5)


# ---------------------------------------------------------------- the budget to the weight
def test_exact_counts_meet_round_s_n_and_stay_near_each_ratio():
    from prunesearch.pruning.budget import exact_counts

    sizes = [331776, 110592, 110592, 331776, 884736, 884736, 884736] * 3
    for S in (0.5, 0.6, 0.7, 0.123456, 0.95):
        counts = exact_counts([S] * len(sizes), sizes)
        assert sum(counts) == round(S * sum(sizes))
        assert all(int(S * n) <= c <= int(S * n) + 1 for c, n in zip(counts, sizes))
    ratios = project_to_budget([0.1 * (i % 9) for i in range(len(sizes))], sizes, 0.7, hi=0.95)
    counts = exact_counts(ratios, sizes)
    assert sum(counts) == round(0.7 * sum(sizes))
    assert all(abs(c - r * n) < 1 for c, r, n in zip(counts, ratios, sizes))
    assert exact_counts([0.5, 0.5, 0.5], [3, 3, 3]) == [2, 1, 1]  # round(4.5) = 4 (half to even); ties: earliest first


@pytest.mark.parametrize("group", ["row", "layer"])
def test_count_masks_prune_exactly_count_and_equal_their_rank_form(group):
    from prunesearch.pruning.masks import count_mask, extra_rows, rank_mask, score_ranks

    torch.manual_seed(0)
    scores = torch.randint(0, 5, (12, 40)).float()  # many ties
    ranks = score_ranks(scores, group)
    for count in (0, 1, 7, 40, 203, 479, 480):
        mask = count_mask(scores, count, group)
        assert int(mask.sum()) == count
        assert torch.equal(mask, rank_mask(ranks, count, group))
        if group == "row":  # count // d_out per row, one more in count % d_out evenly spaced rows
            k, e = divmod(count, 12)
            assert mask.sum(1).tolist() == (k + extra_rows(12, e)).tolist()
    assert extra_rows(12, 5).tolist() == [0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert torch.equal(count_mask(scores, 12 * 20, "row"), prune_mask(scores, 0.5, "row"))


def test_rank_masks_fit_the_small_rank_type_at_its_limit():
    from prunesearch.pruning.masks import rank_mask, score_ranks

    scores = torch.rand(3, 32768)
    ranks = score_ranks(scores)
    assert ranks.dtype == torch.int16
    assert int(rank_mask(ranks, 3 * 32768 - 1).sum()) == 3 * 32768 - 1


def test_sparsegpt_prunes_exactly_its_count():
    from prunesearch.pruning.sparsegpt import sparsegpt_prune

    torch.manual_seed(0)
    X = torch.randn(256, 300)
    W = torch.randn(10, 300)
    mask = sparsegpt_prune(W, X.T @ X, 0.7, count=2101, blocksize=128)
    assert int(mask.sum()) == 2101 == int((W == 0).sum())
