"""mailplat.plugins: backends found by name (twisted.plugin) or dotted path, verified, built and called."""

from __future__ import annotations

import itertools
import os
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import twisted.plugins
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

import commands
from conftest import BASE_CONFIG, MAILPLAT, message
from mailplat.config import BackendSettings, ConfigError
from mailplat.interfaces import BackendContext, IAuthBackend, IBackendFactory, IDeliveryBackend, IMailboxBackend
from mailplat.plugins import build_backend, call, discover, find_factory

# An auth backend that knows the users named in its options, and nobody else.
# {name} is its registered name; {lookup} lets a test break the provider.
BACKEND_SOURCE = '''\
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.config import ConfigError
from mailplat.interfaces import Account, IAuthBackend, IBackendFactory


@implementer(IAuthBackend)
class Listed:
    def __init__(self, users):
        self.users = users

    def authenticate(self, address, password):
        return defer.succeed(Account(address) if self.users.get(address) == password else None)

    async def {lookup}(self, address):
        return Account(address) if address in self.users else None


@implementer(IPlugin, IBackendFactory)
class ListedFactory:
    kind = "auth"
    name = "{name}"

    def build(self, options, context):
        users = options.pop("users", None)
        if not isinstance(users, dict):
            raise ConfigError("users", "must be a table of address = password", 'e.g. users = {{ "a@example.org" = "pw" }}')
        if options:
            raise ConfigError(next(iter(options)), "unknown key", "{name} knows: users")
        return Listed(users)


factory = ListedFactory()
'''

_unique = itertools.count()


def backend_source(name: str, lookup: str = "lookup") -> str:
    return BACKEND_SOURCE.format(name=name, lookup=lookup)


def unique(prefix: str) -> str:
    """A module name not used before in this process: imported modules are cached by name."""
    return f"{prefix}_{os.getpid()}_{next(_unique)}"


@pytest.fixture(autouse=True)
def forget_new_modules() -> Iterator[None]:
    """Modules a test imports (drop-ins, dotted-path modules) are forgotten after it."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("twisted.plugins.thirdparty_", "mailplat_test_")):
            del sys.modules[name]


@pytest.fixture
def drop_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A third-party `twisted/plugins` folder that twisted.plugin discovery searches during this test."""
    folder = tmp_path / "thirdparty" / "twisted" / "plugins"
    folder.mkdir(parents=True)
    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(folder)])
    return folder


def add_drop_in(folder: Path, source: str) -> str:
    """Write a drop-in module with a fresh name into ``folder``; return its module name."""
    module = unique("thirdparty")
    (folder / f"{module}.py").write_text(source)
    return module


def add_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """An importable module with a fresh name in a folder put on sys.path; return its name."""
    module = unique("mailplat_test_mod")
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    return module


