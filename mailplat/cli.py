"""The ``mailplat`` admin command: users and configuration checks."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Any

from twisted.logger import globalLogBeginner

from mailplat import doctor
from mailplat.addresses import AddressError, canonical, validate_address
from mailplat.config import ConfigError, Settings, load
from mailplat.interfaces import IUserManager

__all__ = ["main"]


class CommandError(Exception):
    """A mistake in how the command was used; printed as one line, exit 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailplat", description="Administer a mailplat installation.")
    parser.add_argument("--config", default=os.environ.get("MAILPLAT_CONFIG"), help="the mailplat.toml file (default: $MAILPLAT_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    user = commands.add_parser("user", help="add, change or remove users").add_subparsers(dest="action", required=True)
    for action, text in (("add", "create a user"), ("passwd", "change a user's password")):
        p = user.add_parser(action, help=text)
        p.add_argument("address")
        p.add_argument("--password-stdin", action="store_true", help="read the password as one line from standard input")
    user.add_parser("del", help="remove a user (the mail stays on disk)").add_argument("address")
    user.add_parser("list", help="list the users")

    commands.add_parser("check-config", help="validate the configuration and print the effective settings")
    doctor.add_arguments(commands.add_parser(
        "doctor", help="check DNS (MX, SPF, DKIM, DMARC), the TLS certificate and the listeners; print what to fix",
    ))
    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action", required=True)
    keygen = dkim.add_parser("keygen", help="write a new key for a domain and print the DNS record to publish")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", default="mail", help="the DNS label under _domainkey (default: mail)")
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa", help="rsa (2048 bits, the default) or ed25519")
    keygen.add_argument("--key", help="where to write it (default: dkim/DOMAIN.SELECTOR.key next to the config file)")

    queue = commands.add_parser("queue", help="the outbound queue").add_subparsers(dest="action", required=True)
    queue.add_parser("list", help="queued messages: id, sender, recipients, attempts, next try, last error")
    queue.add_parser("flush", help="make the running server retry everything now")
    queue.add_parser("remove", help="drop a queued message").add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Problems reach the admin as one-line errors; Twisted's log (which would
    # print tracebacks, say for a plugin that fails to import) is not wanted.
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    try:
        if not args.config:
            raise CommandError("give --config FILE or set MAILPLAT_CONFIG")
        settings = load(args.config)
        if args.command == "check-config":
            return check_config(settings)
        if args.command == "doctor":
            return doctor.run(settings, args.dns_server, sys.stdout)
        if args.command == "dkim":
            return dkim_keygen(settings, args)
        if args.command == "queue":
            return queue_command(settings, args)
        return user_command(settings, args)
    except ConfigError as e:
        print(f"mailplat: {e}", file=sys.stderr)
        return 1
    except CommandError as e:
        print(f"mailplat: {e}", file=sys.stderr)
        return 1


def dkim_keygen(settings: Settings, args: argparse.Namespace) -> int:
    """Write a key (mode 0600, never over an existing file) and say what to publish and configure."""
    from mailplat.mailauth.dkim import generate_key

    domain = args.domain.strip().lower().rstrip(".")
    if domain not in settings.domains:
        raise CommandError(f"{domain} is not one of the domains in {settings.path}")
    relative = args.key or os.path.join("dkim", f"{domain}.{args.selector}.key")
    path = os.path.join(settings.config_dir, relative)
    try:
        record = generate_key(path, args.algorithm)
    except FileExistsError:
        raise CommandError(f"{path} exists; give another --key or --selector (keys are never overwritten)")
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}")
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    print(f"wrote {path}")
    print("1. publish this DNS record:")
    print(f"   {args.selector}._domainkey.{domain}. IN TXT {strings}")
    print(f"2. add to {settings.path} and restart mailplat:")
    print(f'   [dkim."{domain}"]')
    print(f'   selector = "{args.selector}"')
    print(f'   key = "{relative}"')
    print(f"3. check with: mailplat --config {settings.path} doctor")
    return 0


def check_config(settings: Settings) -> int:
    """Build every backend as the server would; print the effective settings."""
    from twisted.internet import reactor

    from mailplat.service import build_providers

    context, _ = build_providers(settings, reactor)
    _check_aliases(settings, context.providers["auth"])
    sys.stdout.write(settings.describe())
    print(f"# {settings.path}: OK", file=sys.stderr)
    return 0


