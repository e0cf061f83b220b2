"""Stops a temporary Prefect API server when the process that started it dies without stopping it.

Prefect stops its temporary server at interpreter exit (`atexit`), which never runs when the
build's process is killed (SIGKILL, the OOM killer, a SIGTERM without a handler): the server
would live on, holding a port and a few hundred MB. `python -m flows.server_watch PARENT SERVER`
runs beside it and sends the server SIGTERM once PARENT is gone (this watcher is then handed to
another parent); it exits by itself once the server is gone. Imports nothing of Prefect.
"""
from __future__ import annotations

import os
import signal
import sys
import time

POLL_SECONDS = 0.5


def watch(parent: int, server: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the build's to handle
    while True:
        time.sleep(POLL_SECONDS)
        try:
            os.kill(server, 0)
        except ProcessLookupError:  # stopped (and reaped) by the build: nothing left to do
            return
        if os.getppid() != parent:  # the build's process died, and its server did not
            os.kill(server, signal.SIGTERM)
            return


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
