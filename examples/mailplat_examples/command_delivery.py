"""The ``command`` delivery backend: each message is piped into a program.

For every message, ``argv`` runs with the recipients' addresses appended as
extra arguments and the message on standard input.  The exit status decides,
as for sendmail's prog mailer and Postfix's pipe(8), by the <sysexits.h>
convention: 0 is delivered, 75 (EX_TEMPFAIL) is "try again later" (the client
gets 451), anything else is a permanent failure (554).  A command killed by a
signal or by ``timeout`` is a temporary failure.

The environment holds only PATH, SENDER (the envelope sender, "" for <>),
QUEUE_ID, CLIENT_ADDRESS and FOLDER: the server's own variables are not
passed on.
"""

from __future__ import annotations

import os
import shutil
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.config import ConfigError
from mailplat.interfaces import (
    BackendContext,
    Envelope,
    IDeliveryBackend,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.options import OptionReader

__all__ = ["CommandDelivery", "build"]

log = Logger()

EX_TEMPFAIL = 75


class _ChunkSender(FileSender):
    """Feeds the message to the command's stdin 64 KiB at a time, as fast as it reads."""

    CHUNK_SIZE = 64 * 1024


class _Command(ProcessProtocol):
    """One run of the command: streams the message in, keeps a little of stderr."""

    def __init__(self, message: IO[bytes]) -> None:
        self.message = message
        self.stderr = b""
        # Fires with (exit status, signal); cancelling the wait (mailplat
        # gave up on this delivery) kills the command.
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred(lambda _: self.kill())

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def connectionMade(self) -> None:
        sent = _ChunkSender().beginFileTransfer(self.message, self.transport)
        # A command that exits without reading everything ends the transfer
        # early; its exit status still decides.
        sent.addErrback(lambda _: None)
        sent.addBoth(lambda _: self.transport.closeStdin())

    def outReceived(self, data: bytes) -> None:
        pass

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[:2048]

    def processEnded(self, reason: Failure) -> None:
        self.message.close()
        if not self.ended.called:
            # ProcessDone (status 0) or ProcessTerminated: both carry these two.
            self.ended.callback((reason.value.exitCode, reason.value.signal))


@implementer(IDeliveryBackend)
class CommandDelivery(Service):
    """Runs ``argv`` once per message.

    It is also a Service: mailplat starts it before any client is served
    and stops it after the listeners have closed; stopping waits for the
    commands still running, so a restart never cuts a delivery in half.
    """

    def __init__(self, argv: list[str], timeout: float, reactor: Any) -> None:
        self.argv = argv
        self.timeout = timeout
        self.reactor = reactor
        self.in_progress: set[defer.Deferred[None]] = set()

    def startService(self) -> None:
        super().startService()
        log.info("command delivery ready: {argv}", argv=" ".join(self.argv))

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.in_progress:
            log.info("waiting for {n} delivery command(s) to finish", n=len(self.in_progress))
        return defer.DeferredList(list(self.in_progress), consumeErrors=True)

    def deliver(self, envelope: Envelope, message: SpooledMessage) -> defer.Deferred[None]:
        """Run the command; fires when it exited 0, fails with a DeliveryFailure otherwise."""
        done = defer.Deferred.fromCoroutine(self._run(envelope, message))
        self.in_progress.add(done)
        done.addBoth(self._finished, done)
        return done

    def _finished(self, result: Any, done: defer.Deferred[None]) -> Any:
        self.in_progress.discard(done)
        return result

    async def _run(self, envelope: Envelope, message: SpooledMessage) -> None:
        recipients = [account.address for account in envelope.recipients]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SENDER": envelope.sender,
            "QUEUE_ID": envelope.queue_id,
            "CLIENT_ADDRESS": envelope.client_address,
            # "" for the inbox; "Quarantine" when a filter quarantined the message.
            "FOLDER": envelope.folder,
        }
        command = _Command(message.open())
        try:
            self.reactor.spawnProcess(command, self.argv[0], [*self.argv, *recipients], env=env)
        except OSError as e:
            command.message.close()
            raise TemporaryFailure(f"cannot run the delivery command: {e.strerror}")

        def too_slow() -> None:
            log.warn("{queue_id}: delivery command still running after {t} s: killed", queue_id=envelope.queue_id, t=self.timeout)
            command.kill()

        timer = self.reactor.callLater(self.timeout, too_slow)
        try:
            status, signal = await command.ended
        finally:
            if timer.active():
                timer.cancel()
        self._judge(envelope, status, signal, command.stderr)

    def _judge(self, envelope: Envelope, status: int | None, signal: int | None, stderr: bytes) -> None:
        """Turn the way the command ended into delivered, 4xx or 5xx."""
        if status == 0:
            return
        said = stderr.decode("utf-8", "replace").strip().replace("\n", " | ")
        log.warn(
            "{queue_id}: delivery command failed (exit status {status}, signal {signal}): {said}",
            queue_id=envelope.queue_id, status=status, signal=signal, said=said,
        )
        # What the command printed stays in the log: it may say things about
        # this machine that an SMTP client has no business reading.
        if signal is not None:
            raise TemporaryFailure("delivery command was interrupted; try again later")
        if status == EX_TEMPFAIL:
            raise TemporaryFailure("delivery deferred by the delivery command; try again later")
        raise PermanentFailure(f"delivery command failed with exit status {status}")


def build(options: dict[str, Any], context: BackendContext) -> CommandDelivery:
    """Check the options of ``[delivery] backend = "command"``."""
    reader = OptionReader(options, "command", context=context)
    example = 'e.g. argv = ["/usr/local/bin/deliver-mail", "--verbose"]'
    argv = reader.strings("argv", fix=example, what="the command and its arguments")
    if not argv or not all(argv):
        raise ConfigError("argv", "must be a non-empty list of non-empty strings: the command and its arguments", example)
    # A relative path is relative to the config file, like every other path.
    program = shutil.which(context.resolve_path(argv[0]) if os.sep in argv[0] else argv[0])
    if program is None:
        raise ConfigError("argv", f"{argv[0]!r} is not an executable file, nor a program found on PATH", example)
    timeout = reader.number("timeout", 300.0, unit="of seconds")
    reader.finish()
    return CommandDelivery([os.path.abspath(program), *argv[1:]], timeout, context.reactor)
