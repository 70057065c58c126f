"""DNS: the syntax of a DNS server's address, and the two resolvers that ask ``[dns] servers``.

Code on the reactor (MX lookups for the queue, the dnsbl filter, the
doctor) asks through twisted.names, by :func:`reactor_resolver`.  Libraries
that look names up from inside a synchronous evaluation (pyspf, dkimpy: an
SPF record's ``include:`` is only known once the record is read) run in
worker threads and ask through dnspython, by :class:`Resolver`.  The
twisted.names resolver cannot serve those threads: a thread waiting on the
reactor (``blockingCallFromThread``) deadlocks when the reactor stops its
thread pool at shutdown.  Both ask exactly the configured servers, or the
system's (/etc/resolv.conf) when there are none.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from mailplat.numerals import is_digits

__all__ = ["DNSTemporaryError", "Resolver", "format_server", "parse_server", "reactor_resolver"]

# Seconds one question may take from a worker thread (every server tried),
# and one try at one server.
DNS_TIMEOUT = 5.0
DNS_TRY_TIMEOUT = 2.0
CACHE_ENTRIES = 2048

_BRACKETED = re.compile(r"\[([^\]]+)\](?::([0-9]+))?")


def parse_server(text: str) -> tuple[str, int]:
    """A DNS server's address as (IP, port): ``IP:PORT``, ``[IPv6]:PORT``, or a bare IP (port 53).

    Raises ValueError, whose text says what is wrong, for anything else
    (a host name included: a resolver cannot ask a name to find its own
    server).
    """
    text = text.strip()
    found = _BRACKETED.fullmatch(text)
    if found:
        host, port = found.group(1), found.group(2) or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"  # an IPv4 address, or a bare IPv6 one
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not IP:PORT (e.g. 127.0.0.1:53 or [::1]:53)") from None
    if not is_digits(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: {port!r} is not a port number (1 to 65535)")
    return host, int(port)


def format_server(server: tuple[str, int]) -> str:
    """(IP, port) written back as :func:`parse_server` reads it: ``[::1]:53`` for IPv6."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reactor_resolver(servers: Sequence[tuple[str, int]], *, hosts_file: bool = True, timeout: Sequence[int] = ()) -> Any:
    """The twisted.names resolver asking ``servers`` only, or resolv.conf's when there are none.

    With ``hosts_file`` (the server's way, as twisted.names' own
    ``createResolver``), /etc/hosts answers first and answers are cached;
    without it (the doctor's way: the rest of the world does not see our
    hosts file) every question goes to the servers.  ``timeout`` is
    twisted.names' sequence of retry timeouts (its default when empty).
    """
    from twisted.names import cache, client, hosts, resolve

    options: dict[str, Any] = {"timeout": tuple(timeout)} if timeout else {}
    if servers:
        # A Resolver given no resolv.conf: with one, Twisted falls back to
        # its name servers, or to 127.0.0.1:53, when ours time out.
        asking = client.Resolver(servers=list(servers), **options)
    else:
        asking = client.Resolver(resolv="/etc/resolv.conf", **options)
    if not hosts_file:
        return asking
    return resolve.ResolverChain([hosts.Resolver(), cache.CacheResolver(), asking])


class DNSTemporaryError(Exception):
    """A DNS question got no usable answer (SERVFAIL, REFUSED, no answer in time)."""


class Resolver:
    """Blocking DNS lookups through dnspython, for worker threads only.

    ``servers`` are ``(address, port)`` pairs, the only servers asked; none
    means the system's (/etc/resolv.conf).  /etc/hosts is never read.
    ``timeout`` bounds one question (every server tried), ``try_timeout``
    one try at one server.
    """

    def __init__(
        self, servers: Sequence[tuple[str, int]] | None, timeout: float = DNS_TIMEOUT, try_timeout: float = DNS_TRY_TIMEOUT
    ) -> None:
        if servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
        else:
            resolver = dns.resolver.Resolver()
        resolver.timeout = try_timeout
        resolver.lifetime = timeout
        # Answers are kept as long as their TTL says (the cache is thread-safe).
        resolver.cache = dns.resolver.LRUCache(CACHE_ENTRIES)
        self.servers = tuple(servers or ())
        self.timeout = timeout
        self._resolver = resolver

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[Any]:
        """The records of one type at ``name``: [] for NXDOMAIN or none of that type.

        ``timeout`` may shorten this question's time limit, never lengthen it.
        """
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        if timeout <= 0:
            raise DNSTemporaryError(f"{name} {rdtype}: out of time")
        try:
            answer = self._resolver.resolve(name, rdtype, lifetime=timeout, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            # Not a name DNS can hold: nothing is published there.
            return []
        except dns.exception.Timeout:
            raise DNSTemporaryError(f"{name} {rdtype}: no answer in time")
        except dns.resolver.NoNameservers:
            raise DNSTemporaryError(f"{name} {rdtype}: SERVFAIL or REFUSED from every server")
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{name} {rdtype}: {type(e).__name__}: {e}")
        return list(answer)

    def txt(self, name: str, timeout: float | None = None) -> list[bytes]:
        """Each TXT record at ``name``, its strings joined."""
        return [b"".join(record.strings) for record in self.lookup(name, "TXT", timeout)]
