"""Stops a temporary Prefect API server when the process that started it dies without stopping it.

Prefect stops its temporary server at interpreter exit (`atexit`), which never runs when the
build's process is killed (SIGKILL, the OOM killer, a SIGTERM without a handler): the server
would live on, holding a port and a few hundred MB. `python flows/server_watch.py PARENT SERVER`
runs beside it and stops the server once PARENT is gone (this watcher is then handed to another
parent); it exits by itself once the server is gone. The server is known by its PID and start
time, so a process that later took its PID is never touched. POSIX only (on Windows a parent's
death is not seen this way, and the watcher is not started). Imports nothing of Prefect.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import psutil

POLL_SECONDS = 0.5


def watch(parent: int, server: psutil.Process) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the build's to handle
    while True:
        time.sleep(POLL_SECONDS)
        if not server.is_running():  # stopped by the build (or its PID now another process's)
            return
        if os.getppid() != parent:  # the build's process died, and its server did not
            with contextlib.suppress(psutil.NoSuchProcess):
                server.terminate()
            return


if __name__ == "__main__":
    try:
        watched = psutil.Process(int(sys.argv[2]))
    except psutil.NoSuchProcess:  # gone already
        sys.exit(0)
    watch(int(sys.argv[1]), watched)
