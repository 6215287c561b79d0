"""Forward passes that stop early or run block by block.

``final_hidden`` returns the input of lm_head (post final norm) without paying for the lm_head
matmul: a pre-hook captures it and aborts the rest. ``capture_block_inputs`` records what the
first decoder block receives (hidden states and the keyword arguments the model builds: masks,
rotary embeddings), so later blocks can be run one at a time on any hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from prunesearch.models.families import decoder_blocks
from prunesearch.models.images import model_inputs


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start : start + batch_size]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_until_stop(model: nn.Module, ids: torch.Tensor) -> None:
    """Forward ``ids`` until a hook raises StopForward (the rest of the model is skipped). Image
    prompts (models/images.py) carry their images along."""
    try:
        model(**model_inputs(model, ids.to(model_device(model))), use_cache=False)
    except StopForward:
        pass


@torch.no_grad()
def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states that enter lm_head, shape (batch, seq, hidden)."""
    captured = {}

    def grab(_module, args):
        captured["h"] = args[0]
        raise StopForward

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        run_until_stop(model, ids)
    finally:
        handle.remove()
    return captured["h"]


@torch.no_grad()
def run_to_lm_head(model: nn.Module, ids: torch.Tensor) -> None:
    """A decoder-only forward (for hooks that gather statistics): skips the lm_head."""
    final_hidden(model, ids)


class BlockInput:
    """What one batch feeds a decoder block: hidden states plus the model-built extras."""

    def __init__(self, hidden: torch.Tensor, args: tuple, kwargs: dict):
        self.hidden = hidden
        self.args = args
        self.kwargs = kwargs

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[BlockInput]:
    first = decoder_blocks(model)[0]
    inputs: list[BlockInput] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(BlockInput(hidden, tuple(args[1:]), dict(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches(ids, batch_size):
            run_until_stop(model, batch)
    finally:
        handle.remove()
    return inputs
