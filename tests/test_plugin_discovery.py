"""Backends are found like any third-party plugin: by name through twisted.plugin, or by dotted path."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
import twisted.plugins
from twisted.internet import defer
from zope.interface.verify import verifyObject

from conftest import BASE_CONFIG, message
from mailplat.config import BackendSettings, ConfigError
from mailplat.interfaces import BackendContext, IAuthBackend, IBackendFactory, IDeliveryBackend, IMailboxBackend
from mailplat.plugins import build_backend, call, find_factory

AUTH_PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from mailplat.interfaces import Account, IAuthBackend, IBackendFactory


@implementer(IAuthBackend)
class OneUser:
    def __init__(self, address):
        self.address = address

    def authenticate(self, address, password):
        return None

    async def lookup(self, address):
        return Account(address) if address == self.address else None


@implementer(IPlugin, IBackendFactory)
class Factory:
    kind = "auth"
    name = "{name}"

    def build(self, options, context):
        return OneUser(options.pop("user"))


factory = Factory()
'''


def drop_in(monkeypatch, root: Path, module: str, source: str) -> None:
    """A drop-in module in root/twisted/plugins, visible to twisted.plugin discovery."""
    folder = root / "twisted" / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(folder)])
    monkeypatch.syspath_prepend(str(root))


def context(tmp_path: Path) -> BackendContext:
    from twisted.internet import reactor

    return BackendContext("mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), reactor)


@pytest.mark.parametrize(
    "kind, name, interface",
    [("auth", "passwd-file", IAuthBackend), ("mailbox", "maildir", IMailboxBackend), ("delivery", "local", IDeliveryBackend)],
)
def test_builtin_backends_are_plugins(kind, name, interface):
    """Every built-in backend is found by name through twisted.plugin discovery and provides IBackendFactory."""
    factory = find_factory(kind, name)
    assert verifyObject(IBackendFactory, factory)
    assert (factory.kind, factory.name) == (kind, name)


def test_third_party_drop_in_found_by_name(tmp_path, monkeypatch):
    """A factory in another folder's twisted/plugins is found by its name and builds a verified provider."""
    drop_in(monkeypatch, tmp_path, "mailplat_test_oneuser", AUTH_PLUGIN.format(name="one-user"))
    provider = build_backend(BackendSettings("auth", "one-user", {"user": "x@example.org"}), context(tmp_path), "f.toml")
    assert verifyObject(IAuthBackend, provider)


def test_duplicate_names_refused(tmp_path, monkeypatch):
    """Two drop-ins registering the same kind and name are a config error."""
    drop_in(monkeypatch, tmp_path, "mailplat_test_dup_a", AUTH_PLUGIN.format(name="twin"))
    drop_in(monkeypatch, tmp_path, "mailplat_test_dup_b", AUTH_PLUGIN.format(name="twin"))
    with pytest.raises(ConfigError, match="two auth backends are called 'twin'"):
        find_factory("auth", "twin")


def test_broken_drop_in_is_reported(tmp_path, monkeypatch):
    """A drop-in that fails to import is named, with its exception, in the unknown-backend error."""
    drop_in(monkeypatch, tmp_path, "mailplat_test_broken", "import no_such_module_anywhere\n")
    with pytest.raises(ConfigError) as e:
        find_factory("auth", "wanted")
    text = str(e.value)
    assert "known: passwd-file" in text
    assert "mailplat_test_broken" in text and "No module named 'no_such_module_anywhere'" in text


def test_dotted_path(tmp_path, monkeypatch):
    """A factory named "module:attribute" is imported and used."""
    (tmp_path / "my_auth.py").write_text(AUTH_PLUGIN.format(name="dotted"))
    monkeypatch.syspath_prepend(str(tmp_path))
    provider = build_backend(BackendSettings("auth", "my_auth:factory", {"user": "x@example.org"}), context(tmp_path), "f.toml")
    assert IAuthBackend.providedBy(provider)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
        ("os:no_such_attribute", "module 'os' has no attribute 'no_such_attribute'"),
        ("os:path", "does not provide IBackendFactory"),
        ("my_auth2:factory", "is a auth backend, not a mailbox backend"),
    ],
)
def test_dotted_path_errors(tmp_path, monkeypatch, name, message):
    """A bad dotted path gives a ConfigError that says what is wrong, placed under its section."""
    (tmp_path / "my_auth2.py").write_text(AUTH_PLUGIN.format(name="x"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("mailbox", name, {}), context(tmp_path), "f.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("f.toml: [mailbox] backend: ")


def test_provider_without_interface_refused(tmp_path, monkeypatch):
    """A factory whose provider lacks the interface's methods is refused at start-up (verifyObject)."""
    source = AUTH_PLUGIN.format(name="lazy").replace("    async def lookup(self, address):", "    async def look_up(self, address):")
    (tmp_path / "lazy_auth.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="does not provide IAuthBackend"):
        build_backend(BackendSettings("auth", "lazy_auth:factory", {"user": "x@example.org"}), context(tmp_path), "f.toml")


def test_factory_config_error_gets_file_and_section(tmp_path):
    """A ConfigError raised by a factory's build names the file, the section and the option."""
    with pytest.raises(ConfigError) as e:
        build_backend(BackendSettings("auth", "passwd-file", {}), context(tmp_path), "/etc/m.toml")
    assert str(e.value).startswith("/etc/m.toml: [auth] path: is required")
    assert "fix:" in str(e.value)


def test_call_adapts_values_deferreds_and_coroutines():
    """call() turns a plain value, a Deferred, a coroutine function and an exception into Deferreds."""
    async def coroutine(x):
        return x * 3

    def raises():
        raise ValueError("boom")

    results = []
    call(lambda: 1).addCallback(results.append)
    call(lambda: defer.succeed(2)).addCallback(results.append)
    call(coroutine, 1).addCallback(results.append)
    call(raises).addErrback(lambda f: results.append(f.type))
    assert results == [1, 2, 3, ValueError]


def test_third_party_auth_backend_in_real_server(make_server, tmp_path, monkeypatch):
    """A real twistd server uses a drop-in auth backend from another folder on PYTHONPATH, by name."""
    root = tmp_path / "thirdparty"
    folder = root / "twisted" / "plugins"
    folder.mkdir(parents=True)
    (folder / "mailplat_test_realserver.py").write_text(AUTH_PLUGIN.format(name="only-carol"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    config = BASE_CONFIG.replace(
        '[auth]\nbackend = "passwd-file"\npath = "users.passwd"', '[auth]\nbackend = "only-carol"\nuser = "carol@example.org"'
    )
    assert "only-carol" in config
    server = make_server(config=config)
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("a@remote.test", ["carol@example.org"], message("third-party"))
        client.mail("a@remote.test")
        assert client.rcpt("alice@example.org")[0] == 550
    assert b"Subject: third-party" in server.messages("carol@example.org")[0]


def test_broken_plugin_in_check_config(tmp_path, monkeypatch):
    """check-config names a drop-in that fails to import, in one line without a traceback."""
    import subprocess

    from conftest import MAILPLAT, MailplatServer

    root = tmp_path / "thirdparty"
    (root / "twisted" / "plugins").mkdir(parents=True)
    (root / "twisted" / "plugins" / "mailplat_test_cli_broken.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(root))
    server = MailplatServer(tmp_path / "s", BASE_CONFIG.replace('backend = "passwd-file"', 'backend = "ldap"'))
    result = subprocess.run([MAILPLAT, "--config", str(server.config_path), "check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "mailplat_test_cli_broken" in result.stderr and "RuntimeError: half-installed" in result.stderr
    assert "Traceback" not in result.stderr
