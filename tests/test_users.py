"""Users: the `mailplat user` command, the stored password hashes, and a running server seeing changes."""

from __future__ import annotations

import os
import smtplib
import stat
import subprocess
from pathlib import Path

import bcrypt
import pytest

from twisted.logger import LogLevel, globalLogPublisher

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, wait_for
from mailplat.backends.passwdfile import PasswdFileError, parse
from mailplat.passwords import MalformedHash, UnsupportedScheme, hash_password, scheme_of, verify_password

CONFIG = """\
hostname = "mail.example.org"
domains = ["example.org", "example.net"]

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"
"""


class Site:
    """A config folder for `mailplat user`, with no users file yet."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.config_path = root / "mailplat.toml"
        self.config_path.write_text(CONFIG)
        self.users_file = root / "users.passwd"

    def hashes(self) -> dict[str, str]:
        """address -> stored hash, as in the users file."""
        lines = self.users_file.read_text().splitlines()
        return dict(line.split(":", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def user(site: Site | MailplatServer, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `mailplat --config ... user ARGS` (in a process of its own, tests/commands.py);
    with ``password``, pass --password-stdin and send it."""
    if password is not None:
        args = (*args, "--password-stdin")
    env = {k: v for k, v in os.environ.items() if k != "MAILPLAT_CONFIG"}
    return commands.run(
        [MAILPLAT, "--config", str(site.config_path), "user", *args],
        input=None if password is None else password + "\n", text=True, timeout=60, env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a one-line `mailplat: ...` refusal with exit 1, no traceback; return the line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailplat: "), result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].isprintable(), f"control characters are shown escaped: {lines[0]!r}"
    return lines[0]


# --- the command ---------------------------------------------------------------------


def test_add_creates_a_private_file_with_an_argon2id_hash(site):
    """`user add` creates the users file, mode 0600, holding an {ARGON2ID}$argon2id$ hash and never the password."""
    result = ok(user(site, "add", "carol@example.org", password="s3cret pass:word"))
    assert result.stdout.strip() == "added carol@example.org"
    stored = site.hashes()["carol@example.org"]
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert stat.S_IMODE(site.users_file.stat().st_mode) == 0o600
    assert "s3cret" not in site.users_file.read_text()
    assert "s3cret" not in result.stdout + result.stderr
    assert verify_password(stored, "s3cret pass:word")
    assert not verify_password(stored, "s3cret pass:wor")
    assert [p.name for p in site.root.iterdir() if p.name.startswith(".users-")] == [], "no temporary file is left"


def test_password_line_ending_is_not_part_of_the_password(site):
    """--password-stdin reads one line: its CRLF or LF ending is not part of the password, spaces are."""
    # The console script itself, with its own standard input as a fresh interpreter sets it up.
    result = subprocess.run(
        [MAILPLAT, "--config", str(site.config_path), "user", "add", "dan@example.org", "--password-stdin"],
        input=b" pw with spaces \r\nsecond line\n", capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert verify_password(site.hashes()["dan@example.org"], " pw with spaces ")


def test_add_existing_user_fails(site):
    """Adding a user that exists (in any case) exits 1 with a clear message and leaves the file alone."""
    ok(user(site, "add", "erin@example.org", password="one"))
    before = site.users_file.read_bytes()
    line = refused(user(site, "add", "Erin@EXAMPLE.org", password="two"))
    assert line == "mailplat: erin@example.org already exists; use `user passwd` to change its password"
    assert site.users_file.read_bytes() == before


def test_passwd_changes_the_hash(site):
    """`user passwd` replaces the hash: the new password verifies, the old one no longer does."""
    ok(user(site, "add", "frank@example.org", password="old-password"))
    old = site.hashes()["frank@example.org"]
    result = ok(user(site, "passwd", "FRANK@example.org", password="new-password"))
    assert result.stdout.strip() == "changed the password of frank@example.org"
    new = site.hashes()["frank@example.org"]
    assert new != old and new.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(new, "new-password") and not verify_password(new, "old-password")
    assert stat.S_IMODE(site.users_file.stat().st_mode) == 0o600


def test_del_removes_and_list_is_sorted(site):
    """`user list` prints the addresses sorted, one a line; `user del` removes one and the others stay."""
    for address in ("zoe@example.org", "adam@example.net", "mia@example.org"):
        ok(user(site, "add", address, password="pw"))
    assert ok(user(site, "list")).stdout == "adam@example.net\nmia@example.org\nzoe@example.org\n"
    result = ok(user(site, "del", "mia@example.org"))
    assert result.stdout.strip() == "removed mia@example.org (its mail stays on disk)"
    assert ok(user(site, "list")).stdout == "adam@example.net\nzoe@example.org\n"
    assert list(site.hashes()) == ["adam@example.net", "zoe@example.org"]


def test_rewrite_keeps_mode_and_owner(site):
    """Editing an existing users file keeps its mode (and, as root, its owner), so a server running as another user can still read it."""
    ok(user(site, "add", "olga@example.org", password="one"))
    os.chmod(site.users_file, 0o640)
    if os.geteuid() == 0:
        os.chown(site.users_file, 65534, 65534)
    ok(user(site, "add", "pete@example.org", password="two"))
    st = site.users_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_list_without_a_users_file(site):
    """`user list` before any user was added prints nothing and succeeds."""
    assert ok(user(site, "list")).stdout == ""
    assert not site.users_file.exists()


def test_mixed_case_stored_lower_case(site):
    """An address given in mixed case is stored, listed and found in lower case."""
    ok(user(site, "add", "Grace.Hopper@Example.NET", password="pw"))
    assert list(site.hashes()) == ["grace.hopper@example.net"]
    assert ok(user(site, "list")).stdout == "grace.hopper@example.net\n"
    ok(user(site, "del", "GRACE.HOPPER@example.net"))
    assert site.hashes() == {}


@pytest.mark.parametrize(
    "address, problem",
    [
        ("a/b@example.org", "the local part may not contain '/'"),
        ("../etc@example.org", "the local part may not contain '/'"),
        ("a\\b@example.org", "the local part may not contain '\\\\'"),
        ("a\tb@example.org", "contains a space or a control character"),
        ("a\x01b@example.org", "contains a space or a control character"),
        ("a\x1b[31mb@example.org", "contains a space or a control character"),
        ("a\nb@example.org", "contains a space or a control character"),
        ("a\x7fb@example.org", "contains a space or a control character"),
        (".hidden@example.org", "may not start or end with a dot or contain '..'"),
        ("..@example.org", "may not start or end with a dot or contain '..'"),
        ("a..b@example.org", "may not start or end with a dot or contain '..'"),
        ("alice", "'alice' is not of the form local-part@domain"),
        ("alice@", "the domain is empty"),
        ("@example.org", "is not of the form local-part@domain"),
        ("alice@example", "is not a valid domain name"),
        ("alice@elsewhere.test", "elsewhere.test is not one of the domains in"),
        ("alice+tag@example.org", "'+' starts a subaddress tag"),
    ],
)
def test_bad_addresses_refused(site, address, problem):
    """`user add` refuses an address that could escape a folder, has no domain, is not hosted or has a +tag: one clear line, nothing written."""
    line = refused(user(site, "add", address, password="pw"))
    assert problem in line, line
    assert not site.users_file.exists()


def test_bad_address_refused_by_passwd_and_del(site):
    """`user passwd` and `user del` refuse an invalid address the same way, before asking for a password."""
    assert "may not contain '/'" in refused(user(site, "passwd", "../x@example.org", password="pw"))
    assert "may not contain '/'" in refused(user(site, "del", "../x@example.org"))


def test_empty_password_refused(site):
    """An empty password is refused and no user is created."""
    line = refused(user(site, "add", "henry@example.org", password=""))
    assert line == "mailplat: the password is empty; nothing changed"
    assert not site.users_file.exists()
    ok(user(site, "add", "henry@example.org", password="pw"))
    refused(user(site, "passwd", "henry@example.org", password=""))
    assert verify_password(site.hashes()["henry@example.org"], "pw")


def test_unknown_user_refused(site):
    """`user passwd` and `user del` of an unknown user exit 1 with "no such user"."""
    ok(user(site, "add", "ivy@example.org", password="pw"))
    assert refused(user(site, "passwd", "nobody@example.org", password="pw")) == "mailplat: no such user: nobody@example.org"
    assert refused(user(site, "del", "nobody@example.org")) == "mailplat: no such user: nobody@example.org"


def test_add_of_an_alias_and_del_of_an_alias_target_refused(site):
    """`user add` of an address that is an alias, and `user del` of a user an alias points at, are refused with the fix."""
    site.config_path.write_text(CONFIG + '\n[aliases]\n"Sales@example.org" = ["jo@example.org", "friend@elsewhere.test"]\n')
    line = refused(user(site, "add", "sales@example.org", password="pw"))
    assert line == f'mailplat: sales@example.org is an alias ([aliases] "sales@example.org" in {site.config_path}); remove the alias first, or choose another address'
    assert not site.users_file.exists()
    ok(user(site, "add", "jo@example.org", password="pw"))
    line = refused(user(site, "del", "jo@example.org"))
    assert line == f'mailplat: jo@example.org is the target of [aliases] "sales@example.org" in {site.config_path}; remove it from the alias first'
    assert "jo@example.org" in site.hashes()


def test_check_config_refuses_an_alias_to_no_user(site):
    """check-config names an alias whose target in our domains is no user, and passes once the user exists; targets elsewhere need none."""
    site.config_path.write_text(CONFIG + '\n[aliases]\n"sales@example.org" = ["jo@example.org", "friend@elsewhere.test"]\n')
    ok(user(site, "add", "kim@example.org", password="pw"))
    check = [MAILPLAT, "--config", str(site.config_path), "check-config"]
    line = refused(commands.run(check, text=True, timeout=60))
    assert line.startswith(f'mailplat: {site.config_path}: [aliases] "sales@example.org": target jo@example.org is not a user or an alias; fix: ')
    ok(user(site, "add", "jo@example.org", password="pw"))
    ok(commands.run(check, text=True, timeout=60))


def test_broken_users_file_is_one_line(site):
    """A users file with a broken line makes `user` commands refuse with the file, the line number and the fix."""
    site.users_file.write_text("alice@example.org:{MD5}abc\n")
    line = refused(user(site, "list"))
    assert line.startswith(f"mailplat: {site.config_path}: [auth] path: {site.users_file}:1: unknown password scheme {{MD5}}")
    assert "fix: " in line


# --- password hashes ----------------------------------------------------------------------


def test_argon2id():
    """A new hash is argon2id with its scheme prefix, salted, and verifies only the right password."""
    stored = hash_password("correct horse")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert scheme_of(stored) == "ARGON2ID"
    assert hash_password("correct horse") != stored, "salted: the same password hashes differently"
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horsE")
    assert verify_password(stored.removeprefix("{ARGON2ID}"), "correct horse"), "a bare $argon2id$ hash is recognised too"


@pytest.mark.parametrize("prefix", ["$2b$", "$2y$", "$2a$"])
def test_bcrypt_blf_crypt(prefix):
    """{BLF-CRYPT} bcrypt hashes as Dovecot writes them ($2y$, and $2a$/$2b$) verify, so users can be migrated."""
    digest = bcrypt.hashpw(b"migrated pw", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", prefix, 1)
    stored = "{BLF-CRYPT}" + digest
    assert scheme_of(stored) == "BLF-CRYPT"
    assert verify_password(stored, "migrated pw")
    assert not verify_password(stored, "migrated pW")
    assert verify_password(digest, "migrated pw"), "without the {BLF-CRYPT} prefix too"


def test_bcrypt_long_password():
    """A bcrypt hash verifies a password longer than bcrypt's 72 bytes as Dovecot does: by its first 72 bytes."""
    password = "p" * 60 + "ä" * 10  # 80 bytes in UTF-8
    stored = "{BLF-CRYPT}" + bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(stored, password)
    assert not verify_password(stored, "p" * 60)


def test_bcrypt_malformed_hash_does_not_verify():
    """A {BLF-CRYPT} value that is not a bcrypt hash verifies nothing instead of raising."""
    assert verify_password("{BLF-CRYPT}$2y$not-a-hash", "anything") is False


def test_plain_only_with_allow_plain():
    """{PLAIN} verifies only where allow_plain is set, and the users file refuses it otherwise."""
    assert not verify_password("{PLAIN}secret", "secret")
    assert verify_password("{PLAIN}secret", "secret", allow_plain=True)
    assert not verify_password("{PLAIN}secret", "Secret", allow_plain=True)
    with pytest.raises(PasswdFileError, match=r"users:1: \{PLAIN\} passwords are refused"):
        parse("alice@example.org:{PLAIN}secret\n", "users", allow_plain=False)
    assert parse("alice@example.org:{PLAIN}secret\n", "users", allow_plain=True) == {"alice@example.org": "{PLAIN}secret"}


@pytest.mark.parametrize("stored", ["{MD5-CRYPT}$1$abc$def", "{SHA512-CRYPT}$6$x$y", "$1$abc$def", "secret"])
def test_unknown_scheme_refused(stored):
    """A hash in a scheme we do not support is refused (listing the known ones), never compared as text."""
    with pytest.raises(UnsupportedScheme, match="(?i)argon2id"):
        scheme_of(stored)
    assert verify_password(stored, stored) is False
    with pytest.raises(PasswdFileError, match="users:2: "):
        parse(f"# comment\nalice@example.org:{stored}\n", "users", allow_plain=True)


GOOD_HASH = hash_password("alice-password")

# Stored values that name a scheme we know, but that scheme cannot have made.
DAMAGED = {
    "no closing brace": "{ARGON2ID",
    "no closing brace, digest": "{ARGON2ID$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA",
    "non-ASCII at the end": GOOD_HASH + "é",
    "non-ASCII inside": GOOD_HASH[:30] + "ä" + GOOD_HASH[31:],
    "line separator inside": GOOD_HASH[:30] + "\u2028" + GOOD_HASH[31:],
    "control character": GOOD_HASH[:30] + "\x01" + GOOD_HASH[31:],
    "empty argon2id": "{ARGON2ID}",
    "not argon2 form": "{ARGON2ID}$argon2id$fine",
    "bare argon2 cut": "$argon2id$v=19",
    "bcrypt cut short": "{BLF-CRYPT}$2y$10$abc",
    "bcrypt non-ASCII": "{BLF-CRYPT}$2y$10$" + "é" * 53,
    # Well formed, but each check would hold a password thread for minutes.
    "bcrypt cost 24": "{BLF-CRYPT}$2y$24$" + "a" * 53,
    "argon2 4 GiB": "{ARGON2ID}$argon2id$v=19$m=4194304,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "argon2 1000 passes": "{ARGON2ID}$argon2id$v=19$m=65536,t=1000,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
}


@pytest.mark.parametrize("stored", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_hash_never_raises_and_is_logged(stored):
    """verify_password on a damaged stored hash returns False (the right password or not) and logs why, naming the account."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert verify_password(stored, "alice-password", allow_plain=True, account="alice@example.org") is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [e for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and errors[0]["of"] == " of alice@example.org", events
    with pytest.raises(MalformedHash):
        scheme_of(stored)


@pytest.mark.parametrize("stored", DAMAGED.values(), ids=DAMAGED.keys())
def test_users_file_refuses_a_damaged_hash_with_its_line(stored):
    """The users file refuses a line whose hash is damaged at load, with the file, the line number and a fix naming the user."""
    text = f"# users\nbob@example.org:{GOOD_HASH}\nalice@example.org:{stored}\n"
    with pytest.raises(PasswdFileError, match=r"^users:3: the password hash of alice@example\.org is damaged: ") as raised:
        parse(text, "users", allow_plain=False)
    assert "line 3" in raised.value.fix and "mailplat user add alice@example.org" in raised.value.fix


@pytest.mark.parametrize("stored", [DAMAGED["no closing brace"], DAMAGED["non-ASCII inside"]], ids=["brace", "non-ASCII"])
def test_user_commands_name_the_damaged_line(site, stored):
    """`mailplat user list` (and every user command) on a users file with a damaged hash exits 1 naming the file, the line and the fix."""
    site.users_file.write_text(f"bob@example.org:{GOOD_HASH}\nalice@example.org:{stored}\n")
    for args in (("list",), ("del", "bob@example.org")):
        line = refused(user(site, *args))
        assert line.startswith(f"mailplat: {site.config_path}: [auth] path: {site.users_file}:2: the password hash of alice@example.org is damaged")
        assert "; fix: restore line 2 from a backup, or delete it and set a new password with `mailplat user add alice@example.org`" in line
    assert "bob@example.org" in site.users_file.read_text(), "nothing was rewritten"


def test_users_file_not_utf8_names_the_line(site):
    """A byte that is not UTF-8 in the users file is refused with the line it is on."""
    site.users_file.write_bytes(f"bob@example.org:{GOOD_HASH}\n".encode() + b"alice@example.org:{ARGON2ID}\xff\n")
    line = refused(user(site, "list"))
    assert f"{site.users_file}:2: not UTF-8 text" in line and "fix: " in line


def test_server_refuses_to_start_with_a_damaged_hash(tmp_path):
    """twistd with a users file holding a damaged hash exits before listening, with one line naming the file, the line and the fix."""
    server = MailplatServer(tmp_path / "site", BASE_CONFIG)
    users_file = server.root / "users.passwd"
    users_file.write_text(users_file.read_text() + "carol@example.org:{ARGON2ID\n")
    number = len(users_file.read_text().splitlines())
    try:
        with pytest.raises(AssertionError, match="mailplat exited") as raised:
            server.start()
    finally:
        server.stop()
    output = str(raised.value)
    assert f"{users_file}:{number}: the password hash of carol@example.org is damaged: the {{SCHEME}} prefix has no closing '}}'" in output
    assert f"fix: restore line {number} from a backup" in output
    assert "listening on" not in output and "Traceback" not in output


def test_missing_user_still_costs_a_hash():
    """Verifying against no stored hash (no such user) is False, after hashing anyway."""
    assert verify_password(None, "anything") is False


# --- a running server sees changes ------------------------------------------------------------


def rcpt(server: MailplatServer, address: str) -> tuple[int, bytes]:
    """The server's reply to RCPT TO:<address> in a fresh SMTP session."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo()
        assert client.mail("someone@remote.test")[0] == 250
        return client.rcpt(address)


def test_users_added_and_deleted_while_running(make_server):
    """A user added by the CLI while the server runs is accepted at RCPT without a restart; once deleted it gets 550 5.1.1."""
    server = make_server()
    code, text = rcpt(server, "judy@example.org")
    assert (code, text[:5]) == (550, b"5.1.1")

    ok(user(server, "add", "judy@example.org", password="judy-password"))
    wait_for(lambda: rcpt(server, "judy@example.org")[0] == 250, what="the new user to be accepted")
    assert rcpt(server, "alice@example.org")[0] == 250, "the other users stay"

    ok(user(server, "del", "judy@example.org"))

    def refused_again() -> bool:
        code, text = rcpt(server, "judy@example.org")
        return code == 550 and text.startswith(b"5.1.1")

    wait_for(refused_again, what="the deleted user to be refused with 550 5.1.1")
    assert server.process is not None and server.process.poll() is None


def test_broken_users_file_keeps_the_old_users(make_server):
    """A users file replaced by one with a broken line keeps the old users, logs an error, and the server keeps serving."""
    server = make_server()
    users_file = server.root / "users.passwd"
    good = users_file.read_text()
    assert rcpt(server, "alice@example.org")[0] == 250

    # Replaced the way an editor or a config tool would: a new file renamed over the old.
    broken = server.root / "users.new"
    broken.write_text(good + "kim@example.org:{ARGON2ID}$argon2id$fine\nthis line is broken\n")
    os.replace(broken, users_file)
    assert rcpt(server, "alice@example.org")[0] == 250, "the old users are kept"
    wait_for(lambda: "users file not reloaded" in server.log(), what="the reload error in the log")
    assert f"{users_file}:" in server.log()
    assert rcpt(server, "kim@example.org")[0] == 550, "nothing of the broken file is used"

    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["bob@example.org"], b"Subject: still serving\r\n\r\nHello.\r\n")
    assert b"Subject: still serving" in server.messages("bob@example.org")[0]

    # Fixed again, the file is read again.
    fixed = server.root / "users.new"
    fixed.write_text(good.replace("alice@example.org:", "carol@example.org:"))
    os.replace(fixed, users_file)
    wait_for(lambda: rcpt(server, "carol@example.org")[0] == 250, what="the fixed file to be read")
    assert rcpt(server, "alice@example.org")[0] == 550
