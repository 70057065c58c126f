"""`mailplat user ...`, the passwd-file backend and password hashes."""

from __future__ import annotations

import os
import smtplib
import stat
import subprocess

import bcrypt
import pytest

from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, wait_for
from mailplat.passwords import UnsupportedScheme, hash_password, scheme_of, verify_password


@pytest.fixture
def site(tmp_path):
    """A config folder with the base config and no users file yet."""
    server = MailplatServer(tmp_path / "site", BASE_CONFIG, users={})
    (server.root / "users.passwd").unlink()
    return server


def user(site, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILPLAT, "--config", str(site.config_path), "user", *args],
        input=None if password is None else password + "\n",
        capture_output=True, text=True, timeout=60,
    )


def test_add_list_passwd_del(site):
    """add stores an argon2id hash (never the password) in a 0600 file; list, passwd and del work."""
    assert user(site, "add", "Carol@Example.ORG", "--password-stdin", password="s3cret-pw").returncode == 0
    users_file = site.root / "users.passwd"
    text = users_file.read_text()
    assert "carol@example.org:{ARGON2ID}$argon2id$" in text
    assert "s3cret-pw" not in text
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    first_hash = text.split("carol@example.org:")[1].split("\n")[0]
    assert verify_password(first_hash, "s3cret-pw")

    assert user(site, "add", "dave@example.net", "--password-stdin", password="pw2").returncode == 0
    assert user(site, "list").stdout.split() == ["carol@example.org", "dave@example.net"]

    assert user(site, "passwd", "carol@example.org", "--password-stdin", password="new-pw").returncode == 0
    new_hash = users_file.read_text().split("carol@example.org:")[1].split("\n")[0]
    assert new_hash != first_hash and verify_password(new_hash, "new-pw") and not verify_password(new_hash, "s3cret-pw")

    assert user(site, "del", "carol@example.org").returncode == 0
    assert user(site, "list").stdout.split() == ["dave@example.net"]


@pytest.mark.parametrize(
    "args, password, message",
    [
        (("add", "../etc@example.org"), "pw", "may not contain '/'"),
        (("add", "..@example.org"), "pw", "may not start or end with a dot"),
        (("add", "a/b@example.org"), "pw", "may not contain '/'"),
        (("add", "a\\b@example.org"), "pw", "may not contain '\\\\'"),
        (("add", "a\tb@example.org"), "pw", "control character"),
        (("add", ".alice@example.org"), "pw", "may not start or end with a dot"),
        (("add", "al..ice@example.org"), "pw", "'..'"),
        (("add", "alice"), "pw", "local-part@domain"),
        (("add", "alice@elsewhere.test"), "pw", "not one of the domains"),
        (("add", "alice@example.org"), "", "password is empty"),
        (("passwd", "nobody@example.org"), "pw", "no such user"),
        (("del", "nobody@example.org"), None, "no such user"),
    ],
)
def test_refusals(site, args, password, message):
    """Bad addresses, unknown users and empty passwords are refused in one clear line, changing nothing."""
    result = user(site, *args, *(["--password-stdin"] if password is not None else []), password=password)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (site.root / "users.passwd").exists() or "example" not in (site.root / "users.passwd").read_text()


def test_add_existing_user(site):
    """Adding a user that exists fails and leaves its password alone."""
    user(site, "add", "erin@example.org", "--password-stdin", password="one")
    before = (site.root / "users.passwd").read_text()
    result = user(site, "add", "ERIN@example.org", "--password-stdin", password="two")
    assert result.returncode == 1 and "already exists" in result.stderr
    assert (site.root / "users.passwd").read_text() == before


def test_rewrite_keeps_owner_and_mode(site):
    """Editing the users file keeps its owner, group and mode, so a server running as another user can still read it."""
    user(site, "add", "frank@example.org", "--password-stdin", password="one")
    users_file = site.root / "users.passwd"
    os.chmod(users_file, 0o640)
    if os.geteuid() == 0:
        os.chown(users_file, 65534, 65534)
    user(site, "add", "grace@example.org", "--password-stdin", password="two")
    st = users_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)


# --- hashes -------------------------------------------------------------------


def test_argon2id_roundtrip():
    """A new hash is argon2id with its scheme prefix and verifies only the right password."""
    stored = hash_password("correct horse")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "wrong horse")


@pytest.mark.parametrize("prefix", [b"$2b$", b"$2y$"])
def test_bcrypt_from_dovecot(prefix):
    """{BLF-CRYPT} bcrypt hashes (as Dovecot writes them, $2y$ too) verify, so users can migrate."""
    digest = bcrypt.hashpw(b"migrated", bcrypt.gensalt(rounds=4)).replace(b"$2b$", prefix, 1).decode()
    stored = "{BLF-CRYPT}" + digest
    assert scheme_of(stored) == "BLF-CRYPT"
    assert verify_password(stored, "migrated")
    assert not verify_password(stored, "other")


def test_plain_only_when_allowed():
    """{PLAIN} verifies only with allow_plain, and never by accident."""
    assert not verify_password("{PLAIN}secret", "secret")
    assert verify_password("{PLAIN}secret", "secret", allow_plain=True)
    assert not verify_password("{PLAIN}secret", "other", allow_plain=True)


def test_unknown_scheme_refused():
    """An unknown {SCHEME} is refused with a message listing the known ones."""
    with pytest.raises(UnsupportedScheme, match="ARGON2ID"):
        scheme_of("{MD5-CRYPT}$1$abc")


def test_missing_user_costs_a_hash():
    """Checking a user that does not exist still runs a hash, so timing does not tell who exists."""
    assert verify_password(None, "anything") is False


# --- a running server sees changes -----------------------------------------------


def test_users_reloaded_without_restart(make_server):
    """A user added or removed by the CLI while the server runs is accepted, then refused, without a restart."""
    server = make_server()

    def rcpt_code(address: str) -> int:
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            client.ehlo()
            client.mail("a@remote.test")
            return client.rcpt(address)[0]

    assert rcpt_code("heidi@example.org") == 550
    result = user(server, "add", "heidi@example.org", "--password-stdin", password="pw")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: rcpt_code("heidi@example.org") == 250, what="the new user to be accepted")
    assert user(server, "del", "heidi@example.org").returncode == 0
    wait_for(lambda: rcpt_code("heidi@example.org") == 550, what="the removed user to be refused")


def test_broken_users_file_keeps_old_users(make_server):
    """A users file broken while running keeps the previous users, logs the error, and the server keeps serving."""
    server = make_server()
    users_file = server.root / "users.passwd"
    users_file.write_text(users_file.read_text() + "this line is broken\n")
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        client.mail("a@remote.test")
        assert client.rcpt("alice@example.org")[0] == 250
    wait_for(lambda: "users file not reloaded" in server.log(), what="the reload error in the log")
