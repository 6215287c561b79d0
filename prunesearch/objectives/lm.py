"""Language-model quantities computed from the hidden states that enter lm_head.

Running the decoder once and applying lm_head in token chunks keeps memory bounded: logits of
8 x 512 tokens over a 49k vocabulary would otherwise take 800 MB at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunesearch.models.forward import batches, final_hidden

TOKEN_CHUNK = 128  # 128 x 49k-vocab float32 logits = 25 MB per tensor: bounded peak memory (256 cost +0.6x the model)


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head (with its bias and any final soft-capping) applied to hidden states, in float32."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def nll_sum(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over one batch, and the number of predictions
    (``hidden``: the batch's final hidden states, when the caller ran the decoder)."""
    hidden = (final_hidden(model, ids) if hidden is None else hidden)[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1).to(hidden.device)
    total = 0.0
    for start in range(0, hidden.shape[0], TOKEN_CHUNK):
        logits = logits_from_hidden(model, hidden[start : start + TOKEN_CHUNK])
        total += F.cross_entropy(logits, targets[start : start + TOKEN_CHUNK], reduction="sum").item()
    return total, targets.numel()


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, progress: bool = False, desc: str = "perplexity",
               hidden=None) -> float:
    """exp(mean next-token NLL) over fixed-length sequences ``ids`` (n, seq_len). ``hidden(ids,
    batch_size)``, when given, runs the decoder (block by block) and yields each batch's final
    hidden states; by default the model runs in memory, batch by batch."""
    total, count = 0.0, 0
    chunks = list(batches(ids, batch_size))
    states = hidden(ids, batch_size) if hidden is not None else (None for _ in chunks)
    for batch, h in tqdm(zip(chunks, states), total=len(chunks), desc=desc, disable=not progress, leave=False):
        nll, n = nll_sum(model, batch, h)
        total, count = total + nll, count + n
    return math.exp(total / count)
