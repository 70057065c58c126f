"""The durable outbound queue under ``data_dir/queue``.

A queued message's envelope is ``env/ID.json``: one line of JSON (sender,
and per recipient its state, attempts, next try and last reply).  A small
message (one received in memory) follows that line in the same file, so
that queueing it creates one file; a large one is ``msg/ID``, written once.
Everything is fsynced before the client hears 250.  The envelope is
replaced atomically (temporary file, fsync, rename, fsync the folder) after
an attempt that leaves work to do.

Crash window: between a remote server's 250 and our fsynced "done" mark a
crash makes us deliver that recipient again after restart (a duplicate,
never a loss).  The mark is written right after each domain's transaction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from mailplat.fsutil import fsync_directory, makedirs_durable

__all__ = ["Queue", "QueuedMessage", "QueuedRecipient"]

PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass
class QueuedRecipient:
    address: str
    state: str = PENDING
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    status: str = ""  # enhanced status code of the last reply
    remote_mta: str = ""
    # A failed recipient's sender has had its bounce (so the final one leaves it out).
    bounced: bool = False

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class QueuedMessage:
    id: str
    sender: str
    created: float
    recipients: list[QueuedRecipient] = field(default_factory=list)
    # True: the message follows the envelope line in env/ID.json (no msg/ID).
    inline: bool = False
    # The mailbox folder for our own recipients (a filter's quarantine).
    folder: str = ""

    def pending(self, now: float) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == PENDING and r.next_try <= now]

    @property
    def finished(self) -> bool:
        return all(r.state != PENDING for r in self.recipients)

    @property
    def next_try(self) -> float:
        times = [r.next_try for r in self.recipients if r.state == PENDING]
        return min(times) if times else 0.0


class Queue:
    """The queue's files.  Blocking: the runner calls it from a thread."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.messages_dir = os.path.join(directory, "msg")
        self.envelopes_dir = os.path.join(directory, "env")
        self.flush_file = os.path.join(directory, "flush")

    def start(self) -> None:
        """Create the folders, and drop message files whose envelope never got written (never acknowledged)."""
        for folder in (self.messages_dir, self.envelopes_dir):
            makedirs_durable(folder)
        envelopes = {name[: -len(".json")] for name in os.listdir(self.envelopes_dir) if name.endswith(".json")}
        for name in os.listdir(self.messages_dir):
            if name not in envelopes:
                os.unlink(os.path.join(self.messages_dir, name))
        for name in os.listdir(self.envelopes_dir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.envelopes_dir, name))

    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.messages_dir, queue_id)

    def enqueue(self, queue_id: str, sender: str, recipients: list[str], source: Any, now: float, folder: str = "") -> None:
        """Store a message durably: the message file, then its envelope (both fsynced)."""
        path = self.message_path(queue_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        fsync_directory(self.messages_dir)
        self.save(self.new_envelope(queue_id, sender, recipients, now, folder))

    @staticmethod
    def new_envelope(queue_id: str, sender: str, recipients: list[str], now: float, folder: str = "") -> QueuedMessage:
        """A new message's envelope, every recipient due ``now`` (the runner's clock)."""
        return QueuedMessage(queue_id, sender, now, [QueuedRecipient(r, next_try=now) for r in recipients], folder=folder)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.envelopes_dir, f"{queue_id}.json")

    @staticmethod
    def envelope_data(message: QueuedMessage, content: bytes = b"") -> bytes:
        """The envelope file: its JSON line, then the message when it is inline."""
        return json.dumps(asdict(message)).encode("utf-8") + b"\n" + content

    def save(self, message: QueuedMessage) -> None:
        final = self.envelope_path(message.id)
        tmp = final + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.envelope_data(message))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_directory(self.envelopes_dir)

    def load(self, queue_id: str) -> QueuedMessage:
        with open(self.envelope_path(queue_id), "rb") as f:
            data = json.loads(f.readline())
        data["recipients"] = [QueuedRecipient(**r) for r in data["recipients"]]
        return QueuedMessage(**data)

    def open_message(self, message: QueuedMessage) -> IO[bytes]:
        """The message itself, from wherever it is kept; the caller closes it."""
        if not message.inline:
            return open(self.message_path(message.id), "rb")
        f = open(self.envelope_path(message.id), "rb")
        f.readline()
        return f

    def inline_content(self, message: QueuedMessage) -> bytes:
        """An inline message's bytes (to write them again with a new envelope)."""
        with self.open_message(message) as f:
            return f.read()

    def ids(self) -> list[str]:
        return sorted(name[: -len(".json")] for name in os.listdir(self.envelopes_dir) if name.endswith(".json"))

    def envelopes(self) -> Iterator[dict[str, Any]]:
        """Every envelope as plain data, oldest id first: the fast way to read
        a big queue (``mailplat queue list`` reads 100,000 of them)."""
        decode = json.JSONDecoder().decode
        folder = os.open(self.envelopes_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = sorted(name for name in os.listdir(folder) if name.endswith(".json"))
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
                except FileNotFoundError:
                    continue  # delivered or removed since the folder was listed
                try:
                    # The JSON line only, not an inline message after it.
                    data = os.read(fd, 1 << 16)
                    while b"\n" not in data and (more := os.read(fd, 1 << 16)):
                        data += more
                finally:
                    os.close(fd)
                yield decode(data.partition(b"\n")[0].decode("utf-8"))
        finally:
            os.close(folder)

    def remove(self, queue_id: str) -> None:
        """Drop a message: envelope first, so that a crash leaves an orphan message file, cleaned at start."""
        os.unlink(os.path.join(self.envelopes_dir, f"{queue_id}.json"))
        fsync_directory(self.envelopes_dir)
        try:
            os.unlink(self.message_path(queue_id))
        except FileNotFoundError:
            pass

    def request_flush(self) -> None:
        """Ask the running server to retry everything now (`mailplat queue flush`)."""
        with open(self.flush_file, "w"):
            pass

    def take_flush_request(self) -> bool:
        try:
            os.unlink(self.flush_file)
            return True
        except FileNotFoundError:
            return False
