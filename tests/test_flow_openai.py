"""The build-fundusgen flow with the openai backend against a real loopback model server:
what a re-run costs, what a prompt edit re-calls, what a tripped circuit breaker keeps, and
that the API key never lands in outputs, artifacts or logs."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.build_fundusgen import build_fundusgen
from fundus_engine.config import BuildConfig
from fundus_engine.prompts import PROMPTS_DIR
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows
from fundus_engine.models import InstructionRecord, Reject
from fundus_engine.testing.openai_server import FakeOpenAIServer

SECRET = "sk-fundus-test-7f3a9c1e5b2d8a4f"
KEY_ENV = "FUNDUS_TEST_MODEL_KEY"


pytestmark = pytest.mark.usefixtures("prefect_local")


def stored_bytes(path: Path) -> bytes:
    """A file's bytes, and for a Prefect result file also its payload: task results are stored as
    base64 of a pickle inside JSON, where a plain grep for the key would never find it."""
    data = path.read_bytes()
    try:
        return data + base64.b64decode(json.loads(data)["result"])
    except (ValueError, KeyError, TypeError):
        return data


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in stored_bytes(p)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("input")
    generate(root, 4, seed=5, size=384, full_labels=True)  # ground-truth boxes: no detector needed
    return root


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeOpenAIServer() as srv:
        yield srv


def config_for(server, prompts_dir=None, **openai) -> BuildConfig:
    return BuildConfig.model_validate({
        "shard_size": 2, "prompts_dir": str(prompts_dir) if prompts_dir else None,
        "expand": {"backend": "openai", "openai": {"base_url": server.base_url, "model": "fake-fundus-vl",
                                                   "api_key_env": KEY_ENV, "max_retries": 1, "timeout": 5,
                                                   "prices": {"input_per_million": 1.0, "output_per_million": 2.0},
                                                   **openai}}})


def test_reruns_cost_nothing_and_a_prompt_edit_recalls_only_its_requests(source, server, tmp_path, capfd):
    out = tmp_path / "out"
    first = build_fundusgen(str(source), str(out), config_for(server))
    usage = first["model_usage"]
    assert usage["requests"] == server.count("ok") > 4
    assert usage["cache_hits"] == 0 and usage["cost_usd"] > 0 and usage["model"] == "fake-fundus-vl"
    assert all(r.authorization == f"Bearer {SECRET}" for r in server.requests)  # the key was sent...
    records = read_rows(next((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert {r.provenance.backend for r in records} == {"openai"}

    second = build_fundusgen(str(source), str(out), config_for(server))
    assert second["model_usage"].get("requests", 0) == 0 and server.count("ok") == usage["requests"]
    assert {k: second["stages"]["expand"][k] for k in ("shards", "computed", "cached")} == {
        "shards": 2, "computed": 0, "cached": 2}

    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    region_prompt = prompts / "expand" / "openai_region.j2"
    region_prompt.write_text(region_prompt.read_text().replace("Describe its colour", "Describe its colour, border"))
    third = build_fundusgen(str(source), str(out), config_for(server, prompts))
    images = third["images"]
    assert third["model_usage"]["requests"] == usage["requests"] - images  # region requests only
    assert third["model_usage"]["cache_hits"] == images
    assert third["stages"]["ingest"]["cached"] == 2 and third["stages"]["expand"]["computed"] == 2
    prompt_ids = {p["id"]: p["version"] for p in third["prompts"]}
    assert prompt_ids["expand.openai_region"] == "1.1"

    # ...and nowhere else: not in outputs, the manifest, caches, artifacts or logs.
    assert files_holding(out, SECRET) == []
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert artifacts and all(SECRET not in json.dumps(a.model_dump(mode="json")) for a in artifacts)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert KEY_ENV in json.dumps(third["config"]) and SECRET not in json.dumps(third)


def test_a_tripped_circuit_breaker_fails_clearly_and_keeps_what_was_answered(source, server, tmp_path):
    out = tmp_path / "out"
    server.inject("server_error", times=None, match="close-up of the region")
    config = config_for(server, max_retries=0, circuit_breaker=3, concurrency=2)
    with pytest.raises(RuntimeError, match="circuit breaker open: .* consecutive failed requests"):
        build_fundusgen(str(source), str(out), config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects_per_stage"].get("expand", 0) >= 1
    assert manifest["complete"] is False and manifest["incomplete_shards"]["expand"]
    answered = len(list((out / ".cache" / "llm").rglob("*.json")))
    assert answered >= 1  # image descriptions that came back before the breaker tripped

    server.reset()
    healed = build_fundusgen(str(source), str(out), config)
    total = healed["model_usage"]["requests"] + healed["model_usage"]["cache_hits"]
    assert healed["model_usage"]["cache_hits"] == answered  # nothing answered was paid for twice
    assert server.count("ok") == total - answered
    assert healed["rejects"] == 0 and healed["records"] > 0
    assert healed["complete"] is True and healed["incomplete_shards"] == {}


def test_budget_stop_completes_the_run_and_the_next_run_finishes_the_work(source, server, tmp_path):
    out = tmp_path / "out"
    probe = build_fundusgen(str(source), str(tmp_path / "probe"), config_for(server))
    cost, requests = probe["model_usage"]["cost_usd"], probe["model_usage"]["requests"]
    server.reset()
    stopped = build_fundusgen(str(source), str(out), config_for(server, max_cost=cost / 2, concurrency=1))
    usage = stopped["model_usage"]
    assert usage["budget_stopped"] and 0 < usage["cost_usd"] <= cost / 2
    assert usage["not_sent_budget"] + usage["requests"] == requests
    assert stopped["rejects_per_stage"]["expand"] == usage["not_sent_budget"]
    # chain read the unfinished expansions: it runs again too once they are whole
    assert stopped["complete"] is False and list(stopped["incomplete_shards"]) == ["expand", "chain"]
    resumed = build_fundusgen(str(source), str(out), config_for(server))
    assert resumed["model_usage"]["requests"] == usage["not_sent_budget"]
    assert resumed["rejects"] == 0 and resumed["records"] == probe["records"] and resumed["complete"]


def test_flagged_records_are_counted_and_can_be_dropped(source, server, tmp_path):
    server.inject("contradiction", times=1, match="Describe this fundus photograph")
    kept = build_fundusgen(str(source), str(tmp_path / "kept"), config_for(server))
    assert kept["consistency"]["flagged_records"] > 0 and kept["consistency"]["dropped_records"] == 0
    assert "laterality" in kept["consistency"]["flags"]
    server.reset()
    server.inject("contradiction", times=1, match="Describe this fundus photograph")
    config = config_for(server, cache=False)
    config.expand.drop_flagged = True
    dropped = build_fundusgen(str(source), str(tmp_path / "dropped"), config)
    # the contradiction goes to whichever photograph's description reaches the server first (requests
    # go out concurrently), so each build is checked against its own flags
    flagged = dropped["consistency"]["flagged_records"]
    assert flagged > 0 and dropped["consistency"]["dropped_records"] == flagged
    assert dropped["records"] == kept["records"] - flagged


def test_a_server_that_echoes_the_key_leaves_it_in_no_output_log_artifact_or_run_state(source, server, tmp_path,
                                                                                        caplog, capfd):
    """Some servers repeat the key they were sent in an error body; a model may repeat it in its answer."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    region_requests = "close-up of the region"
    # 1. a 401 whose JSON body repeats the key, for every region request: the run completes with rejects
    server.inject("unauthorized", times=None, match=region_requests)
    refused = build_fundusgen(str(source), str(tmp_path / "refused"), config_for(server, circuit_breaker=1000))
    rejects = read_rows(tmp_path / "refused" / "rejects.parquet", Reject)
    assert refused["rejects_per_stage"]["expand"] == len(rejects) > 0
    assert all("401" in r.reason and "[REDACTED]" in r.reason for r in rejects)  # echoed, then redacted
    # 2. 500s whose text body repeats the Authorization header trip the breaker: the task fails
    server.reset()
    server.inject("server_error", times=None, match=region_requests, echo_key=True, text_body=True)
    with pytest.raises(RuntimeError, match=r"circuit breaker open: .*last error: .*\[REDACTED\]"):
        build_fundusgen(str(source), str(tmp_path / "tripped"), config_for(server, max_retries=0, circuit_breaker=2,
                                                                             concurrency=1))
    # 3. a model that repeats the key in its answers and in an answer that fails validation
    server.reset()
    server.inject("schema_violation", times=2, match=region_requests, echo_key=True)
    server.inject("echo_key", times=None)
    echoed = build_fundusgen(str(source), str(tmp_path / "echoed"), config_for(server, concurrency=1))
    assert echoed["records"] > 0 and echoed["rejects_per_stage"]["expand"] == 1
    records = read_rows(next((tmp_path / "echoed" / "dataset").glob("*.parquet")), InstructionRecord)
    assert any("[REDACTED]" in r.model_dump_json() for r in records)
    (reject,) = read_rows(tmp_path / "echoed" / "rejects.parquet", Reject)
    assert "[REDACTED]" in reject.raw_output

    assert all(r.authorization == f"Bearer {SECRET}" for r in server.requests)  # it was sent, and echoed...
    # ...but is in no dataset, rejects.parquet, manifest, card, stage file, response or Prefect result file
    assert files_holding(tmp_path, SECRET) == []
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        runs = client.read_flow_runs(limit=200)
        ids = [r.id for r in runs]
        tasks = [t for offset in range(0, 2000, 200) for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200, offset=offset)]
        logs = [log for offset in range(0, 5000, 200) for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset)]
    assert any(a.key == "fundusgen-rejects" for a in artifacts)
    assert SECRET not in json.dumps([a.model_dump(mode="json") for a in artifacts])
    assert any("circuit breaker open" in (t.state.message or "") for t in tasks)
    states = json.dumps([{"flow": r.state.message if r.state else None} for r in runs]
                        + [{"task": t.state.message if t.state else None} for t in tasks])
    assert SECRET not in states  # the Prefect database: run and task states...
    assert logs and SECRET not in json.dumps([log.message for log in logs])  # ...and the run logs it keeps
    assert "circuit breaker open" in caplog.text and SECRET not in caplog.text  # the run's log records
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err  # and the console
