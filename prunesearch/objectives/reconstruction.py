"""Model-wise reconstruction error of a pruned model against its dense original.

The dense side is fixed for a study, so it is computed once: the hidden states H_d that enter
lm_head on the calibration prompts. With logits = H W^T (+ b), the squared Frobenius error over
all tokens is sum((H_p - H_d) G (H_p - H_d)^T) with G = W^T W: exact, and it never pays for the
(vocab x hidden) lm_head per trial. The bias cancels in the difference. Soft-capped logits
(Gemma-2) break the identity; there the logits are computed as they are.

The KL needs the dense next-token distributions: they are computed once per worker from the
cached hidden states (``DenseReference.prepare_kl``: every log-probability, or the top k of each
position plus the mass left over), so a KL trial pays the lm_head of the pruned side only.
How the decoder runs is the caller's (``hidden``): the whole model in memory by default, block
by block from host memory for a model past one device (workers/streaming.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from prunesearch.models.forward import batches, final_hidden
from prunesearch.objectives.lm import TOKEN_CHUNK, logits_from_hidden


@dataclass
class DenseReference:
    ids: torch.Tensor  # (n, seq_len) the prompts
    hidden: torch.Tensor  # (n, seq_len, hidden) dense hidden states entering lm_head, float32
    gram: torch.Tensor  # (hidden, hidden) W^T W of lm_head, float64
    batch_size: int
    kl_cache: "DenseLogProbs | ExpectedHead | None" = field(default=None, repr=False)  # this worker's, never on disk

    @torch.no_grad()
    def prepare_kl(self, model: nn.Module, top_k: int | None | str) -> "DenseLogProbs | ExpectedHead":
        """What a trial's KL needs of the dense side, once. ``"expected"`` (a linear lm_head): per
        token, the dense distribution's expected output embedding, its dot with the bias and its
        negative entropy (exact, hidden-sized: see ExpectedHead). Otherwise the dense next-token
        log-probabilities: all of them (``top_k`` None) or the top k of each token."""
        if top_k == "expected":
            self.kl_cache = ExpectedHead.of(model, self.hidden.reshape(-1, self.hidden.shape[-1]))
            return self.kl_cache
        rows = self.hidden.reshape(-1, self.hidden.shape[-1])
        head = model.get_output_embeddings().weight
        n, vocab = rows.shape[0], head.shape[0]
        k = top_k if top_k is not None and top_k < vocab else None
        # filled in place, chunk by chunk: a list of chunks and a cat would hold the cache twice at once
        logp_all = torch.empty(n, k or vocab, dtype=torch.float32)
        index = torch.empty(n, k, dtype=torch.int32) if k else None
        rest = torch.empty(n, dtype=torch.float32) if k else None
        for c in range(0, n, TOKEN_CHUNK):
            logits = logits_from_hidden(model, rows[c : c + TOKEN_CHUNK].to(head.device))
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            if k:
                vals, where = logp.topk(k, dim=-1)
                logp_all[c : c + len(vals)], index[c : c + len(vals)] = vals.cpu(), where.to(torch.int32).cpu()
                rest[c : c + len(vals)] = logp.scatter(-1, where, float("-inf")).logsumexp(-1).cpu()  # log of the mass left
            else:
                logp_all[c : c + len(logp)] = logp.cpu()
        self.kl_cache = DenseLogProbs(logp_all, index, rest)
        return self.kl_cache

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> "DenseReference":
        hidden = torch.cat([final_hidden(model, b).float().cpu() for b in batches(ids, batch_size)])
        return cls.of_hidden(model, ids, hidden, batch_size)

    @classmethod
    @torch.no_grad()
    def of_hidden(cls, model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor, batch_size: int) -> "DenseReference":
        """The reference of dense final hidden states computed elsewhere (block by block)."""
        return cls(ids.cpu(), hidden.float().cpu(), gram_of(model.get_output_embeddings().weight), batch_size)

    @cached_property
    def dense_sq_norm(self) -> float:
        """||H_d W^T||_F^2, to make the error relative (bias left out)."""
        h = self.hidden.reshape(-1, self.hidden.shape[-1]).double()
        return ((h @ self.gram) * h).sum().item()


@torch.no_grad()
def gram_of(W: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """W^T W in float64 on the host, summed over row chunks: a float64 copy of a whole lm_head
    (vocab x hidden) would be twice its float32 size at once."""
    G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for r in range(0, W.shape[0], rows):
        chunk = W[r : r + rows].double()
        G.addmm_(chunk.t(), chunk)
    return G.cpu()


@dataclass
class ExpectedHead:
    """The KL against a linear lm_head without the dense logits. With logits z = W h + b,
    KL(d || p) = sum_v d_v log d_v - sum_v d_v z_v + logsumexp(z): the first term is the dense
    negative entropy, the second is h . (W^T d) + b . d. Per token, ``embed`` = W^T d (hidden
    sized), ``bias_dot`` = b . d and ``neg_entropy`` are computed once, so a trial needs its own
    logits' log-sum-exp only: exact, and no vocabulary-sized cache or pass over one."""

    neg_entropy: torch.Tensor  # (tokens,) float64: sum_v d_v log d_v
    embed: torch.Tensor  # (tokens, hidden) float32: W^T d
    bias_dot: torch.Tensor  # (tokens,) float64: b . d (0 without a bias)

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, rows: torch.Tensor) -> "ExpectedHead":
        head = model.get_output_embeddings()
        W, b = head.weight, getattr(head, "bias", None)
        n = rows.shape[0]
        neg, embed, bias_dot = (torch.empty(n, dtype=torch.float64), torch.empty(n, rows.shape[1]),
                                torch.zeros(n, dtype=torch.float64))
        for c in range(0, n, TOKEN_CHUNK):
            logits = logits_from_hidden(model, rows[c : c + TOKEN_CHUNK].to(W.device))
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            d = logp.exp()
            end = c + len(d)
            neg[c:end] = (d * logp).sum(-1, dtype=torch.float64).cpu()
            embed[c:end] = (d @ W.float()).cpu()
            if b is not None:
                bias_dot[c:end] = (d.double() @ b.double()).cpu()
        return cls(neg, embed, bias_dot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.neg_entropy, self.embed, self.bias_dot))

    def kl_sum(self, hidden: torch.Tensor, logits_pruned: torch.Tensor, rows: slice) -> float:
        """sum over ``rows`` of KL(dense || pruned), from the pruned hidden states and logits."""
        dev = logits_pruned.device
        expected = (hidden.double() * self.embed[rows].to(dev, non_blocking=True).double()).sum(-1)
        expected += self.bias_dot[rows].to(dev, non_blocking=True)
        lse = torch.logsumexp(logits_pruned, -1).double()
        return (self.neg_entropy[rows].to(dev, non_blocking=True) - expected + lse).sum().item()


