"""Shared fixtures: a real Prefect server on loopback, started and stopped by the test run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tail}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env to talk to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_COLORS": "false"}
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2).status == 200,
                 180, "Prefect server", log)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_local():
    """Prefect's local test harness (a temporary server and database) for one test module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def no_patient_key():
    """Tests expect unkeyed pseudonyms unless they set a key themselves: a key exported on the
    machine running them would change every pseudonym and split they compute."""
    saved = os.environ.pop("FUNDUS_ENGINE_PATIENT_KEY", None)
    yield
    if saved is not None:
        os.environ["FUNDUS_ENGINE_PATIENT_KEY"] = saved


@pytest.fixture(scope="session", autouse=True)
def stop_ephemeral_prefect_servers():
    """`fundus-engine build` starts Prefect's temporary server in-process (ephemeral mode), which
    Prefect stops at interpreter exit, after pytest has closed the streams its log line goes to."""
    yield
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)  # the run logs still queued go to the server before it stops
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
