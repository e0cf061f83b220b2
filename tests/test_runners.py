"""The same build on every task runner: Prefect's thread pool, a real Dask cluster (a `dask scheduler`
and two `dask worker` processes on loopback, started here) and a local Ray cluster give the same
records; the detector loads once per worker process; a worker killed mid-shard costs nothing; and
the runner is in no stage's cache key."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.build_fundusgen import build_fundusgen
from flows.runners import detect_resources, runs_on, task_runner_for
from fundus_engine.config import BuildConfig, DetectConfig, RunnerConfig
from fundus_engine.runner import RunContext, plan_build, stage_key
from fundus_engine.stages import STAGES
from fundus_engine.synth import generate
from conftest import BIN, free_port, wait_for

SHARD_SIZE = 2  # 6 images in 3 shards: more shards than the 2 workers


@contextlib.contextmanager
def dask_cluster(workdir: Path, workers: int = 2, env: dict | None = None):
    """`dask scheduler` and `workers` x `dask worker --nworkers 1 --nthreads 1` on 127.0.0.1, each in
    its own session, stopped however the test ends; yields the scheduler's address. The workers get
    no PREFECT_API_URL: Prefect sends its settings with every task (the flow's API included)."""
    from distributed import Client

    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in (env or os.environ).items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    procs: list[subprocess.Popen] = []
    log = workdir / "dask.log"

    def start(*args: str) -> subprocess.Popen:
        with log.open("a") as out:
            procs.append(subprocess.Popen([str(BIN / "dask"), *args], env=env, cwd=workdir, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    def listening(scheduler: subprocess.Popen, port: int) -> bool:
        deadline = time.monotonic() + 60
        while scheduler.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            time.sleep(0.2)
        return False

    try:
        for attempt in range(3):  # the free port may be taken before the scheduler binds it
            port = free_port()
            if listening(start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"), port):
                break
        else:
            raise TimeoutError(f"dask scheduler did not start\n{log.read_text()[-3000:]}")
        address = f"tcp://127.0.0.1:{port}"
        for n in range(workers):
            start("worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                  "--name", f"worker-{n}", "--local-directory", str(workdir / f"worker-{n}"))

        def ready() -> bool:
            with Client(address, timeout=5) as client:
                return len(client.scheduler_info()["workers"]) == workers

        wait_for(ready, 120, "dask cluster", log)
        yield address
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def dask_client(address: str):
    from distributed import Client

    with Client(address, timeout=10) as client:
        yield client


def records(out: Path) -> dict[str, dict]:
    """Every column of every dataset row, by record id, the output folder's own path taken out."""
    rows = pq.read_table(sorted((out / "dataset").glob("*.parquet"))).to_pylist()
    ids = [r["record_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a record written twice"
    root = str(out.resolve())

    def plain(value):
        if isinstance(value, str):
            return value.replace(root, "OUT")
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {r["record_id"]: plain(r) for r in rows}


def counts(manifest: dict) -> dict:
    """What a build produced, not how long it took or where."""
    keys = ("images", "records", "records_per_task", "records_per_split", "images_per_split", "rejects",
            "rejects_per_stage", "complete", "incomplete_shards", "benchmark", "consistency", "labels")
    return {**{k: manifest[k] for k in keys},
            "stages": {s: {k: v for k, v in row.items() if k != "seconds"} for s, row in manifest["stages"].items()}}


def build_on(runner: RunnerConfig, source: Path, out: Path) -> tuple[dict, float]:
    config = BuildConfig(shard_size=SHARD_SIZE, runner=runner)
    started = time.monotonic()
    manifest = build_fundusgen.with_options(task_runner=task_runner_for(config.runner, config.detect))(
        str(source), str(out), config)
    return manifest, time.monotonic() - started


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("input")
    generate(root, 6, seed=23, size=256)
    return root


@pytest.fixture(scope="module")
def on_threads(source, tmp_path_factory, prefect_local):
    out = tmp_path_factory.mktemp("thread") / "out"
    manifest, seconds = build_on(RunnerConfig(kind="thread", workers=2), source, out)
    print(f"thread build: {seconds:.1f} s")
    return out, manifest


@pytest.fixture(scope="module")
def dask_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask")


@pytest.fixture(scope="module")
def dask_address(dask_workdir, prefect_local):
    with dask_cluster(dask_workdir) as address:
        yield address


@pytest.fixture
def dask_log(dask_workdir) -> Path:
    """What the scheduler and workers printed."""
    return dask_workdir / "dask.log"


# ------------------------------------------------------------------------------ fast checks

def test_the_runner_is_in_no_stage_key(tmp_path):
    source = tmp_path / "in"
    generate(source, 3, seed=5, size=256)
    keys = []
    for runner in (RunnerConfig(), RunnerConfig(kind="dask", address="tcp://10.0.0.1:8786", workers=8),
                   RunnerConfig(kind="ray", workers=3)):
        ctx = RunContext.create(source, tmp_path / "out", BuildConfig(shard_size=2, runner=runner), run_id="r")
        shard = plan_build(ctx).shards[0]
        chained, upstream = [], None
        for stage in STAGES:
            upstream = stage_key(stage, ctx, shard, upstream)
            chained.append(upstream)
        keys.append(chained)
    assert keys[0] == keys[1] == keys[2]


def test_each_runner_kind_maps_to_its_prefect_task_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    threads = task_runner_for(RunnerConfig(workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and runs_on(threads, RunnerConfig(workers=3))
    local = task_runner_for(RunnerConfig(kind="dask", workers=2))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert {k: local.cluster_kwargs[k] for k in ("n_workers", "processes", "threads_per_worker", "host")} == {
        "n_workers": 2, "processes": True, "threads_per_worker": 1, "host": "127.0.0.1"}
    remote = task_runner_for(RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786" and not remote.cluster_kwargs
    ray_local = task_runner_for(RunnerConfig(kind="ray", workers=2))
    assert isinstance(ray_local, RayTaskRunner) and ray_local.init_kwargs["num_cpus"] == 2
    assert ray_local.init_kwargs["include_dashboard"] is False and ray_local.init_kwargs["address"] == "local"
    assert task_runner_for(RunnerConfig(kind="ray", address="ray://head:10001")).address == "ray://head:10001"
    # a flow run on another runner than its config names is re-run on that one (runs_on says no)
    assert not runs_on(threads, RunnerConfig(kind="dask"))
    assert not runs_on(local, RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    assert runs_on(remote, RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    assert runs_on(ThreadPoolTaskRunner(max_workers=5), RunnerConfig())  # `build --workers 5`, config says thread


def test_detect_asks_for_a_gpu_only_when_its_device_is_cuda():
    import dask
    from prefect_ray.context import RemoteOptionsContext

    for kind in ("dask", "ray"):
        runner = task_runner_for(RunnerConfig(kind=kind))
        for device in ("auto", "cpu"):
            with detect_resources(runner, DetectConfig(device=device)):
                assert dask.get_annotations() == {} and RemoteOptionsContext.get().current_remote_options == {}
    with detect_resources(task_runner_for(RunnerConfig(kind="dask")), DetectConfig(device="cuda:0")):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with detect_resources(task_runner_for(RunnerConfig(kind="ray")), DetectConfig(device="cuda")):
        assert RemoteOptionsContext.get().current_remote_options == {"num_gpus": 1}
    cpu_cluster = task_runner_for(RunnerConfig(kind="dask"), DetectConfig(device="cpu"))
    assert "resources" not in cpu_cluster.cluster_kwargs


def test_a_worker_running_other_code_than_the_flow_refuses_the_shard(tmp_path):
    from flows.runners import check_same_code, this_process

    generate(tmp_path / "in", 1, seed=5, size=256)
    ctx = RunContext.create(tmp_path / "in", tmp_path / "out", BuildConfig(), run_id="r")
    check_same_code("crop", ctx, "flow-host:1")  # another process, same code: runs
    other = ctx.model_copy(update={"code_versions": {**ctx.code_versions, "crop": "0" * 64}})
    check_same_code("crop", other, this_process())  # the flow's own process: its code is the key's
    with pytest.raises(RuntimeError, match="runs other fundus-engine code for the crop stage than the flow at "
                                           "flow-host:1: install the same version on every worker"):
        check_same_code("crop", other, "flow-host:1")


def test_cli_refuses_remote_workers_without_a_server_they_can_reach(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from fundus_engine.cli import EXIT_USAGE, app

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["build", "--input", str(tmp_path), "--out", str(tmp_path / "out"),
                                          "--runner", "dask", "--address", "tcp://192.0.2.200:8786"])
        assert result.exit_code == EXIT_USAGE, result.output
        assert "cannot reach a temporary Prefect server" in result.output and "PREFECT_API_URL" in result.output
        result = CliRunner().invoke(app, ["build", "--input", str(tmp_path), "--out", str(tmp_path / "out"),
                                          "--runner", "spark"])
    assert result.exit_code == EXIT_USAGE and "'thread', 'dask' or 'ray'" in result.output


# ------------------------------------------------------------------- real clusters, loopback

def _loads_per_worker(client) -> dict[str, dict]:
    """Per worker process: its pid and how often it loaded the detector / found it loaded."""
    def probe():
        import os

        from fundus_engine import detect

        info = detect._load_model.cache_info()
        return {"pid": os.getpid(), "loads": info.misses, "reuses": info.hits}

    return client.run(probe)


@pytest.mark.slow
def test_dask_cluster_builds_the_same_records_and_loads_the_detector_once_per_worker(
        source, on_threads, dask_address, tmp_path):
    thread_out, thread_manifest = on_threads
    with dask_client(dask_address) as client:
        before = _loads_per_worker(client)
        manifest, seconds = build_on(RunnerConfig(kind="dask", address=dask_address), source, tmp_path / "out")
        after = _loads_per_worker(client)
    print(f"dask build (2 external workers): {seconds:.1f} s")
    assert records(tmp_path / "out") == records(thread_out)
    assert counts(manifest) == counts(thread_manifest)
    assert manifest["stages"]["detect"]["computed"] == 3
    # 3 detect shards on 2 worker processes: each process loads the model at most once, ever
    assert set(after) == set(before) and len(after) == 2
    assert all(w["loads"] <= 1 for w in after.values())
    assert sum(after[w]["loads"] + after[w]["reuses"] - before[w]["loads"] - before[w]["reuses"] for w in after) == 3
    assert sum(w["reuses"] for w in after.values()) >= 1  # some process ran detect on a second shard, model reused


@pytest.mark.slow
def test_ray_local_cluster_builds_the_same_records(source, on_threads, tmp_path):
    import ray

    thread_out, thread_manifest = on_threads
    try:
        manifest, seconds = build_on(RunnerConfig(kind="ray", workers=2), source, tmp_path / "out")
        assert not ray.is_initialized()  # the runner started the local cluster, and stopped it
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(f"ray build (local cluster, 2 CPUs): {seconds:.1f} s")
    assert records(tmp_path / "out") == records(thread_out)
    assert counts(manifest) == counts(thread_manifest)


SLOW_DETECT = """
import os, time
from pathlib import Path
from fundus_engine import stages

stages.original_detect_run = _run = stages.Detect.run

def run(self, ctx, shard, inputs):
    Path(MARKS, f"{os.getpid()}-{shard.number}").touch()  # this process is inside a detect shard now
    time.sleep(3)
    return _run(self, ctx, shard, inputs)

stages.Detect.run = run
"""
FAST_DETECT = """
from fundus_engine import stages

stages.Detect.run = getattr(stages, "original_detect_run", stages.Detect.run)
"""


@pytest.mark.slow
def test_a_dask_worker_killed_mid_shard_costs_nothing(source, on_threads, dask_address, tmp_path):
    """SIGKILL one worker process inside a detect shard: Dask reruns that shard-stage on a live worker
    (the nanny restarts the dead one), the build finishes with the same records, and every
    shard-stage has one completion record and one set of files. Results that lived in the dead
    worker's memory (an earlier shard-stage's completion) are recomputed by Dask too, and find
    their completion record on disk: reused, not written again."""
    thread_out, thread_manifest = on_threads
    marks = tmp_path / "marks"
    marks.mkdir()
    killed: list[int] = []
    with dask_client(dask_address) as client:
        client.run(exec, SLOW_DETECT, {"MARKS": str(marks), "__name__": "slow_detect"})
        try:
            manifest, seconds = _kill_one_during_a_build(client, marks, killed, source, tmp_path / "out")
        finally:
            client.run(exec, FAST_DETECT, {"__name__": "fast_detect"})
        pids = {w["pid"] for w in _loads_per_worker(client).values()}
    print(f"dask build with a worker killed: {seconds:.1f} s")
    out = tmp_path / "out"
    assert killed and killed[0] not in pids  # it died (its nanny started a new process)
    assert manifest["complete"] and records(out) == records(thread_out)
    same, expected = counts(manifest), counts(thread_manifest)
    assert {**same, "stages": None} == {**expected, "stages": None}
    for stage, row in same["stages"].items():  # computed, or found whole after a rerun
        assert row["shards"] == row["computed"] + row["cached"] == 3, (stage, row)
    for stage in ("ingest", "detect", "crop", "expand", "chain"):
        done = sorted(p.name[:5] for p in (out / "stages" / stage).glob("*.done.json"))
        assert done == ["00000", "00001", "00002"], (stage, done)
    assert not list((out / "stages").glob("*/*.tmp"))


def _kill_one_during_a_build(client, marks: Path, killed: list[int], source: Path, out: Path):
    def kill_first() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for mark in marks.iterdir():
                killed.append(int(mark.name.split("-")[0]))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first, daemon=True)
    killer.start()
    try:
        return build_on(RunnerConfig(kind="dask", address=client.scheduler.address), source, out)
    finally:
        killer.join(5)



@pytest.mark.slow
def test_cli_build_on_a_dask_cluster_without_a_prefect_server(source, on_threads, dask_address, dask_log, tmp_path):
    """`fundus-engine build --runner dask --address ...` with no PREFECT_API_URL: the CLI's temporary
    Prefect server is the one the workers report to (named in the settings sent with each task)."""
    thread_out, thread_manifest = on_threads
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.run([str(BIN / "fundus-engine"), "build", "--input", str(source), "--out", str(out),
                          "--runner", "dask", "--address", dask_address, "--config", _config(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    print(f"CLI build on dask (2 external workers, temporary Prefect server): {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.stdout + run.stderr
    assert records(out) == records(thread_out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert counts(manifest) == counts(thread_manifest)
    assert manifest["config"]["runner"] == {"kind": "dask", "address": dask_address, "workers": None}
    assert "Starting temporary server" not in dask_log.read_text()  # no worker started a server of its own


def _config(tmp_path: Path) -> str:
    path = tmp_path / "build.json"
    path.write_text(json.dumps({"shard_size": SHARD_SIZE}))
    return str(path)


def _allowed_failures(dask_scheduler, n: int) -> int:
    before, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, n
    return before


@pytest.mark.slow
def test_a_shard_whose_worker_keeps_dying_is_left_for_the_next_run(source, on_threads, dask_address, tmp_path):
    """When Dask gives a shard-stage up (its workers died more often than `allowed-failures`; 0 here,
    so the first death), the build ends Incomplete naming the shards it gave up, everything else
    written, and the next run (here on threads: the runner is in no key) finishes them to the same
    records."""
    import cloudpickle

    thread_out, _ = on_threads
    marks = tmp_path / "marks"
    marks.mkdir()
    killed: list[int] = []
    out = tmp_path / "out"
    with dask_client(dask_address) as client:
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helper runs on the scheduler
        before = client.run_on_scheduler(_allowed_failures, n=0)
        client.run(exec, SLOW_DETECT, {"MARKS": str(marks), "__name__": "slow_detect"})
        try:
            manifest, _ = _kill_one_during_a_build(client, marks, killed, source, out)
        finally:
            client.run(exec, FAST_DETECT, {"__name__": "fast_detect"})
            client.run_on_scheduler(_allowed_failures, n=before)
            cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        [in_detect] = {int(m.name.split("-")[1]) for m in marks.iterdir() if m.name.startswith(f"{killed[0]}-")}
    # the shard-stage the worker was running is lost, with any other the scheduler had queued on it
    incomplete = manifest["incomplete_shards"]
    lost = incomplete["detect"]
    assert not manifest["complete"] and in_detect in lost and len(lost) < 3
    assert {stage: incomplete[stage] for stage in ("detect", "crop", "expand", "chain")} == {
        stage: lost for stage in ("detect", "crop", "expand", "chain")}
    assert set(incomplete) <= {"ingest", "detect", "crop", "expand", "chain"}
    assert set(incomplete.get("ingest", [])) <= set(lost)
    assert len({r["sha256"] for r in records(out).values()}) == SHARD_SIZE * (3 - len(lost))  # the rest written

    again, _ = build_on(RunnerConfig(kind="thread", workers=2), source, out)  # finished on another runner
    assert again["complete"] and records(out) == records(thread_out)
    assert {s: (again["stages"][s]["computed"], again["stages"][s]["cached"]) for s in ("detect", "chain")} == {
        "detect": (len(lost), 3 - len(lost)), "chain": (len(lost), 3 - len(lost))}


@pytest.mark.slow
def test_a_local_dask_cluster_leaves_glibc_its_own_trim_threshold():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which made crop twice as slow."""
    import os

    with task_runner_for(RunnerConfig(kind="dask", workers=1)) as runner:
        environ = runner.client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    assert list(environ.values()) == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}]
