"""`make run`'s dev instance: first start creates dev/, mail to the demo user lands and is read over IMAP, a restart reuses dev/."""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import ssl
import stat
import subprocess
import sys
from pathlib import Path

from conftest import START_TIMEOUT, message, stop_process, wait_for

from mailplat.backends.passwdfile import parse
from mailplat.passwords import verify_password


class DevInstance:
    """`python -m mailplat.devinstance` in ``cwd``, its output in a file."""

    def __init__(self, cwd: Path, run: int) -> None:
        self.out = cwd / f"devinstance-{run}.out"
        any_port = "tcp:0:interface=127.0.0.1"
        env = dict(
            os.environ,
            MAILPLAT_DEV_SMTP=any_port, MAILPLAT_DEV_SUBMISSION=any_port, MAILPLAT_DEV_POP3=any_port, MAILPLAT_DEV_POP3S=any_port,
            MAILPLAT_DEV_IMAP=any_port, MAILPLAT_DEV_IMAPS=any_port,
        )
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailplat.devinstance"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_listening(self) -> dict[str, int]:
        """The port of each listener, once all six listen."""
        def ports() -> dict[str, int] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the dev instance exited with {self.process.returncode}:\n{self.output()}")
            found = {name: int(port) for name, port in re.findall(r"(\w+) listening on 127\.0\.0\.1:(\d+)", self.output())}
            return found if len(found) == 6 else None

        return wait_for(ports, START_TIMEOUT, "the dev instance to listen")  # type: ignore[return-value]

    def stop(self) -> None:
        stop_process(self.process)


def test_dev_instance_first_start_and_restart(tmp_path):
    """The first start creates dev/ with a demo user whose password is printed once; mail to it lands; a restart reuses dev/."""
    dev = tmp_path / "dev"
    first = DevInstance(tmp_path, 1)
    try:
        ports = first.wait_listening()
        port = ports["smtp"]
        password_file = dev / "demo-password.txt"
        password = password_file.read_text().strip()
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert f"password: {password}" in first.output()
        # Stored the way `mailplat user add` stores it: an argon2id hash of the printed password.
        stored = parse((dev / "users.passwd").read_text(), "users.passwd", allow_plain=False)
        assert list(stored) == ["demo@example.test"]
        assert stored["demo@example.test"].startswith("{ARGON2ID}")
        assert verify_password(stored["demo@example.test"], password)
        assert "swaks" in first.output() and "dev/mailplat.toml" in first.output()
        for name in ("imap", "imaps"):
            assert f"  {name:<10} tcp:0:interface=127.0.0.1  (PORT: see the '{name} listening on' line below)" in first.output()
        assert "IMAP server 127.0.0.1, port PORT SSL/TLS (or PORT STARTTLS), username demo@example.test" in first.output()

        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("someone@remote.test", ["demo@example.test"], message("dev one", to="demo@example.test"))
            client.sendmail("someone@remote.test", ["postmaster@example.test"], message("dev two", to="postmaster@example.test"))
        new = dev / "mail" / "example.test" / "demo" / "new"
        contents = [p.read_bytes() for p in new.iterdir()]
        assert len(contents) == 2
        assert any(b"Subject: dev one" in c for c in contents) and any(b"Subject: dev two" in c for c in contents)

        # The demo user reads both over IMAPS and over IMAP with STARTTLS, trusting dev/'s certificate.
        context = ssl.create_default_context(cafile=str(dev / "tls" / "cert.pem"))
        context.check_hostname = False
        with imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=context, timeout=30) as client:
            client.login("demo@example.test", password)
            assert client.select("INBOX", readonly=True) == ("OK", [b"2"])
        with imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30) as client:
            assert "LOGINDISABLED" in client.capabilities
            client.starttls(context)
            client.login("demo@example.test", password)
            assert client.select("INBOX", readonly=True) == ("OK", [b"2"])
    finally:
        first.stop()

    kept = {p: p.read_bytes() for p in (dev / "mailplat.toml", dev / "users.passwd", password_file, dev / "tls" / "cert.pem")}
    second = DevInstance(tmp_path, 2)
    try:
        second.wait_listening()
        assert password not in second.output()
        assert "password in dev/demo-password.txt" in second.output()
        assert {p: p.read_bytes() for p in kept} == kept
        # In new/, or in cur/ once the IMAP session above has seen them.
        maildir = dev / "mail" / "example.test" / "demo"
        assert len(list((maildir / "new").iterdir())) + len(list((maildir / "cur").iterdir())) == 2
    finally:
        second.stop()
