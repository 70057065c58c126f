"""Run one filter's check_data once, outside mailplat, and print the outcome as JSON.

    python check_filter.py BUILDER OPTIONS_JSON MESSAGE_FILE [--spooled] [--claim-size N] [--cancel-after SECONDS] [--hold]

BUILDER is the filter's build function, e.g. mailplat.filters.spamd:build.

The filter is built from OPTIONS_JSON as mailplat would build it from a
[[filter]] table.  The message is held in memory, or with --spooled read
from its file after a header kept apart (as mailplat spools large mail).
--claim-size makes the message say it has N bytes, whatever it holds.
--cancel-after cancels the check as the filter chain's timeout does.
Prints one line, {"action", "text", "headers"}, {"verdict": null} or
{"error"}; with --hold it then keeps running until its standard input
closes, so a test can watch what the filter left behind.  What the filter
logs goes to standard error, where a test looks for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import globalLogBeginner, textFileLogObserver



from mailplat.interfaces import BackendContext, Client, SpooledMessage
from mailplat.plugins import call

PREFIX = b"X-Spooled-Apart: yes\r\n"


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("builder")
    parser.add_argument("options")
    parser.add_argument("message")
    parser.add_argument("--spooled", action="store_true")
    parser.add_argument("--claim-size", type=int)
    parser.add_argument("--cancel-after", type=float)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args(argv)

    context = BackendContext("mail.example.org", ("example.org",), os.getcwd(), os.getcwd(), reactor)
    module, _, function = args.builder.partition(":")
    build = getattr(importlib.import_module(module), function)
    checker = build(json.loads(args.options), context)
    if args.spooled:
        size = os.path.getsize(args.message) + len(PREFIX)
        message = SpooledMessage(args.message, size, "someone@remote.test", prefix=PREFIX)
    else:
        with open(args.message, "rb") as f:
            content = f.read()
        message = SpooledMessage("", len(content), "someone@remote.test", content=content)

    if args.claim_size is not None:
        message = dataclasses.replace(message, size=args.claim_size)

    client = Client("127.0.0.1", "smtp", "client.test")
    d = call(checker.check_data, client, "someone@remote.test", ("alice@example.org",), message)
    if args.cancel_after is not None:
        d.addTimeout(args.cancel_after, reactor)
    print(json.dumps(await outcome(d)), flush=True)
    if args.hold:
        await threads.deferToThread(sys.stdin.read)


async def outcome(d: defer.Deferred[Any]) -> dict[str, Any]:
    try:
        verdict = await d
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if verdict is None:
        return {"verdict": None}
    return {"action": verdict.action, "text": verdict.text, "headers": [list(h) for h in verdict.headers]}


if __name__ == "__main__":
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
