"""The broker's files at rest: private to the account that runs it.

The SQLite database holds every account's password hash, key and address, and the token
key file can mint tokens for any account. On a host that also runs a peer, a task or any
other local user must not read them, so directories the broker creates are 0700 and the
database file is created 0600 before SQLite opens it (SQLite gives its -wal and -shm files
the database file's mode).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents as 0700 directories.

    A directory that already exists is left as the operator made it, except that a
    broker-created one is tightened if an older version left it world-readable.
    """
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        os.chmod(directory, PRIVATE_DIR)  # mkdir's mode is masked by the umask


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if absent; make an existing one 0600."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = path.with_name(path.name + suffix)
        try:
            os.chmod(sibling, PRIVATE_FILE)
        except FileNotFoundError:
            # Absent, or another worker process's connection just closed and removed
            # it: either way there is nothing to tighten.
            pass
