"""`fastkl clean DEST`: what a dead job left for DEST, removed (or its interrupted commit finished).

Takes DEST's lock (local) or claim (store) first, so a live job is never
cleaned away: it fails naming that job instead (exit 1).
"""

from __future__ import annotations

import os
from typing import Any

from .stores import is_store_url


def clean(dest: str, storage_options: dict[str, Any] | None = None) -> str:
    """Clean DEST's staging place; returns one line saying what was done."""
    if is_store_url(dest):
        from .store_output import clean as clean_store, store_dest

        return f"{dest}: " + clean_store(store_dest(dest, storage_options), dest)
    return _clean_local(dest)


def _clean_local(dest: str) -> str:
    from .output import DestLock, Staging, _remove, old_path, resolve_dest

    dest_p = resolve_dest(dest)
    if not os.path.isdir(dest_p.parent):
        return f"{dest}: nothing to clean"
    with DestLock.acquire(dest_p, os.fspath(dest)):
        staging = Staging(dest_p, 1)
        staging._refuse_foreign()  # never remove a directory fastkl did not make
        removed = [str(p) for p in (staging.root, old_path(dest_p)) if os.path.lexists(p)]
        for p in (staging.root, old_path(dest_p)):
            if os.path.lexists(p):
                _remove(p)
    return f"{dest}: removed {', '.join(removed)}" if removed else f"{dest}: nothing to clean"
