"""The KL objective reads the dense side from a per-worker cache, never from dense logits.

A KL trial used to run lm_head on the cached dense hidden states again, every trial. Now, with
a linear lm_head, each token's expected output embedding under the dense distribution, its dot
with the bias and its negative entropy are computed once (KL = neg. entropy - h.W^T d - b.d +
logsumexp(pruned logits): exact, hidden-sized); for a soft-capped head, the dense
log-probabilities (all, or the top k with the log of the mass left over: a lower bound).
"""

from __future__ import annotations

from conftest import study_config
from prunesearch.objectives.reconstruction import DenseLogProbs, ExpectedHead, kl_top_k
from prunesearch.spaces import Candidate


def test_every_kl_cache_gives_the_kl_of_the_dense_logits_and_top_k_bounds_it(tmp_path):
    from prunesearch.workers.evaluator import Evaluator

    ev = Evaluator(study_config(tmp_path, objectives=["kl"], search={"pruner": "none"}))
    cache = ev.ref.kl_cache
    n_tokens, hidden = ev.ref.ids.numel(), ev.ref.hidden.shape[-1]
    assert isinstance(cache, ExpectedHead) and cache.embed.shape == (n_tokens, hidden)  # hidden-sized, not vocabulary
    cand = Candidate(ratios=[0.5, 0.8])
    expected = ev.evaluate(cand)
    assert set(expected.named) == {"kl"}  # no Frobenius error computed when it is not asked
    ev.ref.kl_cache = None  # the dense logits recomputed from the hidden states, as before
    recomputed = ev.evaluate(cand).named["kl"]
    assert abs(expected.named["kl"] - recomputed) <= 1e-5 * recomputed
    ev.ref.prepare_kl(ev.model, None)  # every log-probability (what a soft-capped head keeps)
    assert isinstance(ev.ref.kl_cache, DenseLogProbs) and ev.ref.kl_cache.logp.shape == (n_tokens, 49152)
    assert abs(ev.evaluate(cand).named["kl"] - recomputed) <= 1e-5 * recomputed
    for k, share in ((64, 0.5), (4096, 0.95)):
        ev.ref.prepare_kl(ev.model, k)
        assert ev.ref.kl_cache.logp.shape[1] == k and ev.ref.kl_cache.nbytes == n_tokens * (k * 8 + 4)
        bound = ev.evaluate(cand).named["kl"]
        assert share * recomputed <= bound <= recomputed * (1 + 1e-5), (k, bound, recomputed)


def test_kl_cache_setting():
    assert kl_top_k("auto", n_tokens=8 * 4096, vocab=128256) == "expected"  # a linear head: exact, any size
    assert kl_top_k("auto", n_tokens=2048, vocab=49152, linear_head=False) is None  # soft-capped, 0.4 GB: all
    assert kl_top_k("auto", n_tokens=8 * 4096, vocab=128256, linear_head=False) == 1024  # 16.8 GB: the top 1024
    assert kl_top_k("all", n_tokens=8 * 4096, vocab=128256) is None
    assert kl_top_k(256, n_tokens=10, vocab=49152) == 256 and kl_top_k(10**6, n_tokens=10, vocab=49152) is None
