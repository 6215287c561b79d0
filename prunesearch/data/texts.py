"""The token sequences a job calibrates and evaluates on, as a config's data sections describe
them (the one place both `prune` and the study workers cut their text)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prunesearch.data.image_prompts import TEXT_ONLY_NOTE, image_pairs, image_prompts
from prunesearch.data.select import select_calibration
from prunesearch.data.sequences import token_sequences
from prunesearch.errors import UserError
from prunesearch.models.images import has_images

if TYPE_CHECKING:
    from prunesearch.config import DataConfig


def load_texts(tokenizer, calibration: DataConfig, evaluation: DataConfig | None,
               model=None, processor=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration and evaluation sequences. Calibration always draws from its source's
    calibration partition and evaluation from the held-out one, so the two never share a
    document, and the calibration set never depends on whether (or where) evaluation happens.
    With ``calibration.select`` the samples are chosen out of a larger pool (``model`` embeds
    them for hard/easy). With an image-text-to-text model's ``processor``, a source of images
    gives image + text prompts; evaluation (perplexity) is always text."""
    return (calibration_texts(tokenizer, calibration, model, processor)[0], evaluation_texts(tokenizer, evaluation))


def calibration_modality(processor, calib: torch.Tensor) -> str | None:
    """What an image-text-to-text model calibrates on, read off its prompts (image prompts carry
    image markers), for the report; None for a text model."""
    if processor is None:
        return None
    return "image + text" if has_images(calib) else TEXT_ONLY_NOTE


def evaluation_texts(tokenizer, evaluation: DataConfig | None) -> torch.Tensor | None:
    """Held-out sequences: contiguous windows of the source's evaluation partition."""
    if evaluation is None:
        return None
    e = evaluation
    return token_sequences(tokenizer, e.source, n_samples=e.samples, seq_len=e.seq_len, seed=e.seed, split="evaluation",
                           text_field=e.text_field, contiguous=True)


def calibration_pool(tokenizer, calibration: DataConfig, processor=None) -> torch.Tensor:
    """The calibration windows drawn from the source: the samples themselves, or with
    ``select`` the samples x pool candidates they are chosen from. With a ``processor`` and a
    source of images: image + text prompts (data/image_prompts.py)."""
    c = calibration
    n = c.samples * (c.pool if c.select != "none" else 1)
    if processor is not None and (pairs := image_pairs(c.source, c.text_field)) is not None:
        return image_prompts(processor, pairs, c.source, n_samples=n, seq_len=c.seq_len, seed=c.seed)
    return token_sequences(tokenizer, c.source, n_samples=n, seq_len=c.seq_len, seed=c.seed, split="calibration",
                           text_field=c.text_field)


def calibration_texts(tokenizer, calibration: DataConfig, model=None, processor=None) -> tuple[torch.Tensor, dict | None]:
    """The calibration sequences, and what the selection did (None without one)."""
    c = calibration
    if c.select == "none":
        return calibration_pool(tokenizer, c, processor), None
    if c.select != "random" and model is None:
        raise UserError(f"calibration select '{c.select}' embeds the candidates with the model: none was given")
    chosen, info = select_calibration(model, calibration_pool(tokenizer, c, processor), c.samples, c.select, seed=c.seed,
                                      batch_size=c.batch_size)
    return chosen, info
