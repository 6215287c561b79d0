"""Output paths checked before any work: a job that runs for an hour must not fail at its end
because its output folder is a file or holds an earlier result."""

from __future__ import annotations

import os
from pathlib import Path

from prunesearch.errors import UserError


def check_output(path: str | Path, kind: str, overwrite: bool, flag: str) -> Path:
    """An output ``kind`` ('file' or 'dir') can be written at ``path``: its nearest existing
    parent is a writable folder, it is not the other kind, and an existing non-empty one is
    replaced only with --overwrite."""
    p = Path(path)
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise UserError(f"{flag} {p}: a file of that name exists, and a directory is written there")
        if kind == "file" and p.is_dir():
            raise UserError(f"{flag} {p}: is a directory, and a file is written there")
        if not overwrite and (kind == "file" or any(p.iterdir())):
            raise UserError(f"{flag} {p} already exists: choose another or pass --overwrite")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {p}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: the folder {parent} is not writable")
    return p
