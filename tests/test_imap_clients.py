"""Real IMAP clients, unmodified, against mailplat: mbsync and offlineimap two-way
sync, neomutt reading and sending, curl, and two devices on one account.

Every client trusts the test's self-signed certificate (for mail.example.org)
and nothing else: mbsync by ``CertificateFile`` (an exact match of the server's
certificate is trusted whatever the host name), offlineimap by the
certificate's SHA-256 fingerprint, neomutt by ``certificate_file`` with the
``#H`` line it writes itself when a user accepts a certificate for a host, curl
and imaplib by the certificate as their CA (curl reaches mail.example.org
through ``--resolve``).  Each test has an account of its own on one server
for the module.

MAILPLAT_IMAP_PEER=dovecot runs the same tests against a throwaway Dovecot
(benchmarks/imap_dovecot.py; apt-get install -y dovecot-imapd), which is how
the client configurations were checked: a test that passes there and fails
here points at mailplat.
"""

from __future__ import annotations

import email
import fcntl
import hashlib
import imaplib
import os
import re
import select
import shutil
import smtplib
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, USERS, MailplatServer, stop_process, wait_for

HOST = "mail.example.org"
PEER = os.environ.get("MAILPLAT_IMAP_PEER", "mailplat")
# One account per test, so that the tests can share the server.
ACCOUNTS = {
    **USERS,
    "mbsync@example.org": "mbsync-password",
    "offline@example.org": "offline-password",
    "mutt@example.org": "mutt-password",
    "curl@example.org": "curl-password",
    "devices@example.org": "devices-password",
}
TIMEOUT = 60


def need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        why = f"needs {program} (apt-get install -y {package})"
        if os.environ.get("MAILPLAT_REQUIRE_DAEMONS") == "1":
            pytest.fail(why)
        pytest.skip(why)


# --- the server ------------------------------------------------------------------------


class Peer:
    """The IMAP server under test, as the clients see it."""

    def __init__(self, root: Path, ports: dict[str, int], cert: Path, maildirs: Path, smtp_port: int | None) -> None:
        self.root = root
        self.ports = ports
        # Self-signed: the certificate is its own CA.
        self.cert = cert
        self.maildirs = maildirs
        self.smtp_port = smtp_port

    def maildir(self, address: str, folder: str = "") -> Path:
        """The server's own maildir of ``address`` (Maildir++: a folder is a ".Name" subfolder)."""
        local, domain = address.split("@")
        path = self.maildirs / domain / local
        return path / ("." + folder.replace("/", ".")) if folder else path

    def stored_flags(self, address: str, folder: str = "") -> list[str]:
        """The maildir flag letters of each stored message, sorted (new/ counts as no flags)."""
        path = self.maildir(address, folder)
        found = [p.name.partition(":2,")[2] for p in (path / "cur").iterdir()] if (path / "cur").is_dir() else []
        found += [""] * (len(list((path / "new").iterdir())) if (path / "new").is_dir() else 0)
        return sorted(found)

    def stored(self, address: str, folder: str = "") -> dict[str, bytes]:
        """Subject -> bytes of each message in the server's own maildir, as delivery stored it (with its Received: lines)."""
        return {subject: path.read_bytes() for subject, path in local_messages(self.maildir(address, folder)).items()}

    def deliver(self, address: str, *messages: bytes) -> None:
        """Mail for ``address``: by SMTP to mailplat, by APPEND to Dovecot (which has no SMTP here)."""
        if self.smtp_port is not None:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=TIMEOUT) as client:
                for raw in messages:
                    client.sendmail("someone@remote.test", [address], raw)
            return
        with login(self, address) as client:
            for raw in messages:
                assert client.append("INBOX", None, None, raw)[0] == "OK"

    def fingerprint(self) -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert.read_text())).hexdigest()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    root = tmp_path_factory.mktemp("imap")
    if PEER == "dovecot":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        from imap_dovecot import Dovecot  # type: ignore[import-not-found,unused-ignore]

        from mailplat.tls import make_self_signed

        make_self_signed(HOST, str(root / "cert.pem"), str(root / "key.pem"))
        # Outside pytest's 0700 folders: Dovecot's processes run as other users.
        home = Path(tempfile.mkdtemp(prefix="mailplat-imap-clients-"))
        dovecot = Dovecot(home, ACCOUNTS, root / "cert.pem", root / "key.pem").start()
        try:
            yield Peer(root, dovecot.ports, root / "cert.pem", dovecot.root / "mail", None)
        finally:
            dovecot.stop()
            shutil.rmtree(home, ignore_errors=True)
        return
    server = MailplatServer(root, BASE_CONFIG, ACCOUNTS)
    server.start()
    try:
        yield Peer(root, {"imap": server.ports["imap"], "imaps": server.ports["imaps"]}, root / "tls" / "cert.pem", root / "mail", server.port)
    finally:
        server.stop()


