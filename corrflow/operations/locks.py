"""One command at a time on a data root: an advisory lock, held for as long as the command runs.

Two demos on one data root would share its embedded Prefect database (and race on its migration),
its catalog and its storages. The second one refuses at once, naming the first. The lock is an
``fcntl.flock`` on ``<data_root>/.corrflow.lock``: the kernel releases it when its holder ends,
however it ends, so a killed command never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DataRootBusy", "LOCK_NAME", "data_root_lock"]

LOCK_NAME = ".corrflow.lock"


class DataRootBusy(RuntimeError):
    """Another corrflow command holds the data root; the message names it."""


@contextmanager
def data_root_lock(data_root: Path, *, what: str) -> Iterator[Path]:
    """Hold ``<data_root>/.corrflow.lock`` while the block runs.

    Raises
    ------
    DataRootBusy
        Another process holds it (its pid and command are in the message).
    """
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    path = data_root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise DataRootBusy(
                f"{data_root} is in use by {holder}; wait for it to finish or give another --data-root"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({what})\n".encode())
        yield path
    finally:
        os.close(fd)  # closing releases the lock
