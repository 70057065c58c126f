"""What the benchmark scripts share: /proc readings, finding the commands to
run, and the helper process that does their PostgreSQL work.

Standard library only, like the scripts: whatever needs psycopg runs in a
helper process, `PYTHON SCRIPT --pg-helper DSN SCHEMA`, where PYTHON is the
interpreter of the twistd being measured (it has mailplat, hence psycopg).
The helper reads one JSON request per line and answers one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


WORDS = (
    "the of and to in is that for it as was with be by on not he this are or "
    "his from at which but have an they you were her she there been one all "
    "mail server queue deliver message header body relay domain mailbox "
    "twisted reactor deferred protocol transport latency throughput benchmark "
    "quarterly report meeting agenda attached please review comments thanks"
).split()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_tree(roots: list[int]) -> list[int]:
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            tasks = []
        for t in tasks:
            text = _read(f"/proc/{pid}/task/{t}/children")
            if text:
                todo.extend(int(x) for x in text.split())
    return seen


def cpu_ticks(pid: int) -> int:
    """utime+stime of pid plus cutime+cstime (children it has reaped)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17
    return sum(int(x) for x in fields[11:15])


def status_kb(pid: int, key: str) -> int:
    text = _read(f"/proc/{pid}/status") or ""
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


PG_DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


MAILDIR_STORE = """\
[auth]
backend = "passwd-file"
path = "users.passwd"
[mailbox]
backend = "maildir"
path = "mail"
"""


POSTGRES_STORE = """\
[auth]
backend = "postgres"
{options}
[mailbox]
backend = "postgres"
{options}
"""


def python_of(script: str) -> str:
    """The interpreter named on a console script's #! line (a venv's python)."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError:
        first = ""
    if first.startswith("#!"):
        words = first[2:].split()
        if len(words) == 1 and os.access(words[0], os.X_OK):
            return words[0]
    sibling = Path(script).parent / "python"
    return str(sibling) if sibling.exists() else sys.executable


class PgHelper:
    """A fresh schema, and the queries on it that the benchmark needs."""

    def __init__(self, python: str, dsn: str, schema: str, script: str = __file__):
        """``script`` answers ``--pg-helper`` (this module, or a script with requests of its own)."""
        self.schema = schema
        self.proc = subprocess.Popen([python, script, "--pg-helper", dsn, schema],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.call("ping")

    def call(self, op: str, **kw):
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"postgres helper: exited with status {self.proc.wait()} "
                             f"(is psycopg installed next to twistd?)")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"postgres ({op}): {answer['error']}")
        return answer["result"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def postmaster_pid(helper: PgHelper) -> int | None:
    """The local PostgreSQL postmaster (the parent of a backend), or None when
    the database runs elsewhere: its process tree is measured like the server's."""
    backend = helper.call("backend_pid")
    if (_read(f"/proc/{backend}/comm") or "").strip() != "postgres":
        return None
    m = re.search(r"^PPid:\s+(\d+)", _read(f"/proc/{backend}/status") or "", re.M)
    if not m or (_read(f"/proc/{m.group(1)}/comm") or "").strip() != "postgres":
        return None
    return int(m.group(1))


def find_command(name: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    candidates = []
    if os.environ.get("VIRTUAL_ENV"):
        candidates.append(Path(os.environ["VIRTUAL_ENV"]) / "bin" / name)
    repo = Path(__file__).resolve().parent.parent
    candidates += [Path.cwd() / ".venv/bin" / name, repo / ".venv/bin" / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"cannot find `{name}` ($VIRTUAL_ENV/bin, .venv/bin, PATH); "
                     f"run `make test` once to create .venv, or pass --{name}")


def pg_helper_main(dsn: str, schema: str, extra: dict | None = None) -> int:
    """Run by the server's Python: answer the benchmark's requests on stdin."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name=f"{schema}-bench")
    except psycopg.Error as e:
        sys.stdout.write(json.dumps({"error": " ".join(str(e).split())}) + "\n")
        return 1
    name = sql.Identifier(schema)

    def handle(req: dict):
        op = req["op"]
        if op == "ping":
            return None
        if op == "conninfo":
            # mailplat's connections name themselves after the schema.
            return make_conninfo(dsn, application_name=schema)
        if op == "backend_pid":
            return conn.info.backend_pid
        if op == "count":
            return conn.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE address = %s")
                                .format(name), (req["address"],)).fetchone()[0]
        if op == "drop":
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = %s AND pid <> pg_backend_pid()", (schema,))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
            return None
        if extra and op in extra:
            return extra[op](conn, schema, **{k: v for k, v in req.items() if k != "op"})
        raise ValueError(f"unknown request {op!r}")

    for line in sys.stdin:
        try:
            answer = {"result": handle(json.loads(line))}
        except (psycopg.Error, ValueError, KeyError) as e:
            answer = {"error": " ".join(f"{type(e).__name__}: {e}".split())}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    conn.close()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--pg-helper"]:
    sys.exit(pg_helper_main(*sys.argv[2:4]))
