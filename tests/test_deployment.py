"""The path users take: a real Prefect server on loopback, the deployment served, and a run
started with `prefect deployment run build-fundusgen/build-fundusgen --watch`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from fundus_engine.synth import generate
from conftest import BIN, wait_for

ROOT = Path(__file__).resolve().parents[1]


def run_served_deployment(env: dict, serve_log: Path, *params: str) -> None:
    """`fundus-engine serve`, then `prefect deployment run ... --watch` with `params`; the run must complete."""
    with serve_log.open("w") as log:
        served = subprocess.Popen([str(BIN / "fundus-engine"), "serve"], env=env, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        prefect = str(BIN / "prefect")
        wait_for(lambda: subprocess.run([prefect, "deployment", "inspect", "build-fundusgen/build-fundusgen"],
                                        env=env, capture_output=True).returncode == 0, 120, "deployment", serve_log)
        run = subprocess.run([prefect, "deployment", "run", "build-fundusgen/build-fundusgen",
                              *(arg for param in params for arg in ("-p", param)), "--watch"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr + serve_log.read_text()[-3000:]
        assert "Completed" in run.stdout
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(30)


@pytest.mark.slow
def test_served_deployment_runs_and_writes_the_dataset(prefect_server, tmp_path):
    env = prefect_server
    source, out = tmp_path / "input", tmp_path / "output"
    generate(source, 6, seed=321)
    (source / "images" / "broken.png").write_bytes(b"\x89PNG not really")

    run_served_deployment(env, tmp_path / "serve.log", f"input_dir={source}", f"output_dir={out}")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 6
    assert manifest["rejects_per_stage"] == {"ingest": 1}
    records = ds.dataset(out / "dataset", format="parquet").to_table()
    assert records.num_rows == manifest["records"] >= 6 * 6  # at least one record per task per image
    assert set(records.column("task").to_pylist()) >= {
        "disease_diagnosis", "severity_grading", "region_identification", "region_detection",
        "report_generation", "grounded_report", "cognitive_chain", "multi_turn", "finding_presence"}
    rejects = ds.dataset(out / "rejects.parquet").to_table().to_pylist()
    assert [Path(r["item"]).name for r in rejects] == ["broken.png"] and rejects[0]["stage"] == "ingest"

    # The run's artifacts are on the server, where users inspect them.
    code = ("import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_='fundusgen-')))\n"
            "        print(json.dumps(sorted({a.key for a in arts})))\n"
            "asyncio.run(main())\n")
    keys = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert {"fundusgen-summary", "fundusgen-ingest", "fundusgen-detect", "fundusgen-crop", "fundusgen-expand",
            "fundusgen-chain", "fundusgen-rejects"} <= set(keys)


@pytest.mark.slow
def test_a_deployment_run_can_ask_for_a_dask_cluster_in_its_config(prefect_server, tmp_path):
    """`-p config='{"runner": {"kind": "dask", "address": ...}}'`: the served flow runs the build as a
    subflow on that Dask cluster (a real scheduler and two worker processes, started here without
    PREFECT_API_URL: the task runs reach the server through the settings Prefect sends with them)."""
    from test_runners import dask_cluster

    env = prefect_server
    source, out = tmp_path / "input", tmp_path / "output"
    generate(source, 4, seed=322, size=256)
    serve_log = tmp_path / "serve.log"
    with dask_cluster(tmp_path / "dask", env=env) as address:
        config = json.dumps({"shard_size": 2, "runner": {"kind": "dask", "address": address}})
        run_served_deployment(env, serve_log, f"input_dir={source}", f"output_dir={out}", f"config={config}")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 4 and manifest["complete"] and manifest["config"]["runner"]["kind"] == "dask"
    assert manifest["stages"]["detect"] == {**manifest["stages"]["detect"], "shards": 2, "computed": 2}
    assert ds.dataset(out / "dataset", format="parquet").to_table().num_rows == manifest["records"] > 0
    assert "running the build on the dask runner" in serve_log.read_text()

    code = ("import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterId\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        [sub] = await c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_='-on-dask')))\n"
            "        tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub.id])))\n"
            "        print(json.dumps({'subflow': sub.state.type.value, 'parent': bool(sub.parent_task_run_id),\n"
            "                          'tasks': sorted((t.name, t.state.type.value) for t in tasks)}))\n"
            "asyncio.run(main())\n")
    seen = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert seen["subflow"] == "COMPLETED" and seen["parent"]
    expected = sorted([[f"{stage}-{n:05d}", "COMPLETED"] for stage in ("ingest", "detect", "crop", "expand", "chain")
                       for n in range(2)] + [["write", "COMPLETED"]])
    assert seen["tasks"] == expected
