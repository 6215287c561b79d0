"""The KL objective reads the dense side's log-probabilities from a per-worker cache.

A KL trial used to run lm_head on the cached dense hidden states again, every trial; now the
dense next-token log-probabilities are computed once (all of them, or the top k of each
position plus the leftover mass) and a trial pays the pruned side's lm_head only.
"""

from __future__ import annotations

from conftest import study_config
from prunesearch.objectives.reconstruction import kl_top_k
from prunesearch.spaces import Candidate


def test_cached_dense_log_probs_give_the_kl_of_the_dense_logits_and_top_k_bounds_it(tmp_path):
    from prunesearch.workers.evaluator import Evaluator

    ev = Evaluator(study_config(tmp_path, objectives=["kl"], search={"pruner": "none"}))
    cache = ev.ref.kl_cache
    assert cache is not None and cache.index is None and cache.logp.shape == (ev.ref.ids.numel(), 49152)
    cand = Candidate(ratios=[0.5, 0.8])
    cached = ev.evaluate(cand)
    assert set(cached.named) == {"kl"}  # no Frobenius error computed when it is not asked
    ev.ref.kl_cache = None  # the dense logits recomputed from the hidden states, as before
    recomputed = ev.evaluate(cand).named["kl"]
    assert abs(cached.named["kl"] - recomputed) <= 1e-5 * recomputed
    for k, share in ((64, 0.5), (4096, 0.95)):
        ev.ref.prepare_kl(ev.model, k)
        assert ev.ref.kl_cache.logp.shape[1] == k and ev.ref.kl_cache.nbytes == ev.ref.ids.numel() * (k * 8 + 4)
        bound = ev.evaluate(cand).named["kl"]
        assert share * recomputed <= bound <= recomputed * (1 + 1e-5), (k, bound, recomputed)


def test_kl_cache_setting_keeps_all_when_it_fits():
    assert kl_top_k("auto", n_tokens=2048, vocab=49152) is None  # 0.4 GB: all of them
    assert kl_top_k("auto", n_tokens=8 * 4096, vocab=128256) == 1024  # 16.8 GB: the top 1024
    assert kl_top_k("all", n_tokens=8 * 4096, vocab=128256) is None
    assert kl_top_k(256, n_tokens=10, vocab=49152) == 256 and kl_top_k(10**6, n_tokens=10, vocab=49152) is None
