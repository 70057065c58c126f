"""A mailbox backend without IMessageStore (test_async_plugin's, which serves
delivery and POP3) still builds; with an IMAP listener, building the backends
(check-config, and the server before it listens) is a config error.
test_imap_clients checks the server's refusal at start over the wire."""

from __future__ import annotations

import textwrap

import pytest

from conftest import BASE_CONFIG
from test_async_plugin import ASYNC_MAILBOX
from mailplat.config import ConfigError, load
from mailplat.service import build_providers
from mailplat.tls import make_self_signed


def config(tmp_path, monkeypatch, with_imap: bool):
    (tmp_path / "modules").mkdir(exist_ok=True)
    module = f"mailplat_test_pop3_only_{with_imap}"
    (tmp_path / "modules" / f"{module}.py").write_text(ASYNC_MAILBOX)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    make_self_signed("mail.example.org", str(tmp_path / "tls" / "cert.pem"), str(tmp_path / "tls" / "key.pem"))
    (tmp_path / "users.passwd").write_text("")
    text = BASE_CONFIG.replace('backend = "maildir"\npath = "mail"', f'backend = "{module}:factory"')
    if not with_imap:
        text = text.replace('imap = "tcp:0:interface=127.0.0.1"\n', "").replace('imaps = "tcp:0:interface=127.0.0.1"\n', "")
    path = tmp_path / "mailplat.toml"
    path.write_text(textwrap.dedent(text))
    return load(str(path))


def test_an_imap_listener_needs_a_store_that_serves_imap(tmp_path, monkeypatch):
    """check-config and the server (both build the providers) refuse it before listening, naming the listener, the backend and the fix."""
    settings = config(tmp_path, monkeypatch, with_imap=True)
    from twisted.internet import reactor

    with pytest.raises(ConfigError) as e:
        build_providers(settings, reactor)
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'mailplat.toml'}: [listen] imap: the 'mailplat_test_pop3_only_True:factory' mailbox backend does not serve IMAP")
    assert "remove the imap listeners" in text


def test_without_imap_the_same_store_still_serves(tmp_path, monkeypatch):
    """Delivery and POP3 only: the same backend builds."""
    settings = config(tmp_path, monkeypatch, with_imap=False)
    from twisted.internet import reactor

    context, _ = build_providers(settings, reactor)
    assert context.providers["mailbox"] is not None
