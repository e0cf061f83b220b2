"""A build killed at any moment (SIGKILL, no cleanup) and started again ends with exactly the
records of an uninterrupted build: same ids and content, none twice."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fundus_engine.models import InstructionRecord
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows

CLI = [sys.executable, "-m", "fundus_engine.cli"]


def _start_build(source: Path, out: Path, config: Path | None = None) -> subprocess.Popen:
    """`fundus-engine build` in a session of its own (its Prefect server and all), with no PREFECT_API_URL."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(out.parent / "prefect")})
    options = ["--config", str(config)] if config else []
    return subprocess.Popen([*CLI, "build", "--input", str(source), "--out", str(out), "--workers", "1", *options],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _build(source: Path, out: Path, kill_when=None, timeout: float = 300, config: Path | None = None) -> int | None:
    """Run `fundus-engine build`; with `kill_when`, SIGKILL it as soon as that holds."""
    proc = _start_build(source, out, config)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"build into {out} did not finish in {timeout} s")
    return proc.returncode


def _records(out: Path) -> dict[str, str]:
    """record id -> content, with the output folder's own path taken out of the image paths."""
    rows = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    ids = [r.record_id for r in rows]
    assert len(ids) == len(set(ids)), "a record written twice"
    return {r.record_id: r.model_dump_json().replace(str(out.resolve()), "OUT") for r in rows}


def _files(out: Path, stage: str) -> int:
    return len(list((out / "stages" / stage).glob("*.parquet")))


@pytest.mark.timeout(900)
def test_killed_builds_resume_to_exactly_the_uninterrupted_records(tmp_path):
    source = tmp_path / "in"
    generate(source, 10, seed=31, size=256)
    whole = tmp_path / "whole" / "out"
    assert _build(source, whole) == 0
    expected = _records(whole)

    out = tmp_path / "killed" / "out"
    kill_points = {
        "mid-detect": lambda: _files(out, "detect") >= 1,
        "mid-chain": lambda: _files(out, "chain") >= 1,
        "mid-write": lambda: any((out / "builds").glob("*/dataset/*.parquet")),
    }
    for name, when in kill_points.items():
        assert _build(source, out, kill_when=when) is None, f"the build finished before the {name} kill"
    assert _build(source, out) == 0  # the lock of the killed runs is taken over
    got = _records(out)
    assert got.keys() == expected.keys()
    assert got == expected


def _answers_kept(out: Path) -> int:
    return len(list((out / ".cache" / "llm").rglob("*.json")))


@pytest.mark.timeout(900)
def test_a_build_killed_mid_expand_resends_no_answered_request(tmp_path):
    """With the openai backend: killed while the model server answers, the next run sends only
    what had not been answered (and kept) and ends with the uninterrupted build's records."""
    import json

    from fundus_engine.testing.openai_server import FakeOpenAIServer

    source = tmp_path / "in"
    generate(source, 6, seed=37, size=256)
    with FakeOpenAIServer(latency=0.15) as server:
        config = tmp_path / "openai.json"
        config.write_text(json.dumps({"expand": {"backend": "openai", "openai": {
            "base_url": server.base_url, "model": "fake-fundus-vl", "concurrency": 2, "max_retries": 0}}}))
        whole = tmp_path / "whole" / "out"
        assert _build(source, whole, config=config) == 0
        expected, answered_whole = _records(whole), server.count("ok")
        assert answered_whole > 8

        server.reset()
        out = tmp_path / "killed" / "out"
        assert _build(source, out, config=config, kill_when=lambda: _answers_kept(out) >= 4) is None
        kept, sent_before_kill = _answers_kept(out), server.count()
        assert kept < answered_whole and _files(out, "expand") == 0  # killed inside the expand stage
        server.reset()
        assert _build(source, out, config=config) == 0
        assert _records(out) == expected
        # Every answer kept before the kill is served from the cache; only the rest is sent again.
        assert server.count() == answered_whole - kept
        assert sent_before_kill + server.count() <= answered_whole + 2  # + at most what was in flight


def test_a_build_killed_alone_leaves_no_prefect_server_running(tmp_path):
    """Prefect stops its temporary server at exit, which a SIGKILL (or the OOM killer) skips:
    `flows.server_watch` stops it once the build's process is gone, and then ends itself."""
    import psutil

    generate(tmp_path / "in", 16, seed=5)
    proc = _start_build(tmp_path / "in", tmp_path / "out")
    try:
        deadline, started, watchers = time.monotonic() + 120, [], []
        while not (started and watchers) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            children = {c: " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children()}
            started = [c for c, line in children.items() if "uvicorn" in line]
            watchers = [c for c, line in children.items() if "server_watch" in line]
        assert len(started) == 1 and len(watchers) == 1, "the build started no Prefect server, or no watcher beside it"
        os.kill(proc.pid, signal.SIGKILL)  # the build alone, not its process group
        proc.wait()
        _, alive = psutil.wait_procs([*started, *watchers], timeout=20)
        assert not alive, f"still running after the build was killed: {[p.cmdline() for p in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_builds_run_one_after_another_in_a_process_share_one_server_and_one_watcher(tmp_path):
    """The temporary server is one per process (Prefect's), so its watcher is too."""
    script = ("import psutil\nfrom flows.runners import temporary_api\n"
              "for _ in range(3):\n    with temporary_api():\n        pass\n"
              "children = [' '.join(c.cmdline()) for c in psutil.Process().children()]\n"
              "print(sum('uvicorn' in c for c in children), sum('server_watch' in c for c in children))\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect")})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", "1"]