def _check_aliases(settings: Settings, auth: Any) -> None:
    """Every alias target in our domains is a user or an alias (ConfigError otherwise), as at server start."""
    from twisted.internet import defer

    from mailplat.addresses import AliasResolver
    from mailplat.interfaces import Account
    from mailplat.plugins import call
    from mailplat.service import check_alias_targets

    if check_alias_targets(settings, AliasResolver(settings.domains, settings.aliases, lambda address: call(auth.lookup, address))):
        return
    if not IUserManager.providedBy(auth):
        print(f"# [aliases] targets not checked: the {settings.auth.name} auth backend answers only once running", file=sys.stderr)
        return
    # A database backend answers only once the server runs; its user list is for this command.
    users = set(auth.list_users())
    listed = AliasResolver(settings.domains, settings.aliases, lambda address: defer.succeed(Account(address) if address in users else None))
    check_alias_targets(settings, listed)


def _user_manager(settings: Settings) -> Any:
    from twisted.internet import reactor

    from mailplat.plugins import build_backend
    from mailplat.service import backend_context

    auth = build_backend(settings.auth, backend_context(settings, reactor, admin=True), settings.path)
    if not IUserManager.providedBy(auth):
        raise CommandError(f"the {settings.auth.name} auth backend cannot edit users; manage them where that backend keeps them")
    return auth


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ; nothing changed")
    if not password:
        raise CommandError("the password is empty; nothing changed")
    return password


def user_command(settings: Settings, args: argparse.Namespace) -> int:
    users = _user_manager(settings)
    if args.action == "list":
        for address in users.list_users():
            print(address)
        return 0
    address = args.address.strip().lower()
    try:
        validate_address(address)
    except AddressError as e:
        raise CommandError(f"{args.address!r}: {e}")
    domain = address.rpartition("@")[2]
    if args.action == "add":
        if domain not in settings.domains:
            raise CommandError(f"{domain} is not one of the domains in {settings.path}; add it to domains first")
        if "+" in address.rpartition("@")[0]:
            # Mail for user+tag@domain is delivered to user@domain, so such a
            # mailbox could never receive anything.
            raise CommandError(f"{args.address!r}: '+' starts a subaddress tag (user+tag@ delivers to user@); choose an address without '+'")
        if address in settings.aliases:
            # Aliases resolve before mailboxes: this one would never get mail.
            raise CommandError(
                f'{address} is an alias ([aliases] "{address}" in {settings.path}); remove the alias first, or choose another address'
            )
        password = _read_password(args.password_stdin)
        try:
            users.add_user(address, password)
        except ValueError as e:
            raise CommandError(str(e))
        print(f"added {address}")
    elif args.action == "passwd":
        if address not in users.list_users():
            raise CommandError(f"no such user: {address}")
        users.set_password(address, _read_password(args.password_stdin))
        print(f"changed the password of {address}")
    elif args.action == "del":
        pointing = [source for source, targets in settings.aliases.items() if address in map(canonical, targets)]
        if pointing:
            # The server refuses to start with an alias whose target is no user.
            raise CommandError(
                f'{address} is the target of [aliases] "{pointing[0]}" in {settings.path}; remove it from the alias first'
            )
        try:
            users.delete_user(address)
        except KeyError:
            raise CommandError(f"no such user: {address}")
        print(f"removed {address} (its mail stays on disk)")
    return 0


def _print_queue(queue: Any) -> int:
    """One line per message and one per recipient, written in one go."""
    from mailplat.queue.store import PENDING

    times: dict[int, str] = {}

    def when(timestamp: float) -> str:
        # Many entries share a second: format each second once.
        second = int(timestamp)
        if second not in times:
            times[second] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return times[second]

    lines = []
    count = 0
    for envelope in queue.envelopes():
        count += 1
        lines.append(f"{envelope['id']}  from <{envelope['sender']}>  queued {when(envelope['created'])}")
        for r in envelope["recipients"]:
            next_try = when(r["next_try"]) if r["state"] == PENDING else "-"
            lines.append(f"    <{r['address']}>  {r['state']}  attempts={r['attempts']}  next try {next_try}  {r['last_error']}")
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    return count


def queue_command(settings: Settings, args: argparse.Namespace) -> int:
    from mailplat.queue.store import Queue

    queue = Queue(os.path.join(settings.data_dir, "queue"))
    if not os.path.isdir(queue.envelopes_dir):
        if args.action == "remove":
            raise CommandError(f"no such queued message: {args.id}")
        print("the queue is empty" if args.action == "list" else "nothing to flush")
        return 0
    if args.action == "list":
        count = _print_queue(queue)
        print(f"{count} queued message(s)")
    elif args.action == "flush":
        queue.request_flush()
        print("asked the running server to retry every queued message now")
    else:
        if args.id not in queue.ids():
            raise CommandError(f"no such queued message: {args.id}")
        queue.remove(args.id)
        print(f"removed {args.id} from the queue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
