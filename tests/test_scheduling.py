"""When shard-stages run on Prefect's thread pool: each after the stage before it on its shard,
detect one shard at a time, and the stages of different shards side by side (a task waiting for
another's future used to hold a pool thread, so the stages ran one after another)."""
from __future__ import annotations

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner

from flows.build_fundusgen import build_fundusgen
from flows.scheduling import pick
from fundus_engine.config import BuildConfig
from fundus_engine.runner import STAGE_NAMES
from fundus_engine.synth import generate


def test_pick_prefers_the_latest_stage_then_the_earliest_shard_and_one_detect_at_a_time():
    ready = [("ingest", 3), ("detect", 1), ("crop", 2), ("crop", 0)]
    assert pick(ready, running=[]) == ("crop", 0)
    assert pick([("ingest", 2), ("detect", 1), ("detect", 0)], running=[]) == ("detect", 0)
    assert pick([("ingest", 2), ("detect", 1)], running=[("detect", 0)]) == ("ingest", 2)
    assert pick([("detect", 1)], running=[("detect", 0)]) is None
    assert pick([("crop", 1)], running=[("crop", 0)]) == ("crop", 1)  # only detect is one at a time
    assert pick([], running=[]) is None


@pytest.mark.usefixtures("prefect_local")
def test_shard_stages_overlap_across_shards_and_keep_their_order_within_one(tmp_path):
    generate(tmp_path / "in", 12, seed=5, size=384)
    pooled = build_fundusgen.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    state = pooled(str(tmp_path / "in"), str(tmp_path / "out"), BuildConfig(shard_size=3), return_state=True)
    assert state.is_completed() and state.result()["images"] == 12
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])), limit=200)
    spans = {}
    for run in runs:
        if run.name != "write":
            stage, shard = run.name.rsplit("-", 1)
            spans[stage, int(shard)] = (run.start_time, run.end_time)
    assert len(spans) == 4 * len(STAGE_NAMES)

    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    for shard in range(4):  # on one shard, each stage starts once the one before it has ended
        for before, after in zip(STAGE_NAMES, STAGE_NAMES[1:]):
            assert spans[after, shard][0] >= spans[before, shard][1], (before, after, shard)
    detects = [spans["detect", n] for n in range(4)]
    assert not any(overlap(a, b) for i, a in enumerate(detects) for b in detects[i + 1:])
    beside_detect = {(stage, n) for (stage, n), span in spans.items() if stage != "detect"
                     for m, d in enumerate(detects) if m != n and overlap(span, d)}
    assert {stage for stage, _ in beside_detect} & {"ingest", "crop"}, spans  # other shards' work ran beside detect