def context(tmp_path: Path) -> BackendContext:
    from twisted.internet import reactor

    return BackendContext("mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), reactor)


def result_of(d: defer.Deferred[object]) -> object:
    """The result a Deferred already has (a Failure when it failed)."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


USERS = {"carol@example.org": "carol-password"}


# --- discovery by name --------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, name, interface",
    [("auth", "passwd-file", IAuthBackend), ("mailbox", "maildir", IMailboxBackend), ("delivery", "local", IDeliveryBackend)],
)
def test_builtin_backends_found_by_name(tmp_path, kind, name, interface):
    """Each built-in backend is found by its name through twisted.plugin discovery and builds a verified provider."""
    factories, errors = discover()
    assert errors == []
    assert [(f.kind, f.name) for f in factories].count((kind, name)) == 1
    factory = find_factory(kind, name)
    assert verifyObject(IBackendFactory, factory)
    assert (factory.kind, factory.name) == (kind, name)
    (tmp_path / "users.passwd").write_text("")
    options = {"path": "users.passwd"} if kind == "auth" else {"path": "mail"} if kind == "mailbox" else {}
    ctx = context(tmp_path)
    if kind == "delivery":
        ctx.providers["mailbox"] = build_backend(BackendSettings("mailbox", "maildir", {"path": "mail"}), ctx, "f.toml")
    assert verifyObject(interface, build_backend(BackendSettings(kind, name, options), ctx, "f.toml"))


def test_unknown_name_lists_known_names():
    """An unknown backend name is a ConfigError listing the names that do exist for that kind."""
    with pytest.raises(ConfigError) as e:
        find_factory("auth", "ldap")
    assert e.value.key == "backend"
    assert "no auth backend called 'ldap'; known: passwd-file" in str(e.value)
    assert "dotted path" in e.value.fix


def test_third_party_drop_in_found_by_name(drop_ins, tmp_path):
    """A factory in another folder's twisted/plugins is found by its name, and its provider is verified and works."""
    module = add_drop_in(drop_ins, backend_source("listed"))
    factory = find_factory("auth", "listed")
    assert type(factory).__module__ == f"twisted.plugins.{module}"
    provider = build_backend(BackendSettings("auth", "listed", {"users": dict(USERS)}), context(tmp_path), "f.toml")
    assert verifyObject(IAuthBackend, provider)
    assert result_of(call(provider.lookup, "carol@example.org")).address == "carol@example.org"
    assert result_of(call(provider.lookup, "alice@example.org")) is None


def test_two_drop_ins_with_one_name(drop_ins):
    """Two drop-ins registering the same kind and name are a ConfigError saying "two" and naming both modules."""
    first = add_drop_in(drop_ins, backend_source("twin"))
    second = add_drop_in(drop_ins, backend_source("twin"))
    with pytest.raises(ConfigError) as e:
        find_factory("auth", "twin")
    text = str(e.value)
    assert "two auth backends are called 'twin'" in text
    assert f"twisted.plugins.{first}" in text and f"twisted.plugins.{second}" in text


def test_two_drop_ins_with_one_name_via_backend_factory(drop_ins):
    """Two drop-ins using mailplat's lazy BackendFactory under one name are named by the modules they build from."""
    for builder in ("pkg_one.auth:build", "pkg_two.auth:build"):
        add_drop_in(drop_ins, f"from mailplat.plugins import BackendFactory\nf = BackendFactory('auth', 'lazy-twin', {builder!r})\n")
    with pytest.raises(ConfigError) as e:
        find_factory("auth", "lazy-twin")
    assert "two auth backends" in str(e.value)
    assert "pkg_one.auth" in str(e.value) and "pkg_two.auth" in str(e.value)


def test_other_kind_with_the_same_name_is_no_clash(drop_ins):
    """A name is per kind: a mailbox backend called "passwd-file" does not clash with the auth one."""
    add_drop_in(drop_ins, backend_source("passwd-file").replace('kind = "auth"', 'kind = "mailbox"'))
    assert find_factory("auth", "passwd-file").kind == "auth"
    assert type(find_factory("mailbox", "passwd-file")).__name__ == "ListedFactory"


def test_drop_in_failing_to_import_is_reported(drop_ins):
    """A drop-in raising ImportError is named, with its exception, in the unknown-backend error instead of vanishing."""
    module = add_drop_in(drop_ins, "import mailplat_no_such_dependency\n")
    with pytest.raises(ConfigError) as e:
        find_factory("auth", "wanted")
    text = str(e.value)
    assert "no auth backend called 'wanted'; known: passwd-file" in text
    assert f"{module}.py" in text
    assert "ModuleNotFoundError: No module named 'mailplat_no_such_dependency'" in text
    assert "\n" not in text


def test_drop_in_failing_does_not_hide_others(drop_ins):
    """A broken drop-in beside a good one: the good one is still found by name."""
    add_drop_in(drop_ins, "raise RuntimeError('half-installed')\n")
    add_drop_in(drop_ins, backend_source("survivor"))
    assert find_factory("auth", "survivor").name == "survivor"


# --- dotted paths ------------------------------------------------------------------


def test_dotted_path(tmp_path, monkeypatch):
    """A backend named "module:attribute" is imported from sys.path and builds a verified provider."""
    module = add_module(tmp_path, monkeypatch, backend_source("unregistered"))
    provider = build_backend(BackendSettings("auth", f"{module}:factory", {"users": dict(USERS)}), context(tmp_path), "f.toml")
    assert verifyObject(IAuthBackend, provider)


@pytest.mark.parametrize(
    "target, problem",
    [
        ("mailplat_test_no_such_module:factory", "cannot import module 'mailplat_test_no_such_module': ModuleNotFoundError"),
        ("{module}:no_such_attribute", "module '{module}' has no attribute 'no_such_attribute'"),
        ("{module}:Listed", "{module}:Listed does not provide IBackendFactory"),
        ("{module}:USERS", "{module}:USERS does not provide IBackendFactory"),
    ],
    ids=["missing module", "missing attribute", "not a factory (class)", "not a factory (value)"],
)
def test_dotted_path_errors(tmp_path, monkeypatch, target, problem):
    """A dotted path to a missing module, a missing attribute or a non-factory is a ConfigError that says which."""
    module = add_module(tmp_path, monkeypatch, backend_source("x") + "USERS = {}\n")
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", target.format(module=module), {}), context(tmp_path), "/etc/mailplat.toml")
    assert str(e.value).startswith("/etc/mailplat.toml: [auth] backend: " + problem.format(module=module)), str(e.value)
    assert e.value.fix


def test_dotted_path_of_another_kind(tmp_path, monkeypatch):
    """A dotted path to an auth factory in [mailbox] is refused, naming both kinds."""
    module = add_module(tmp_path, monkeypatch, backend_source("x"))
    with pytest.raises(ConfigError, match=r"\[mailbox\] backend: .* is a auth backend, not a mailbox backend"):
        build_backend(BackendSettings("mailbox", f"{module}:factory", {}), context(tmp_path), "f.toml")


def test_dotted_module_failing_to_import(tmp_path, monkeypatch):
    """A dotted-path module that raises while importing is named with its exception."""
    module = add_module(tmp_path, monkeypatch, "raise ImportError('needs libfoo')\n")
    with pytest.raises(ConfigError, match=f"cannot import module '{module}': ImportError: needs libfoo"):
        find_factory("auth", f"{module}:factory")


# --- verification and building --------------------------------------------------------


def test_provider_without_the_interface_is_refused(drop_ins, tmp_path):
    """A factory whose provider lacks an interface method (here lookup) is refused by build_backend (verifyObject)."""
    add_drop_in(drop_ins, backend_source("sloppy", lookup="look_up"))
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", "sloppy", {"users": {}}), context(tmp_path), "f.toml")
    assert str(e.value).startswith("f.toml: [auth] backend: sloppy built a provider that does not provide IAuthBackend")
    assert "lookup" in str(e.value)


def test_provider_not_declaring_the_interface_is_refused(drop_ins, tmp_path):
    """A provider with the right methods that does not declare the interface is refused too."""
    add_drop_in(drop_ins, backend_source("undeclared").replace("@implementer(IAuthBackend)\n", ""))
    with pytest.raises(ConfigError, match="does not provide IAuthBackend"):
        build_backend(BackendSettings("auth", "undeclared", {"users": {}}), context(tmp_path), "f.toml")


def test_factory_without_build_is_refused(drop_ins, tmp_path):
    """A drop-in that declares IBackendFactory but has no build() is refused before it is used."""
    add_drop_in(drop_ins, backend_source("buildless").replace("def build(self, options, context):", "def make(self, options, context):"))
    with pytest.raises(ConfigError, match=r"\[auth\] backend: buildless is not a valid backend factory: .*build"):
        build_backend(BackendSettings("auth", "buildless", {}), context(tmp_path), "f.toml")


def test_factory_config_error_names_file_section_and_key(drop_ins, tmp_path):
    """A factory's ConfigError("users", ...) comes out as `FILE: [auth] users: problem; fix: ...`."""
    add_drop_in(drop_ins, backend_source("strict"))
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", "strict", {"users": "carol"}), context(tmp_path), "/etc/mailplat.toml")
    assert str(e.value) == (
        '/etc/mailplat.toml: [auth] users: must be a table of address = password; fix: e.g. users = { "a@example.org" = "pw" }'
    )


def test_builtin_factory_config_error(tmp_path):
    """The passwd-file factory's ConfigError for a missing path names the file, [auth] path and the fix."""
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", "passwd-file", {}), context(tmp_path), "/etc/mailplat.toml")
    assert str(e.value) == (
        '/etc/mailplat.toml: [auth] path: is required: the users file; fix: e.g. path = "users.passwd" (relative to this file)'
    )


def test_factory_crash_is_one_line(drop_ins, tmp_path):
    """A factory whose build() raises something other than ConfigError is still a one-line ConfigError naming it."""
    add_drop_in(drop_ins, backend_source("crashy").replace("users = options.pop(\"users\", None)", "users = options[\"users\"]"))
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", "crashy", {}), context(tmp_path), "/etc/mailplat.toml")
    assert str(e.value).startswith("/etc/mailplat.toml: [auth] backend: crashy failed to build: KeyError: 'users'; fix: ")


def test_options_are_the_factorys_own_copy(drop_ins, tmp_path):
    """build() gets a copy of the options: popping them does not change the settings (built again, it works again)."""
    add_drop_in(drop_ins, backend_source("twice"))
    settings = BackendSettings("auth", "twice", {"users": dict(USERS)})
    build_backend(settings, context(tmp_path), "f.toml")
    build_backend(settings, context(tmp_path), "f.toml")
    assert settings.options == {"users": USERS}


# --- call() -----------------------------------------------------------------------------


def test_call_adapts_a_plain_value():
    """call() turns a plain return value into a Deferred that has already fired with it."""
    assert result_of(call(lambda address: address.upper(), "a@example.org")) == "A@EXAMPLE.ORG"


def test_call_adapts_a_deferred():
    """call() passes a Deferred's result through, and waits for one that fires later."""
    assert result_of(call(defer.succeed, 2)) == 2
    later: defer.Deferred[int] = defer.Deferred()
    d = call(lambda: later)
    box: list[object] = []
    d.addCallback(box.append)
    assert box == []
    later.callback(3)
    assert box == [3]


def test_call_adapts_a_coroutine():
    """call() runs an `async def` method, including awaits on Deferreds, and gives its result as a Deferred."""

    async def lookup(address: str, waiting: defer.Deferred[str]) -> str:
        return address + await waiting

    waiting: defer.Deferred[str] = defer.Deferred()
    d = call(lookup, "a", waiting=waiting)
    box: list[object] = []
    d.addCallback(box.append)
    assert box == []
    waiting.callback("b")
    assert box == ["ab"]


def test_call_turns_exceptions_into_failures():
    """A method that raises, a failed Deferred and a raising coroutine all become failed Deferreds, never exceptions."""

    def raises() -> None:
        raise ValueError("plain")

    async def coroutine_raises() -> None:
        raise KeyError("coroutine")

    outcomes = [result_of(call(raises)), result_of(call(lambda: defer.fail(OSError("deferred")))), result_of(call(coroutine_raises))]
    assert all(isinstance(o, Failure) for o in outcomes)
    assert [o.type for o in outcomes] == [ValueError, OSError, KeyError]  # type: ignore[union-attr]


# --- in a real server -----------------------------------------------------------------------


def test_third_party_backend_in_a_real_server(make_server, tmp_path, monkeypatch):
    """A real `twistd mailplat` uses an auth backend from a drop-in folder on PYTHONPATH, by name, at RCPT."""
    root = tmp_path / "thirdparty-site"
    folder = root / "twisted" / "plugins"
    folder.mkdir(parents=True)
    module = unique("thirdparty_wire")
    (folder / f"{module}.py").write_text(backend_source("listed-wire"))
    # Twisted adds every twisted/plugins folder found on sys.path to twisted.plugins.__path__.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    auth = '[auth]\nbackend = "passwd-file"\npath = "users.passwd"\n'
    assert auth in BASE_CONFIG
    config = BASE_CONFIG.replace(auth, '[auth]\nbackend = "listed-wire"\nusers = { "carol@example.org" = "carol-password" }\n')
    # The base aliases point at alice, whom this backend does not know: the server would refuse to start.
    aliases = config[config.index("[aliases]"):].split("\n[", 1)[0]
    config = config.replace(aliases, '[aliases]\n"postmaster@example.org" = "carol@example.org"\n')
    server = make_server(config=config)

    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo()
        assert client.mail("someone@remote.test")[0] == 250
        assert client.rcpt("carol@example.org")[0] == 250
        code, text = client.rcpt("alice@example.org")
        assert (code, text[:5]) == (550, b"5.1.1"), "alice is in users.passwd but not known to the configured backend"
        client.rset()
        client.sendmail("someone@remote.test", ["carol@example.org"], message("from-the-wire", to="carol@example.org"))
    assert b"Subject: from-the-wire" in server.messages("carol@example.org")[0]



def test_broken_drop_in_named_by_check_config(tmp_path):
    """`mailplat check-config` names a drop-in on PYTHONPATH that fails to import, in one line without a traceback."""
    root = tmp_path / "thirdparty-site"
    (root / "twisted" / "plugins").mkdir(parents=True)
    module = unique("thirdparty_cli")
    (root / "twisted" / "plugins" / f"{module}.py").write_text("raise ImportError('needs libldap')\n")
    config = tmp_path / "mailplat.toml"
    config.write_text('hostname = "mail.example.org"\ndomains = ["example.org"]\n[auth]\nbackend = "ldap"\n[mailbox]\nbackend = "maildir"\npath = "mail"\n')
    env = {k: v for k, v in os.environ.items() if k != "MAILPLAT_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    result = commands.run([MAILPLAT, "--config", str(config), "check-config"], text=True, timeout=60, env=env)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mailplat: {config}: [auth] backend: no auth backend called 'ldap'; known: passwd-file")
    assert f"{module}.py: ImportError: needs libldap" in lines[0]
    assert "Traceback" not in result.stderr
