"""Every shipped study config validates, as `prunesearch launch` would load it (a broken example
config is the first thing a new user meets)."""

from pathlib import Path

import pytest

from prunesearch.config import StudyConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(StudyConfig, path)
    assert cfg.search.trials >= 1 and cfg.objectives


def test_the_method_configs_select_their_methods():
    by_name = {p.stem: load_config(StudyConfig, p) for p in CONFIGS}
    assert by_name["ace"].pruning.metric == "ace" and by_name["ace"].calibration.seq_len == 128
    assert by_name["sparsegpt"].pruning.metric == "sparsegpt"
    assert by_name["evo"].search.sampler == "evo" and by_name["evo"].space.name == "levels"
    assert [by_name[n].pruning.sparsity for n in ("default-s50", "default-s60", "default")] == [0.5, 0.6, 0.7]
