"""Running `mailplat` and `twistd` as commands, each in a process of its own,
without paying Python's start and mailplat's imports every time.

A test suite runs the admin command hundreds of times (every bad config,
every `user` case); a fresh interpreter costs most of a second of CPU each
time on a loaded machine.  Here one warm process per test worker imports
mailplat once and forks a child per command: the child gets its own argv,
environment, cwd, stdin and stdout/stderr files, runs the same entry point
as the console script (``mailplat.cli:main``, ``twisted.scripts.twistd:run``)
and exits with its exit status.  A crash prints its traceback to stderr and
exits 1, as the interpreter would.  ``python SCRIPT.py ARGS`` runs the same
way (the script as __main__, its folder first on the path, a reactor of its
own).  ``run`` answers as ``subprocess.run`` does, so a test reads the same
result either way; the tests that are about the process itself (it starts,
it exits before it listens) still start the real console scripts.

``spawn`` starts a long-running one the same way (a test's `twistd -n
mailplat`): a process of its own with its own listening sockets, which
SIGTERM stops and SIGKILL kills; the child installs a reactor of its own
before twistd runs, so nothing of the warm process's reactor is shared.
``ForkedProcess`` answers as much of ``subprocess.Popen`` as the fixtures use.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

_ENTRY_POINTS = {"mailplat": ("mailplat.cli", "main"), "twistd": ("twisted.scripts.twistd", "run")}


def _entry(args: Sequence[str]) -> str:
    """What ``args`` runs: a console script's name, or "script" for ``python SCRIPT.py ...``."""
    name = os.path.basename(args[0])
    if os.path.realpath(args[0]) == os.path.realpath(sys.executable) and len(args) > 1 and args[1].endswith(".py"):
        return "script"
    assert name in _ENTRY_POINTS, f"{name}: only {sorted(_ENTRY_POINTS)} and python scripts run here"
    return name


# One warm server per set of interpreter settings (PYTHONPATH and the like),
# and what each has spawned.
_servers: dict[tuple[tuple[str, str], ...], subprocess.Popen[bytes]] = {}
_spawned: dict[tuple[tuple[str, str], ...], list[ForkedProcess]] = {}


