"""Small durable-filesystem steps shared by the spool, the maildir and the users file."""

from __future__ import annotations

import os

__all__ = ["fsync_directory", "makedirs_durable"]


def fsync_directory(path: str) -> None:
    """Make a rename or a new entry in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str, mode: int = 0o700) -> None:
    """``os.makedirs`` that also fsyncs each parent that gained an entry."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue
        fsync_directory(os.path.dirname(folder))
