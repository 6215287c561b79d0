"""Model-wise reconstruction error of a pruned model against its dense original.

The dense side is fixed for a study, so it is computed once: the hidden states H_d that enter
lm_head on the calibration prompts. With logits = H W^T (+ b), the squared Frobenius error over
all tokens is sum((H_p - H_d) G (H_p - H_d)^T) with G = W^T W: exact, and it never pays for the
(vocab x hidden) lm_head per trial. The bias cancels in the difference. Soft-capped logits
(Gemma-2) break the identity; there the logits are computed as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

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

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> "DenseReference":
        hidden = torch.cat([final_hidden(model, b).float().cpu() for b in batches(ids, batch_size)])
        W = model.get_output_embeddings().weight.detach().double()
        return cls(ids.cpu(), hidden, (W.t() @ W).cpu(), batch_size)

    @cached_property
    def dense_sq_norm(self) -> float:
        """||H_d W^T||_F^2, to make the error relative (bias left out)."""
        h = self.hidden.reshape(-1, self.hidden.shape[-1]).double()
        return ((h @ self.gram) * h).sum().item()


def _softcapped(model: nn.Module) -> bool:
    return bool(getattr(model.config, "final_logit_softcapping", None))


OnStage = Callable[[int, dict[str, float]], bool]


def stage_ends(n_prompts: int, stages: Sequence[int] = ()) -> list[int]:
    """Prompt counts after which a staged pass reports: the ``stages`` below ``n_prompts``, then
    all of them (the last stage, after which nothing is stopped)."""
    return sorted({s for s in stages if 0 < s < n_prompts}) + [n_prompts]


@torch.no_grad()
def reconstruction_error(model: nn.Module, ref: DenseReference, kl: bool = True, stages: Sequence[int] = (),
                         on_stage: OnStage | None = None) -> dict[str, float] | None:
    """Frobenius norm of the logit difference (absolute and relative to the dense logits) and the
    mean KL(dense || pruned) of next-token distributions, over every prompt token.

    Staged (``stages``, prompt counts): after the first ``s`` prompts of every stage but the last,
    ``on_stage(s, running)`` sees the values so far, the Frobenius norm scaled to the whole prompt
    set so that a stage compares across candidates; if it returns True the pass stops there and
    the result is None (an Optuna pruner's verdict). The last stage always runs to the end.
    """
    sq, kl_sum, n_tokens, start = 0.0, 0.0, 0, 0
    n_prompts, n_total = ref.ids.shape[0], ref.ids.shape[0] * ref.ids.shape[1]
    for end in stage_ends(n_prompts, stages if on_stage is not None else ()):
        for b in range(start, end, ref.batch_size):
            stop = min(b + ref.batch_size, end)
            d_sq, d_kl, d_n = _batch_error(model, ref, b, stop, kl)
            sq, kl_sum, n_tokens = sq + d_sq, kl_sum + d_kl, n_tokens + d_n
        start = end
        if end < n_prompts and on_stage(end, _summary(sq * n_total / n_tokens, kl_sum, n_tokens, ref, kl)):
            return None
    return _summary(sq, kl_sum, n_tokens, ref, kl)


def _batch_error(model: nn.Module, ref: DenseReference, start: int, stop: int, kl: bool) -> tuple[float, float, int]:
    """Squared Frobenius error, summed KL and token count of prompts ``start:stop``."""
    sq, kl_sum = 0.0, 0.0
    h_p = final_hidden(model, ref.ids[start:stop]).float()
    h_p = h_p.reshape(-1, h_p.shape[-1])
    h_d = ref.hidden[start:stop].reshape(-1, h_p.shape[-1]).to(h_p.device)
    if not _softcapped(model):
        delta = (h_p - h_d).double()
        sq += ((delta @ ref.gram.to(delta.device)) * delta).sum().item()
    if kl or _softcapped(model):
        for c in range(0, h_p.shape[0], TOKEN_CHUNK):
            lp = logits_from_hidden(model, h_p[c : c + TOKEN_CHUNK])
            ld = logits_from_hidden(model, h_d[c : c + TOKEN_CHUNK])
            if _softcapped(model):
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


def _summary(sq: float, kl_sum: float, n_tokens: int, ref: DenseReference, kl: bool) -> dict[str, float]:
    out = {"frobenius": sq**0.5, "frobenius_rel": (sq / max(ref.dense_sq_norm, 1e-30)) ** 0.5}
    if kl:
        out["kl"] = kl_sum / n_tokens
    return out
