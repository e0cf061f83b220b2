"""Prefect task runners for `config.runner`: thread (Prefect's thread pool), dask (prefect-dask) or
ray (prefect-ray). The runner decides where shard-stages run, never what they produce: it is in
no stage's cache key. prefect-dask and prefect-ray are imported only when asked for (the `scale`
extra installs them).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import subprocess
import sys
from typing import Iterator
from urllib.parse import urlsplit

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import server_watch
from fundus_engine.config import DetectConfig, RunnerConfig
from fundus_engine.runner import RunContext, code_version

KINDS = ("ThreadPoolTaskRunner", "DaskTaskRunner", "RayTaskRunner")
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # a local Ray cluster's shared memory: tasks pass paths, not images


def task_runner_for(runner: RunnerConfig, detect: DetectConfig | None = None) -> TaskRunner:
    """The task runner `runner` names: a local cluster started (and stopped) for the run, or an
    existing one at `runner.address`."""
    workers = runner.workers or os.cpu_count() or 2
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        import dask

        # Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then returns every
        # freed block at once, and each photograph's working copies (tens of MB, made and freed per
        # image) are faulted in afresh; crop ran twice as slow. Local workers keep glibc's default.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
        cluster = {"n_workers": workers, "processes": True, "threads_per_worker": 1,
                   "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
        if detect is not None and gpu_detect(detect):
            cluster["resources"] = {"GPU": 1}  # each local worker may run one detect at a time on the GPU
        return DaskTaskRunner(cluster_kwargs=cluster)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines: no usage report
    if runner.address:
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=runner.address)
    from flows.ray_runner import LocalRayTaskRunner

    return LocalRayTaskRunner(init_kwargs={"address": "local", "num_cpus": workers, "include_dashboard": False,
                                           "object_store_memory": RAY_OBJECT_STORE_BYTES, "log_to_driver": False})


def runs_on(task_runner: TaskRunner, runner: RunnerConfig) -> bool:
    """Whether `task_runner` (the flow run's) is the kind, cluster and size `runner` asks for."""
    kind = _kind(task_runner)
    if runner.kind == "thread":
        return isinstance(task_runner, ThreadPoolTaskRunner) and (
            runner.workers is None or getattr(task_runner, "_max_workers", None) == runner.workers)
    if runner.kind == "dask":
        if kind != "DaskTaskRunner":
            return False
        if runner.address:
            return task_runner.address == runner.address
        return runner.workers is None or task_runner.cluster_kwargs.get("n_workers") == runner.workers
    if kind != "RayTaskRunner":
        return False
    if runner.address:
        return task_runner.address == runner.address
    return runner.workers is None or task_runner.init_kwargs.get("num_cpus") == runner.workers


def _kind(task_runner: TaskRunner) -> str | None:
    """The runner's family, by class name (prefect-dask and prefect-ray stay unimported until used)."""
    return next((c.__name__ for c in type(task_runner).__mro__ if c.__name__ in KINDS), None)


def gpu_detect(detect: DetectConfig) -> bool:
    """The detect stage asks the cluster for a GPU only when its device names one explicitly."""
    return detect.device.startswith("cuda")


@contextlib.contextmanager
def detect_resources(task_runner: TaskRunner, detect: DetectConfig) -> Iterator[None]:
    """Around the submission of a detect shard-stage: with a CUDA device, the task asks for one GPU
    (Dask: the worker resource `GPU`, `dask worker --resources GPU=1`; Ray: `num_gpus=1`), so GPU
    workers take detect and the other stages run anywhere. On the CPU it asks for nothing."""
    if not gpu_detect(detect):
        yield
    elif _kind(task_runner) == "DaskTaskRunner":
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    elif _kind(task_runner) == "RayTaskRunner":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
    else:
        yield


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def _code_version_here(stage: str) -> str:
    return code_version(stage)


def check_same_code(stage: str, ctx: RunContext, submitted_from: str) -> None:
    """A worker process other than the flow's must run the code the flow keyed the stage by (a worker
    with another version of fundus-engine would write its results under this version's key)."""
    if submitted_from == this_process():
        return
    if _code_version_here(stage) != ctx.code_versions[stage]:
        raise RuntimeError(f"worker {this_process()} runs other fundus-engine code for the {stage} stage than "
                           f"the flow at {submitted_from}: install the same version on every worker and "
                           "restart the workers")


def check_api_reachable(address: str | None) -> None:
    """Workers on other machines report their task runs to the flow's Prefect API: a temporary server
    on this machine's loopback is out of their reach."""
    host = urlsplit(address if "://" in (address or "") else f"//{address}").hostname if address else None
    if host and host not in ("localhost", "127.0.0.1", "::1", "auto") and not PREFECT_API_URL.value():
        raise ValueError(f"the workers of {address} cannot reach a temporary Prefect server on this machine's "
                         "loopback: start one they can reach (`prefect server start --host 0.0.0.0`) and set "
                         "PREFECT_API_URL=http://THIS-HOST:4200/api")


@contextlib.contextmanager
def temporary_api():
    """The Prefect API of a build run from the command line: PREFECT_API_URL's server, else a
    temporary local one started here and named in the settings the task runs receive (worker
    processes too: else each would start a temporary server of its own). Prefect stops it at exit;
    `flows.server_watch` stops it if this process is killed first."""
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # one per process: a second build here reuses it, and its watcher
    started_here = not server.running
    server.start()
    if started_here and sys.platform != "win32":
        watcher = subprocess.Popen([sys.executable, server_watch.__file__, str(os.getpid()),
                                    str(server.server_process.pid)])
        atexit.register(_stop_watcher, watcher)  # runs before Prefect's stop of the server, registered earlier
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _stop_watcher(watcher: subprocess.Popen) -> None:
    watcher.terminate()
    watcher.wait()
