"""The token sequences a job calibrates and evaluates on, as a config's data sections describe
them (the one place both `prune` and the study workers cut their text)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prunesearch.data.select import select_calibration
from prunesearch.data.sequences import token_sequences
from prunesearch.errors import UserError

if TYPE_CHECKING:
    from prunesearch.config import DataConfig


def load_texts(tokenizer, calibration: DataConfig, evaluation: DataConfig | None,
               model=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration and evaluation sequences. Calibration always draws from its source's
    calibration partition and evaluation from the held-out one, so the two never share a
    document, and the calibration set never depends on whether (or where) evaluation happens.
    With ``calibration.select`` the samples are chosen out of a larger pool (``model`` embeds
    them for hard/easy)."""
    return calibration_texts(tokenizer, calibration, model)[0], evaluation_texts(tokenizer, evaluation)


def evaluation_texts(tokenizer, evaluation: DataConfig | None) -> torch.Tensor | None:
    """Held-out sequences: contiguous windows of the source's evaluation partition."""
    if evaluation is None:
        return None
    e = evaluation
    return token_sequences(tokenizer, e.source, n_samples=e.samples, seq_len=e.seq_len, seed=e.seed, split="evaluation",
                           text_field=e.text_field, contiguous=True)


def calibration_pool(tokenizer, calibration: DataConfig) -> torch.Tensor:
    """The calibration windows drawn from the source: the samples themselves, or with
    ``select`` the samples x pool candidates they are chosen from."""
    c = calibration
    n = c.samples * (c.pool if c.select != "none" else 1)
    return token_sequences(tokenizer, c.source, n_samples=n, seq_len=c.seq_len, seed=c.seed, split="calibration",
                           text_field=c.text_field)


def calibration_texts(tokenizer, calibration: DataConfig, model=None) -> tuple[torch.Tensor, dict | None]:
    """The calibration sequences, and what the selection did (None without one)."""
    c = calibration
    if c.select == "none":
        return calibration_pool(tokenizer, c), None
    if c.select != "random" and model is None:
        raise UserError(f"calibration select '{c.select}' embeds the candidates with the model: none was given")
    chosen, info = select_calibration(model, calibration_pool(tokenizer, c), c.samples, c.select, seed=c.seed,
                                      batch_size=c.batch_size)
    return chosen, info