@dataclass
class DenseLogProbs:
    """Dense next-token log-probabilities, one row per prompt token: all of the vocabulary
    (``index`` None) or the top k of each row with their vocabulary ids."""

    logp: torch.Tensor  # (tokens, vocab or k) float32
    index: torch.Tensor | None = None  # (tokens, k) int32
    rest: torch.Tensor | None = None  # (tokens,) log of the probability outside the top k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logp, self.index, self.rest) if t is not None)

    def kl_sum(self, logp_pruned: torch.Tensor, rows: slice) -> float:
        """sum over ``rows`` of KL(dense || pruned), given the pruned log-probs of those rows.
        With the top k only, the rest of the vocabulary is one bucket on each side: a lower
        bound of the full KL (coarser distributions never diverge more), exact as k reaches the
        vocabulary. Both leftover masses are log-sum-exps, never 1 minus a sum near 1."""
        ld = self.logp[rows].to(logp_pruned.device, non_blocking=True)
        if self.index is None:
            return ld.exp().mul_(ld - logp_pruned).sum().item()
        where = self.index[rows].to(logp_pruned.device, non_blocking=True).long()
        lp = logp_pruned.gather(1, where)
        head = ld.exp().mul(ld - lp).sum(dtype=torch.float64)
        rest_d = self.rest[rows].to(logp_pruned.device, non_blocking=True).double()
        rest_p = logp_pruned.scatter(1, where, float("-inf")).logsumexp(1).double()
        tail = torch.where(rest_d > float("-inf"), rest_d.exp() * (rest_d - rest_p), 0.0)
        return (head + tail.sum()).item()


def kl_top_k(setting: int | str, n_tokens: int, vocab: int, budget_bytes: int = 1 << 30,
             linear_head: bool = True) -> int | None | str:
    """What a worker keeps for the KL: ``"expected"`` (ExpectedHead: exact, hidden-sized; ``auto``
    wherever the lm_head is linear), or the dense log-probabilities, all of them (None) or the
    top k; ``auto`` on a soft-capped head keeps all when they take at most ``budget_bytes``
    (1 GiB), else the top 1024."""
    if setting == "all":
        return None
    if setting == "auto":
        if linear_head:
            return "expected"
        return None if n_tokens * vocab * 4 <= budget_bytes else min(1024, vocab)
    return None if int(setting) >= vocab else int(setting)


Hidden = Callable[[int, int], Iterator[torch.Tensor]]  # (first prompt, end) -> final hidden states, batch by batch


def _softcapped(model: nn.Module) -> bool:
    return bool(getattr(model.config, "final_logit_softcapping", None))


OnStage = Callable[[int, dict[str, float]], bool]


def stage_ends(n_prompts: int, stages: Sequence[int] = ()) -> list[int]:
    """Prompt counts after which a staged pass reports: the ``stages`` below ``n_prompts``, then
    all of them (the last stage, after which nothing is stopped)."""
    return sorted({s for s in stages if 0 < s < n_prompts}) + [n_prompts]


