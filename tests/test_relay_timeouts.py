"""The relay against remotes that stall (RFC 5321 4.5.3.2 timeouts) and
against certificates that do or do not verify (``[relay] tls = "verify"``)."""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from conftest import message, wait_for
from dnsserver import DNSServer
from relaying import REMOTE_CONFIG, queue_cli, submit, tls_context

from mailplat.tls import make_self_signed


class StallingRemote:
    """A remote MX that behaves until ``stall_at``, then goes silent (and,
    at "data", stops reading too, so that our sender's buffers fill up)."""

    def __init__(self, stall_at: str) -> None:
        self.stall_at = stall_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop_event.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.connections.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            if self.stall_at == "greeting":
                return
            conn.sendall(b"220 stalling.test ESMTP\r\n")
            reader = conn.makefile("rb")
            for line in reader:
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    if self.stall_at == "data":
                        return  # never read again
                    for data_line in reader:
                        if data_line == b".\r\n":
                            break
                    return  # "done": never answer the final reply
                if verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                # No PIPELINING: the relay's one-command-at-a-time path.
                conn.sendall(b"250 stalling.test\r\n" if verb == b"EHLO" else b"250 ok\r\n")
        except OSError:
            return

    def close(self) -> None:
        self.stop_event.set()
        self.listener.close()
        for conn in self.connections:
            conn.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    """One per module: its answers never change."""
    server = DNSServer().start({"zones": {
        "elsewhere.test": {"MX": [[10, "mx.elsewhere.test"]]},
        "mx.elsewhere.test": {"A": ["127.0.0.1"]},
    }})
    yield server
    server.stop()


@pytest.fixture
def stalling() -> Iterator[Callable[[str], StallingRemote]]:
    remotes: list[StallingRemote] = []

    def start(stall_at: str) -> StallingRemote:
        remotes.append(StallingRemote(stall_at))
        return remotes[-1]

    yield start
    for remote in remotes:
        remote.close()


def local_server(make_server, dns: DNSServer, port: int, relay: str, name: str = "local"):
    return make_server(
        f'[dns]\nservers = ["127.0.0.1:{dns.port}"]\n[relay]\nport = {port}\nretry_initial = 3600\n{relay}', name=name
    )


@pytest.mark.parametrize(
    "stall_at, timeout_key, size",
    [("greeting", "greeting_timeout", 1), ("done", "data_done_timeout", 1), ("data", "data_block_timeout", 8 << 20)],
)
def test_a_stalled_remote_times_out_and_the_mail_stays_queued(make_server, dns, stalling, stall_at, timeout_key, size):
    remote = stalling(stall_at)
    local = local_server(make_server, dns, remote.port, f"{timeout_key} = 0.5\n")
    body = ("x" * 998 + "\r\n") * (size // 1000 + 1)
    with smtplib.SMTP_SSL("127.0.0.1", local.ports["submissions"], context=tls_context(), timeout=60) as client:
        client.login("alice@example.org", "alice-password")
        client.sendmail("alice@example.org", ["carol@elsewhere.test"], message("stalled", body, "alice@example.org", "carol@elsewhere.test"))
    expected = "stopped reading the message" if stall_at == "data" else "no reply within 0.5 seconds"
    wait_for(lambda: expected in local.log(), timeout=20, what=f"the {timeout_key}")
    listing = failed_attempt(local)
    assert "<carol@elsewhere.test>  pending" in listing and expected in listing


def failed_attempt(server) -> str:
    """`queue list` once the first attempt is recorded."""

    def listing() -> str:
        out = queue_cli(server, "list").stdout
        return out if "attempts=1" in out else ""

    return str(wait_for(listing, timeout=20, what="the failed attempt"))


def remote_with_certificate(make_server, tmp_path, hostname: str, name: str):
    """A mailplat MX for elsewhere.test offering STARTTLS with a certificate for ``hostname``."""
    tls = tmp_path / name / "tls"
    tls.mkdir(parents=True)
    make_self_signed(hostname, str(tls / "cert.pem"), str(tls / "key.pem"))
    config = REMOTE_CONFIG.format(port=0) + '\n[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n'
    return make_server(config=config, users={"carol@elsewhere.test": "carol-password"}, name=name)


def test_tls_verify_accepts_a_certificate_naming_the_mx(make_server, dns, tmp_path):
    remote = remote_with_certificate(make_server, tmp_path, "mx.elsewhere.test", "good-remote")
    ca_file = tmp_path / "good-remote" / "tls" / "cert.pem"
    local = local_server(make_server, dns, remote.port, f'tls = "verify"\nca_file = "{ca_file}"\n')
    submit(local, ["carol@elsewhere.test"], "verified")
    wait_for(lambda: any(b"Subject: verified" in m for m in remote.messages("carol@elsewhere.test")), what="the verified delivery")
    assert b"with ESMTPS" in remote.messages("carol@elsewhere.test")[0]


@pytest.mark.parametrize("trusted", [True, False])
def test_tls_verify_refuses_a_wrong_or_untrusted_certificate(make_server, dns, tmp_path, trusted):
    """A certificate for another name (though trusted), or one nobody vouches for: nothing is sent."""
    hostname = "mail.other.test" if trusted else "mx.elsewhere.test"
    remote = remote_with_certificate(make_server, tmp_path, hostname, "bad-remote")
    ca_file = tmp_path / "bad-remote" / "tls" / "cert.pem"
    relay = f'tls = "verify"\nca_file = "{ca_file}"\n' if trusted else 'tls = "verify"\n'
    local = local_server(make_server, dns, remote.port, relay)
    submit(local, ["carol@elsewhere.test"], "unverified")
    listing = failed_attempt(local)
    assert "<carol@elsewhere.test>  pending" in listing
    assert remote.messages("carol@elsewhere.test") == []
