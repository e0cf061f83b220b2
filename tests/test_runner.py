"""The library's shard runner without Prefect: a plain loop builds the same dataset, completion
records decide what is reused, and what a stage depends on is in its key."""
from __future__ import annotations

import json
import time

from fundus_engine.config import BuildConfig
from fundus_engine.models import InstructionRecord
from fundus_engine.runner import RunContext, finish_build, plan_build
from fundus_engine.stages import STAGES
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows
from in_memory import run_local


def _build(source, out, config=BuildConfig(shard_size=3)):
    ctx = RunContext.create(source, out, config, run_id="local-run")
    plan = plan_build(ctx)
    outcomes = run_local(ctx, plan)
    return outcomes, finish_build(ctx, plan, outcomes, time.monotonic())


def test_a_plain_loop_builds_and_reuses_by_completion_record(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    generate(source, 5, seed=41, size=256, full_labels=True)
    outcomes, manifest = _build(source, out)
    assert [s.name for s in STAGES] == ["ingest", "detect", "crop", "expand", "chain"]
    assert len(outcomes) == 10 and all(o.completion and not o.completion.reused for o in outcomes)
    assert manifest["complete"] and manifest["images"] == 5 and manifest["records"] > 0
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert len(records) == manifest["records"]
    records_done = sorted((out / "stages").glob("*/*.done.json"))
    assert len(records_done) == 10  # one completion record per shard-stage
    # where detect ran, as each shard's worker reported it (the flow's process never resolves it)
    ran_on = [json.loads(p.read_text())["ran_on"] for p in records_done if p.parent.name == "detect"]
    assert ran_on == [{"device": "cpu", "backend": ran_on[0]["backend"]}] * 2
    assert ran_on[0]["backend"] in ("torch", "onnx", "openvino") and manifest["detector"]["runs_on"] == ran_on[0]

    again, manifest2 = _build(source, out)
    assert all(o.completion.reused for o in again) and manifest2["records"] == manifest["records"]

    # a shard-stage without its record (killed before writing it) runs again, and what reads from it
    crop_record = next(p for p in records_done if p.parent.name == "crop" and p.name.startswith("00001-"))
    crop_record.unlink()
    third, manifest3 = _build(source, out)
    recomputed = sorted((o.stage, o.shard) for o in third if not o.completion.reused)
    assert recomputed == [("chain", 1), ("crop", 1), ("expand", 1)]
    assert manifest3["stages"]["crop"]["computed"] == 1 and manifest3["stages"]["crop"]["cached"] == 1
    assert [r.model_dump() for r in read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)] == \
        [r.model_dump() for r in records]


def test_a_failing_shard_stage_costs_only_its_shard(tmp_path, monkeypatch):
    source, out = tmp_path / "in", tmp_path / "out"
    generate(source, 5, seed=42, size=256, full_labels=True)
    from fundus_engine import stages

    real_run = stages.Crop.run

    def broken(self, ctx, shard, inputs):
        if shard.number == 0:
            raise RuntimeError("disk full")
        return real_run(self, ctx, shard, inputs)

    monkeypatch.setattr(stages.Crop, "run", broken)
    outcomes, manifest = _build(source, out)
    states = {(o.stage, o.shard): o.state for o in outcomes}
    assert states[("crop", 0)] == "failed" and states[("expand", 0)] == "not run"
    assert states[("chain", 1)] == "completed"
    assert not manifest["complete"] and manifest["incomplete_shards"] == {"crop": [0], "expand": [0], "chain": [0]}
    assert manifest["images"] == 2 and manifest["rejects_per_stage"] == {"crop": 1}


def test_skipping_the_localiser_where_it_can_change_nothing_leaves_every_record_as_it_was(tmp_path):
    """`crop.localise: when_needed` (the default) against `always`, on photographs where the detector
    (trusted on synthetic photographs) finds the disc and fovea: the same dataset records and the
    same anatomy apart from its provenance."""
    from fundus_engine.models import Anatomy

    source = tmp_path / "in"
    generate(source, 8, seed=23, size=384)
    built = {}
    for localise in ("when_needed", "always"):
        config = BuildConfig(shard_size=4, crop={"localise": localise})
        outcomes, manifest = _build(source, tmp_path / localise, config)
        assert manifest["complete"]
        anatomy = read_rows(sorted((tmp_path / localise / "stages" / "crop").glob("*.anatomy.parquet")), Anatomy)
        records = read_rows(sorted((tmp_path / localise / "dataset").glob("*.parquet")), InstructionRecord)
        out_dir = json.dumps(str(tmp_path / localise))[1:-1]
        built[localise] = anatomy, [json.loads(r.model_dump_json().replace(out_dir, "OUT")) for r in records]
    (lazy, lazy_records), (full, full_records) = built["when_needed"], built["always"]
    assert lazy_records == full_records and len(lazy_records) > 50
    provenance = {"disc_source", "fovea_source", "landmark_disagreement"}
    assert [a.model_dump(exclude=provenance) for a in lazy] == [a.model_dump(exclude=provenance) for a in full]
    skipped = [a for a in lazy if (a.disc_source, a.fovea_source) == ("detector", "detector")]
    assert len(skipped) >= 4 and all("localiser" in (a.disc_source or "") for a in full)
