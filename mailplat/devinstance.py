"""`make run`: a development instance in ./dev, then `twistd -n mailplat` in the foreground.

The first start writes ``dev/mailplat.toml``, a self-signed certificate and a
demo user whose random password is printed once (and kept in
``dev/demo-password.txt``); later starts reuse all of it.  The SMTP listener
is ``$MAILPLAT_DEV_SMTP`` (default ``tcp:2525:interface=127.0.0.1``),
submission ``$MAILPLAT_DEV_SUBMISSION`` (2587), POP3 ``$MAILPLAT_DEV_POP3``
(2110, STLS), POP3S ``$MAILPLAT_DEV_POP3S`` (2995), IMAP
``$MAILPLAT_DEV_IMAP`` (2143, STARTTLS) and IMAPS ``$MAILPLAT_DEV_IMAPS``
(2993), read when the config is written.  The banner prints where each
listens and how to reach it.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import sys

DEV = "dev"
CONFIG = os.path.join(DEV, "mailplat.toml")
PASSWORD_FILE = os.path.join(DEV, "demo-password.txt")
DEMO = "demo@example.test"
DEFAULT_SMTP = "tcp:2525:interface=127.0.0.1"
DEFAULT_SUBMISSION = "tcp:2587:interface=127.0.0.1"
DEFAULT_POP3 = "tcp:2110:interface=127.0.0.1"
DEFAULT_POP3S = "tcp:2995:interface=127.0.0.1"
DEFAULT_IMAP = "tcp:2143:interface=127.0.0.1"
DEFAULT_IMAPS = "tcp:2993:interface=127.0.0.1"
LISTENERS = (
    ("smtp", DEFAULT_SMTP), ("submission", DEFAULT_SUBMISSION), ("pop3", DEFAULT_POP3), ("pop3s", DEFAULT_POP3S),
    ("imap", DEFAULT_IMAP), ("imaps", DEFAULT_IMAPS),
)

TEMPLATE = """\
# mailplat development instance, written by `make run`; kept across runs
# (delete dev/ to start again).  Relative paths are relative to this folder.
hostname = "mail.example.test"
data_dir = "var"
domains = ["example.test"]

[listen]
smtp = {smtp}
submission = {submission}
pop3 = {pop3}
pop3s = {pop3s}
imap = {imap}
imaps = {imaps}

[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"

[aliases]
"postmaster@example.test" = "{demo}"
"""


def create() -> str | None:
    """Create whatever of dev/ is missing; the demo password when it is new."""
    from mailplat import cli
    from mailplat.tls import make_self_signed

    os.makedirs(DEV, mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(DEV, "tls", "cert.pem")):
        make_self_signed("mail.example.test", os.path.join(DEV, "tls", "cert.pem"), os.path.join(DEV, "tls", "key.pem"))
    if not os.path.exists(CONFIG):
        listen = {name: json.dumps(os.environ.get(f"MAILPLAT_DEV_{name.upper()}", default)) for name, default in LISTENERS}
        with open(CONFIG, "x") as f:
            f.write(TEMPLATE.format(demo=DEMO, **listen))
    elif any(f"MAILPLAT_DEV_{name.upper()}" in os.environ for name, _ in LISTENERS):
        print(f"note: MAILPLAT_DEV_* listeners are used only when {CONFIG} is written; edit [listen] there", file=sys.stderr)
    if os.path.exists(PASSWORD_FILE):
        return None
    # The same code path as `mailplat user add --password-stdin`: the password
    # goes through standard input, never the command line.  `passwd` repairs
    # a first start that stopped between adding the user and saving the file.
    password = secrets.token_urlsafe(12)
    for action in ("add", "passwd"):
        stdin, sys.stdin = sys.stdin, io.StringIO(password + "\n")
        try:
            status = cli.main(["--config", CONFIG, "user", action, DEMO, "--password-stdin"])
        finally:
            sys.stdin = stdin
        if status == 0:
            break
    else:
        raise SystemExit(f"mailplat: could not create {DEMO} in {CONFIG}")
    fd = os.open(PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def banner(password: str | None) -> str:
    from mailplat.config import load
    from mailplat.doctor import connect_target

    listen = load(CONFIG).listen

    def where(name: str) -> tuple[str, str]:
        """(host, port) a client uses for a listener; port "PORT" when the system picks it at start."""
        _, host, port = connect_target(listen.get(name, ""))
        return host or "127.0.0.1", str(port) if port else "PORT"

    host, port = where("smtp")
    secret = f"password: {password}  (shown once; also in {PASSWORD_FILE})" if password else f"password in {PASSWORD_FILE}"
    lines = ["mailplat development instance", f"  config     {CONFIG}  (delete {DEV}/ to start again)"]
    for name, _ in LISTENERS:
        if name in listen:
            picked = "  (PORT: see the '" + name + " listening on' line below)" if where(name)[1] == "PORT" else ""
            lines.append(f"  {name:<10} {listen[name]}{picked}")
    lines += [
        f"  user       {DEMO}, {secret}",
        f"  send       swaks --server {host} --port {port} --to {DEMO}",
        f"  submit     swaks --server {where('submission')[0]} --port {where('submission')[1]} --tls --auth-user {DEMO} --from {DEMO} --to {DEMO}",
        f"  fetch      curl --insecure --ssl-reqd --user {DEMO}:PASSWORD pop3://{where('pop3')[0]}:{where('pop3')[1]}/1",
    ]
    if "imaps" in listen:
        imaps_host, imaps_port = where("imaps")
        lines += [
            f"  read       curl --insecure --user {DEMO}:PASSWORD 'imaps://{imaps_host}:{imaps_port}/INBOX;UID=1'",
            f"  mail app   IMAP server {imaps_host}, port {imaps_port} SSL/TLS"
            + (f" (or {where('imap')[1]} STARTTLS)" if "imap" in listen else "")
            + f", username {DEMO}; accept the self-signed certificate",
        ]
    elif "imap" not in listen:
        lines.append(f"  note       {CONFIG} has no imap/imaps listeners (written before mailplat served IMAP): add them to [listen], or delete {DEV}/")
    lines += [f"  mail in    {os.path.join(DEV, 'mail', 'example.test', 'demo')}/  (new/, then cur/ once a client has seen it)", ""]
    return "\n".join(lines)


def main() -> None:
    print(banner(create()), flush=True)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    sys.stderr.flush()
    os.execv(twistd, [twistd, "-n", "--pidfile=", "mailplat", "--config", CONFIG])


if __name__ == "__main__":
    main()
