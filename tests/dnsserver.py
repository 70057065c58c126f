"""A throwaway authoritative DNS server for tests (twisted.names, UDP and TCP on 127.0.0.1, or ::1).

    with DNSServer().start({"zones": {"example.net": {"MX": [[10, "mx.example.net"]]},
                                      "mx.example.net": {"A": ["127.0.0.1"]}}}) as dns:
        ... [dns] servers = ["127.0.0.1:%d" % dns.port] ...

Run as ``python tests/dnsserver.py ZONES.json [INTERFACE]``; it prints ``dns
listening on 127.0.0.1:PORT`` (``[::1]:PORT`` for ``DNSServer("::1")``).
Unknown names get NXDOMAIN, a known name without the asked type NODATA,
names under the top-level "servfail" key SERVFAIL.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

_TYPES = {"A": 1, "MX": 15, "TXT": 16, "AAAA": 28, "CNAME": 5}


def _records(zones: dict[str, Any]) -> Any:
    from twisted.names import dns

    table: dict[tuple[str, int], list[Any]] = {}
    for owner, types in zones.items():
        for kind, values in types.items():
            for value in values:
                if kind == "A":
                    payload = dns.Record_A(value, ttl=60)
                elif kind == "AAAA":
                    payload = dns.Record_AAAA(value, ttl=60)
                elif kind == "MX":
                    payload = dns.Record_MX(value[0], value[1].rstrip(".").encode() if value[1] != "." else b"", ttl=60)
                elif kind == "TXT":
                    payload = dns.Record_TXT(value.encode(), ttl=60)
                else:
                    payload = dns.Record_CNAME(value.encode(), ttl=60)
                table.setdefault((owner.lower().rstrip("."), _TYPES[kind]), []).append(
                    dns.RRHeader(owner.encode(), _TYPES[kind], dns.IN, 60, payload, auth=True)
                )
    return table


def serve(path: str, interface: str = "127.0.0.1") -> None:
    from twisted.internet import defer, reactor
    from twisted.names import dns, error, server
    from twisted.names.common import ResolverBase

    config = json.loads(Path(path).read_text())
    table = _records(config.get("zones", {}))
    owners = {owner for owner, _ in table}
    broken = {name.lower() for name in config.get("servfail", [])}

    class Authority(ResolverBase):
        def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
            key = name.decode().lower().rstrip(".")
            if key in broken:
                # Not a DomainError: twisted.names answers those NXDOMAIN.
                return defer.fail(RuntimeError(f"servfail {key}"))
            if key not in owners:
                return defer.fail(error.AuthoritativeDomainError(key))
            return defer.succeed((table.get((key, type), []), [], []))

    factory = server.DNSServerFactory(authorities=[Authority()])
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=interface)
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface=interface)
            break
        except Exception:  # noqa: BLE001 - the TCP port is taken: try another UDP one
            udp.stopListening()
    host = f"[{interface}]" if ":" in interface else interface
    print(f"dns listening on {host}:{port}", flush=True)
    reactor.run()


class DNSServer:
    """The server above as a subprocess, for a test."""

    def __init__(self, interface: str = "127.0.0.1") -> None:
        self.interface = interface
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self, zones: dict[str, Any], timeout: float = 20.0) -> DNSServer:
        folder = Path(tempfile.mkdtemp(prefix="dnsserver-"))
        (folder / "zones.json").write_text(json.dumps(zones))
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(folder / "zones.json"), self.interface], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # blocks until the server prints, or exits
        found = re.search(r"listening on \S+:(\d+)$", line.strip())
        if not found or time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"the DNS server did not start: {line!r}")
        self.port = int(found.group(1))
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    serve(*sys.argv[1:3])