def _interpreter_settings(env: dict[str, str] | os._Environ[str]) -> tuple[tuple[str, str], ...]:
    """What an interpreter reads only as it starts (PYTHONPATH and the like)."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith("PYTHON")))


def _start(settings: tuple[tuple[str, str], ...]) -> subprocess.Popen[bytes]:
    server = _servers.get(settings)
    if server is None or server.poll() is not None:
        if not _servers:
            atexit.register(_stop)
        # A test's own PYTHONPATH is mostly its own: its server goes once nothing it spawned runs.
        for other in [k for k in _servers if k != _interpreter_settings(os.environ)]:
            if all(p.poll() is not None for p in _spawned.get(other, [])):
                _close(_servers.pop(other))
                _spawned.pop(other, None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | dict(settings)
        server = _servers[settings] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=os.getcwd(), env=env,
        )
    return server


def _close(server: subprocess.Popen[bytes]) -> None:
    """Closing its stdin ends a server (it exits at EOF)."""
    assert server.stdin is not None
    server.stdin.close()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    assert server.stdout is not None
    server.stdout.close()


def _stop() -> None:
    for server in _servers.values():
        _close(server)
    _servers.clear()


def run(
    args: Sequence[str], *, input: str | bytes | None = None, cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None, timeout: float = 60, text: bool = False, capture_output: bool = True,
    check: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """Run ``args`` (the path of the `mailplat` or `twistd` script, then its arguments) as
    ``subprocess.run(args, input=..., capture_output=True, text=..., timeout=..., cwd=..., env=..., check=...)`` would.

    An ``env`` that sets up the interpreter differently (say a PYTHONPATH with
    a third-party plugin) is served by a warm process started with it.
    """
    assert capture_output, "output is always captured"
    name = _entry(args)
    env = dict(os.environ if env is None else env)
    data = input.encode() if isinstance(input, str) else input
    request = {
        "kind": "run", "name": name, "argv": list(map(str, args)), "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "env": env, "timeout": timeout,
        "stdin": None if data is None else base64.b64encode(data).decode(),
    }
    reply = _ask(_start(_interpreter_settings(env)), request)
    stdout, stderr = base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"])
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(list(args), timeout, stdout, stderr)
    result: subprocess.CompletedProcess[Any] = subprocess.CompletedProcess(
        list(args), reply["returncode"], *((stdout.decode(), stderr.decode()) if text else (stdout, stderr)),
    )
    if check:
        result.check_returncode()
    return result


_lock = threading.Lock()


def _ask(server: subprocess.Popen[bytes], request: dict[str, Any]) -> dict[str, Any]:
    """One request to a server and its reply (one at a time: a test's threads may share it)."""
    assert server.stdin is not None and server.stdout is not None
    with _lock:
        server.stdin.write(json.dumps(request).encode() + b"\n")
        server.stdin.flush()
        line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the command server exited with {server.wait()}")
    reply: dict[str, Any] = json.loads(line)
    return reply


class ForkedProcess:
    """A spawned command, as far as ``subprocess.Popen`` goes for the fixtures:
    ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``.
    Its parent is the warm server, which reaps it and tells its exit status."""

    def __init__(self, server: subprocess.Popen[bytes], pid: int, args: list[str]) -> None:
        self.server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _ask(self.server, {"kind": "wait", "pid": self.pid, "timeout": 0})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            reply = _ask(self.server, {"kind": "wait", "pid": self.pid, "timeout": timeout})
            if reply["returncode"] is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = reply["returncode"]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(args: Sequence[str], *, cwd: str | os.PathLike[str], output: str | os.PathLike[str],
          env: dict[str, str] | None = None) -> ForkedProcess:
    """Start ``args`` (the `twistd` script and its arguments) as a process of its own, forked from the
    warm one, with stdin from /dev/null and stdout and stderr appended to ``output``, as
    ``subprocess.Popen(args, cwd=cwd, env=env, stdout=open(output, "ab"), stderr=subprocess.STDOUT)`` would."""
    name = _entry(args)
    env = dict(os.environ if env is None else env)
    settings = _interpreter_settings(env)
    server = _start(settings)
    request = {"kind": "spawn", "name": name, "argv": list(map(str, args)), "cwd": os.fspath(cwd), "env": env, "output": os.fspath(output)}
    process = ForkedProcess(server, _ask(server, request)["pid"], list(map(str, args)))
    _spawned.setdefault(settings, []).append(process)
    return process


# --- the server (this file run as a script) ---------------------------------------------


def _fresh_reactor() -> None:
    """Install a new default reactor in a spawned child: the warm process's one
    (installed by its imports, never run) has an epoll and a waker that every
    child shares with it."""
    import twisted.internet
    from twisted.internet import default

    sys.modules.pop("twisted.internet.reactor", None)
    if hasattr(twisted.internet, "reactor"):
        del twisted.internet.reactor
    default.install()


def _child(request: dict[str, Any], stdin_path: str, out_fd: int, err_fd: int) -> None:
    """In the forked child: become the command, then exit with its status."""
    import importlib
    import traceback

    code: Any = 1
    try:
        if request["kind"] == "spawn" or request["name"] == "script":
            _fresh_reactor()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, target in ((os.open(stdin_path, os.O_RDONLY), 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(fd, target)
        # The standard streams as a fresh interpreter makes them (text, "\n", the same encoding).
        for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
            old = getattr(sys, "__" + name + "__")
            stream = open(fd, mode, encoding=old.encoding, errors=old.errors, newline="\n", closefd=False)
            setattr(sys, name, stream)
            setattr(sys, "__" + name + "__", stream)
        if request["name"] == "script":
            import runpy

            # As `python SCRIPT.py ARGS`: its folder first on the path, run as __main__.
            sys.argv = request["argv"][1:]
            sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        else:
            sys.argv = request["argv"]
            module, function = _ENTRY_POINTS[request["name"]]
            code = getattr(importlib.import_module(module), function)()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if request["kind"] == "spawn":
        # The interpreter's own exit, as the console script's: it flushes the
        # streams, runs atexit and waits for threads still running.
        raise SystemExit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _serve() -> None:
    """Read one request a line, fork a child for it, answer with its exit status and output."""
    import select
    import tempfile

    # As in the console scripts: the scripts' folder first on the path, not this one.
    sys.path[0] = os.path.dirname(sys.executable)
    # What every command imports, imported once (a module that does not import
    # yet is imported, and fails, in the child, as it would in a fresh process).
    for module in ("mailplat.cli", "mailplat.config", "mailplat.service", "mailplat.passwords", "twisted.scripts.twistd"):
        try:
            __import__(module)
        except Exception:
            pass
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    spawned: dict[int, int | None] = {}  # pid -> exit status, once reaped

    def answer(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()

    while True:
        line = requests.readline()
        if not line:
            # The tests are gone: nothing they started may outlive them.
            for pid, returncode in spawned.items():
                if returncode is None:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            return
        request = json.loads(line)
        if request["kind"] == "spawn":
            out_fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            pid = os.fork()
            if pid == 0:
                _child(request, os.devnull, out_fd, out_fd)
            os.close(out_fd)
            spawned[pid] = None
            answer({"pid": pid})
            continue
        if request["kind"] == "wait":
            pid = request["pid"]
            if spawned.get(pid) is None:
                pidfd = os.pidfd_open(pid)
                ready, _, _ = select.select([pidfd], [], [], request["timeout"])
                os.close(pidfd)
                if ready:
                    spawned[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            answer({"returncode": spawned[pid]})
            continue
        with tempfile.TemporaryDirectory(prefix="mailplat-command-") as folder:
            stdin_path = os.path.join(folder, "stdin")
            with open(stdin_path, "wb") as f:
                f.write(base64.b64decode(request["stdin"]) if request["stdin"] is not None else b"")
            paths = [os.path.join(folder, "stdout"), os.path.join(folder, "stderr")]
            out_fd, err_fd = (os.open(p, os.O_WRONLY | os.O_CREAT, 0o600) for p in paths)
            pid = os.fork()
            if pid == 0:
                _child(request, stdin_path, out_fd, err_fd)
            os.close(out_fd)
            os.close(err_fd)
            pidfd = os.pidfd_open(pid)
            ready, _, _ = select.select([pidfd], [], [], request["timeout"])
            timed_out = not ready
            if timed_out:
                os.kill(pid, signal.SIGKILL)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            output = [open(p, "rb").read() for p in paths]
        answer({
            "returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
            "stdout": base64.b64encode(output[0]).decode(), "stderr": base64.b64encode(output[1]).decode(),
        })


if __name__ == "__main__":
    _serve()
