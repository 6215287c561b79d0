"""Models: loading (hub, local directory, GGUF, the bundled default) and where to prune them."""

from prunesearch.models.families import PrunableLinear, decoder_blocks, linears_by_block, prunable_linears
from prunesearch.models.loading import DEFAULT_MODEL, LoadedModel, load_model, resolve_device

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "PrunableLinear",
    "decoder_blocks",
    "linears_by_block",
    "load_model",
    "prunable_linears",
    "resolve_device",
]
