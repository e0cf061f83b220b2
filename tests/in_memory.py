"""Whole-list forms of the end-of-run writers, for tests: the library streams a build shard by
shard (`write.DatasetWriter`, `write.RecordStats`, `card.BoxStats`, `evidence.DomainReport`);
these feed them a list at once, as a hand-made case or a small build has it. And `run_local`, a
plain loop over shards and stages in this process, for tests of what the stages write (the flow's
scheduling is tested in tests/test_scheduling.py)."""
from __future__ import annotations

from pathlib import Path

from fundus_engine.card import BoxStats, render_card
from fundus_engine.config import WriteConfig
from fundus_engine.evidence import DetectorEvidence, DomainReport
from fundus_engine.models import Anatomy, ImageRecord, InstructionRecord, Region, Reject
from fundus_engine.tables import table_of
from fundus_engine.runner import STAGE_NAMES, Completion, Plan, RunContext, StageOutcome, run_shard_stage
from fundus_engine.stages import STAGES
from fundus_engine.write import DatasetWriter, RecordStats


def record_stats(records: list[InstructionRecord]) -> RecordStats:
    stats = RecordStats()
    stats.add_rows((r.sha256, r.task, r.split, r.language, r.diagnosis) for r in records)
    return stats


def write_dataset(records: list[InstructionRecord], build_dir: Path, config: WriteConfig) -> dict[str, list[str]]:
    writer = DatasetWriter(build_dir, config, len(records))
    writer.add(table_of(records, InstructionRecord))
    return writer.close()


def summarise(records: list[InstructionRecord], rejects: list[Reject]) -> dict:
    return record_stats(records).summary(rejects)


def write_card(out: Path, records: list[InstructionRecord], regions: list[Region], about: dict) -> Path:
    stats, boxes = record_stats(records), BoxStats()
    boxes.add_rows((r.label, r.source, r.size_dd, r.box_999) for r in regions if r.sha256 in stats.images)
    return render_card(out, stats, boxes, about)


def domain_report(images: list[ImageRecord], anatomies: list[Anatomy], regions: list[Region],
                  evidence: DetectorEvidence) -> dict:
    report = DomainReport(evidence)
    for i in images:
        report.add_image(i.sha256, i.synthetic)
    for a in anatomies:
        report.add_anatomy(a.sha256, a.disc_source, a.fovea_source)
    for r in regions:
        report.add_region(r.sha256, r.source, r.confidence)
    return report.report()


def run_local(ctx: RunContext, plan: Plan) -> list[StageOutcome]:
    """The plain executor: every shard through every stage in this process, in order."""
    outcomes = []
    for shard in plan.shards:
        upstream: dict[str, Completion] = {}
        for stage in STAGES:
            if len(upstream) < STAGE_NAMES.index(stage.name):  # an earlier stage failed on this shard
                outcomes.append(StageOutcome(stage=stage.name, shard=shard.number, state="not run"))
                continue
            try:
                upstream[stage.name] = done = run_shard_stage(stage, ctx, shard, upstream)
                outcomes.append(StageOutcome(stage=stage.name, shard=shard.number, completion=done))
            except Exception as exc:  # one shard's failure never costs the others
                outcomes.append(StageOutcome(stage=stage.name, shard=shard.number, failure=str(exc), state="failed"))
    return outcomes
