"""The house's rules, checked on the imports themselves.

Protocols (``smtp``, ``pop3``, ``imap``) never import backends, the queue or
filters; backends never import protocols; ``interfaces`` imports nothing of
ours; ``wire`` and ``mailauth`` are leaves below the protocols; and there
is no import cycle among mailplat's modules.  Imports inside functions
count too: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mailplat"

PROTOCOLS = ("mailplat.smtp", "mailplat.pop3", "mailplat.imap")
FORBIDDEN = [
    # (importer prefix, imported prefix, why)
    *[(p, q, "protocols never import backends, the queue or filters")
      for p in PROTOCOLS for q in ("mailplat.backends", "mailplat.queue", "mailplat.filters")],
    *[("mailplat.backends", p, "backends never import protocols") for p in PROTOCOLS],
    *[("mailplat.filters", p, "filters never import protocols") for p in PROTOCOLS],
    *[("mailplat.pop3", "mailplat.smtp", "POP3 shares nothing with SMTP but wire/ and the contracts")],
    *[("mailplat.imap", q, "IMAP shares nothing with SMTP or POP3 but wire/, cred and the contracts")
      for q in ("mailplat.smtp", "mailplat.pop3")],
    ("mailplat.pop3", "mailplat.imap", "POP3 reads the store through the contracts, not through IMAP"),
    *[("mailplat.wire", q, "wire/ is bytes and replies only")
      for q in ("mailplat.smtp", "mailplat.pop3", "mailplat.imap", "mailplat.queue", "mailplat.backends",
                "mailplat.filters", "mailplat.service", "mailplat.mailauth")],
    *[("mailplat.mailauth", q, "mailauth/ knows messages and DNS, not who calls it")
      for q in ("mailplat.smtp", "mailplat.pop3", "mailplat.imap", "mailplat.queue", "mailplat.backends",
                "mailplat.filters", "mailplat.service")],
    ("mailplat.queue", "mailplat.smtp", "the queue is a peer of the SMTP server, not part of it"),
    ("mailplat.routing", "mailplat.queue", "the hand-off is given the queue, it does not import it"),
    ("mailplat.routing", "mailplat.smtp", "the hand-off serves SMTP and the queue alike"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every mailplat module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # "from mailplat.wire import sasl" imports the module mailplat.wire.sasl.
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    return {m for m in found if m == "mailplat" or m.startswith("mailplat.")}


@functools.cache
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path) if m in modules and m != name}
    return edges


def test_graph_sees_the_modules():
    """The walk finds the house (a wrong ROOT would make every rule pass)."""
    edges = graph()
    assert {"mailplat.interfaces", "mailplat.smtp.server", "mailplat.pop3.server", "mailplat.queue.runner"} <= set(edges)
    assert "mailplat.wire.lines" in edges["mailplat.smtp.server"]


def test_interfaces_import_nothing_of_ours():
    assert graph()["mailplat.interfaces"] == set()


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN, ids=[f"{a}->{b}" for a, b, _ in FORBIDDEN])
def test_forbidden_edge(importer, imported, why):
    bad = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        if source == importer or source.startswith(importer + ".")
        for target in targets
        if target == imported or target.startswith(imported + ".")
    )
    assert not bad, f"{why}: " + "; ".join(bad)


def test_no_import_cycle():
    edges = graph()
    # Package __init__ modules are imported on the way to their children:
    # an edge into a package is an edge into its __init__ only.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + " | ".join(cycles)


def test_every_package_is_installed():
    """pyproject.toml lists every package of mailplat/: one left out is missing from the wheel (as mailplat.imap once was)."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for init in ROOT.rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
