"""workers = N: several processes serve the same listening sockets."""

from __future__ import annotations

import os
import re
import signal
import smtplib

from conftest import message, wait_for






def test_worker_serves_the_shared_port_and_logs_through_main(make_server):
    """With workers = 2, worker 1 accepts on the same port (shown by pausing the main process), and its events reach the main log."""
    server = make_server("workers = 2\n")
    pid = int(wait_for(lambda: re.findall(r"worker 1 started, pid (\d+)", server.log()), what="worker 1")[0])
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.sendmail("a@remote.test", ["alice@example.org"], message("from-worker"))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    names = os.listdir(server.maildir("alice@example.org") / "new")
    assert [n.split("P")[1].split("Q")[0] for n in names] == [str(pid)]
    wait_for(lambda: " delivered from=<a@remote.test>" in server.log(), what="the worker's log line in the main log")


def test_killed_worker_is_restarted(make_server):
    """A worker that dies is restarted, and mail keeps flowing meanwhile."""
    server = make_server("workers = 2\n")
    pid = int(wait_for(lambda: re.findall(r"worker 1 started, pid (\d+)", server.log()), what="worker 1")[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "worker 1 ended" in server.log(), what="the main process to notice")
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("a@remote.test", ["alice@example.org"], message("during-restart"))
    wait_for(lambda: len(re.findall(r"worker 1 started, pid (\d+)", server.log())) == 2, timeout=15, what="the restart")
    new_pid = int(re.findall(r"worker 1 started, pid (\d+)", server.log())[-1])
    assert new_pid != pid


def test_workers_stop_with_main_process(make_server):
    """Stopping the main process stops its workers too."""
    server = make_server("workers = 2\n")
    pid = int(wait_for(lambda: re.findall(r"worker 1 started, pid (\d+)", server.log()), what="worker 1")[0])
    server.stop()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, what="the worker to exit")
