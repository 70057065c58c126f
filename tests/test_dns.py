"""DNS servers: the one syntax of a server's address (IPv6 in brackets), read once by the config and
printed back by check-config, and an IPv6 server asked by both resolvers of a real mailplat."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import commands
from conftest import (
    BASE_CONFIG,
    MAILPLAT,
    MailplatServer,
    merge_toml,
    message,
    wait_for,
)
from dnsserver import DNSServer

from mailplat.wire.dns import format_server, parse_server


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to run a DNS server on")


@pytest.mark.parametrize("text, server", [
    ("127.0.0.1:53", ("127.0.0.1", 53)),
    (" 192.0.2.53:5353 ", ("192.0.2.53", 5353)),
    ("192.0.2.53", ("192.0.2.53", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:db8::53]", ("2001:db8::53", 53)),
    ("2001:db8::53", ("2001:db8::53", 53)),
])
def test_parse_server(text, server):
    """IP:PORT, [IPv6]:PORT and a bare address (port 53) are read; each prints back in the form that reads the same."""
    assert parse_server(text) == server
    assert parse_server(format_server(server)) == server
    assert format_server(("::1", 5353)) == "[::1]:5353" and format_server(("127.0.0.1", 53)) == "127.0.0.1:53"


@pytest.mark.parametrize("text, problem", [
    ("dns.example:53", "is not IP:PORT"),
    ("", "is not IP:PORT"),
    ("[::1]:", "is not IP:PORT"),
    ("127.0.0.1:0", "is not a port number"),
    ("127.0.0.1:65536", "is not a port number"),
    ("127.0.0.1:dns", "is not a port number"),
    ("[::1]:x", "is not IP:PORT"),
])
def test_parse_server_refuses(text, problem):
    """A name, a missing or impossible port: ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=problem):
        parse_server(text)


def test_check_config_prints_servers_back(tmp_path: Path):
    """[dns] servers are parsed once; the effective config writes them as the config may: [::1]:53 for IPv6."""
    site = MailplatServer(tmp_path / "site", merge_toml(BASE_CONFIG, '[dns]\nservers = ["[::1]:5353", "192.0.2.53", " 127.0.0.1:53"]\n'))
    result = commands.run([MAILPLAT, "--config", str(site.config_path), "check-config"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["dns"] == {"servers": ["[::1]:5353", "192.0.2.53:53", "127.0.0.1:53"]}


def test_settings_hold_servers_as_pairs(tmp_path: Path):
    """What the service, the filters and the doctor read: (IP, port) pairs, parsed by config alone."""
    from mailplat.config import load

    site = MailplatServer(tmp_path / "site", merge_toml(BASE_CONFIG, '[dns]\nservers = ["[::1]:5353", "192.0.2.53"]\n'))
    assert load(str(site.config_path)).dns_servers == (("::1", 5353), ("192.0.2.53", 53))


@needs_ipv6
def test_ipv6_dns_server_is_used(make_server):
    """With [dns] servers = ["[::1]:PORT"], the dnsbl filter (twisted.names, on the reactor) and the authentication
    filter's SPF check (dnspython, in a thread) both get their answers from that server."""
    zones = {
        "1.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed for testing"]},
        "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    }
    with DNSServer("::1").start({"zones": zones}) as dns:
        server = make_server(
            f'[dns]\nservers = ["[::1]:{dns.port}"]\n'
            '[[filter]]\nbackend = "dnsbl"\nzones = ["bl.test"]\naction = "tag"\nskip = []\n'
            '[[filter]]\nbackend = "authentication"\n'
        )
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            assert client.sendmail("a@pass.test", ["alice@example.org"], message(sender="a@pass.test")) == {}
        [delivered] = wait_for(lambda: server.messages("alice@example.org"), 10, "the message in alice's inbox")  # type: ignore[misc]
    assert b"\r\nX-DNSBL: bl.test listed 127.0.0.1" in b"\r\n" + delivered, delivered
    assert b"spf=pass smtp.mailfrom=a@pass.test" in delivered, delivered


def test_pyspf_is_not_patched(tmp_path: Path):
    """Importing mailplat's SPF code, the filter and the doctor leaves pyspf's own DNS lookup in place
    (mailplat's lookups go through its query subclass), for any other user of pyspf in the process."""
    code = (
        "import spf; own = spf.DNSLookup\n"
        "import mailplat.mailauth.spf, mailplat.filters.authentication, mailplat.doctor, mailplat.service\n"
        "assert spf.DNSLookup is own and own.__module__ == 'spf', spf.DNSLookup\n"
        "assert spf.query.dns is not mailplat.mailauth.spf.Query.dns\n"
    )
    # Not from the repository's root, whose twisted/ folder would shadow Twisted.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
