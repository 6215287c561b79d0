"""OptiShear's meta metric: Wanda is a member, every point is finite, configs and the CLI take it."""

import itertools

import pytest
import torch

from prunesearch.errors import UserError
from prunesearch.pruning import metrics
from prunesearch.pruning.masks import prune_mask
from prunesearch.pruning.meta_metric import COEFFICIENTS, TRANSFORMS
from prunesearch.pruning.stats import ColumnStats


def stats_of(x):
    st = ColumnStats(x.shape[-1], x.device)
    st.update(x)
    return st


def test_meta_at_wandas_point_gives_wandas_masks_exactly():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    st = stats_of(torch.randn(4, 16, 64) * torch.linspace(0.1, 5, 64))
    for s in (0.3, 0.5, 0.7):
        assert torch.equal(prune_mask(metrics.score("meta", W, st), s), prune_mask(metrics.score("wanda", W, st), s))
    explicit = "meta:coef_w=one,op_w=identity,coef_x=one,op_x=identity"
    torch.testing.assert_close(metrics.score(explicit, W, st), metrics.score("wanda", W, st))


def test_ria_like_point_is_relative_importance_times_norm_to_the_half():
    torch.manual_seed(1)
    W = torch.randn(8, 16)
    st = stats_of(torch.randn(2, 8, 16) + 1)
    A = W.abs()
    expected = A / (A.sum(1, keepdim=True) + A.sum(0, keepdim=True)) * st.wanda_norm.sqrt()
    torch.testing.assert_close(metrics.score("meta:coef_w=rowcol,op_x=sqrt", W, st), expected)


def test_all_2401_points_are_finite_even_with_zero_rows_and_columns():
    W = torch.randn(6, 8)
    W[2] = 0
    W[:, 5] = 0
    x = torch.randn(2, 4, 8)
    x[..., 3] = 0
    st = stats_of(x)
    for cw, ow, cx, ox in itertools.product(COEFFICIENTS, TRANSFORMS, COEFFICIENTS, TRANSFORMS):
        s = metrics.score(f"meta:coef_w={cw},op_w={ow},coef_x={cx},op_x={ox}", W, st)
        assert torch.isfinite(s).all(), (cw, ow, cx, ox)


def test_bad_meta_points_are_user_errors():
    st = stats_of(torch.ones(1, 2, 4))
    with pytest.raises(UserError, match="metric 'meta': op_w='cube': input should be 'identity', 'sqrt'"):
        metrics.score("meta:op_w=cube", torch.ones(2, 4), st)
    with pytest.raises(UserError, match="coef_x='median': input should be 'one', 'row'"):
        metrics.score("meta:coef_x=median", torch.ones(2, 4), st)
