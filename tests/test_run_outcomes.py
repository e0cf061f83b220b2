"""How a build ends, as a user sees it: exit codes, the flow run's state, and one build at a time
per output folder."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.build_fundusgen import build_fundusgen
from fundus_engine.cli import EXIT_FAILED, EXIT_INCOMPLETE, app
from fundus_engine.config import BuildConfig
from fundus_engine.publish import BuildLock
from fundus_engine.synth import generate
from fundus_engine.testing.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("prefect_local")
runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    generate(root, 4, seed=7, size=256, full_labels=True)
    return root


def test_an_unreachable_model_server_finishes_incomplete_with_its_own_state_and_exit_code(source, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("FUNDUS_OUTCOME_KEY", "sk-outcome")
    with FakeOpenAIServer() as server:
        server.inject("server_error", times=None)  # every request fails: the run ends, not whole
        config = {"shard_size": 2, "expand": {"backend": "openai", "openai": {
            "base_url": server.base_url, "api_key_env": "FUNDUS_OUTCOME_KEY", "max_retries": 0, "timeout": 5,
            "circuit_breaker": 100}}}
        state = build_fundusgen(str(source), str(tmp_path / "flow"), BuildConfig.model_validate(config),
                                return_state=True)
        assert state.is_completed() and state.name == "Incomplete"
        assert "re-run the same build to finish" in state.message and state.result()["complete"] is False

        path = tmp_path / "build.json"
        path.write_text(json.dumps(config))
        result = runner.invoke(app, ["build", "--input", str(source), "--out", str(tmp_path / "cli"),
                                     "--config", str(path)])
    assert result.exit_code == EXIT_INCOMPLETE, result.output
    assert "incomplete:" in result.output and "Re-run the same command to finish them" in result.output


def test_a_second_build_into_a_locked_folder_stops_at_once_naming_the_first(source, tmp_path):
    out = tmp_path / "out"
    with BuildLock(out, run="the-first-build"):
        result = runner.invoke(app, ["build", "--input", str(source), "--out", str(out)])
    assert result.exit_code == EXIT_FAILED
    assert "another build is writing here (run the-first-build" in " ".join(result.output.split())
    assert not (out / "dataset").exists()  # it wrote nothing
    result = runner.invoke(app, ["build", "--input", str(source), "--out", str(out)])  # the lock is free again
    assert result.exit_code == 0, result.output
    assert (out / "dataset").is_symlink() and json.loads((out / "manifest.json").read_text())["complete"]
    # not on a terminal: a plain line per finished stage; Prefect's log lines went to a file
    assert "chain: 1 shard done (0 cached), 4 images computed, 0 rejects" in result.output  # shard_size 64
    assert "Finished in state" not in result.output
    assert "Finished in state Completed()" in (out / "logs" / "build.log").read_text()


def test_progress_counts_shards_images_and_rejects_per_stage(tmp_path):
    from fundus_engine.progress import BuildProgress, read_progress

    progress = BuildProgress.start(tmp_path, ("ingest", "detect"), {0: 64, 1: 64, 2: 10})
    progress.started -= 10  # ten seconds into the build
    assert progress.finished("ingest", 1, rejects=2, cached=True).startswith("ingest: 1/3 shards (1 cached), - images/s")
    line = progress.finished("ingest", 0, rejects=1, cached=False)
    assert line.startswith("ingest: 2/3 shards (1 cached), 6.") and line.endswith(", 3 rejects")  # 64 images / ~10 s
    assert "ETA 7 s" in line or "ETA 8 s" in line  # 46 images left at ~6.4 images/s
    saved = read_progress(tmp_path)
    assert saved["images"] == 138 and saved["stages"]["ingest"]["done"] == 2 and saved["stages"]["detect"]["done"] == 0
