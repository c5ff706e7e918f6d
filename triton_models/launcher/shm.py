"""The python backend's /dev/shm regions of one server: made owner-only, removed after it exits.

The backend creates one region per model instance, named `<shm-region-prefix-name><uuid>`, through
boost.interprocess, which fchmods it to 0644 whatever the umask: a private umask cannot keep other
local users out, so the launcher narrows the mode itself once the region exists. A stub or server
that dies by SIGKILL never unlinks its region, so the launcher removes what is left by its prefix.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PRIVATE_MODE = 0o600


def regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """The regions whose names start with `prefix` (empty when /dev/shm does not exist)."""
    if not prefix or not shm_dir.is_dir():
        return []
    return sorted(p for p in shm_dir.iterdir() if p.name.startswith(prefix))


def make_private(prefix: str, shm_dir: Path = SHM_DIR) -> int:
    """chmod 0600 every region of `prefix` that is still wider; how many were narrowed."""
    narrowed = 0
    for path in regions(prefix, shm_dir):
        try:
            if path.stat().st_mode & 0o777 != PRIVATE_MODE:
                os.chmod(path, PRIVATE_MODE)
                narrowed += 1
        except FileNotFoundError:  # unlinked by its instance meanwhile
            continue
    return narrowed


def remove(prefix: str, shm_dir: Path = SHM_DIR) -> int:
    """Unlink every region of `prefix` (call once no process of the server is left); how many."""
    removed = 0
    for path in regions(prefix, shm_dir):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed
