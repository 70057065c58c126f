"""mailplat doctor against a real DNS server, real certificates and a real mailplat: a correct
deployment passes every row; each broken record, certificate and listener fails with its exact fix."""

from __future__ import annotations

import base64
import datetime
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MailplatServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from dnsserver import DNSServer

COMMAND = [str(Path(sys.executable).parent / "mailplat")]

HOST = "mail.example.org"
HOST_A = "192.0.2.25"
HOST_AAAA = "2001:db8::25"


# --- keys, certificates, configs ----------------------------------------------------


def write_key(path: Path, key: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def dkim_value(key: Any) -> str:
    """The DKIM TXT value for a key, computed here independently of mailplat."""
    public = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def write_certificate(folder: Path, names: list[str], not_before: datetime.timedelta, not_after: datetime.timedelta) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` valid from now+not_before to now+not_after, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else HOST)])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now + not_before).not_valid_after(now + not_after)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return folder / "cert.pem", write_key(folder / "key.pem", key)


def write_config(
    folder: Path, domains: list[str], *, dns_port: int | None = None, listen: dict[str, str] | None = None,
    tls: tuple[Path, Path] | None = None, dkim: dict[str, tuple[str, Path]] | None = None,
) -> Path:
    lines = [f'hostname = "{HOST}"', 'data_dir = "var"', "domains = [" + ", ".join(f'"{d}"' for d in domains) + "]", "", "[listen]"]
    lines += [f'{name} = "{value}"' for name, value in (listen or {}).items()]
    if tls:
        lines += ["", "[tls]", f'certificate = "{tls[0]}"', f'key = "{tls[1]}"']
    lines += ["", "[auth]", 'backend = "passwd-file"', 'path = "users.passwd"', "", "[mailbox]", 'backend = "maildir"', 'path = "mail"']
    if dns_port:
        lines += ["", "[dns]", f'servers = ["127.0.0.1:{dns_port}"]']
    for domain, (selector, key) in (dkim or {}).items():
        lines += ["", f'[dkim."{domain}"]', f'selector = "{selector}"', f'key = "{key}"']
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mailplat.toml").write_text("\n".join(lines) + "\n")
    return folder / "mailplat.toml"


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- running the doctor -----------------------------------------------------------------


class Report:
    """The doctor's exit status and its table, row by row."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.status = result.returncode
        self.output = result.stdout
        self.stderr = result.stderr
        self.rows: list[dict[str, str]] = []
        lines = result.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("CHECK "))
        starts = [lines[header].index(word) for word in ("CHECK", "SUBJECT", "RESULT", "DETAIL")]
        for line in lines[header + 1:]:
            if not line.strip():
                break
            if line.startswith(" "):
                assert line[starts[3]:].startswith("fix: "), line
                self.rows[-1]["fix"] = line[starts[3] + len("fix: "):]
                continue
            self.rows.append({
                "check": line[:starts[1]].strip(), "subject": line[starts[1]:starts[2]].strip(),
                "result": line[starts[2]:starts[3]].strip(), "detail": line[starts[3]:], "fix": "",
            })

    def row(self, check: str, subject: str) -> dict[str, str]:
        found = [r for r in self.rows if r["check"] == check and r["subject"] == subject]
        assert len(found) == 1, f"no single {check} row for {subject} in:\n{self.output}"
        return found[0]

    def __repr__(self) -> str:
        return f"exit {self.status}\n{self.output}{self.stderr}"


def doctor(config: Path, *args: str, timeout: float = 30) -> Report:
    result = subprocess.run([*COMMAND, "--config", str(config), "doctor", *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return Report(result)


def txt_strings(fix: str, owner: str) -> list[str]:
    """The quoted strings of a fix written as ``OWNER. IN TXT "..." "..."``."""
    prefix = f"{owner}. IN TXT "
    assert fix.startswith(prefix), fix
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', fix[len(prefix):])
    assert fix[len(prefix):] == " ".join(f'"{s}"' for s in strings), fix
    return strings


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Ed25519 key of the correct deployment, an RSA key whose record is missing or wrong, and a stranger."""
    folder = tmp_path_factory.mktemp("dkim")
    good = ed25519.Ed25519PrivateKey.generate()
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "good": good, "good_path": write_key(folder / "example.org.key", good),
        "rsa": wrong, "rsa_path": write_key(folder / "rsa.key", wrong),
        "stranger": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture(scope="module")
def dns(keys: dict[str, Any]) -> Iterator[DNSServer]:
    """example.org is published right; example.net, example.com, example.info and example.biz each wrong in their own way."""
    server = DNSServer().start({
        "zones": {
            HOST: {"A": [HOST_A], "AAAA": [HOST_AAAA]},
            "example.org": {"MX": [[10, HOST]], "TXT": ["v=spf1 mx -all", "site-verification=abc"]},
            "mail._domainkey.example.org": {"TXT": [dkim_value(keys["good"])]},
            "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; rua=mailto:postmaster@example.org"]},
            # No MX, no SPF, another key than ours, no DMARC (the name does not exist).
            "example.net": {"TXT": ["site-verification=def"]},
            "mail._domainkey.example.net": {"TXT": [dkim_value(keys["stranger"])]},
            # MX elsewhere, SPF for other addresses only, no DKIM record, DMARC lookups fail.
            "example.com": {"MX": [[10, "mx.elsewhere.test"]], "TXT": ["v=spf1 mx ip4:198.51.100.7 ~all"]},
            "mx.elsewhere.test": {"A": ["198.51.100.8"], "AAAA": ["2001:db8:ffff::8"]},
            # SPF covering the host's IPv4 address but not its IPv6 one.
            "example.biz": {"MX": [[10, HOST]], "TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
            "_dmarc.example.biz": {"TXT": ["v=DMARC1; p=reject"]},
            # A backup MX, SPF through a provider's include, a monitoring-only DMARC.
            "example.info": {"MX": [[10, HOST], [20, "backup.example.info"]], "TXT": ["v=spf1 include:_spf.provider.test -all"]},
            "_spf.provider.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"]},
            "_dmarc.example.info": {"TXT": ["v=DMARC1; p=none"]},
        },
        "servfail": ["_dmarc.example.com"],
    })
    yield server
    server.stop()


# --- a correct deployment -------------------------------------------------------------------


def test_correct_deployment_passes_every_row(make_server, dns: DNSServer, keys: dict[str, Any]):
    """MX, A/AAAA, SPF, DKIM (Ed25519), DMARC published, the server's certificate, all seven listeners up:
    exit 0 and every row ok, with DNS asked through [dns] servers."""
    server: MailplatServer = make_server()
    config = write_config(
        server.root / "doctor", ["example.org"], dns_port=dns.port,
        listen={name: f"tcp:{port}:interface=127.0.0.1" for name, port in server.ports.items()},
        tls=(server.root / "tls" / "cert.pem", server.root / "tls" / "key.pem"),
        dkim={"example.org": ("mail", keys["good_path"])},
    )
    report = doctor(config)
    assert report.status == 0, report
    assert [r["result"] for r in report.rows] == ["ok"] * len(report.rows), report
    assert [(r["check"], r["subject"]) for r in report.rows] == [
        ("A/AAAA", HOST),
        ("MX", "example.org"), ("SPF", "example.org"), ("DKIM", "mail._domainkey.example.org"), ("DMARC", "_dmarc.example.org"),
        ("TLS dates", str(server.root / "tls" / "cert.pem")), ("TLS name", HOST),
        *[("listener", f"{name} tcp:{port}:interface=127.0.0.1") for name, port in server.ports.items()],
    ], report
    assert not any(r["fix"] for r in report.rows), report
    assert report.row("A/AAAA", HOST)["detail"] == f"A {HOST_A}; AAAA {HOST_AAAA}"
    assert report.row("MX", "example.org")["detail"] == f"{HOST} (preference 10)"
    assert report.row("SPF", "example.org")["detail"] == f"allows {HOST_A}, {HOST_AAAA} (mx)"
    assert "ed25519" in report.row("DKIM", "mail._domainkey.example.org")["detail"]
    assert report.row("TLS name", HOST)["detail"] == f"covered by {HOST}"
    assert f"DNS answers from 127.0.0.1:{dns.port} ([dns] servers)" in report.output
    assert f"all {len(report.rows)} checks passed" in report.output
    assert server.ports["smtp"] == server.port and len(server.ports) == 7


# --- broken DNS -------------------------------------------------------------------------------


def test_broken_records_fail_with_the_exact_fix(tmp_path: Path, dns: DNSServer, keys: dict[str, Any]):
    """Each missing or wrong record is a FAIL whose fix is the record to publish; --dns-server is asked."""
    config = write_config(
        tmp_path, ["example.net", "example.com", "example.info", "example.biz"],
        dkim={"example.net": ("mail", keys["rsa_path"]), "example.com": ("s2024", keys["good_path"])},
    )
    report = doctor(config, "--dns-server", f"127.0.0.1:{dns.port}")
    assert report.status == 1, report
    assert f"DNS answers from 127.0.0.1:{dns.port} (--dns-server)" in report.output

    # example.net: nothing right.
    mx = report.row("MX", "example.net")
    assert (mx["result"], mx["fix"]) == ("FAIL", f"example.net. IN MX 10 {HOST}."), report
    spf = report.row("SPF", "example.net")
    assert (spf["result"], spf["fix"]) == ("FAIL", 'example.net. IN TXT "v=spf1 mx -all"'), report
    dkim = report.row("DKIM", "mail._domainkey.example.net")
    assert dkim["result"] == "FAIL" and "another key" in dkim["detail"], report
    strings = txt_strings(dkim["fix"], "mail._domainkey.example.net")
    # A 2048-bit RSA record is longer than one TXT string may be: split, never altered.
    assert "".join(strings) == dkim_value(keys["rsa"]) and len(strings) == 2 and all(len(s) <= 255 for s in strings), dkim
    dmarc = report.row("DMARC", "_dmarc.example.net")
    assert (dmarc["result"], dmarc["fix"]) == ("FAIL", '_dmarc.example.net. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.net"'), report

    # example.com: MX and SPF point elsewhere, the DKIM record is missing, DMARC cannot be asked.
    mx = report.row("MX", "example.com")
    assert (mx["result"], mx["fix"]) == ("FAIL", f"example.com. IN MX 10 {HOST}."), report
    assert f"MX points at mx.elsewhere.test (10), not {HOST}" in mx["detail"]
    spf = report.row("SPF", "example.com")
    assert spf["result"] == "FAIL", report
    assert f"does not allow {HOST_A} (~all), {HOST_AAAA} (~all)" in spf["detail"]
    # The suggestion keeps what the domain already allows; "mx" is there already, so by name.
    assert spf["fix"] == f'example.com. IN TXT "v=spf1 a:{HOST} mx ip4:198.51.100.7 ~all"'
    dkim = report.row("DKIM", "s2024._domainkey.example.com")
    assert dkim["result"] == "FAIL" and "no DKIM record" in dkim["detail"], report
    assert txt_strings(dkim["fix"], "s2024._domainkey.example.com") == [dkim_value(keys["good"])]
    dmarc = report.row("DMARC", "_dmarc.example.com")
    assert dmarc["result"] == "FAIL" and dmarc["detail"] == "cannot check: DNS error: SERVFAIL for _dmarc.example.com TXT", report

    # example.info: works, with warnings for what mailplat cannot vouch for.
    mx = report.row("MX", "example.info")
    assert mx["result"] == "ok" and mx["detail"] == f"{HOST} (preference 10); also backup.example.info (20)", report
    spf = report.row("SPF", "example.info")
    assert spf["result"] == "warn" and "only through include:_spf.provider.test" in spf["detail"], report
    assert spf["fix"].endswith('example.info. IN TXT "v=spf1 mx include:_spf.provider.test -all"')
    dkim = report.row("DKIM", "example.info")
    assert dkim["result"] == "warn" and dkim["fix"] == f"mailplat --config {config} dkim keygen example.info", report
    dmarc = report.row("DMARC", "_dmarc.example.info")
    assert dmarc["result"] == "ok" and dmarc["detail"].startswith("p=none"), report

    # example.biz: SPF lets the host's IPv4 address through, not its IPv6 one.
    spf = report.row("SPF", "example.biz")
    assert spf["result"] == "FAIL" and spf["detail"].endswith(f"does not allow {HOST_AAAA} (-all)"), report
    assert spf["fix"] == 'example.biz. IN TXT "v=spf1 mx ip4:192.0.2.0/24 -all"'

    # Once: the host is fine; no [tls] is a warning.
    assert report.row("A/AAAA", HOST)["result"] == "ok", report
    tls = report.row("TLS", "[tls]")
    assert tls["result"] == "warn" and "STARTTLS is not offered" in tls["detail"], report
    failed = sum(r["result"] == "FAIL" for r in report.rows)
    assert failed == 9 and f"{failed} of {len(report.rows)} checks failed" in report.output, report


def test_host_without_addresses(tmp_path: Path, keys: dict[str, Any]):
    """A hostname with no A/AAAA fails with the records to publish, a loopback one as unreachable;
    SPF then cannot be judged against its addresses."""
    zones = {"example.org": {"MX": [[10, HOST]], "TXT": ["v=spf1 mx -all"]}}
    with DNSServer().start({"zones": zones}) as dns:
        report = doctor(write_config(tmp_path / "none", ["example.org"], dns_port=dns.port))
    assert report.status == 1, report
    row = report.row("A/AAAA", HOST)
    assert row["result"] == "FAIL" and f"{HOST}. IN A <this server's public IPv4 address>" in row["fix"], report
    assert report.row("SPF", "example.org")["result"] == "warn", report

    zones[HOST] = {"A": ["127.0.1.1"]}
    with DNSServer().start({"zones": zones}) as dns:
        report = doctor(write_config(tmp_path / "loopback", ["example.org"], dns_port=dns.port))
    row = report.row("A/AAAA", HOST)
    assert row["result"] == "FAIL" and "other servers cannot reach 127.0.1.1" in row["detail"], report


def test_dns_server_that_never_answers(tmp_path: Path, dns: DNSServer):
    """--dns-server wins over [dns] servers; a server that never answers makes every DNS row
    'cannot check' within a few seconds, not a false 'missing record'."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        silent.bind(("127.0.0.1", 0))
        config = write_config(tmp_path, ["example.org"], dns_port=dns.port)
        started = time.monotonic()
        report = doctor(config, "--dns-server", f"127.0.0.1:{silent.getsockname()[1]}")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert report.status == 1, report
    dns_rows = [r for r in report.rows if r["check"] in ("A/AAAA", "MX", "SPF", "DMARC")]
    assert len(dns_rows) == 4, report
    for row in dns_rows:
        assert row["result"] == "FAIL" and row["detail"].startswith("cannot check: DNS error: no answer for "), report
    assert elapsed < 15, elapsed


def test_bad_dns_server_argument(tmp_path: Path):
    result = subprocess.run(
        [*COMMAND, "--config", str(write_config(tmp_path, ["example.org"])), "doctor", "--dns-server", "dns.example:53"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2 and "is not IP:PORT" in result.stderr, result


# --- the certificate --------------------------------------------------------------------------


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "names, not_before, not_after, check, result, detail",
    [
        pytest.param(["www.example.org", "example.org"], -DAY, 90 * DAY, "TLS name", "FAIL",
                     f"the certificate is for www.example.org, example.org, not {HOST}", id="wrong-name"),
        pytest.param([HOST], -80 * DAY, 5 * DAY, "TLS dates", "FAIL", "in 5 days", id="expires-in-5-days"),
        pytest.param([HOST], -60 * DAY, 20 * DAY, "TLS dates", "warn", "in 20 days: renewal is due", id="expires-in-20-days"),
        pytest.param([HOST], -90 * DAY, -DAY, "TLS dates", "FAIL", "expired on ", id="expired"),
        pytest.param(["*.example.org"], -DAY, 90 * DAY, "TLS name", "ok", "covered by *.example.org", id="wildcard"),
        pytest.param([], -DAY, 90 * DAY, "TLS name", "FAIL", "no subjectAltName", id="no-san"),
    ],
)
def test_certificate(tmp_path: Path, dns: DNSServer, names, not_before, not_after, check, result, detail):
    """The [tls] certificate: its name must cover the hostname (one wildcard label allowed), and
    it must be valid for more than 14 days (a warning under 30)."""
    cert, key = write_certificate(tmp_path / "tls", names, not_before, not_after)
    report = doctor(write_config(tmp_path, ["example.org"], dns_port=dns.port, tls=(cert, key)))
    row = report.row(check, "tls/cert.pem" if check == "TLS dates" else HOST)
    assert row["result"] == result and detail in row["detail"], report
    if result == "FAIL":
        assert report.status == 1, report
        assert row["fix"].startswith("get a certificate whose subjectAltName includes mail.example.org" if check == "TLS name" else "renew the certificate")
    else:
        # A warning is worth reading but does not fail the command.
        assert report.status == 0, report


# --- listeners ----------------------------------------------------------------------------------


def test_listener_not_running(tmp_path: Path, dns: DNSServer):
    """A listener nothing answers on fails ('is mailplat running?'); port 0 cannot be found by anyone."""
    port = free_port()
    cert, key = write_certificate(tmp_path / "tls", [HOST], -DAY, 90 * DAY)
    config = write_config(
        tmp_path, ["example.org"], dns_port=dns.port, tls=(cert, key),
        listen={"smtp": f"tcp:{port}:interface=127.0.0.1", "submission": "tcp:0:interface=127.0.0.1"},
    )
    report = doctor(config)
    assert report.status == 1, report
    smtp = report.row("listener", f"smtp tcp:{port}:interface=127.0.0.1")
    assert smtp["result"] == "FAIL", report
    assert smtp["detail"].startswith(f"cannot connect to 127.0.0.1:{port}: ") and smtp["detail"].endswith("is mailplat running?"), report
    assert smtp["fix"] == f"start it (systemctl start mailplat, or twistd -n mailplat --config {config}) and read its log"
    assert report.row("listener", "submission tcp:0:interface=127.0.0.1")["result"] == "warn", report


class ScriptedServer:
    """A line server on 127.0.0.1 that greets, then answers each command line with its script's reply (impostors for the doctor)."""

    def __init__(self, greeting: bytes, replies: dict[bytes, bytes]) -> None:
        self.greeting = greeting
        self.replies = replies
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.talk, args=(client,), daemon=True).start()

    def talk(self, client: socket.socket) -> None:
        with client, client.makefile("rb") as lines:
            client.settimeout(10)
            try:
                client.sendall(self.greeting + b"\r\n")
                for line in lines:
                    command = line.rstrip(b"\r\n")
                    reply = self.replies.get(command.split(b" ", 1)[-1].upper() if command.startswith(b"a ") else command.upper())
                    if reply is None:
                        return
                    client.sendall(reply)
            except OSError:
                pass

    def stop(self) -> None:
        # shutdown() wakes the accept() that close() alone would leave blocked.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)


def test_retrieval_listeners_speak_their_protocol(make_server, dns: DNSServer):
    """pop3, pop3s, imap and imaps are checked as a mail client sees them: greeting, STLS/STARTTLS with no login before it
    (LOGINDISABLED), TLS at once on the implicit ones, and the [tls] certificate served."""
    server: MailplatServer = make_server()
    names = ("pop3", "pop3s", "imap", "imaps")
    config = write_config(
        server.root / "doctor", ["example.org"], dns_port=dns.port,
        listen={name: f"tcp:{server.ports[name]}:interface=127.0.0.1" for name in names},
        tls=(server.root / "tls" / "cert.pem", server.root / "tls" / "key.pem"),
    )
    report = doctor(config)
    details = {name: report.row("listener", f"{name} tcp:{server.ports[name]}:interface=127.0.0.1") for name in names}
    assert all(row["result"] == "ok" and not row["fix"] for row in details.values()), report
    where = {name: f"127.0.0.1:{server.ports[name]}: " for name in names}
    assert details["pop3"]["detail"] == where["pop3"] + "STLS, no login before it, login after it"
    assert details["pop3s"]["detail"] == where["pop3s"] + "TLS at once (RFC 8314), POP3 greeting, login offered"
    assert details["imap"]["detail"] == where["imap"] + "STARTTLS, LOGINDISABLED before it, login after it"
    assert details["imaps"]["detail"] == where["imaps"] + "TLS at once (RFC 8314), IMAP greeting, login offered"


def test_retrieval_listener_that_is_not_what_it_says(make_server, dns: DNSServer, tmp_path: Path):
    """A listener that greets in another protocol, offers login before TLS, has no TLS, or serves an old certificate
    is a FAIL (a warning for the certificate) naming what a client would meet."""
    server: MailplatServer = make_server()
    loose_imap = ScriptedServer(
        b"* OK ready", {b"CAPABILITY": b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\na OK done\r\n", b"LOGOUT": b"* BYE\r\na OK\r\n"},
    )
    loose_pop3 = ScriptedServer(b"+OK ready", {b"CAPA": b"+OK\r\nUSER\r\nSTLS\r\n.\r\n"})
    try:
        cert, key = write_certificate(tmp_path / "renewed", [HOST], -DAY, 90 * DAY)
        config = write_config(
            tmp_path, ["example.org"], dns_port=dns.port, tls=(cert, key),
            listen={
                "imap": f"tcp:{server.ports['pop3']}:interface=127.0.0.1",   # a POP3 server
                "imaps": f"tcp:{loose_imap.port}:interface=127.0.0.1",       # no TLS at all
                "pop3": f"tcp:{loose_pop3.port}:interface=127.0.0.1",        # USER before STLS
                "pop3s": f"tcp:{server.ports['pop3s']}:interface=127.0.0.1",  # not the [tls] certificate
                "submission": f"tcp:{loose_imap.port}:interface=127.0.0.1",  # only connected to
            },
        )
        report = doctor(config)
        loose = doctor(write_config(
            tmp_path / "loose", ["example.org"], dns_port=dns.port, tls=(cert, key),
            listen={"imap": f"tcp:{loose_imap.port}:interface=127.0.0.1"},
        ))
    finally:
        loose_imap.stop()
        loose_pop3.stop()
    assert report.status == 1, report

    def row(report: Report, name: str, port: int) -> dict[str, str]:
        return report.row("listener", f"{name} tcp:{port}:interface=127.0.0.1")

    imap = row(report, "imap", server.ports["pop3"])
    assert imap["result"] == "FAIL" and imap["detail"].startswith(f"127.0.0.1:{server.ports['pop3']}: greets with \"+OK"), report
    assert imap["detail"].endswith("not as an IMAP server (* OK ...)"), report
    assert imap["fix"] == f"see which program listens there (ss -ltnp 'sport = :{server.ports['pop3']}'): [listen] imap must be mailplat's own imap listener"
    imaps = row(report, "imaps", loose_imap.port)
    assert imaps["result"] == "FAIL" and imaps["detail"].endswith(
        "the TLS handshake failed (wrong version number), waiting for the TLS handshake and greeting"
    ), report
    pop3 = row(report, "pop3", loose_pop3.port)
    assert pop3["result"] == "FAIL" and pop3["detail"].endswith("CAPA offers USER before TLS: a client may send its password in clear"), report
    pop3s = row(report, "pop3s", server.ports["pop3s"])
    assert pop3s["result"] == "warn" and pop3s["detail"].endswith("but it serves another certificate than renewed/cert.pem"), report
    assert pop3s["fix"].startswith("restart mailplat"), report
    assert row(report, "submission", loose_imap.port)["result"] == "ok", report
    assert row(loose, "imap", loose_imap.port)["detail"].endswith(
        "CAPABILITY offers AUTH=PLAIN, LOGIN before TLS: a client may send its password in clear (RFC 3501 6.2.3)"
    ), loose


# --- SPF, term by term ---------------------------------------------------------------------------


SPF_CASES = {
    # domain: (its SPF record(s), the result, text in the detail)
    "by-name.test": (["v=spf1 a:mail.example.org -all"], "ok", f"allows {HOST_A}, {HOST_AAAA} (a:mail.example.org)"),
    "by-network.test": (["v=spf1 a/24//64 -all"], "ok", "(a/24//64)"),
    "by-address.test": ([f"v=spf1 ip4:{HOST_A} ip6:{HOST_AAAA}/128 -all"], "ok", f"(ip4:{HOST_A}, ip6:{HOST_AAAA}/128)"),
    "all-first.test": (["v=spf1 -all mx"], "FAIL", f"does not allow {HOST_A} (-all), {HOST_AAAA} (-all)"),
    "plus-all.test": (["v=spf1 +all"], "FAIL", "+all lets every host on the internet send as plus-all.test"),
    "two-records.test": (["v=spf1 mx -all", "v=spf1 -all"], "FAIL", "2 SPF records"),
    # The macro expands to the address asked about: only the IPv4 one is published.
    "macro.test": (["v=spf1 exists:%{i}.spf.test -all"], "FAIL", f"does not allow {HOST_AAAA} (-all)"),
    "nested.test": (["v=spf1 include:level1.test -all"], "warn", "only through include:level1.test"),
    "redirect.test": (["v=spf1 redirect=_spf.provider.test"], "warn", "only through redirect=_spf.provider.test"),
    "redirect-fail.test": (["v=spf1 redirect=level3.test"], "FAIL", f"does not allow {HOST_A} (redirect=level3.test: -all)"),
    "typo.test": (["v=spf1 mx frobnicate -all"], "FAIL", "permerror: Unknown mechanism found: frobnicate"),
}


def test_spf_terms(tmp_path: Path):
    """SPF is judged against the host's addresses as a receiver judges it (pyspf, includes, redirects
    and macros followed), and the row names the term that decided."""
    zones: dict[str, Any] = {
        HOST: {"A": [HOST_A], "AAAA": [HOST_AAAA]},
        "level1.test": {"TXT": ["v=spf1 include:level2.test -all"]},
        "level2.test": {"TXT": ["v=spf1 mx -all"], "MX": [[10, HOST]]},
        "level3.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
        "_spf.provider.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"]},
        f"{HOST_A}.spf.test": {"A": ["127.0.0.2"]},
    }
    for domain, (records, _, _) in SPF_CASES.items():
        zones[domain] = {"MX": [[10, HOST]], "TXT": records}
    zones["by-network.test"].update({"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]})
    with DNSServer().start({"zones": zones}) as dns:
        report = doctor(write_config(tmp_path, list(SPF_CASES), dns_port=dns.port))
    for domain, (_, result, detail) in SPF_CASES.items():
        row = report.row("SPF", domain)
        assert row["result"] == result and detail in row["detail"], (domain, report)
        assert bool(row["fix"]) == (result != "ok"), (domain, report)