def login(peer: Peer, address: str) -> imaplib.IMAP4_SSL:
    """imaplib over implicit TLS, checking the certificate (not the host name: we connect to 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(peer.cert))
    context.check_hostname = False
    client = imaplib.IMAP4_SSL("127.0.0.1", peer.ports["imaps"], ssl_context=context, timeout=TIMEOUT)
    try:
        client.login(address, ACCOUNTS[address])
    except BaseException:
        client.shutdown()
        raise
    return client


def server_state(peer: Peer, address: str, folder: str = "INBOX") -> dict[str, set[str]]:
    """Subject -> flags of every message in ``folder``, as IMAP reports them."""
    with login(peer, address) as client:
        status, _ = client.select(f'"{folder}"', readonly=True)
        assert status == "OK", folder
        return fetch_state(client)


def fetch_state(client: imaplib.IMAP4) -> dict[str, set[str]]:
    status, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK", data
    state: dict[str, set[str]] = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
        subject = email.message_from_bytes(item[1])["Subject"]
        state[subject] = set(flags.group(1).decode().split()) if flags else set()
    return state


def message(subject: str, to: str, body: str = "") -> bytes:
    return (
        f"From: <someone@remote.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}.{time.time_ns()}@remote.test>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n"
        f"{body or subject + ' body'}\r\n"
    ).encode()


# --- local maildirs (the clients' side) -----------------------------------------------------------


def local_messages(folder: Path) -> dict[str, Path]:
    """Subject -> file of every message in a client's local maildir folder."""
    found = {}
    for sub in ("new", "cur"):
        if (folder / sub).is_dir():
            for path in (folder / sub).iterdir():
                found[email.message_from_bytes(path.read_bytes())["Subject"]] = path
    return found


def local_flags(path: Path) -> str:
    return path.name.partition(":2,")[2] if ":2," in path.name else ""


def set_local_flags(path: Path, flags: str) -> Path:
    """Flag a local message the way a maildir mail reader does: rename it into cur/ with the letters."""
    base = path.name.split(":2,")[0]
    target = path.parent.parent / "cur" / f"{base}:2,{''.join(sorted(flags))}"
    path.rename(target)
    return target


