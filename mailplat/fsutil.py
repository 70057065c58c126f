"""Small durable-filesystem steps shared by the spool, the maildir and the users file."""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet import defer

__all__ = ["GroupCommit", "fsync_directory", "makedirs_durable", "replace_durably"]


def fsync_directory(path: str) -> None:
    """Make a rename or a new entry in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: bytes) -> None:
    """Replace ``path`` (0600) with ``data``: a temporary file beside it
    (named for this process and thread, so writers never share one),
    fsynced, renamed over it, and the folder fsynced."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(path))


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


class GroupCommit:
    """Writes new files (and removes old ones) durably in batches, off the reactor thread.

    ``write(tmp, final, data)`` creates ``tmp``, writes ``data``, fsyncs it,
    renames it to ``final`` and fsyncs the folder.  One thread does this for
    everything queued while it was busy, in phases: create and write every
    file, fsync them (the first fsync's journal commit carries the rest),
    rename them, then fsync each folder once.  A batch costs about two journal
    commits whatever its size, and wakes the reactor once (group commit, as
    databases do).  Even creating a file can wait for a journal commit, which
    is why none of this runs on the reactor thread.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._pending: list[_Job] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None

    def write(self, tmp: str, final: str, data: bytes) -> defer.Deferred[None]:
        """Fires once ``final`` exists durably; fails with the OSError otherwise."""
        return self._add(_Job(tmp, final, data, defer.Deferred()))

    def remove(self, path: str, then: str = "") -> defer.Deferred[None]:
        """Fires once ``path`` is durably gone (its folder fsynced with the
        batch's); ``then`` is removed after that, without a sync of its own."""
        return self._add(_Removal(path, then, defer.Deferred()))

    def stop(self) -> defer.Deferred[None]:
        """Finish what is queued, then end the thread; fires when it has ended."""
        with self._condition:
            if self._thread is None or self._stopped is not None:
                return self._stopped or defer.succeed(None)
            self._stopping = True
            self._stopped = defer.Deferred()
            self._condition.notify()
        return self._stopped

    def _add(self, job: Any) -> defer.Deferred[None]:
        with self._condition:
            if self._stopping:
                return defer.fail(OSError("the group commit is stopped"))
            self._pending.append(job)
            self._condition.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mailplat-group-commit", daemon=True)
            self._thread.start()
        return job.done

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if not self._pending:
                    stopped = self._stopped
                    assert stopped is not None
                    self.reactor.callFromThread(stopped.callback, None)
                    return
                batch, self._pending = self._pending, []
            writes = [job for job in batch if isinstance(job, _Job)]
            removals = [job for job in batch if isinstance(job, _Removal)]
            for job in writes:
                job.run_phase(job.create)
            for job in writes:
                job.run_phase(job.sync)
            for job in writes:
                job.run_phase(job.rename)
            for removal in removals:
                removal.unlink()
            folders: dict[str, list[Any]] = {}
            for job in batch:
                if job.error is None:
                    folders.setdefault(os.path.dirname(job.final), []).append(job)
            for folder, jobs in folders.items():
                try:
                    fsync_directory(folder)
                except OSError as e:
                    for job in jobs:
                        job.error = e
            for removal in removals:
                removal.unlink_then()
            self.reactor.callFromThread(_fire, batch)


class _Job:
    def __init__(self, tmp: str, final: str, data: bytes, done: defer.Deferred[None]) -> None:
        self.tmp, self.final, self.data, self.done = tmp, final, data, done
        self.fd = -1
        self.error: OSError | None = None

    def run_phase(self, phase: Any) -> None:
        if self.error is not None:
            return
        try:
            phase()
        except OSError as e:
            self.error = e
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

    def create(self) -> None:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        view = memoryview(self.data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.data = b""

    def sync(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def rename(self) -> None:
        os.rename(self.tmp, self.final)


class _Removal:
    def __init__(self, path: str, then: str, done: defer.Deferred[None]) -> None:
        self.final, self.then, self.done = path, then, done
        self.error: OSError | None = None

    def unlink(self) -> None:
        try:
            os.unlink(self.final)
        except OSError as e:
            self.error = e

    def unlink_then(self) -> None:
        if self.then and self.error is None:
            try:
                os.unlink(self.then)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.error = e


def _fire(batch: list[Any]) -> None:
    for job in batch:
        if job.error is None:
            job.done.callback(None)
        else:
            job.done.errback(job.error)
