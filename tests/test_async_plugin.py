"""A third-party mailbox whose every method is ``async def``, in a real server:
SMTP delivers into it and POP3 lists, reads, deletes and releases through it,
so each call goes through mailplat's one backend adapter (plugins.call)."""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import ssl
import textwrap

from conftest import BASE_CONFIG, message

ASYNC_MAILBOX = textwrap.dedent('''
    """An in-memory mailbox whose methods are all coroutines."""
    import io

    from twisted.internet import task
    from zope.interface import implementer

    from mailplat.interfaces import IMailboxBackend, IMaildrop, MaildropEntry

    STORE = {}
    CALLS = []


    async def later(reactor):
        # Really asynchronous: the result comes on a later reactor turn.
        await task.deferLater(reactor, 0, lambda: None)


    @implementer(IMaildrop)
    class AsyncMaildrop:
        def __init__(self, reactor, address):
            self.reactor, self.address = reactor, address

        async def entries(self):
            await later(self.reactor)
            return [MaildropEntry(str(i), len(m)) for i, m in enumerate(STORE.get(self.address, []))]

        async def read(self, uid):
            await later(self.reactor)
            return io.BytesIO(STORE[self.address][int(uid)])

        async def commit(self, deleted, retrieved, trash):
            await later(self.reactor)
            kept = [m for i, m in enumerate(STORE.get(self.address, [])) if str(i) not in deleted]
            STORE[self.address] = kept
            print(f"commit {self.address} deleted={len(deleted)}", flush=True)

        async def expire(self, retrieved_days, trash_days):
            await later(self.reactor)

        async def close(self):
            await later(self.reactor)
            print(f"close {self.address}", flush=True)


    @implementer(IMailboxBackend)
    class AsyncMailbox:
        def __init__(self, reactor):
            self.reactor = reactor

        async def deliver(self, account, message, folder=""):
            await later(self.reactor)
            with message.open() as f:
                STORE.setdefault(account.address, []).append(f.read())

        async def open(self, account):
            await later(self.reactor)
            return AsyncMaildrop(self.reactor, account.address)


    class Factory:
        kind = "mailbox"
        name = "async-memory"

        def build(self, options, context):
            return AsyncMailbox(context.reactor)


    from mailplat.interfaces import IBackendFactory
    from zope.interface import directlyProvides

    factory = Factory()
    directlyProvides(factory, IBackendFactory)
''')


def test_async_mailbox_over_smtp_and_pop3(make_server, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "async_mailbox_plugin.py").write_text(ASYNC_MAILBOX)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    mailbox = '[mailbox]\nbackend = "maildir"\npath = "mail"\n'
    assert mailbox in BASE_CONFIG
    # The plugin is a mailbox for POP3 only (no IMessageStore): no IMAP listeners.
    config = re.sub(r"(?m)^imaps? = .*\n", "", BASE_CONFIG.replace(mailbox, '[mailbox]\nbackend = "async_mailbox_plugin:factory"\n'))
    server = make_server(config=config)

    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], message("first"))
        client.sendmail("someone@remote.test", ["alice@example.org"], message("second"))

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=context, timeout=10)
    pop.user("alice@example.org")
    assert pop.pass_("alice-password").startswith(b"+OK Logged in, 2 messages")
    assert len(pop.list()[1]) == 2
    assert b"Subject: second" in b"\n".join(pop.retr(2)[1])
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")

    # Closing without QUIT releases the maildrop through the async close.
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=context, timeout=10)
    pop.user("alice@example.org")
    assert pop.pass_("alice-password").startswith(b"+OK Logged in, 1 messages")
    pop.close()

    from conftest import wait_for

    wait_for(lambda: "close alice@example.org" in server.log(), 10, "the async close")
    assert "commit alice@example.org deleted=1" in server.log()
    assert "Traceback" not in server.log()
