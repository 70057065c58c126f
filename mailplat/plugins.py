"""Finding backend factories, building providers, and calling them.

Factories come from ``twisted.plugin`` discovery (every ``twisted/plugins/``
folder on the path; our own backends register there too) or from a dotted
path ``"package.module:attribute"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet import defer
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailplat.config import BackendSettings, ConfigError
from mailplat.interfaces import (
    BackendContext,
    IAuthBackend,
    IBackendFactory,
    IDeliveryBackend,
    IMailboxBackend,
    IMessageFilter,
    MaybeAsync,
)

__all__ = ["PROVIDES", "BackendFactory", "build_backend", "call", "discover", "find_factory"]

T = TypeVar("T")

# What the provider of each kind must provide.
PROVIDES: dict[str, type[Interface]] = {
    "auth": IAuthBackend,
    "mailbox": IMailboxBackend,
    "delivery": IDeliveryBackend,
    "filter": IMessageFilter,
}


def call(method: Callable[..., MaybeAsync[T]], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
    """Call a backend method that may return a value, a Deferred or a coroutine.

    The one place backends are called: ``maybeDeferred`` already adapts all
    three (and turns an exception into a failed Deferred).
    """
    # maybeDeferred's stubs know only "returns a Deferred or a value"; it
    # adapts coroutines too (Twisted >= 22.8).
    return defer.maybeDeferred(cast("Callable[..., defer.Deferred[T]]", method), *args, **kwargs)


@implementer(IPlugin, IBackendFactory)
class BackendFactory:
    """A factory that imports its builder only when used.

    ``builder`` is ``"package.module:function"``; the function takes
    ``(options, context)`` like :meth:`IBackendFactory.build`.  Drop-in files
    are imported by every plugin discovery, so this keeps them cheap.
    """

    def __init__(self, kind: str, name: str, builder: str) -> None:
        self.kind = kind
        self.name = name
        self.builder = builder

    def build(self, options: dict[str, Any], context: BackendContext) -> Any:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(options, context)

    def __repr__(self) -> str:
        return f"<BackendFactory {self.kind} {self.name!r} -> {self.builder}>"


def discover() -> tuple[list[Any], list[str]]:
    """All IBackendFactory plugins, and the import errors met on the way.

    ``getPlugins`` only logs a drop-in module that fails to import; we listen
    to the log while it runs so that such a module is reported, not ignored.
    """
    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        # getPlugins logs through the legacy API: its events carry "failure".
        failure = event.get("log_failure") or event.get("failure")
        if failure is not None and not event.get("why"):
            modules = [frame[1] for frame in failure.frames if "plugins" in frame[1]]
            where = f"{modules[-1]}: " if modules else ""
            errors.append(f"{where}{failure.type.__name__}: {failure.getErrorMessage()}")

    observer = cast(ILogObserver, observe)  # a plain function is an ILogObserver
    globalLogPublisher.addObserver(observer)
    try:
        factories = list(getPlugins(IBackendFactory))
    finally:
        globalLogPublisher.removeObserver(observer)
    return factories, errors


def find_factory(kind: str, name: str) -> Any:
    """The factory of ``kind`` called ``name`` (or at dotted path ``name``).

    Raises ConfigError with key ``backend`` (the caller adds file and section).
    """
    if ":" in name:
        return _import_factory(kind, name)
    factories, errors = discover()
    matches = [f for f in factories if f.kind == kind and f.name == name]
    if len(matches) > 1:
        where = ", ".join(sorted(_origin(f) for f in matches))
        raise ConfigError("backend", f"two {kind} backends are called {name!r} (in {where})", "uninstall one of the packages")
    if matches:
        return matches[0]
    known = sorted({f.name for f in factories if f.kind == kind})
    problem = f"no {kind} backend called {name!r}; known: {', '.join(known) or 'none'}"
    if errors:
        problem += "; some plugin modules failed to import: " + " | ".join(errors)
    raise ConfigError("backend", problem, 'use a known name, or a dotted path "package.module:factory"')


def _origin(factory: Any) -> str:
    """The module a factory comes from, to tell two of one name apart.

    A BackendFactory's class lives in mailplat.plugins whoever uses it: name
    the module it builds from instead, which says which package it came with.
    """
    builder = getattr(factory, "builder", None)
    if isinstance(factory, BackendFactory) and isinstance(builder, str):
        return builder.partition(":")[0]
    return type(factory).__module__


def _import_factory(kind: str, dotted: str) -> Any:
    module_name, _, attribute = dotted.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError("backend", f"cannot import module {module_name!r}: {type(e).__name__}: {e}", "check the package is installed and the name is right")
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise ConfigError("backend", f"module {module_name!r} has no attribute {attribute!r}", f"name a factory defined in {module_name}")
    if not IBackendFactory.providedBy(factory):
        raise ConfigError("backend", f"{dotted} does not provide IBackendFactory", "decorate its class with @implementer(IBackendFactory)")
    if factory.kind != kind:
        raise ConfigError("backend", f"{dotted} is a {factory.kind} backend, not a {kind} backend", f"name a {kind} backend here")
    return factory


def build_backend(settings: BackendSettings, context: BackendContext, file: str) -> Any:
    """Find, build and verify the provider for one ``[section]`` of the config."""
    kind = _KIND_OF_SECTION[settings.section]
    try:
        factory = find_factory(kind, settings.name)
        try:
            verifyObject(IBackendFactory, factory)
        except Invalid as e:
            raise ConfigError("backend", f"{settings.name} is not a valid backend factory: {e}", "fix the plugin")
        try:
            provider = factory.build(dict(settings.options), context)
        except ConfigError:
            raise
        except Exception as e:
            # A plugin's bug (or a builder module that fails to import) is
            # still one line naming the section, not a traceback.
            raise ConfigError(
                "backend", f"{settings.name} failed to build: {type(e).__name__}: {e}",
                "check this section's options; if they are right, the plugin has a bug",
            )
        try:
            verifyObject(PROVIDES[kind], provider)
        except Invalid as e:
            raise ConfigError("backend", f"{settings.name} built a provider that does not provide {PROVIDES[kind].__name__}: {e}", "fix the plugin")
    except ConfigError as e:
        raise e.within(file, settings.label or settings.section)
    return provider


_KIND_OF_SECTION = {"auth": "auth", "mailbox": "mailbox", "delivery": "delivery", "filter": "filter"}
