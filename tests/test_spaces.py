"""Search spaces: every suggested candidate meets the budget; baselines encode back exactly."""

import optuna
import pytest

from prunesearch.errors import UserError
from prunesearch.pruning.budget import weighted_mean
from prunesearch.spaces import ModelLayout, make_space

LAYOUT = ModelLayout(4, (100, 100, 100, 200), (300, 300, 300, 200))


def fixed_trial(params: dict) -> optuna.Trial:
    study = optuna.create_study()
    study.enqueue_trial(params)
    return study.ask()


@pytest.mark.parametrize("split", [False, True])
def test_blockwise_candidates_meet_the_budget_exactly(split):
    space = make_space("blockwise", LAYOUT, 0.7, min_sparsity=0.3, max_sparsity=0.9, split_attn_mlp=split)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        cand = space.suggest(study.ask())
        sizes = LAYOUT.unit_sizes(split)
        assert len(cand.ratios) == len(sizes)
        assert weighted_mean(cand.ratios, sizes) == pytest.approx(0.7, abs=1e-9)
        assert all(0.3 - 1e-12 <= r <= 0.9 + 1e-12 for r in cand.ratios)


def test_blockwise_on_the_nm_grid():
    space = make_space("blockwise", ModelLayout(4, (10,) * 4, (30,) * 4), 0.5, nm_m=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        cand = space.suggest(study.ask())
        assert all(abs(r * 8 - round(r * 8)) < 1e-9 for r in cand.ratios)
        assert sum(cand.ratios) / 4 == pytest.approx(0.5)


def test_baselines_encode_to_params_that_suggest_them_back():
    space = make_space("blockwise", LAYOUT, 0.6, min_sparsity=0.2, max_sparsity=0.9, kv_bits=[16, 8, 4])
    owl = [0.5, 0.6, 0.65, 0.65]
    assert weighted_mean(owl, LAYOUT.unit_sizes(False)) == pytest.approx(0.6)
    resolve = {"uniform": lambda: [0.6] * 4, "owl": lambda: owl}
    for name in ("uniform", "owl"):
        params = space.encode({"name": name, "params": {}}, None, lambda alloc: resolve[alloc["name"]]())
        cand = space.suggest(fixed_trial(params))
        assert cand.ratios == pytest.approx(resolve[name]())
        assert cand.kv_bits == [16] * 4  # baselines keep the cache in 16 bits


def test_owl_space_suggests_an_allocation_and_encodes_uniform_as_lambda_zero():
    space = make_space("owl", LAYOUT, 0.7)
    cand = space.suggest(fixed_trial(space.encode({"name": "owl", "params": {}}, None, None)))
    assert cand.allocation == {"name": "owl", "params": {"M": 5.0, "lam": 0.08}}
    assert space.encode({"name": "uniform"}, None, None)["lam"] == 0.0


def test_impossible_budget_and_bad_space_parameters_are_user_errors():
    with pytest.raises(UserError, match="impossible budget"):
        make_space("blockwise", LAYOUT, 0.95, max_sparsity=0.9)
    with pytest.raises(UserError, match="unknown search space"):
        make_space("grid", LAYOUT, 0.5)
    with pytest.raises(UserError, match="search space 'owl'"):
        make_space("owl", LAYOUT, 0.5, colour=1)
