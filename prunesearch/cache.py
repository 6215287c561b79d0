"""One cache root for everything prunesearch computes once and reuses (model copies, tokens,
dense references): ``$PRUNESEARCH_CACHE`` or ``~/.cache/prunesearch``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("PRUNESEARCH_CACHE") or Path.home() / ".cache" / "prunesearch")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