@torch.no_grad()
def reconstruction_error(model: nn.Module, ref: DenseReference, kl: bool = True, stages: Sequence[int] = (),
                         on_stage: OnStage | None = None, frobenius: bool = True,
                         hidden: Hidden | None = None) -> dict[str, float] | None:
    """Frobenius norm of the logit difference (absolute and relative to the dense logits) and the
    mean KL(dense || pruned) of next-token distributions, over every prompt token; ``frobenius``
    False skips the former (a KL-only study never pays its Gram product).

    Staged (``stages``, prompt counts): after the first ``s`` prompts of every stage but the last,
    ``on_stage(s, running)`` sees the values so far, the Frobenius norm scaled to the whole prompt
    set so that a stage compares across candidates; if it returns True the pass stops there and
    the result is None (an Optuna pruner's verdict). The last stage always runs to the end.
    ``hidden(start, end)`` yields the pruned model's final hidden states of those prompts batch
    by batch (default: the whole model's forward, one batch at a time).
    """
    hidden = hidden or (lambda start, end: (final_hidden(model, b) for b in batches(ref.ids[start:end], ref.batch_size)))
    sq, kl_sum, n_tokens, start = 0.0, 0.0, 0, 0
    n_prompts, n_total = ref.ids.shape[0], ref.ids.shape[0] * ref.ids.shape[1]
    for end in stage_ends(n_prompts, stages if on_stage is not None else ()):
        first = start
        for h_p in hidden(start, end):
            stop = first + h_p.shape[0]
            d_sq, d_kl, d_n = _batch_error(model, ref, h_p, first, stop, kl, frobenius)
            sq, kl_sum, n_tokens, first = sq + d_sq, kl_sum + d_kl, n_tokens + d_n, stop
        start = end
        if end < n_prompts and on_stage(end, _summary(sq * n_total / n_tokens, kl_sum, n_tokens, ref, kl, frobenius)):
            return None
    return _summary(sq, kl_sum, n_tokens, ref, kl, frobenius)


def _batch_error(model: nn.Module, ref: DenseReference, h_p: torch.Tensor, start: int, stop: int, kl: bool,
                 frobenius: bool) -> tuple[float, float, int]:
    """Squared Frobenius error, summed KL and token count of prompts ``start:stop``, whose pruned
    final hidden states are ``h_p``."""
    sq, kl_sum = 0.0, 0.0
    h_p = h_p.float().reshape(-1, h_p.shape[-1])
    h_d = ref.hidden[start:stop].reshape(-1, h_p.shape[-1]).to(h_p.device)
    capped = _softcapped(model)
    if frobenius and not capped:
        delta = (h_p - h_d).double()
        sq += ((delta @ ref.gram.to(delta.device)) * delta).sum().item()
    cache = ref.kl_cache if kl and not (frobenius and capped) else None  # capped logits need the dense ones
    row0 = start * ref.ids.shape[1]
    if kl or (frobenius and capped):
        for c in range(0, h_p.shape[0], TOKEN_CHUNK):
            lp = logits_from_hidden(model, h_p[c : c + TOKEN_CHUNK])
            if isinstance(cache, ExpectedHead):
                kl_sum += cache.kl_sum(h_p[c : c + TOKEN_CHUNK], lp, slice(row0 + c, row0 + c + lp.shape[0]))
                continue
            if cache is not None:
                lp -= torch.logsumexp(lp, -1, keepdim=True)
                kl_sum += cache.kl_sum(lp, slice(row0 + c, row0 + c + lp.shape[0]))
                continue
            ld = logits_from_hidden(model, h_d[c : c + TOKEN_CHUNK])
            if frobenius and capped:
                sq += (lp - ld).double().square().sum().item()
            if kl:
                kl_sum += _kl_sum(lp, ld)
    return sq, kl_sum, h_p.shape[0]


def _kl_sum(logits_p: torch.Tensor, logits_d: torch.Tensor) -> float:
    """sum KL(softmax(d) || softmax(p)) over rows, in place on the two logit chunks (it consumes
    them): three chunk-sized tensors at most, where F.kl_div over log_softmax copies holds ~8."""
    logits_p -= torch.logsumexp(logits_p, -1, keepdim=True)  # log p, in place
    logits_d -= torch.logsumexp(logits_d, -1, keepdim=True)  # log d
    prob_d = logits_d.exp()
    logits_d -= logits_p  # log d - log p
    return prob_d.mul_(logits_d).sum().item()  # sum's pairwise reduction: dot's was 20x less exact


def _summary(sq: float, kl_sum: float, n_tokens: int, ref: DenseReference, kl: bool, frobenius: bool = True) -> dict[str, float]:
    out = {"frobenius": sq**0.5, "frobenius_rel": (sq / max(ref.dense_sq_norm, 1e-30)) ** 0.5} if frobenius else {}
    if kl:
        out["kl"] = kl_sum / n_tokens
    return out