def new_local_message(folder: Path, raw: bytes, name: str) -> None:
    """A message written into a local maildir (LF line ends, as a local mail reader writes)."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "tmp" / name).write_bytes(raw.replace(b"\r\n", b"\n"))
    (folder / "tmp" / name).rename(folder / "new" / name)


def same_message(local: bytes, sent: bytes) -> bool:
    """The clients store LF line ends locally (the server keeps CRLF), and mbsync adds an X-TUID header of its own."""
    local = re.sub(rb"(?m)^X-TUID: .*\n", b"", local, count=1)
    return local.replace(b"\r\n", b"\n") == sent.replace(b"\r\n", b"\n")


# --- mbsync ------------------------------------------------------------------------------------


class Mbsync:
    """One device syncing one account with mbsync (isync) into a local maildir."""

    def __init__(self, peer: Peer, address: str, home: Path, tls: str = "STARTTLS") -> None:
        self.home = home
        self.local = home / "Mail"
        self.local.mkdir(parents=True)
        port = peer.ports["imap" if tls == "STARTTLS" else "imaps"]
        self.rc = home / "mbsyncrc"
        self.rc.write_text(
            f"IMAPAccount account\nHost 127.0.0.1\nPort {port}\nUser {address}\nPass {ACCOUNTS[address]}\n"
            f"SSLType {tls}\nCertificateFile {peer.cert}\n\n"
            "IMAPStore remote\nAccount account\n\n"
            f"MaildirStore local\nPath {self.local}/\nInbox {self.local}/INBOX\nSubFolders Verbatim\n\n"
            "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSync All\nSyncState *\n"
        )

    def run(self) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["mbsync", "--verbose", "-c", str(self.rc), "--all"], capture_output=True, text=True, timeout=TIMEOUT,
            env={**os.environ, "HOME": str(self.home)},
        )
        assert result.returncode == 0, f"mbsync exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        # e.g. "Warning: lost track of 1 pushed message(s)": a UID the server gave (APPENDUID) that mbsync could not find.
        assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
        return result

    def inbox(self) -> dict[str, Path]:
        return local_messages(self.local / "INBOX")


def test_mbsync_two_way_sync(peer: Peer, tmp_path: Path):
    """mbsync over STARTTLS pulls the inbox, pushes local flags, deletions, a new message and a new folder, and pulls the server's changes back."""
    need("mbsync", "isync")
    user = "mbsync@example.org"
    sent = {s: message(s, user) for s in ("keep", "flag-me", "delete-me")}
    peer.deliver(user, *sent.values())
    device = Mbsync(peer, user, tmp_path / "laptop")

    device.run()
    pulled = device.inbox()
    assert sorted(pulled) == sorted(sent)
    stored = peer.stored(user)
    assert all(stored[s].endswith(sent[s]) and same_message(pulled[s].read_bytes(), stored[s]) for s in sent)
    assert (device.local / "Sent").is_dir()  # the special-use folders came down too

    # Read and flag one, delete one, write one, and file one into a new folder.
    set_local_flags(pulled["flag-me"], "FS")
    pulled["delete-me"].unlink()
    new_local_message(device.local / "INBOX", message("written-locally", user), "1.local.laptop")
    new_local_message(device.local / "Projects", message("filed-locally", user), "2.local.laptop")
    device.run()

    state = server_state(peer, user)
    assert sorted(state) == ["flag-me", "keep", "written-locally"], state
    assert {"\\Seen", "\\Flagged"} <= state["flag-me"] and "\\Flagged" not in state["keep"], state
    assert sorted(server_state(peer, user, "Projects")) == ["filed-locally"]
    # On the server's disk too: the maildir flag letters in the file names.
    assert peer.stored_flags(user) == ["", "", "FS"] and peer.stored_flags(user, "Projects") == [""], peer.stored_flags(user)

    # The server's side changes: another client answers one and deletes one.
    with login(peer, user) as client:
        client.select("INBOX")
        uids = {s: uid for s, uid in uid_by_subject(client).items()}
        assert client.uid("STORE", uids["keep"], "+FLAGS", "(\\Answered)")[0] == "OK"
        assert client.uid("STORE", uids["written-locally"], "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert client.expunge()[0] == "OK"
    device.run()
    again = device.inbox()
    assert sorted(again) == ["flag-me", "keep"]
    assert "R" in local_flags(again["keep"]) and local_flags(again["flag-me"]) == "FS"

    # Nothing left to do: a fourth run changes nothing on either side.
    device.run()
    assert {s: p.name for s, p in device.inbox().items()} == {s: p.name for s, p in again.items()}
    assert sorted(server_state(peer, user)) == ["flag-me", "keep"]


def uid_by_subject(client: imaplib.IMAP4) -> dict[str, str]:
    status, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK", data
    found = {}
    for item in data:
        if isinstance(item, tuple):
            uid = re.search(rb"UID (\d+)", item[0])
            assert uid, item
            found[email.message_from_bytes(item[1])["Subject"]] = uid.group(1).decode()
    return found


# --- offlineimap ------------------------------------------------------------------------


def test_offlineimap_round_trip(peer: Peer, tmp_path: Path):
    """offlineimap over implicit TLS pulls the inbox, then pushes a flag, a deletion and a new message."""
    need("offlineimap", "offlineimap3")
    user = "offline@example.org"
    sent = {s: message(s, user) for s in ("one", "two", "three")}
    peer.deliver(user, *sent.values())
    local = tmp_path / "Mail"
    rc = tmp_path / "offlineimaprc"
    rc.write_text(
        f"[general]\naccounts = test\nmetadata = {tmp_path / 'metadata'}\nui = basic\n\n"
        "[Account test]\nlocalrepository = local\nremoterepository = remote\n\n"
        f"[Repository local]\ntype = Maildir\nlocalfolders = {local}\n\n"
        f"[Repository remote]\ntype = IMAP\nremotehost = 127.0.0.1\nremoteport = {peer.ports['imaps']}\n"
        f"remoteuser = {user}\nremotepass = {ACCOUNTS[user]}\nssl = yes\ncert_fingerprint = {peer.fingerprint()}\n"
    )

    def run() -> None:
        result = subprocess.run(
            ["offlineimap", "-c", str(rc), "-o", "-u", "basic"], capture_output=True, text=True, timeout=TIMEOUT,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "ERROR" not in output, output

    run()
    pulled = local_messages(local / "INBOX")
    assert sorted(pulled) == sorted(sent)
    stored = peer.stored(user)
    assert all(same_message(pulled[s].read_bytes(), stored[s]) for s in sent)

    set_local_flags(pulled["one"], "F")
    pulled["two"].unlink()
    new_local_message(local / "INBOX", message("four", user), "4.local.offline")
    run()
    state = server_state(peer, user)
    assert sorted(state) == ["four", "one", "three"], state
    assert "\\Flagged" in state["one"] and "\\Flagged" not in state["three"], state
    assert len(peer.stored_flags(user)) == 3


# --- neomutt ------------------------------------------------------------------------


def in_terminal(argv: list[str], env: dict[str, str], typed: tuple[tuple[bytes, bytes], ...] = (), timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run a full-screen program on a pseudo-terminal of 80x24; its exit status and what it drew.

    ``typed``: (what appears on the screen, the keys then typed), in turn.
    """
    typed = tuple(typed)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the program has exited and the terminal is gone
                    chunk = b""
                if not chunk and process.poll() is not None:
                    break
                screen += chunk
                if typed and typed[0][0] in screen:
                    os.write(master, typed[0][1])
                    typed = typed[1:]
            elif process.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} still running after {timeout}s; the screen:\n{screen[-2000:].decode(errors='replace')}")
    finally:
        stop_process(process)
        os.close(master)
    return process.returncode, screen.decode(errors="replace")


def muttrc(peer: Peer, home: Path, user: str) -> Path:
    """neomutt on imaps:// and smtps://: the certificate pinned for 127.0.0.1 as neomutt's own "accept always" writes it."""
    der = ssl.PEM_cert_to_DER_cert(peer.cert.read_text())
    md5 = hashlib.md5(der).hexdigest().upper()
    certificates = home / "certificates"
    certificates.write_text(peer.cert.read_text() + f"#H 127.0.0.1 {' '.join(md5[i:i + 4] for i in range(0, 32, 4))}\n")
    rc = home / "muttrc"
    url = f"imaps://127.0.0.1:{peer.ports['imaps']}"
    rc.write_text(
        f"set certificate_file = {certificates}\nset ssl_force_tls = yes\n"
        f'set imap_user = "{user}"\nset imap_pass = "{ACCOUNTS[user]}"\n'
        f'set folder = "{url}/"\nset spoolfile = "+INBOX"\nset record = "+Sent"\nset copy = yes\n'
        'set from = "' + user + '"\nset use_from = yes\nset header_cache = ""\nset message_cachedir = ""\n'
        "set delete = yes\nset quit = yes\nset move = no\nset mark_old = no\nset confirmappend = no\nset wait_key = no\n"
        "set imap_check_subscribed = no\nset imap_passive = yes\n"
    )
    return rc


def test_neomutt_reads_flags_and_deletes(peer: Peer, tmp_path: Path):
    """neomutt on imaps:// opens the inbox, reads one message, flags one and deletes one, and the server keeps exactly that."""
    need("neomutt", "neomutt")
    user = "mutt@example.org"
    peer.deliver(user, message("read-me", user), message("flag-me", user), message("delete-me", user))
    rc = muttrc(peer, tmp_path, user)
    keys = (
        "<search>~s read-me<enter><display-message><exit>"
        "<tag-pattern>~s flag-me<enter><tag-prefix><flag-message>"
        "<delete-pattern>~s delete-me<enter><sync-mailbox><quit>"
    )
    status, screen = in_terminal(
        ["neomutt", "-n", "-F", str(rc), "-e", f'push "{keys}"'],
        {"HOME": str(tmp_path), "TERM": "xterm", "PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
    )
    assert status == 0, screen[-2000:]
    state = server_state(peer, user)
    assert sorted(state) == ["flag-me", "read-me"], (state, screen[-2000:])
    assert "\\Seen" in state["read-me"] and "\\Flagged" not in state["read-me"], state
    assert "\\Flagged" in state["flag-me"] and "\\Seen" not in state["flag-me"], state


def test_neomutt_sends_by_smtp_and_files_a_copy_over_imap(peer: Peer, tmp_path: Path):
    """neomutt submits a message over smtps:// and APPENDs its copy to Sent over imaps://; the recipient reads it by IMAP."""
    need("neomutt", "neomutt")
    if peer.smtp_port is None:
        pytest.skip("the Dovecot peer has no submission listener")
    user = "mutt@example.org"
    rc = muttrc(peer, tmp_path, user)
    submissions = re.search(r"submissions listening on \S+:(\d+)", (peer.root / "twistd.log").read_text())
    assert submissions, "no submissions port in the log"
    # A draft with its headers (-H), no editor, and "y" (send) typed at the compose screen: neomutt
    # files no copy to IMAP in batch mode (-s ... < body), so this is the interactive path.
    with open(rc, "a") as f:
        f.write(
            f'set smtp_url = "smtps://{user}@127.0.0.1:{submissions.group(1)}"\nset smtp_pass = "{ACCOUNTS[user]}"\n'
            'set editor = "true"\nset abort_unmodified = no\nset autoedit = yes\nset edit_headers = yes\n'
        )
    draft = tmp_path / "draft"
    draft.write_text(f"From: {user}\nTo: bob@example.org\nSubject: sent-by-neomutt\n\nHello Bob, from neomutt.\n")
    status, screen = in_terminal(
        ["neomutt", "-n", "-F", str(rc), "-H", str(draft)],
        {"HOME": str(tmp_path), "TERM": "xterm", "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}, typed=((b"Fcc:", b"y"),),
    )
    assert status == 0, screen[-2000:]
    assert server_state(peer, user, "Sent") == {"sent-by-neomutt": {"\\Seen"}}, screen[-2000:]
    with login(peer, user) as client:
        client.select("Sent", readonly=True)
        fetched, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert fetched == "OK" and b"Hello Bob, from neomutt." in data[0][1], data

    def arrived() -> dict[str, set[str]] | None:
        state = server_state(peer, "bob@example.org")
        return state if "sent-by-neomutt" in state else None

    wait_for(arrived, 10, "bob to get neomutt's message")


# --- curl ----------------------------------------------------------------------------------------


def curl(peer: Peer, url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """curl trusting only the test's certificate, reaching mail.example.org at 127.0.0.1."""
    port = re.search(r":(\d+)/", url)
    assert port
    command = [
        "curl", "--silent", "--show-error", "--max-time", "30", "--cacert", str(peer.cert),
        "--resolve", f"{HOST}:{port.group(1)}:127.0.0.1", "--user", f"curl@example.org:{ACCOUNTS['curl@example.org']}", *args, url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, (command, result.stderr)
    return result


def test_curl_list_fetch_by_uid_and_search(peer: Peer):
    """curl lists the folders over imaps://, fetches a message by UID, searches over STARTTLS, and cannot log in without TLS."""
    need("curl", "curl")
    user = "curl@example.org"
    sent = [message("curl-first", user), message("curl-needle", user, body="a haystack with a needle in it")]
    peer.deliver(user, *sent)
    imaps = f"imaps://{HOST}:{peer.ports['imaps']}/"
    imap = f"imap://{HOST}:{peer.ports['imap']}/"

    listing = curl(peer, imaps).stdout.decode()
    names = re.findall(r'^\* LIST \(([^)]*)\) "/" "?([^"\r\n]+)"?\r?$', listing, re.M)
    assert "INBOX" in {name for _, name in names}, listing
    assert any("\\Sent" in attributes and name == "Sent" for attributes, name in names), listing

    with login(peer, user) as client:
        client.select("INBOX", readonly=True)
        uids = uid_by_subject(client)
    fetched = curl(peer, f"{imaps}INBOX;UID={uids['curl-needle']}").stdout
    assert fetched == peer.stored(user)["curl-needle"], fetched

    found = curl(peer, f"{imap}INBOX", "--ssl-reqd", "--request", "UID SEARCH BODY needle").stdout.decode()
    assert re.search(rf"^\* SEARCH {uids['curl-needle']}\r?$", found, re.M), found
    found = curl(peer, f"{imaps}INBOX", "--request", "UID SEARCH SUBJECT curl-").stdout.decode()
    assert sorted(re.search(r"^\* SEARCH ([\d ]+)\r?$", found, re.M).group(1).split()) == sorted(uids.values()), found  # type: ignore[union-attr]

    # Without TLS the password is never sent: LOGINDISABLED, and curl gives up.
    # (Dovecot counts a loopback connection as secure and lets it log in.)
    if PEER == "mailplat":
        refused = curl(peer, imap, check=False)
        assert refused.returncode != 0, refused.stdout


# --- two devices on one account ---------------------------------------------------------------------


class Idle:
    """imaplib's session in IDLE (RFC 2177), read line by line: imaplib has no IDLE before Python 3.14."""

    def __init__(self, client: imaplib.IMAP4) -> None:
        self.client = client
        self.tag = client._new_tag().decode()
        client.send(f"{self.tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+"), "no continuation after IDLE"

    def wait_for(self, pattern: bytes, timeout: float = 10) -> list[bytes]:
        """Untagged lines until one matches ``pattern``."""
        lines: list[bytes] = []
        deadline = time.monotonic() + timeout
        sock = self.client.socket()
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                line = self.client.readline()
            except (TimeoutError, ssl.SSLError):
                break
            lines.append(line)
            if re.search(pattern, line):
                sock.settimeout(TIMEOUT)
                return lines
        raise AssertionError(f"no {pattern!r} during IDLE within {timeout}s; got {lines!r}")

    def done(self) -> None:
        self.client.send(b"DONE\r\n")
        while True:
            line = self.client.readline()
            assert line, "connection closed after DONE"
            if line.startswith(self.tag.encode()):
                assert line.split()[1] == b"OK", line
                return


def test_two_devices_converge(peer: Peer, tmp_path: Path):
    """A laptop (mbsync) and a phone (imaplib, in IDLE) on one account: each one's flags and deletions reach the other."""
    need("mbsync", "isync")
    user = "devices@example.org"
    peer.deliver(user, message("from-laptop", user), message("laptop-deletes", user), message("phone-deletes", user))
    laptop = Mbsync(peer, user, tmp_path / "laptop", tls="IMAPS")
    laptop.run()
    assert sorted(laptop.inbox()) == ["from-laptop", "laptop-deletes", "phone-deletes"]

    with login(peer, user) as phone:
        assert phone.select("INBOX")[0] == "OK"
        numbers = {s: n for n, s in enumerate(sorted_by_uid(phone), start=1)}

        # The laptop flags one and deletes one; the phone, in IDLE, is told at once.
        idle = Idle(phone)
        set_local_flags(laptop.inbox()["from-laptop"], "F")
        laptop.inbox()["laptop-deletes"].unlink()
        laptop.run()
        seen = idle.wait_for(rb"^\* %d EXPUNGE" % numbers["laptop-deletes"])
        idle.done()
        state = fetch_state(phone)
        assert sorted(state) == ["from-laptop", "phone-deletes"], (state, seen)
        assert "\\Flagged" in state["from-laptop"], state

        # The phone reads one and deletes the other; the laptop's next sync has both.
        uids = uid_by_subject(phone)
        assert phone.uid("STORE", uids["from-laptop"], "+FLAGS", "(\\Seen)")[0] == "OK"
        assert phone.uid("STORE", uids["phone-deletes"], "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert phone.expunge()[0] == "OK"
        laptop.run()
        assert sorted(laptop.inbox()) == ["from-laptop"]
        assert local_flags(laptop.inbox()["from-laptop"]) == "FS"

        # New mail reaches both: the phone during IDLE, the laptop at its next sync.
        idle = Idle(phone)
        peer.deliver(user, message("new-for-both", user))
        idle.wait_for(rb"^\* \d+ EXISTS")
        idle.done()
        assert sorted(fetch_state(phone)) == ["from-laptop", "new-for-both"]
    laptop.run()
    assert sorted(laptop.inbox()) == ["from-laptop", "new-for-both"]


def sorted_by_uid(client: imaplib.IMAP4) -> list[str]:
    """The subjects of the selected folder in UID (= sequence) order."""
    return [s for s, _ in sorted(uid_by_subject(client).items(), key=lambda item: int(item[1]))]


# --- what docs/plugins.md promises a store without IMAP ---------------------------------------------


def test_a_store_without_imap_is_refused_with_the_documented_line(make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A mailbox plugin that does not provide IMessageStore and an imap listener: the start stops with the line docs/plugins.md quotes."""
    from test_async_plugin import ASYNC_MAILBOX

    site = tmp_path / "site"
    site.mkdir()
    (site / "async_mailbox_plugin.py").write_text(ASYNC_MAILBOX)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    config = BASE_CONFIG.replace('[mailbox]\nbackend = "maildir"\npath = "mail"\n', '[mailbox]\nbackend = "async_mailbox_plugin:factory"\n')
    assert "async_mailbox_plugin" in config
    with pytest.raises(AssertionError, match="mailplat exited with 1") as refused:
        make_server(config=config)
    guide = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    documented = re.search(r"^mailplat: /etc/mailplat/mailplat\.toml: \[listen\] imap: the 'mystore' mailbox backend .*$", guide, re.M)
    assert documented, "docs/plugins.md no longer quotes the refusal"
    expected = documented.group(0).replace("/etc/mailplat/mailplat.toml", str(tmp_path / "server" / "mailplat.toml"))
    assert expected.replace("'mystore'", "'async_mailbox_plugin:factory'") in str(refused.value), str(refused.value)
