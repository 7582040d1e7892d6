"""Temporary files and folders written beside their target, and the cleaning of ones a killed
process left behind.

Each temporary name carries the writer's process id, `.{target}.tmp-{pid}-{random}`, so a later save
can tell its own leftovers from a save still running elsewhere: an entry is stale when its process
no longer exists. Entries of this process are never stale (another thread may be writing them), and
nothing that does not match the pattern for the target's name is touched.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def temp_prefix(target_name: str) -> str:
    """The `prefix=` for tempfile.mkdtemp / mkstemp next to `target_name`."""
    return f".{target_name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale(folder: Path, target_name: str, suffix: str = "") -> list[Path]:
    """Delete `.{target_name}.tmp-{pid}-*{suffix}` entries of `folder` whose process is gone; returns them."""
    pattern = re.compile(rf"\.{re.escape(target_name)}\.tmp-(\d+)-.*{re.escape(suffix)}\Z", re.S)
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # another cleaner got there first, or no permission: leave it
        removed.append(entry)
    return removed


__all__ = ["temp_prefix", "remove_stale"]
